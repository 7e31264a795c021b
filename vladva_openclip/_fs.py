"""Files and directories with the permissions the user's umask asks for, for atomic writes.

``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700 entries, and safetensors' ``save_file`` (0.8) replaces its
target with a new 0600 file: right for secrets, wrong for results. Renamed into place, they would leave adapters
and caches unreadable to the rest of a group or to a serving account. These helpers create unique temporary names
with mode 0666 / 0777, which the operating system masks with the umask, and save safetensors files with the
same mode.
"""
from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["default_file_mode", "make_temp_dir", "make_temp_file", "save_safetensors", "write_atomically"]

_UMASK_LOCK = threading.Lock()

_ATTEMPTS = 100


def _candidates(parent: Path, prefix: str, suffix: str):
    for _ in range(_ATTEMPTS):
        yield parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
    raise FileExistsError(f"no unused temporary name {prefix}*{suffix} in {parent}")


def make_temp_file(parent: str | os.PathLike, prefix: str = ".", suffix: str = ".tmp") -> Path:
    """Create (exclusively) and return an empty file with a unique name in ``parent``, mode ``0666 & ~umask``."""
    for path in _candidates(Path(parent), prefix, suffix):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path


def make_temp_dir(parent: str | os.PathLike, prefix: str = ".", suffix: str = "") -> Path:
    """Create and return a directory with a unique name in ``parent``, mode ``0777 & ~umask``."""
    for path in _candidates(Path(parent), prefix, suffix):
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore (the only portable way to read it)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """What ``open(path, "w")`` gives a new file: ``0666 & ~umask``."""
    return 0o666 & ~current_umask()


def save_safetensors(tensors: Mapping, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the file mode a normally created file gets (not safetensors' 0600)."""
    from safetensors.torch import save_file

    save_file(dict(tensors), os.fspath(path), metadata=None if metadata is None else dict(metadata))
    os.chmod(path, default_file_mode())


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object], prefix: str | None = None,
                     suffix: str = ".tmp") -> Path:
    """``write(tmp)`` to a fresh file beside ``path`` (umask permissions), then rename it into place: a reader, or a
    run that dies meanwhile, sees the old file or the new one, never half of one. ``prefix`` defaults to
    ``.<name>.``. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_file(path.parent, prefix=f".{path.name}." if prefix is None else prefix, suffix=suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
