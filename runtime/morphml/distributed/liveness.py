"""Liveness of a worker's parts: the decision whether each one is still making progress.

A worker is healthy when every part that should be making progress has shown some recently.
The worker has two kinds of part:

- the session loop (`"session"`): the generator that feeds the Connect stream and beats every
  heartbeat interval. It is only expected to make progress while a session is open; a worker
  that cannot reach its master is not stuck (the master's heartbeat path covers that side).
- one runner per slot (`"runner-<slot>"`): the trial_runner child and the slot thread reading
  its pipe. The runner's beat thread writes a beat line every beat period, also while a trial
  trains, so a runner that is busy is never silent; a SIGSTOPped runner (every thread frozen)
  or one stuck in the kernel is.

Evidence of progress is a beat (`progress()`), or for a runner CPU time that grew since the
last look (`observe_cpu()`): a trial holding the GIL in one long C call starves the beat
thread, but a process that burns CPU is busy, not stuck. A part without evidence for longer
than its `stuck_after` bound is stuck (the worker's health turns NOT_SERVING); a part stuck
past its `replace_after` bound is to be replaced, once per episode (the worker gives its
trials back and kills it). A part that shows progress again has recovered.

If the checker itself did not run for a while (the whole worker was stopped or starved), the
silence it finds says nothing about the parts: that gap is forgiven instead of blamed on them.

Pure: no I/O and no threads of its own; time comes from an injected clock (Clock protocol of
morphml.distributed.clock). The worker feeds it events and carries out its verdicts.

Imports: dataclasses, threading, typing only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

SESSION = "session"
STUCK_AFTER_HEARTBEATS = 3  # the master's default missedHeartbeats: both sides judge on one scale
MIN_STUCK_AFTER_SECONDS = 10.0  # a healthy part on a loaded host is never this late
REPLACE_AFTER_FACTOR = 2.0  # replace_after = this x stuck_after unless configured


def runner_part(slot: int) -> str:
    return f"runner-{slot}"


class Clock(Protocol):
    def monotonic(self) -> float: ...


@dataclass(frozen=True)
class LivenessBounds:
    """How long a part may show no progress before it is stuck (health NOT_SERVING) and before
    a stuck runner is replaced; how often the worker checks and a runner beats."""

    stuck_after: float
    replace_after: float
    check_period: float
    beat_period: float


def liveness_bounds(heartbeat_interval: float, stuck_after: float | None = None,
                    replace_after: float | None = None) -> LivenessBounds:
    """Defaults derived from the master's heartbeat interval: stuck after 3 intervals (never less
    than 10 s), replaced after twice that. On Kubernetes the readiness probe (2 x 5 s) and the
    operator's unready threshold (5 s) then report a wedged pod before the worker replaces the
    runner itself; without an operator the worker's own replacement gives the trial back."""
    if heartbeat_interval <= 0:
        raise ValueError(f"heartbeat_interval={heartbeat_interval!r}: must be > 0")
    if stuck_after is not None and stuck_after <= 0:
        raise ValueError(f"stuck_after_seconds={stuck_after!r}: must be > 0")
    stuck = stuck_after if stuck_after is not None else max(STUCK_AFTER_HEARTBEATS * heartbeat_interval,
                                                            MIN_STUCK_AFTER_SECONDS)
    replace = replace_after if replace_after is not None else REPLACE_AFTER_FACTOR * stuck
    if replace < stuck:
        raise ValueError(f"replace_after_seconds={replace!r}: must be >= stuck_after_seconds={stuck!r}")
    return LivenessBounds(stuck_after=stuck, replace_after=replace, check_period=min(1.0, stuck / 10),
                          beat_period=min(1.0, stuck / 10))


@dataclass
class _Part:
    stuck_after: float
    replace_after: float | None
    last_progress: float
    active: bool
    cpu_key: object = None  # which process the CPU reading is of (a replaced runner starts from 0)
    cpu_seconds: float | None = None
    stuck: bool = False
    replace_requested: bool = False


@dataclass(frozen=True)
class Verdict:
    """One check's outcome. `stuck` maps each stuck part to its seconds without progress."""

    now: float
    stuck: dict[str, float] = field(default_factory=dict)
    newly_stuck: tuple[str, ...] = ()
    recovered: tuple[str, ...] = ()
    replace: tuple[str, ...] = ()  # stuck past replace_after: replace these (reported once per episode)
    forgiven: float = 0.0  # seconds of the checker's own absence not blamed on the parts

    @property
    def serving(self) -> bool:
        return not self.stuck


class LivenessMonitor:
    """Thread-safe: the session generator, the slot threads and the checker all call it."""

    def __init__(self, clock: Clock, check_period: float):
        if check_period <= 0:
            raise ValueError(f"check_period={check_period!r}: must be > 0")
        self._clock = clock
        self.check_period = check_period
        self._parts: dict[str, _Part] = {}
        self._last_check: float | None = None
        self._lock = threading.Lock()

    def add_part(self, name: str, stuck_after: float, replace_after: float | None = None,
                 active: bool = True) -> None:
        with self._lock:
            self._parts[name] = _Part(stuck_after, replace_after, self._clock.monotonic(), active)

    def set_bounds(self, name: str, stuck_after: float, replace_after: float | None = None) -> None:
        with self._lock:
            part = self._parts[name]
            part.stuck_after, part.replace_after = stuck_after, replace_after

    def progress(self, name: str) -> None:
        """The part did something (a beat, a reply, a message yielded)."""
        with self._lock:
            self._parts[name].last_progress = self._clock.monotonic()

    def observe_cpu(self, name: str, process: object, cpu_seconds: float | None) -> None:
        """CPU time (user + system) of the part's process `process` (any key, e.g. its pid), read
        now; more than at the last reading of the same process counts as progress."""
        if cpu_seconds is None:
            return
        with self._lock:
            part = self._parts[name]
            if part.cpu_key == process and part.cpu_seconds is not None and cpu_seconds > part.cpu_seconds:
                part.last_progress = self._clock.monotonic()
            part.cpu_key, part.cpu_seconds = process, cpu_seconds

    def activate(self, name: str) -> None:
        """The part is expected to make progress from now on (a session opened)."""
        with self._lock:
            part = self._parts[name]
            part.active, part.last_progress = True, self._clock.monotonic()

    def deactivate(self, name: str) -> None:
        """The part is not expected to make progress (no session): never stuck meanwhile."""
        with self._lock:
            self._parts[name].active = False

    def silent_for(self, name: str) -> float:
        with self._lock:
            return self._clock.monotonic() - self._parts[name].last_progress

    def stuck(self, name: str) -> bool:
        """Whether the part was stuck at the last check()."""
        with self._lock:
            return self._parts[name].stuck

    def check_age(self) -> float | None:
        """Seconds since the last check() (None before the first): a checker that stopped
        checking must not leave a stale SERVING behind."""
        with self._lock:
            return None if self._last_check is None else self._clock.monotonic() - self._last_check

    def check(self) -> Verdict:
        with self._lock:
            now = self._clock.monotonic()
            forgiven = 0.0
            if self._last_check is not None and now - self._last_check > 2 * self.check_period:
                # The checker itself was not running (worker stopped, host starved): nobody
                # watched during that gap, so it is no evidence against any part.
                forgiven = now - self._last_check - self.check_period
                for part in self._parts.values():
                    part.last_progress = min(now, part.last_progress + forgiven)
            self._last_check = now
            stuck: dict[str, float] = {}
            newly, recovered, replace = [], [], []
            for name, part in self._parts.items():
                silent = now - part.last_progress
                is_stuck = part.active and silent > part.stuck_after
                if is_stuck and not part.stuck:
                    newly.append(name)
                elif part.stuck and not is_stuck:
                    recovered.append(name)
                    part.replace_requested = False
                part.stuck = is_stuck
                if not is_stuck:
                    continue
                stuck[name] = silent
                if part.replace_after is not None and silent > part.replace_after and not part.replace_requested:
                    part.replace_requested = True
                    replace.append(name)
            return Verdict(now, stuck, tuple(newly), tuple(recovered), tuple(replace), forgiven)
