"""The lease table: tasks, their attempts, and which worker holds which lease.

A task is one trial (one candidate architecture). Each hand-out to a worker is an attempt
`(task id, attempt number)`; the number grows by one per lease, so a result can always be
matched to the one live attempt. Pure bookkeeping: no I/O, no threads (the coordinator holds
the lock and writes the journal), time is passed in by the caller.

Imports: morphml.distributed.states only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from .states import AttemptState, TaskState, check_transition


@dataclass
class Attempt:
    """One lease of a task to a worker."""

    task_id: str
    attempt: int
    worker_id: str
    worker_name: str
    leased_at: float  # wall seconds
    state: AttemptState = AttemptState.LEASED
    ended_at: float | None = None
    outcome: str = ""  # failure kind, "ok", or the loss reason for STALE

    def set_state(self, new: AttemptState) -> None:
        check_transition(self.state, new)
        self.state = new


@dataclass
class Task:
    """One trial: a candidate architecture to evaluate exactly once."""

    task_id: str
    candidate_id: str
    arch_json: str
    arch_hash: str
    summary: str
    generation: int
    seed: int
    proposed_at: float
    state: TaskState = TaskState.PENDING
    attempt: int = 0  # number of the latest lease (0: never leased)
    retries_used: int = 0
    avoid_workers: set[str] = field(default_factory=set)  # names it failed on
    # After a master restart: the journaled attempt that was out when the master died. A result
    # for it is still accepted (the worker finished while the master was away) until the task is
    # re-leased; `held_until` (monotonic) gives its worker time to reconnect and re-adopt it.
    orphan_attempt: int | None = None
    held_until: float | None = None
    metrics: dict | None = None
    error_kind: str = ""
    error_message: str = ""
    finished_by: str = ""  # worker name of the counted attempt
    finished_attempt: int = 0
    finished_at: float | None = None
    duration_seconds: float = 0.0

    def set_state(self, new: TaskState) -> None:
        check_transition(self.state, new)
        self.state = new

    @property
    def finished(self) -> bool:
        return self.state in (TaskState.SUCCEEDED, TaskState.STOPPED, TaskState.FAILED)


class ResultMatch:
    """How an incoming result relates to the task's attempts."""

    LIVE = "live"  # the current leased attempt: count it
    ORPHAN = "orphan"  # the attempt that was out when the master restarted: count it
    STALE = "stale"  # an older attempt (worker declared dead, task re-leased): record only
    DUPLICATE = "duplicate"  # this attempt already reported
    UNKNOWN = "unknown"  # no such task or attempt


class LeaseTable:
    """Tasks in proposal order, their attempts, and the leases each worker holds."""

    def __init__(self) -> None:
        self.tasks: OrderedDict[str, Task] = OrderedDict()
        # Pending task ids in queue order (oldest first); kept in step with task states so that
        # choosing a task does not scan every finished trial.
        self._pending: OrderedDict[str, None] = OrderedDict()
        self._leased: set[str] = set()  # ids of LEASED tasks, kept by track() like _pending
        self.attempts: dict[tuple[str, int], Attempt] = {}
        self._by_worker: dict[str, set[tuple[str, int]]] = {}

    # --- tasks -------------------------------------------------------------------------------
    def add(self, task: Task) -> None:
        if task.task_id in self.tasks:
            raise ValueError(f"task id {task.task_id!r} already exists")
        self.tasks[task.task_id] = task
        self.track(task)

    def track(self, task: Task) -> None:
        """Keeps the pending index in step with the task's state (call after each change)."""
        if task.state is TaskState.PENDING:
            self._pending.setdefault(task.task_id, None)
        else:
            self._pending.pop(task.task_id, None)
        if task.state is TaskState.LEASED:
            self._leased.add(task.task_id)
        else:
            self._leased.discard(task.task_id)

    def pending_ids(self) -> list[str]:
        return list(self._pending)

    def get(self, task_id: str) -> Task | None:
        return self.tasks.get(task_id)

    def in_state(self, state: TaskState) -> list[Task]:
        return [t for t in self.tasks.values() if t.state is state]

    def count(self, state: TaskState) -> int:
        if state is TaskState.LEASED:  # asked on every status call: kept as an index
            return len(self._leased)
        if state is TaskState.PENDING:
            return len(self._pending)
        return sum(1 for t in self.tasks.values() if t.state is state)

    def outstanding(self) -> int:
        """Tasks proposed but not finished (pending or leased)."""
        return sum(1 for t in self.tasks.values() if not t.finished)

    def leases_of(self, worker_id: str) -> list[tuple[str, int]]:
        return sorted(self._by_worker.get(worker_id, ()))

    # --- choosing and leasing -----------------------------------------------------------------
    def choose_for(self, worker_name: str, other_live_names: Iterable[str], now: float) -> Task | None:
        """The next pending task for a worker, oldest first (a re-queued task jumps ahead of
        newer proposals, so a lost worker's trial is re-leased first).

        A task that failed on this worker goes to another one if any other live worker has not
        failed it yet; only when every live worker has, it may come back here.
        Tasks held for a reconnecting worker after a master restart are skipped until the hold ends.
        """
        others = set(other_live_names) - {worker_name}
        fallback = None
        for task_id in sorted(self._pending):  # ids are zero-padded: oldest proposal first
            task = self.tasks[task_id]
            if task.held_until is not None and now < task.held_until:
                continue
            if worker_name not in task.avoid_workers:
                return task
            if fallback is None and not (others - task.avoid_workers):
                fallback = task
        return fallback

    def lease(self, task_id: str, worker_id: str, worker_name: str, now_wall: float) -> Attempt:
        """Hands the task out as a new attempt (attempt number + 1)."""
        task = self.tasks[task_id]
        task.set_state(TaskState.LEASED)
        self._retire_orphan(task, now_wall)
        task.attempt += 1
        task.held_until = None
        self.track(task)
        return self._open_attempt(task, worker_id, worker_name, now_wall)

    def adopt(self, task_id: str, attempt: int, worker_id: str, worker_name: str, now_wall: float) -> Attempt | None:
        """After a master restart: the reconnected worker keeps running its attempt.

        Only possible while the task is pending with exactly that orphaned attempt."""
        task = self.tasks.get(task_id)
        if task is None or task.state is not TaskState.PENDING or task.orphan_attempt != attempt:
            return None
        task.set_state(TaskState.LEASED)
        task.orphan_attempt = None
        task.held_until = None
        self.track(task)
        old = self.attempts.get((task_id, attempt))
        if old is not None:
            self._by_worker.get(old.worker_id, set()).discard((task_id, attempt))
        return self._open_attempt(task, worker_id, worker_name, now_wall, number=attempt)

    def _open_attempt(self, task: Task, worker_id: str, worker_name: str, now_wall: float,
                      number: int | None = None) -> Attempt:
        att = Attempt(task.task_id, number if number is not None else task.attempt, worker_id, worker_name, now_wall)
        self.attempts[(task.task_id, att.attempt)] = att
        self._by_worker.setdefault(worker_id, set()).add((task.task_id, att.attempt))
        return att

    def _retire_orphan(self, task: Task, now_wall: float) -> None:
        if task.orphan_attempt is None:
            return
        old = self.attempts.get((task.task_id, task.orphan_attempt))
        if old is not None and old.state is AttemptState.LEASED:
            old.set_state(AttemptState.STALE)
            old.ended_at = now_wall
            old.outcome = "restart"
        task.orphan_attempt = None

    # --- results ------------------------------------------------------------------------------
    def match(self, task_id: str, attempt: int) -> str:
        task = self.tasks.get(task_id)
        att = self.attempts.get((task_id, attempt))
        if task is None or att is None:
            return ResultMatch.UNKNOWN
        if task.state is TaskState.LEASED and task.attempt == attempt and att.state is AttemptState.LEASED:
            return ResultMatch.LIVE
        if task.state is TaskState.PENDING and task.orphan_attempt == attempt and att.state is AttemptState.LEASED:
            return ResultMatch.ORPHAN
        if att.state in (AttemptState.SUCCEEDED, AttemptState.FAILED):
            return ResultMatch.DUPLICATE
        return ResultMatch.STALE

    def close_attempt(self, task_id: str, attempt: int, state: AttemptState, outcome: str, now_wall: float) -> Attempt:
        att = self.attempts[(task_id, attempt)]
        att.set_state(state)
        att.ended_at = now_wall
        att.outcome = outcome
        self._by_worker.get(att.worker_id, set()).discard((task_id, attempt))
        return att

    def succeed(self, task_id: str, attempt: int, metrics: dict, worker_name: str, duration: float,
                now_wall: float, stopped: bool = False, paused: bool = False) -> Task:
        """Records a result with metrics: the task SUCCEEDED, STOPPED when an early-stopping
        scheduler ended it, or PAUSED at an ASHA rung (the attempt returned its metrics every
        way: outcome "ok"/"stopped"/"paused")."""
        task = self.tasks[task_id]
        self._prepare_finish(task)
        outcome = "paused" if paused else "stopped" if stopped else "ok"
        self.close_attempt(task_id, attempt, AttemptState.SUCCEEDED, outcome, now_wall)
        task.set_state(TaskState.PAUSED if paused else TaskState.STOPPED if stopped else TaskState.SUCCEEDED)
        task.metrics = metrics
        task.finished_by, task.finished_attempt, task.finished_at = worker_name, attempt, now_wall
        task.duration_seconds = duration
        self.track(task)
        return task

    def promote(self, task_id: str) -> Task:
        """A PAUSED trial promoted to its next rung: back to the queue for a new lease (the next
        attempt number; no retry used)."""
        task = self.tasks[task_id]
        task.set_state(TaskState.PENDING)
        self.track(task)
        return task

    def stop(self, task_id: str, now_wall: float) -> Task:
        """A PAUSED (or PENDING, when its next segment does not fit the epoch budget) trial ends
        STOPPED with the metrics of its last rung result (None: it never had one)."""
        task = self.tasks[task_id]
        task.set_state(TaskState.STOPPED)
        task.orphan_attempt, task.held_until = None, None
        if task.finished_at is None:
            task.finished_at = now_wall
        self.track(task)
        return task

    def fail(self, task_id: str, attempt: int, kind: str, message: str, worker_name: str, duration: float,
             max_retries: int, now_wall: float) -> bool:
        """Records a failed attempt. Returns True when the task goes back to the queue (a retry),
        False when it failed for good (retries used up)."""
        task = self.tasks[task_id]
        self._prepare_finish(task)
        self.close_attempt(task_id, attempt, AttemptState.FAILED, kind, now_wall)
        task.error_kind, task.error_message = kind, message
        task.avoid_workers.add(worker_name)
        if task.retries_used < max_retries:
            task.retries_used += 1
            task.set_state(TaskState.PENDING)
            self.track(task)
            return True
        task.set_state(TaskState.FAILED)
        task.finished_by, task.finished_attempt, task.finished_at = worker_name, attempt, now_wall
        task.duration_seconds = duration
        self.track(task)
        return False

    def _prepare_finish(self, task: Task) -> None:
        # An orphaned attempt (master restarted) is finished straight from PENDING: pass through
        # LEASED so the task's state machine still only sees allowed transitions.
        if task.state is TaskState.PENDING and task.orphan_attempt is not None:
            task.set_state(TaskState.LEASED)
            task.attempt = task.orphan_attempt
            task.orphan_attempt = None
            task.held_until = None
            self.track(task)

    # --- losing workers -----------------------------------------------------------------------
    def live_leases(self, worker_id: str) -> list[tuple[str, int]]:
        """The worker's leases whose attempt is still out (what release_worker would release)."""
        return sorted(key for key in self._by_worker.get(worker_id, set())
                      if self.attempts[key].state is AttemptState.LEASED)

    def release_worker(self, worker_id: str, reason: str, now_wall: float, give_up: Collection[str] = (),
                       give_up_kind: str = "", give_up_message: str = "") -> list[tuple[str, int]]:
        """The worker is gone: its live attempts become STALE and their tasks go back to the
        queue at once, without using the tasks' retry budget; a task in `give_up` (it lost too
        many workers) fails instead, with that kind and message. Returns the released leases."""
        released = []
        for task_id, attempt in sorted(self._by_worker.pop(worker_id, set())):
            task = self.tasks[task_id]
            att = self.attempts[(task_id, attempt)]
            if att.state is not AttemptState.LEASED:
                continue
            att.set_state(AttemptState.STALE)
            att.ended_at, att.outcome = now_wall, reason
            if task.state is TaskState.LEASED and task.attempt == attempt:
                if task_id in give_up:
                    task.error_kind, task.error_message = give_up_kind, give_up_message
                    task.set_state(TaskState.FAILED)
                    task.finished_by, task.finished_attempt, task.finished_at = att.worker_name, attempt, now_wall
                else:
                    task.set_state(TaskState.PENDING)
                self.track(task)
            released.append((task_id, attempt))
        return released
