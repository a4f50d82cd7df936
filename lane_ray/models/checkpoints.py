"""Where a run's checkpoints are: a name under ``RUN/checkpoints`` or a path (no torch: paths only)."""

from __future__ import annotations

from pathlib import Path

from lane_ray.errors import DataError


def resolve_checkpoint(run: Path, name: str) -> Path:
    """The checkpoint directory ``name`` names: a path to one, or a directory under ``run/checkpoints``; a name
    that is neither raises, listing the run's checkpoints."""
    ckpt = Path(name) if Path(name).is_dir() else run / "checkpoints" / name
    if not ckpt.is_dir():
        have = sorted(p.name for p in (run / "checkpoints").glob("*") if p.is_dir())
        raise DataError(f"no checkpoint '{name}' (have: {', '.join(have) or 'none'}; run `lane train` first)",
                        file=ckpt)
    return ckpt


__all__ = ["resolve_checkpoint"]
