"""The demo's one-glance table: retrieval R@1 both ways and the compositional accuracies, one row per model, with
the chance level of each column (the full per-subset tables come from :class:`vladva_openclip.eval.report.Report`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SummaryColumn:
    """``header``: column title; ``task``/``metric``: where the value is in the evaluator's results;
    ``chance``: the expected score of a random embedding, as a function of the number of test images."""

    header: str
    task: str
    metric: str
    chance: Callable[[int], float]


def _constant(value: float) -> Callable[[int], float]:
    return lambda n: value


# Chance levels: R@1 of a random ranking is (positives / gallery) = 1/n both ways (I2T: 2 positives among 2n
# captions); a two-way choice 50 %; SugarCrepe++ ITT/TOT need one of three similarities to be the lowest
# (or highest): 1/3; Winoground text/image need two independent two-way choices: 1/4; group: 1/6.
SUMMARY_COLUMNS: tuple[SummaryColumn, ...] = (
    SummaryColumn("T2I R@1", "synth", "t2i_R@1", lambda n: 100.0 / max(n, 1)),
    SummaryColumn("I2T R@1", "synth", "i2t_R@1", lambda n: 100.0 / max(n, 1)),
    SummaryColumn("SC replace", "sugarcrepe", "replace", _constant(50.0)),
    SummaryColumn("SC swap", "sugarcrepe", "swap", _constant(50.0)),
    SummaryColumn("SC add", "sugarcrepe", "add", _constant(50.0)),
    SummaryColumn("SC++ ITT", "sugarcrepe_pp", "avg_itt", _constant(100.0 / 3)),
    SummaryColumn("SC++ TOT", "sugarcrepe_pp", "avg_tot", _constant(100.0 / 3)),
    SummaryColumn("Wino text", "winoground", "text", _constant(25.0)),
    SummaryColumn("Wino image", "winoground", "image", _constant(25.0)),
    SummaryColumn("Wino group", "winoground", "group", _constant(100.0 / 6)),
)


def pick(results: Mapping[str, Mapping[str, Any]], columns=SUMMARY_COLUMNS) -> dict[str, float | None]:
    """``{header: value}`` from ``evaluate``'s ``{task name: {"metrics": {...}}}`` (None where absent)."""
    out = {}
    for c in columns:
        value = results.get(c.task, {}).get("metrics", {}).get(c.metric)
        out[c.header] = None if value is None else float(value)
    return out


@dataclass
class SummaryTable:
    """Rows of ``{"model": label, header: value, ...}``; ``n_test`` sets the retrieval chance level."""

    n_test: int
    columns: tuple[SummaryColumn, ...] = SUMMARY_COLUMNS
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, label: str, results: Mapping[str, Mapping[str, Any]], **extra: Any) -> dict[str, Any]:
        row = {"model": label, **extra, **pick(results, self.columns)}
        self.rows.append(row)
        return row

    def chance_row(self) -> dict[str, float]:
        return {c.header: c.chance(self.n_test) for c in self.columns}

    def to_markdown(self, digits: int = 1, extra: tuple[str, ...] = ("steps",)) -> str:
        extra = tuple(k for k in extra if any(k in r for r in self.rows))
        header = ["Model", *extra, *(c.header for c in self.columns)]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]

        def cell(v: Any) -> str:
            if v is None:
                return "–"
            return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

        for r in [*self.rows, {"model": "chance", **self.chance_row()}]:
            lines.append("| " + " | ".join([r["model"], *(cell(r.get(k)) for k in extra),
                                            *(cell(r.get(c.header)) for c in self.columns)]) + " |")
        return "\n".join(lines)
