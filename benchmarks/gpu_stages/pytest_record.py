"""pytest plugin for stage ``parity``: appends one JSON line per finished test to ``$GPU_CHECK_PYTEST_LOG``.

Loaded with ``-p benchmarks.gpu_stages.pytest_record``. A line is written as soon as a test ends (and flushed), so
the outcome of every test that finished survives a stage that is killed on its time budget; a JUnit file is only
written at the very end. ``$GPU_CHECK_PYTEST_MAX=N`` keeps only the first N selected tests (the dry run's toy size,
independent of test names).
"""
from __future__ import annotations

import json
import os

import pytest

_PATH = os.environ.get("GPU_CHECK_PYTEST_LOG")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items) -> None:
    limit = int(os.environ.get("GPU_CHECK_PYTEST_MAX") or 0)
    if limit and len(items) > limit:
        # after -m/-k have deselected (trylast), so the first N of the selected tests remain
        config.hook.pytest_deselected(items=items[limit:])
        del items[limit:]


def _write(record: dict) -> None:
    if not _PATH:
        return
    with open(_PATH, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def pytest_runtest_logreport(report) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # under pytest-xdist the controller receives every report too: write each test once
    # A test's outcome: the call phase, or setup when it was skipped/failed there, or a teardown error.
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed") or (
            report.when == "teardown" and report.outcome == "failed"):
        message = ""
        if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
        elif report.outcome == "failed":
            message = getattr(report.longrepr, "reprcrash", None)
            message = message.message if message is not None else str(report.longrepr)
        _write({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                "seconds": round(report.duration, 3), "message": message.splitlines()[0][:300] if message else ""})
