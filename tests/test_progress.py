"""The project's progress bars: in-place redraws on a terminal, periodic plain lines in a log (CI, SLURM)."""
import io
import re
from pathlib import Path

import pytest

from vladva_openclip.progress import is_interactive, log_interval, progress

ROOT = Path(__file__).resolve().parents[1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_mode_writes_lines_not_carriage_returns(monkeypatch):
    monkeypatch.setenv("VLADVA_PROGRESS_INTERVAL", "0")
    log = io.StringIO()
    for _ in progress(range(5), desc="embed", file=log, leave=False):
        pass
    text = log.getvalue()
    assert "\r" not in text and "\x1b[" not in text
    lines = text.splitlines()
    assert len(lines) >= 2 and all(line.startswith("embed:") for line in lines)
    assert "5/5" in lines[-1]  # the final state is written even with leave=False: nothing redraws over it


def test_log_mode_is_silent_for_short_loops_and_keeps_the_interval(monkeypatch):
    monkeypatch.delenv("VLADVA_PROGRESS_INTERVAL", raising=False)
    assert log_interval() == 60.0
    log = io.StringIO()
    for _ in progress(range(10_000), desc="fast", file=log):
        pass
    assert log.getvalue() == ""


def test_log_mode_lines_follow_the_clock(monkeypatch):
    """A fake clock: 100 updates 1 s apart with a 10 s interval give about 10 lines, not 100."""
    monkeypatch.setenv("VLADVA_PROGRESS_INTERVAL", "10")
    log = io.StringIO()
    now = [1000.0]
    bar = progress(total=100, desc="slow", file=log)
    bar._time = lambda: now[0]
    bar.start_t = bar.last_print_t = now[0]
    for _ in range(100):
        now[0] += 1.0
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert 8 <= len(lines) <= 12, lines
    assert "100/100" in lines[-1]


def test_terminal_mode_redraws_in_place():
    term = _Terminal()
    assert is_interactive(term)
    for _ in progress(range(3), desc="tty", file=term, mininterval=0):
        pass
    assert "\r" in term.getvalue()


def test_bad_interval_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("VLADVA_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="VLADVA_PROGRESS_INTERVAL"):
        progress(range(2), file=io.StringIO())


def test_every_bar_in_the_project_uses_the_helper():
    """No module builds a tqdm bar directly (tqdm.write, a class method, is fine)."""
    offenders = []
    for path in [*(ROOT / "vladva_openclip").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"),
                 *(ROOT / "benchmarks").rglob("*.py")]:
        if path.name == "progress.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"from tqdm(\.auto)? import tqdm\b", line) and "# noqa: progress" not in line:
                uses = re.findall(r"\btqdm\(", path.read_text())
                if uses:
                    offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert not offenders, f"use vladva_openclip.progress.progress instead of tqdm in {offenders}"
