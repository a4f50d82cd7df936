"""The transformers backend's decoding loop (lane_ray/llm/decoding.py) against ``model.generate`` as the
reference, on the packaged SmolLM2 in float32 (bf16 rounding differs between batch shapes, so only float32
makes greedy outputs comparable token for token), and what the loop saves: forced runs fed in one pass,
finished rows leaving the batch, the shared prompt prefix computed once."""

from __future__ import annotations

import pytest

from lane_ray.llm.backend import Choice, FreeText, GenerationParams, Template, Text

pytestmark = pytest.mark.integration

CONVERSATIONS = [[{"role": "user", "content": c}] for c in (
    "Name three good movies from the 1990s and say why.",
    "Reply with a short JSON object about cats.",
    "What is your favourite drama? Be brief, please, and kind to the people who made it.",
)]
LETTERS = "abcdefghijklmnopqrstuvwxyz "
GENRES = ("Drama", "Comedy", "Sci-Fi")
TEMPLATE = Template((Choice(GENRES), Text(" movies about"), FreeText(2, 6, LETTERS), Text('", "'),
                     Choice(GENRES, distinct=True), Text(" movies with"), FreeText(2, 6, LETTERS), Text('"]}')))
PREFILL = '{"p": ["'


@pytest.fixture(scope="module")
def llm32():
    torch = pytest.importorskip("torch")
    from lane_ray.llm.transformers_backend import LLMNotFoundError, TransformersBackend

    threads = torch.get_num_threads()
    try:
        yield TransformersBackend(num_threads=1, dtype="float32")
    except LLMNotFoundError as exc:
        pytest.skip(str(exc))
    finally:
        torch.set_num_threads(threads)


class Forwards:
    """Records the input shape of every forward pass of a model."""

    def __init__(self, model) -> None:
        self.shapes: list[tuple[int, int]] = []
        self.handle = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, mod, args, kwargs) -> None:
        self.shapes.append(tuple(kwargs["input_ids"].shape))

    def close(self) -> None:
        self.handle.remove()


def reference(llm, conversations, params: GenerationParams, constraint: Template | None) -> list[str]:
    """What ``model.generate`` writes greedily with the same template processor (left-padded batch)."""
    import torch
    from transformers import LogitsProcessorList

    from lane_ray.llm.constrained import TemplateProcessor, TokenVocabulary

    texts = [llm.render(c, PREFILL) for c in conversations]
    enc = llm.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    n = len(texts)
    procs = LogitsProcessorList([TemplateProcessor(TokenVocabulary(llm.tokenizer), [constraint] * n, n, "cpu",
                                                   params.frequency_penalty)])
    with torch.inference_mode():
        out = llm.model.generate(**enc, max_new_tokens=params.max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, logits_processor=procs,
                                 pad_token_id=llm.tokenizer.pad_token_id)
    return [llm.tokenizer.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]


@pytest.mark.parametrize("constrained", [False, True])
def test_greedy_replies_equal_generate(llm32, constrained):
    template = TEMPLATE if constrained else None
    params = GenerationParams(max_new_tokens=40, temperature=0.0, frequency_penalty=1.0 if constrained else 0.5)
    got = [g.text for g in llm32.generate(CONVERSATIONS, params, prefill=PREFILL, constraint=template)]
    assert got == reference(llm32, CONVERSATIONS, params, template)
    if constrained:
        assert all(template.matches(t) for t in got), got


def test_forced_runs_take_one_pass_and_finished_rows_leave(llm32):
    head = Text("A fixed opening sentence that the model does not choose, written by the template")
    short = Template((head, FreeText(1, 1, LETTERS), Text('"')))
    long = Template((head, FreeText(6, 6, LETTERS), Text('"')))
    params = GenerationParams(max_new_tokens=60, temperature=0.0)
    rec = Forwards(llm32.model)
    try:
        gens = llm32.generate(CONVERSATIONS[:2], params, prefill=PREFILL, constraint=[short, long])
    finally:
        rec.close()
    assert short.matches(gens[0].text) and long.matches(gens[1].text), [g.text for g in gens]
    assert gens[1].new_tokens == len(llm32.tokenizer.encode(head.text, add_special_tokens=False)) + 6 + 1
    # one pass over the prompts and the forced opening, then one per free token (the closing quote rides with
    # the last one): 1 + 1 for the short row, 1 + 6 for the long one, which goes on alone
    assert len(rec.shapes) <= 1 + 6 + 1, rec.shapes
    assert [b for b, _ in rec.shapes[-3:]] == [1, 1, 1], rec.shapes
    # a row decoded alone writes the same text as in the batch
    alone = llm32.generate(CONVERSATIONS[1:2], params, prefill=PREFILL, constraint=long)
    assert alone[0].text == gens[1].text


def test_the_shared_prefix_is_computed_once_and_kept(llm32):
    params = GenerationParams(max_new_tokens=6, temperature=0.0)
    system = {"role": "system", "content": "You answer movie questions in a few words, always politely."}
    convs = [[system, *c] for c in CONVERSATIONS]
    llm32.generate(convs[:1], params)  # the system prompt's tokens are now kept
    before = llm32.prefix_cache.reused_tokens
    rec = Forwards(llm32.model)
    try:
        llm32.generate(convs, params)
    finally:
        rec.close()
    shared = len(llm32.tokenizer.encode(llm32.render([system]), add_special_tokens=False))
    assert llm32.prefix_cache.reused_tokens - before >= shared - 2  # the system turn, less its final tokens
    prompt_tokens = sum(len(llm32.tokenizer.encode(llm32.render(c), add_special_tokens=False)) for c in convs)
    fed = sum(b * n for b, n in rec.shapes)
    assert fed < prompt_tokens, (fed, prompt_tokens)  # nothing of the shared prefix was computed again


def test_stop_strings_end_a_row(llm32):
    params = GenerationParams(max_new_tokens=40, temperature=0.0, stop=(",",))
    gens = llm32.generate(CONVERSATIONS[:1], params, prefill="Three movies: Heat,")
    assert gens[0].finish_reason == "stop" and "," in gens[0].text, gens[0].text
    assert gens[0].text.count(",") == 1


def test_grouped_attention_equals_sdpa_on_padded_multi_token_passes(llm32):
    """The backend's model runs lane_ray/llm/grouped_attention.py; a second copy on transformers' own SDPA gives
    the same logits for a left-padded prompt pass and for later passes of several tokens per row."""
    import copy

    import torch

    from lane_ray.llm.decoding import new_cache
    from lane_ray.llm.grouped_attention import NAME

    model = llm32.model
    assert llm32.grouped_attention and model.config._attn_implementation == NAME
    plain = copy.deepcopy(model)
    plain.set_attn_implementation("sdpa")
    torch.manual_seed(0)
    lengths = [9, 14, 5]
    ids = torch.randint(100, 5000, (3, 14))
    mask = torch.zeros((3, 14), dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, 14 - n:] = 1  # left padding, as the decoding loop lays rows out
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    caches = (new_cache(), new_cache())
    with torch.inference_mode():
        for step, width in enumerate((14, 4, 1, 3)):
            if step:
                ids = torch.randint(100, 5000, (3, width))
                mask = torch.cat([mask, torch.ones((3, width), dtype=torch.long)], dim=1)
                pos = pos[:, -1:] + torch.arange(1, width + 1)
            got = [m(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=c, use_cache=True).logits
                   for m, c in zip((model, plain), caches, strict=True)]
            real = mask[:, -width:].bool()  # padded positions carry no meaningful logits
            torch.testing.assert_close(got[0][real], got[1][real], rtol=1e-4, atol=1e-4)
