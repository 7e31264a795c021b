"""Running a trainer (``vladva-train`` or open_clip_train's own ``main``) to its final checkpoint, for the demo."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path


def run_to_final_checkpoint(main: Callable[..., int | None], argv: list[str], logs: str | Path, name: str,
                            epochs: int, what: str, **main_kwargs) -> Path:
    """Run ``main(argv, **main_kwargs)`` (whose ``--logs``/``--name`` are ``logs``/``name``) in a fresh ``logs/name``
    and return ``checkpoints/epoch_{epochs}.pt``.

    Raises:
        RuntimeError: the trainer returned an error code or wrote no final checkpoint (names ``what`` and its log).
    """
    run_dir = Path(logs) / name
    if run_dir.exists():  # open_clip_train refuses to reuse an experiment name
        shutil.rmtree(run_dir)
    rc = main(argv, **main_kwargs)
    ckpt = run_dir / "checkpoints" / f"epoch_{epochs}.pt"
    if rc not in (None, 0) or not ckpt.is_file():
        raise RuntimeError(f"{what} failed (return code {rc}); see {run_dir / 'out.log'}")
    return ckpt
