"""Training checkpoints on disk: atomic writes, health marks, leftover temp files, and what ``--resume latest``
picks.

A checkpoint is *unusable* for resuming when
- it cannot be read (truncated by a full disk or a cut copy): :func:`find_resume_checkpoint` warns and falls back
  to the previous one;
- it was saved while a streak of non-finite steps was in progress (recorded in the checkpoint under
  :data:`HEALTH_KEY`);
- the run later found its weights bad: a streak that began right after it was saved (no finite step in between)
  hit ``--max-nonfinite-steps``. Such weights are finite but blown up, and every loss from them is NaN. This is
  only known after the save, so it is recorded in a sidecar ``<checkpoint>.bad.json`` that also holds the
  checkpoint's size and mtime: a checkpoint written again under the same name is not affected by an old mark.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_logger = logging.getLogger(__name__)

HEALTH_KEY = "vladva_health"  # {"nonfinite_in_a_row": int, "skipped_steps": int} inside a checkpoint dict
BAD_SUFFIX = ".bad.json"
TMP_INFIX = ".tmp-"
STALE_TEMP_SECONDS = 3600.0  # a writer rewrites its temp file continuously; one untouched this long is abandoned

_STEP_NAME = re.compile(r"^epoch_(\d+)_step_(\d+)\.pt$")
_EPOCH_NAME = re.compile(r"^epoch_(\d+)\.pt$")
_TEMP_NAME = re.compile(r"^.+\.pt" + re.escape(TMP_INFIX) + r"(\d+)$")
# what torch.load(weights_only=True) raises for a truncated, foreign or tampered file
UNREADABLE_ERRORS = (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile)


def temp_path(path: str | os.PathLike) -> str:
    return f"{os.fspath(path)}{TMP_INFIX}{os.getpid()}"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same directory, then rename: a crash never leaves a torn file. A mark
    of unusability left for an older file of the same name is removed."""
    path = os.fspath(path)
    tmp = temp_path(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    clear_unusable(path)


# ---- health marks --------------------------------------------------------------------------------------------
def _identity(path: str | os.PathLike) -> dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def mark_unusable(path: str | os.PathLike, reason: str) -> None:
    """Record that the checkpoint at ``path`` must not be resumed from (sidecar, written atomically)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return
    sidecar = path + BAD_SUFFIX
    tmp = temp_path(sidecar)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"reason": reason, "checkpoint": _identity(path)}, f)
    os.replace(tmp, sidecar)
    _logger.warning("marked %s unusable for resuming: %s", path, reason)


def clear_unusable(path: str | os.PathLike) -> None:
    try:
        os.remove(os.fspath(path) + BAD_SUFFIX)
    except FileNotFoundError:
        pass


def unusable_reason(path: str | os.PathLike) -> str | None:
    """The sidecar's reason if it applies to the file now at ``path`` (same size and mtime), else None."""
    sidecar = os.fspath(path) + BAD_SUFFIX
    try:
        with open(sidecar, encoding="utf-8") as f:
            mark = json.load(f)
        same_file = mark.get("checkpoint") == _identity(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:  # an unreadable mark: be safe, treat the checkpoint as marked
        return f"unreadable mark {sidecar} ({err})"
    return str(mark.get("reason", "marked unusable")) if same_file else None


def health_record(nonfinite_in_a_row: int, skipped_steps: int) -> dict[str, int]:
    return {"nonfinite_in_a_row": int(nonfinite_in_a_row), "skipped_steps": int(skipped_steps)}


# ---- leftover temp files -------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:
        return False
    return True


def clean_stale_temp_files(directory: str | os.PathLike, stale_after: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove ``*.pt.tmp-<pid>`` files that a killed save left behind; returns what was removed.

    A file is removed when process ``pid`` is not alive on this machine, or when the file has not been written to
    for ``stale_after`` seconds (its writer may run on another machine of a shared file system, whose pid this
    machine cannot check). A live writer's file is never touched.
    """
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    now = time.time()
    for path in directory.iterdir():
        match = _TEMP_NAME.match(path.name)
        if not match or not path.is_file():
            continue
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if _pid_alive(int(match.group(1))) and age < stale_after:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    if removed:
        _logger.warning("removed %d temporary file(s) left by an interrupted save in %s: %s", len(removed),
                        directory, ", ".join(p.name for p in removed))
    return removed


# ---- what --resume latest picks ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Candidate:
    path: Path
    progress: tuple[int, int]  # (epoch, optimizer step within it): epoch_E.pt is (E, 0)
    named: bool  # progress read from the file name (epoch_latest.pt and others are read from the contents)


def _progress_from_name(name: str) -> tuple[int, int] | None:
    if m := _STEP_NAME.match(name):
        return int(m.group(1)), int(m.group(2))
    if m := _EPOCH_NAME.match(name):
        return int(m.group(1)), 0
    return None


def safe_pt_load(path: str, map_location: Any = None) -> Any:
    """open_clip_train's ``pt_load`` (local or fsspec URL) with ``weights_only=True`` passed explicitly: an explicit
    argument wins over ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, so a pickle payload in a checkpoint never runs."""
    import fsspec

    with fsspec.open(path, "rb") as f:
        return torch.load(f, map_location=map_location, weights_only=True)


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict with tensors memory-mapped (cheap: nothing but the pickle is read). Raises on a file
    that is not a complete checkpoint, e.g. a truncated one (its zip directory, at the end, is missing)."""
    ckpt = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "epoch" not in ckpt:
        raise ValueError("not a training checkpoint (no 'epoch' and 'state_dict')")
    return ckpt


def _why_unusable(path: Path, ckpt: dict[str, Any]) -> str | None:
    streak = int((ckpt.get(HEALTH_KEY) or {}).get("nonfinite_in_a_row", 0))
    if streak:
        return f"saved while non-finite steps were in progress ({streak} in a row)"
    return unusable_reason(path)


def find_resume_checkpoint(directory: str | os.PathLike, accum_freq: int = 1) -> str | None:
    """The checkpoint ``--resume latest`` should continue from: the most advanced one (epoch, then step) that is
    readable and not marked unusable; None when there is none. Leftover temp files are cleaned up first, and every
    checkpoint passed over is named in a warning."""
    directory = Path(directory)
    clean_stale_temp_files(directory)
    if not directory.is_dir():
        return None
    candidates, loaded = [], {}
    for path in sorted(directory.glob("*.pt")):
        progress = _progress_from_name(path.name)
        if progress is None:  # epoch_latest.pt (--save-most-recent) and the like: ask the contents
            try:
                ckpt = loaded[path] = read_checkpoint_meta(path)
            except UNREADABLE_ERRORS as err:
                _logger.warning("not resuming from %s: unreadable (%s: %s)", path, type(err).__name__, err)
                continue
            batches = int(ckpt.get("batches_done", 0))
            progress = (int(ckpt["epoch"]), batches // max(1, accum_freq))
        candidates.append(_Candidate(path, progress, named=path not in loaded))
    # newest first; of equal progress, a file named by its progress before epoch_latest.pt (same contents)
    candidates.sort(key=lambda c: (c.progress, c.named), reverse=True)
    for cand in candidates:
        try:
            ckpt = loaded.get(cand.path) or read_checkpoint_meta(cand.path)
        except UNREADABLE_ERRORS as err:
            _logger.warning("checkpoint %s is unreadable (%s: %s), probably truncated; falling back to the "
                            "previous checkpoint", cand.path, type(err).__name__, err)
            continue
        reason = _why_unusable(cand.path, ckpt)
        if reason:
            _logger.warning("not resuming from %s: %s; falling back to the previous checkpoint", cand.path,
                            reason)
            continue
        return str(cand.path)
    return None
