"""Progress of long work: a tqdm bar on a terminal, plain log lines everywhere else.

When stderr is a terminal, :class:`Progress` is a tqdm bar. When it is not (a log file, CI, a
scheduler), it writes one line every ``every_s`` seconds (default 30) and a last line at the end, via the
``equss`` logger — no carriage returns, no escape codes::

    train: 120/296 (41%) loss 0.8123 usage 0.41 | 2.31 it/s, ETA 0:01:16
    train: done 296 it in 0:02:08 (2.31 it/s)

Phases that take time (feature caches, kNN tables, baselines, evaluations) announce their size and
duration through the same logger.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["Progress", "format_duration"]

log = logging.getLogger("equss.progress")


def format_duration(seconds: float) -> str:
    """``h:mm:ss``."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """A progress display over ``total`` units (or an iterable), bar or log lines (module docstring).

    Args:
        iterable: what to iterate over (optional; ``update`` counts otherwise).
        total: units of work (default ``len(iterable)``).
        desc: the line's prefix.
        unit: the unit's name in rates.
        enabled: ``False`` shows nothing at all.
        initial: units already done (a resumed run).
        every_s: seconds between log lines when stderr is not a terminal.
        leave: keep the bar after it is done (terminal only).
    """

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", enabled: bool = True, initial: int = 0, every_s: float = 30.0,
                 leave: bool = True) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.start_n = initial
        self.enabled = enabled
        self.every_s = every_s
        self.postfix: dict[str, Any] = {}
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the count (formatted with ``str``); the display refreshes with the next update."""
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            log.info(self._line())

    def _rate(self) -> float:
        return (self.n - self.start_n) / max(time.monotonic() - self.t0, 1e-9)

    def _line(self) -> str:
        rate = self._rate()
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        post = " ".join(f"{k} {v}" for k, v in self.postfix.items())
        eta = ""
        if self.total and rate > 0:
            eta = f", ETA {format_duration((self.total - self.n) / rate)}"
        return f"{self.desc}: {done} {post} | {rate:.2f} {self.unit}/s{eta}".replace("  ", " ")

    def write(self, message: str) -> None:
        """A message that does not break the bar."""
        if self.bar is not None:
            self.bar.write(message)
        else:
            log.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.n > self.start_n:
            elapsed = time.monotonic() - self.t0
            log.info(f"{self.desc}: done {self.n - self.start_n} {self.unit} in {format_duration(elapsed)} "
                     f"({self._rate():.2f} {self.unit}/s)")
        self.enabled = False
