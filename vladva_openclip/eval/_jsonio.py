"""Reading annotation files with errors that name the file (and, via the helpers, the entry); writing result
files atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import AnnotationError, EvalDataError

__all__ = ["as_path", "read_json", "read_jsonl", "require_field", "require_str", "write_text_atomic"]


def as_path(p: str | os.PathLike, what: str) -> Path:
    path = Path(p).expanduser()
    if not path.exists():
        raise EvalDataError(f"{what} not found: {path}")
    return path


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise AnnotationError(path, None, f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from err
    except UnicodeDecodeError as err:
        raise AnnotationError(path, None, f"not UTF-8 text (byte {err.start}); save it as UTF-8") from None


def read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """``(line_number, object)`` for every non-blank line of a JSON-lines file."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise AnnotationError(path, f"at line {lineno}", f"not valid JSON ({err.msg})") from err
    except UnicodeDecodeError as err:
        raise AnnotationError(path, None, f"not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    return rows


def require_field(entry: Any, field: str, path: Path, where: object) -> Any:
    if not isinstance(entry, dict):
        raise AnnotationError(path, where, f"expected a JSON object, got {type(entry).__name__}: {_short(entry)}")
    if field not in entry:
        raise AnnotationError(path, where, f"missing field {field!r} (has: {', '.join(map(repr, entry))}): "
                                           f"{_short(entry)}")
    return entry[field]


def require_str(entry: Any, field: str, path: Path, where: object) -> str:
    value = require_field(entry, field, path, where)
    if not isinstance(value, str) or not value.strip():
        raise AnnotationError(path, where, f"field {field!r} must be a non-empty string, got {_short(value)}")
    return value


def _short(obj: Any, limit: int = 160) -> str:
    text = json.dumps(obj, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file next to ``path``, then rename it over ``path``: a reader (or a run that
    dies meanwhile) sees the old file or the new one, never half of one. The file gets the umask's permissions."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
