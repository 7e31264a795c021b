"""Writing analysis outputs atomically (written aside, then renamed; the umask's permissions): CSV, JSON,
Markdown, PNG and safetensors."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._fs import save_safetensors, write_atomically

__all__ = ["jsonable", "markdown_table", "save_figure", "write_csv", "write_json", "write_safetensors", "write_text"]


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any]) -> Path:
    return write_atomically(path, lambda tmp: save_safetensors({k: v.contiguous() for k, v in tensors.items()}, tmp))


def jsonable(value: Any) -> Any:
    """Plain JSON types; floats rounded to 6 significant digits (diff-friendly committed outputs), NaN -> None."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else float(f"{value:.6g}")
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(jsonable(obj), indent=1, ensure_ascii=False) + "\n")


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    columns = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: jsonable(row.get(k)) for k in columns})
    return write_text(path, buf.getvalue())


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], digits: int = 3) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "–" if math.isnan(v) else f"{v:.{digits}f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically, with fixed metadata so reruns give identical files, and close it."""
    import matplotlib.pyplot as plt

    try:
        return write_atomically(
            path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", metadata={"Software": None}),
            suffix=".png")
    finally:
        plt.close(fig)
