"""Progress off a terminal: plain log lines at an interval and a closing line, no escape codes."""

import logging

from equss.progress import Progress, format_duration


def test_format_duration():
    assert format_duration(0) == "0:00:00"
    assert format_duration(3725.4) == "1:02:05"


def test_log_lines_off_terminal(caplog, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    with caplog.at_level(logging.INFO, logger="equss.progress"):
        p = Progress(total=4, desc="train", every_s=0.0)
        for _ in range(4):
            p.set_postfix(loss="0.5")
            p.update()
        p.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("train: 1/4 (25%) loss 0.5 |")
    assert "ETA" in lines[0]
    assert lines[-1].startswith("train: done 4 it in ")
    assert len(lines) == 5
    assert not any("\r" in s or "\x1b" in s for s in lines)


def test_interval_and_disabled(caplog, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    with caplog.at_level(logging.INFO, logger="equss.progress"):
        list(Progress(range(10), desc="x", every_s=3600.0))   # only the closing line
        list(Progress(range(10), desc="y", enabled=False))     # nothing at all
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("x: done 10 it")


def test_resumed_counts_only_new_work(caplog, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    with caplog.at_level(logging.INFO, logger="equss.progress"):
        p = Progress(total=10, desc="train", initial=6, every_s=0.0)
        p.update(2)
        p.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("train: 8/10 (80%)")
    assert lines[-1].startswith("train: done 2 it")
