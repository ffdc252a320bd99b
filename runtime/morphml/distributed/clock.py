"""Injectable time: heartbeat and lease logic read time only through a Clock.

`SystemClock` is real time; `ManualClock` lets tests advance time without sleeping.
Imports: time, threading only.
"""

from __future__ import annotations

import threading
import time


class SystemClock:
    """Real time: monotonic() for timeouts, wall() (Unix seconds) for the journal."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class ManualClock:
    """Test clock: time moves only when advance() is called."""

    def __init__(self, start: float = 1000.0, wall_offset: float = 1_700_000_000.0):
        self._now = start
        self._wall_offset = wall_offset
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def wall(self) -> float:
        with self._lock:
            return self._wall_offset + self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"ManualClock.advance(seconds={seconds}): must be >= 0")
        with self._lock:
            self._now += seconds
