"""The worker registry: every registration, its state, capacity, leases and last heartbeat.

Pure bookkeeping with an injected clock (no threads, no I/O); the coordinator holds the lock.
Imports: morphml.distributed.states, morphml.distributed.clock.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .clock import ManualClock, SystemClock
from .states import WorkerState, check_transition


@dataclass
class WorkerRecord:
    worker_id: str
    name: str
    gpus: int
    slots: int
    hostname: str
    pid: int
    registered_at: float  # wall
    last_heartbeat: float  # monotonic
    state: WorkerState = WorkerState.REGISTERING
    leases: set[tuple[str, int]] = field(default_factory=set)
    died_at: float | None = None  # wall
    death_reason: str = ""
    prefetch: int = 0  # extra leases queued on the worker beyond its slots


    def set_state(self, new: WorkerState) -> None:
        check_transition(self.state, new)
        self.state = new

    @property
    def alive(self) -> bool:
        return self.state is not WorkerState.DEAD

    @property
    def accepts_work(self) -> bool:
        return self.state in (WorkerState.IDLE, WorkerState.BUSY)

    @property
    def free_slots(self) -> int:
        return max(0, self.slots + self.prefetch - len(self.leases)) if self.accepts_work else 0


class WorkerRegistry:
    """Registrations by id. A worker that reconnects gets a new registration (new id)."""

    def __init__(self, clock: SystemClock | ManualClock, heartbeat_interval: float, missed_heartbeats: int):
        if heartbeat_interval <= 0:
            raise ValueError(f"heartbeat interval {heartbeat_interval!r}: must be > 0 seconds")
        if missed_heartbeats < 1:
            raise ValueError(f"missed heartbeats {missed_heartbeats!r}: must be >= 1")
        self.clock = clock
        self.heartbeat_interval = float(heartbeat_interval)
        self.missed_heartbeats = int(missed_heartbeats)
        self.workers: dict[str, WorkerRecord] = {}
        self._ids = itertools.count(1)

    @property
    def heartbeat_timeout(self) -> float:
        return self.heartbeat_interval * self.missed_heartbeats

    def register(self, name: str, gpus: int, slots: int, hostname: str = "", pid: int = 0) -> WorkerRecord:
        worker_id = f"{name}/{next(self._ids)}"
        rec = WorkerRecord(worker_id, name, gpus, slots, hostname, pid, self.clock.wall(), self.clock.monotonic())
        self.workers[worker_id] = rec
        return rec

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self.workers.get(worker_id)

    def live(self) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if w.alive]

    def by_name_or_id(self, key: str) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if w.alive and key in (w.worker_id, w.name)]

    def connected(self, worker_id: str) -> None:
        rec = self.workers[worker_id]
        rec.last_heartbeat = self.clock.monotonic()
        if rec.state is WorkerState.REGISTERING:
            rec.set_state(WorkerState.IDLE)
        self.refresh_load(rec)

    def heartbeat(self, worker_id: str) -> None:
        self.workers[worker_id].last_heartbeat = self.clock.monotonic()

    def refresh_load(self, rec: WorkerRecord) -> None:
        """IDLE when it holds no lease, BUSY when it holds at least one."""
        if rec.state is WorkerState.IDLE and rec.leases:
            rec.set_state(WorkerState.BUSY)
        elif rec.state is WorkerState.BUSY and not rec.leases:
            rec.set_state(WorkerState.IDLE)

    def drain(self, worker_id: str) -> None:
        rec = self.workers[worker_id]
        if rec.alive:
            rec.set_state(WorkerState.DRAINING)

    def mark_dead(self, worker_id: str, reason: str) -> WorkerRecord | None:
        """Declares the worker dead; returns its record, or None if it already was."""
        rec = self.workers.get(worker_id)
        if rec is None or not rec.alive:
            return None
        rec.set_state(WorkerState.DEAD)
        rec.died_at = self.clock.wall()
        rec.death_reason = reason
        return rec

    def expired(self) -> list[WorkerRecord]:
        """Live workers whose last heartbeat is older than interval x missed."""
        now = self.clock.monotonic()
        return [w for w in self.workers.values()
                if w.alive and now - w.last_heartbeat > self.heartbeat_timeout]

    def seconds_since_heartbeat(self, rec: WorkerRecord) -> float:
        return max(0.0, self.clock.monotonic() - rec.last_heartbeat)
