"""Seconds per training step against a huge catalogue: how the item table is updated decides the epoch time.

    python benchmarks/item_table_step.py --items 1000000 --steps 20 --json

SASRec (hidden 64, 2 blocks, window 50, batch 32, loss bce) on random sequences over N items, one process:
``id_dense`` (Adam over the whole ID table, the default), ``id_sparse`` (train.sparse_items: sparse gradients +
SparseAdam), ``title_batch`` (title vectors through the projection, only the batch's items; frozen titles) and
``title_table`` (the same, projecting the whole title table each step: what bce did before). Prints one JSON line
``{"items", "threads", "seconds_per_step": {variant: s}}``.
"""

from __future__ import annotations

import argparse
import sys
import time

from _results import emit


def _step(name: str, model, opt, items, num_items: int) -> None:
    import torch
    import torch.nn.functional as F

    if name == "title_table":  # the former path: every step projects the whole title table
        table = model.items.table()
        inputs, targets = items[:, :-1], items[:, 1:]
        states, _ = model.encode(inputs, None, None, table)
        rep = states.reshape(-1, states.shape[-1])
        tgt = targets.reshape(-1)
        neg = torch.randint(1, num_items + 1, tgt.shape)
        pos, negl = (rep * table[tgt]).sum(-1), (rep * table[neg]).sum(-1)
        loss = F.binary_cross_entropy_with_logits(torch.cat([pos, negl]),
                                                  torch.cat([torch.ones_like(pos), torch.zeros_like(negl)]))
    else:
        loss = model.loss(items, loss_type="bce")
    opt.zero_grad()
    loss.backward()
    opt.step()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)

    import torch

    from lane_ray.models import ModelConfig, SequentialRecommender
    from lane_ray.train.loop import make_optimizer

    torch.set_num_threads(args.threads)
    N, B, L = args.items, 32, 50
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(1, N + 1, (B, L + 1), generator=g) for _ in range(args.steps + 2)]
    titles = torch.randn(N + 1, 384, generator=g)
    out: dict[str, float] = {}
    for name in ("id_dense", "id_sparse", "title_batch", "title_table"):
        mode = "title" if name.startswith("title") else "id"
        cfg = ModelConfig(num_items=N, item_mode=mode, hidden=64, layers=2, max_len=L, dropout=0.2,
                          sparse_items=name == "id_sparse")
        torch.manual_seed(0)
        model = SequentialRecommender(cfg, titles if mode == "title" else None).train()
        opt = make_optimizer(model, 1e-3)

        for b in batches[:2]:  # warm-up (allocations, Adam state)
            _step(name, model, opt, b, N)
        t0 = time.perf_counter()
        for b in batches[2:]:
            _step(name, model, opt, b, N)
        out[name] = round((time.perf_counter() - t0) / args.steps, 4)
        del model, opt
    return emit({"items": N, "threads": args.threads, "batch": B, "window": L, "seconds_per_step": out})


if __name__ == "__main__":
    sys.exit(main())
