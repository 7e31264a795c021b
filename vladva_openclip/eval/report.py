"""Results of one run: JSON (everything) and Markdown (one table per task type, laid out like the paper's).

Tables have one row per model. Columns come from each task type's :meth:`Task.columns`; when a type has several
instances (Flickr30K, COCO, nocaps retrieval) each column repeats per instance, column-major, so a retrieval
table reads ``flickr30k T2I | coco T2I | ... | flickr30k I2T | coco I2T | ...`` as in the paper's Table 1.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._jsonio import write_text_atomic
from .tasks import TASKS

__all__ = ["Report"]


@dataclass
class Report:
    """records: one dict per (model, task): ``{"model", "task", "name", "metrics", "info", "seconds"}``."""

    records: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)

    def add(self, model: str, result: Mapping[str, Any], **extra: Any) -> None:
        self.records.append({"model": model, **result, **extra})

    def to_dict(self) -> dict[str, Any]:
        protocols = {r["task"]: TASKS[r["task"]].protocol for r in self.records}
        nested: dict[str, dict[str, Any]] = {}
        for r in self.records:
            nested.setdefault(r["model"], {})[r["name"]] = {k: v for k, v in r.items() if k not in ("model", "name")}
        return {"meta": self.meta, "models": self.models, "protocols": protocols, "results": nested}

    def to_markdown(self, digits: int = 1) -> str:
        models = list(dict.fromkeys(r["model"] for r in self.records))
        by_type: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for r in self.records:
            by_type.setdefault(r["task"], {}).setdefault(r["name"], []).append(r)
        parts = []
        for task_type, instances in by_type.items():
            cls = TASKS[task_type]
            prefix = len(instances) > 1 or task_type == "retrieval"
            per_instance = {name: cls.columns(recs) for name, recs in instances.items()}
            width = max(len(cols) for cols in per_instance.values())
            header, cells = ["Model"], {m: [m] for m in models}
            for i in range(width):  # column-major across instances
                for name, cols in per_instance.items():
                    if i >= len(cols):
                        continue
                    col = cols[i]
                    header.append(f"{name} {col.header}" if prefix else col.header)
                    metrics = {r["model"]: r["metrics"] for r in instances[name]}
                    for m in models:
                        vals = [metrics.get(m, {}).get(k) for k in col.keys]
                        cells[m].append(" / ".join("–" if v is None else f"{v:.{digits}f}" for v in vals))
            lines = [f"### {cls.title}", "", "| " + " | ".join(header) + " |",
                     "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
            lines += ["| " + " | ".join(cells[m]) + " |" for m in models if any(r["model"] == m for recs in
                                                                                instances.values() for r in recs)]
            parts.append("\n".join(lines))
        return "\n\n".join(parts) + "\n"

    def save(self, output_dir: str | os.PathLike, stem: str = "results") -> tuple[Path, Path]:
        """Write ``<stem>.json`` and ``<stem>.md`` (each atomically: saving after every task never leaves a torn
        file); returns both paths."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
        write_text_atomic(json_path, json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        write_text_atomic(md_path, self.to_markdown() if self.records else "No task finished.\n")
        return json_path, md_path
