"""Progress bars that read well both on a terminal and in a log file; every bar in the project comes from here.

On a terminal (or in a notebook) :func:`progress` is plain ``tqdm.auto.tqdm``: one line redrawn in place. When the
stream is not a terminal (CI, SLURM, ``nohup``, ``2> log``) a redraw is a carriage return that a log file keeps,
so a bar updated per batch fills the log with tens of thousands of characters. There the bar instead writes one
ordinary line every ``interval`` seconds (default 60; ``VLADVA_PROGRESS_INTERVAL`` overrides it), a first line only
once that much time has passed (short loops stay silent), and a final line with the totals when it ends.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import autonotebook as _autonotebook
from tqdm import tqdm as _std_tqdm
from tqdm.auto import tqdm as _auto_tqdm

__all__ = ["DEFAULT_LOG_INTERVAL", "is_interactive", "log_interval", "progress"]

#: seconds between two lines of a bar in a non-interactive log
DEFAULT_LOG_INTERVAL = 60.0
_ENV_INTERVAL = "VLADVA_PROGRESS_INTERVAL"
# cursor movements tqdm emits for nested bars (position > 0): meaningless in a file
_ANSI_CSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def log_interval() -> float:
    """Seconds between the lines of a bar in a log (``VLADVA_PROGRESS_INTERVAL``, default 60)."""
    raw = os.environ.get(_ENV_INTERVAL)
    if raw is None or not raw.strip():
        return DEFAULT_LOG_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{_ENV_INTERVAL}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ValueError(f"{_ENV_INTERVAL} must be >= 0 seconds, got {value}")
    return value


def is_interactive(stream: TextIO | None = None) -> bool:
    """True on a terminal or in a notebook (where tqdm.auto draws a widget)."""
    if _autonotebook.tqdm is not _std_tqdm:  # tqdm picked its notebook class: a Jupyter kernel
        return True
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class _LineStream:
    """A file for tqdm that turns each in-place redraw (``\\r`` + bar + padding) into one log line."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = _ANSI_CSI.sub("", text).replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        flush = getattr(self.stream, "flush", None)
        if flush is not None:
            flush()


def progress(iterable: Iterable | None = None, **kwargs: Any) -> _std_tqdm:
    """``tqdm(iterable, **kwargs)`` that prints periodic lines instead of redraws when not on a terminal.

    Takes tqdm's arguments (``desc``, ``total``, ``unit``, ``disable``, ``leave``, ``file``, ...). In log mode
    ``mininterval``/``delay`` become the log interval (unless given larger) and the last state is always written
    (``leave=True``), since nothing is redrawn over it.
    """
    stream = kwargs.get("file") or sys.stderr
    if is_interactive(stream):
        return _auto_tqdm(iterable, **kwargs)
    interval = log_interval()
    kwargs["file"] = _LineStream(stream)
    kwargs["mininterval"] = max(float(kwargs.get("mininterval") or 0.0), interval)
    kwargs["delay"] = max(float(kwargs.get("delay") or 0.0), interval)
    kwargs["leave"] = True
    kwargs.setdefault("ascii", True)
    kwargs.setdefault("ncols", 100)
    kwargs.pop("dynamic_ncols", None)
    kwargs.pop("position", None)
    return _std_tqdm(iterable, **kwargs)
