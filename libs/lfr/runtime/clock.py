"""The one clock of the platform's time rules (retention of alert crops, adjudication due times).

The rules take a `Clock` rather than calling `time.time_ns()`, so a test can move time: `ManualClock` in
unit tests, `OffsetFileClock` for running services (the wall clock plus the seconds written in a file named
by LFR_CLOCK_OFFSET_FILE; a drill or an end-to-end test writes "2764800" to move them 32 days ahead).
Freshness budgets and latency measurements stay on the real wall clock: they are physics, not rules.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Protocol


class Clock(Protocol):
    def now_ns(self) -> int: ...


class SystemClock:
    def now_ns(self) -> int:
        return time.time_ns()


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start_ns: int | None = None):
        self._now = time.time_ns() if start_ns is None else start_ns

    def now_ns(self) -> int:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += int(seconds * 1e9)

    def set(self, ns: int) -> None:
        self._now = ns


class OffsetFileClock:
    """The wall clock plus the offset (seconds, a float) written in a file; re-read when the file changes.
    A missing or unreadable file means no offset."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._offset_ns = 0

    def offset_ns(self) -> int:
        try:
            st = os.stat(self.path)
        except OSError:
            self._stamp, self._offset_ns = None, 0
            return 0
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                self._offset_ns = int(float(self.path.read_text().strip() or 0) * 1e9)
            except (OSError, ValueError):
                self._offset_ns = 0
            self._stamp = stamp
        return self._offset_ns

    def now_ns(self) -> int:
        return time.time_ns() + self.offset_ns()


def from_config(config) -> Clock:
    return OffsetFileClock(config.clock_offset_file) if config.clock_offset_file else SystemClock()


def wait_for(predicate, timeout_s: float = 20.0, interval: float = 0.25):
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout_s`` passes (then its last
    value). For tests, tools and benchmarks that wait on a running system."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()
