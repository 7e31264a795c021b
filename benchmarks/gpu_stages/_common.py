"""What every stage shares: its command line, its deadline, and results written after every measurement.

A stage is run as ``python -m benchmarks.gpu_stages.<name> --result FILE --deadline EPOCH [--dry-run]``. It writes
``FILE`` atomically (temporary file + rename) every time it adds a measurement, so the orchestrator can read the
partial results of a stage it had to kill, and stops starting new measurements once the deadline is near.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)


class StageResult:
    """A JSON object on disk, rewritten atomically on every change.

    Args:
        path: the result file the orchestrator reads.
        deadline: wall-clock time (``time.time()``) by which the stage must have finished.
    """

    def __init__(self, path: str | Path, deadline: float):
        self.path = Path(path)
        self.deadline = deadline
        self.data: dict[str, Any] = {"complete": False}
        self.save()

    def left(self) -> float:
        """Seconds until the deadline."""
        return self.deadline - time.time()

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def append(self, key: str, item: dict[str, Any]) -> None:
        self.data.setdefault(key, []).append(item)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def finish(self) -> None:
        self.data["complete"] = True
        self.save()


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--result", required=True, help="JSON file to write (rewritten after every measurement)")
    parser.add_argument("--deadline", type=float, required=True, help="wall-clock time (epoch seconds) to end by")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on CPU (Triton under the interpreter)")
    parser.add_argument("--context", default=None, help="JSON file with earlier stages' results (env probe)")
    return parser.parse_args()


def read_context(path: str | None) -> dict[str, Any]:
    """Earlier stages' results as the orchestrator passed them (empty when absent or unreadable)."""
    if not path:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def error_text(err: BaseException) -> str:
    """One line for the results (the full traceback goes to the log)."""
    _logger.error("%s", "".join(traceback.format_exception(err)).rstrip())
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text[:400]


def guarded(result: StageResult, key: str, what: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """Run one measurement; on an exception record ``{"name": what, "error": ...}`` under ``key`` and go on."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - one failed measurement must not end the stage
        result.append(key, {"name": what, "error": error_text(err)})
        return None


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def wall_ms(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock milliseconds of ``repeats`` calls after ``warmup`` calls (CUDA synchronised around each)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def sig(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits (toy-size figures must not round to 0)."""
    return float(f"{value:.{digits}g}")
