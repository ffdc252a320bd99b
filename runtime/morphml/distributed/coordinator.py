"""The experiment coordinator: drives an optimizer through ask/tell over a pool of workers.

It owns the lease table, the worker registry and the journal, and decides everything the
master does: which task goes to which worker, what a result means (counted, retried, stale),
what happens when a worker dies, when the experiment is over. It knows nothing about gRPC:
the master's servicer translates RPCs into calls here, and lease hand-outs come back as plain
messages on a per-worker outbox queue. Time comes from an injected clock, so tests of
heartbeats and holds run without sleeping.

Fail-stop: memory changes with the transaction that journals it, so a failed commit leaves
memory ahead of the file. Any error inside a change therefore halts the coordinator (every
later call raises the JournalError, on_halt callbacks stop the server); leases, shutdowns and
"done" are after-commit callbacks, so nothing of the failed change ever left.

Early stopping (spec.earlyStopping): progress reports of live attempts are journaled as the
trial's learning curve and fed to the scheduler (morphml.distributed.schedulers, a pure state
machine); a STOP is journaled (event stop_decided) before it is answered, and the attempt's
result then finishes the task as STOPPED: finished, not failed, the optimizer told its last
reported value.

Multi-fidelity (asha/hyperband, docs/early-stopping.md): a trial trains in segments, one lease
each (LeaseMessage start_epoch/stop_epoch/checkpoint/save_epochs); a segment's result at a rung
below the full budget PAUSES the trial (journaled rung_result + paused), and a free slot first
promotes a paused trial ASHA allows (promoted; PAUSED -> PENDING, a new attempt resuming from
the trial's latest checkpoint, no retry used), else starts a new trial. When nothing more can
start, the paused trials become STOPPED. spec.budget.maxEpochs is kept by counting each lease's
segment when it is granted (meta epochs_leased) and reserving what pending tasks will lease.
Checkpoints are journaled (checkpoint_saved / checkpoint_deleted, resumed, checkpoint_fallback)
and deleted from `artifact_store` only after the commit that says so. A restart rebuilds all of
it from those events (no schema change).

Imports: morphml.distributed.{states, clock, leases, registry, journal, schedulers, checkpoints}; the optimizer is
any object with the ask/tell contract (ask, tell, is_finished, state_dict, load_state_dict).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import math
import queue
import secrets
import statistics
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .checkpoints import ArtifactSettings, ArtifactStore, CheckpointRef, validate_key
from .clock import ManualClock, SystemClock
from .journal import Journal, JournalError
from .leases import Attempt, LeaseTable, ResultMatch, Task
from .registry import WorkerRecord, WorkerRegistry
from .schedulers import Asha, Decision, EarlyStoppingSettings, Promotion, Report, Value, make_scheduler
from .states import LossReason, TaskState, WorkerState

log = logging.getLogger("morphml.master")

FAILURE_KINDS = ("exception", "nan", "timeout", "oom", "invalid")
PENDING, RUNNING, SUCCEEDED, FAILED = "Pending", "Running", "Succeeded", "Failed"
MAX_ERROR_TEXT = 4000
DEFAULT_EPOCHS = 5  # spec.evaluation.epochs when a settings dict lacks it (the CRD's default)
AUTO_PREFETCH_BELOW_SECONDS = 2.0  # prefetch=None: one queued lease per worker while trials are this short,
AUTO_PREFETCH_2_BELOW_SECONDS = 0.05  # two while they are shorter than a result's round trip (commit + fsync)
AUTO_PREFETCH_WINDOW = 16  # ...judged by the median duration of this many last finished trials
RECENT_LOSSES = 100  # losses status() shows by default...
MAX_LOSSES_PER_STATUS = 500  # ...and at most this many after a given loss number
SNAPSHOT_EVERY = 100  # optimizer ops between state_dict snapshots in the journal, at least...
SNAPSHOT_GROWTH = 0.5  # ...and at least this fraction of all ops so far: a state_dict grows with the
# history, so a fixed interval made each trial's share of the snapshots grow with the run
# (0.3 ms per trial at 800 trials); a geometric one keeps it constant, and a restart replays
# at most about half of the ops.


# Worker losses that count toward spec.faultTolerance.maxTaskLosses: a worker that died or went
# silent under the trial (not a clean leave, not a master restart).
COUNTED_LOSSES = frozenset({LossReason.STREAM.value, LossReason.HEARTBEAT.value, LossReason.POD_GONE.value})
LOST_FAILURE_KIND = "lost"

@dataclass
class ExperimentSettings:
    """What the coordinator needs from the manifest (spec.budget, faultTolerance, ...)."""

    name: str = "experiment"
    max_trials: int = 100
    max_failed_trials: int = 10
    max_task_retries: int = 2
    # Worker losses a trial may be out for before it fails (kind "lost"): a trial that kills its
    # workers must not take down worker after worker for ever.
    max_task_losses: int = 5
    heartbeat_interval: float = 10.0
    missed_heartbeats: int = 3
    evaluation: dict = field(default_factory=dict)
    metric: str = "val_accuracy"
    goal: str = "maximize"
    seed: int = 0
    # After a restart, leases that were out stay reserved this long for their worker to
    # reconnect and re-adopt them (default: one heartbeat timeout).
    restart_hold_seconds: float | None = None
    # Hand out no lease until this many workers are connected (or min_workers_wait_seconds
    # passed since the master started): a fair start for benchmarks and gang-like runs.
    min_workers: int = 0
    min_workers_wait_seconds: float = 60.0
    # Leases queued on each worker beyond its slots, so it starts the next trial the moment one
    # ends instead of waiting a master round trip. 0 keeps "ask only for free slots"; 1 pays
    # off only for short trials (docs/benchmarks.md). None = auto: 1 while the median duration
    # of the last trials is under AUTO_PREFETCH_BELOW_SECONDS (2 under AUTO_PREFETCH_2_BELOW_SECONDS),
    # else 0 (the CLI's default).
    prefetch: int | None = 0
    # spec.earlyStopping (default type none: every trial trains its full budget).
    early_stopping: EarlyStoppingSettings = field(default_factory=EarlyStoppingSettings)
    # spec.artifacts (checkpoint interval, retention, store) and spec.budget.maxEpochs (total
    # epochs leased over all trials; None = no limit).
    artifacts: ArtifactSettings = field(default_factory=ArtifactSettings)
    max_epochs: int | None = None

    def __post_init__(self) -> None:
        if self.max_trials < 1:
            raise ValueError(f"spec.budget.maxTrials={self.max_trials!r}: must be >= 1")
        if self.max_failed_trials < 0:
            raise ValueError(f"spec.budget.maxFailedTrials={self.max_failed_trials!r}: must be >= 0")
        if self.prefetch is not None and self.prefetch < 0:
            raise ValueError(f"prefetch={self.prefetch!r}: must be >= 0")
        if self.max_task_retries < 0:
            raise ValueError(f"spec.faultTolerance.maxTaskRetries={self.max_task_retries!r}: must be >= 0")
        if self.max_task_losses < 1:
            raise ValueError(f"spec.faultTolerance.maxTaskLosses={self.max_task_losses!r}: must be >= 1")
        if self.goal not in ("maximize", "minimize"):
            raise ValueError(f"spec.objective.goal={self.goal!r}: allowed maximize, minimize")
        if self.max_epochs is not None and (isinstance(self.max_epochs, bool) or not isinstance(self.max_epochs, int)
                                            or self.max_epochs < 1):
            raise ValueError(f"spec.budget.maxEpochs={self.max_epochs!r}: must be an integer >= 1")


@dataclass
class LeaseMessage:
    task_id: str
    attempt: int
    arch_json: str
    evaluation_json: str
    seed: int
    lease_key: str = ""
    # The segment to train (docs/early-stopping.md, MF_CONTRACT): epochs already trained (0 =
    # fresh), train until this many in total (0 = the evaluation's full epochs), the checkpoint to
    # resume from (None unless start_epoch > 0), the epochs after which to save a checkpoint.
    start_epoch: int = 0
    stop_epoch: int = 0
    checkpoint: CheckpointRef | None = None
    save_epochs: tuple[int, ...] = ()


@dataclass
class ResultReport:
    """One result as a worker reports it (see ExperimentCoordinator.report_results)."""

    task_id: str
    attempt: int
    ok: bool
    metrics: dict | None
    failure_kind: str = ""
    failure_message: str = ""
    worker_name: str = ""
    duration: float = 0.0
    lease_key: str | None = None


@dataclass
class ProgressReport:
    """One progress report as a worker sends it (see ExperimentCoordinator.report_progress)."""

    task_id: str
    attempt: int
    step: int
    metrics: dict
    lease_key: str | None = None


@dataclass
class _QueuedResult:
    """A reported result waiting for the group commit that journals it."""

    args: tuple
    claimed: bool = False  # taken into a batch
    disposition: str | None = None
    error: BaseException | None = None
    durable: threading.Event = field(default_factory=threading.Event)  # its batch is fsynced (or failed)


@dataclass
class ShutdownMessage:
    reason: str


# Put on an outbox to end that worker's session stream (the worker was declared dead).
END_OF_STREAM = None


def _arch_hash(candidate: Any) -> str:
    arch_hash = candidate.graph.arch_hash
    return str(arch_hash() if callable(arch_hash) else arch_hash)


def describe_candidate(candidate: Any) -> tuple[str, str, str, str, int]:
    """(candidate id, canonical arch JSON text, arch hash, summary, generation) of a Candidate."""
    graph = candidate.graph
    arch = graph.to_json()
    arch_text = arch if isinstance(arch, str) else json.dumps(arch, sort_keys=True)
    arch_hash = _arch_hash(candidate)
    summary = getattr(graph, "summary", "")
    summary = summary() if callable(summary) else summary
    generation = int(getattr(candidate, "generation", 0) or 0)
    return str(candidate.id), arch_text, str(arch_hash), str(summary or ""), generation


class ExperimentCoordinator:
    """All master decisions, under one lock, each journaled as one transaction."""

    def __init__(self, optimizer: Any, settings: ExperimentSettings, journal: Journal,
                 clock: SystemClock | ManualClock | None = None):
        self.optimizer = optimizer
        self.settings = settings
        self.journal = journal
        self.clock = clock or SystemClock()
        self.registry = WorkerRegistry(self.clock, settings.heartbeat_interval, settings.missed_heartbeats)
        self.leases = LeaseTable()
        self._lock = threading.RLock()
        self.changed = threading.Condition(self._lock)
        self._outboxes: dict[str, queue.Queue] = {}
        # Makes a worker's outbox: a queue.Queue, or a subclass that also wakes whoever sends
        # it out (the gRPC server sets one).
        self.new_outbox: Callable[[], queue.Queue] = queue.Queue
        self._queue_lock = threading.Lock()
        self._recent_durations: deque[float] = deque(maxlen=AUTO_PREFETCH_WINDOW)
        self._result_queue: list[_QueuedResult] = []
        self.phase = PENDING
        self.message = ""
        self.succeeded = 0
        self.failed = 0
        self.stopped = 0  # finished early by the scheduler: counted as finished, never as failed
        self.full_epochs = int(settings.evaluation.get("epochs", DEFAULT_EPOCHS))
        objectives = getattr(optimizer, "objectives", None)
        goals = [o["goal"] for o in objectives] if objectives and len(objectives) > 1 else None
        self._objective_metrics = [o["metric"] for o in objectives] if goals and objectives else [settings.metric]
        self.scheduler = make_scheduler(settings.early_stopping, settings.goal, self.full_epochs, goals)
        # asha/hyperband: trials train in segments up to their rung and pause there (see _segment_result).
        self._asha: Asha | None = self.scheduler if isinstance(self.scheduler, Asha) else None
        # Trials whose candidate the optimizer was told about (asha/hyperband: at the first rung
        # result, then updated at each higher rung; see docs/early-stopping.md).
        self._told: set[str] = set()
        # Epochs leased so far (each lease's segment; a finished attempt's unused epochs are given
        # back): what spec.budget.maxEpochs limits. Journaled (meta epochs_leased) with each lease.
        self.epochs_leased = 0
        # The store checkpoints are kept in (set by whoever builds the master; None = no checkpoints).
        self.artifact_store: ArtifactStore | None = None
        # Journaled checkpoints still in the store, per trial by epoch; the checkpoint each attempt
        # was leased to resume from (task -> attempt -> ref).
        self._checkpoints: dict[str, list[CheckpointRef]] = {}
        self._resume: dict[str, dict[int, CheckpointRef]] = {}
        # Attempts the scheduler stopped (journaled as stop_decided events), and the last report
        # of each live attempt (step, metrics): what a stopped trial's result is completed with.
        self._stop_decided: set[tuple[str, int]] = set()
        self._last_report: dict[tuple[str, int], tuple[int, dict]] = {}
        self.retries = 0
        self.stale_results = 0
        # Per trial: how often a worker died under it (the journal's "requeued" events of lost
        # workers; spec.faultTolerance.maxTaskLosses).
        self._losses_of: collections.Counter[str] = collections.Counter()
        # Every result by disposition and every loss by detection path, whole journal (restored
        # at start): what the metrics' counters read, so they agree with the journal across restarts.
        self.results_by_disposition: collections.Counter[str] = collections.Counter()
        self.losses_by_reason: collections.Counter[str] = collections.Counter()
        # Metrics hook: (lease-to-result seconds, reported trial seconds) of each accepted result,
        # called inside the result's transaction (cheap, no journal calls).
        self.on_accepted_result: Callable[[float, float], None] | None = None
        self.best: Task | None = None
        # The most recent worker losses (status' default view); all of them are in the journal,
        # numbered 1, 2, 3, ... across restarts (loss_seq is the latest number).
        self.losses: deque[dict] = deque(maxlen=RECENT_LOSSES)
        self.loss_seq = 0
        self._seq = 0
        self._exhausted = False
        self._evaluation_json = json.dumps(settings.evaluation, sort_keys=True)
        self._started_mono = self.clock.monotonic()
        self._ops_since_snapshot = 0
        self._last_op_seq = 0
        self._halted: JournalError | None = None
        self._done_committed = False  # `done`: Succeeded/Failed is journaled (and fsynced)
        # Called once, with the error, when a change fails (see _halt); may run on any thread
        # and under the coordinator's lock, so it must not block.
        self.on_halt: list[Callable[[JournalError], None]] = []
        self._restore()

    # --- restart -----------------------------------------------------------------------------
    def _restore(self) -> None:
        with self._lock, self.journal.transaction():
            now, mono = self.clock.wall(), self.clock.monotonic()
            state, op_seq = self.journal.load_optimizer()
            if state is not None:
                self.optimizer.load_state_dict(state)
            self._replay_optimizer(op_seq)
            tasks = self.journal.load_tasks()
            for att in self.journal.load_attempts():
                self.leases.attempts[(att.task_id, att.attempt)] = att
            hold = self.settings.restart_hold_seconds
            hold = self.registry.heartbeat_timeout if hold is None else hold
            for task in tasks:
                if task.state is TaskState.LEASED:
                    # The worker may still be running it: keep the attempt number, accept its result,
                    # and reserve the task for it for a while before handing it to someone else.
                    task.set_state(TaskState.PENDING)
                    task.orphan_attempt = task.attempt
                    task.held_until = mono + hold
                    self.journal.event(now, "requeued", task.task_id, task.attempt,
                                       detected_by=LossReason.RESTART.value,
                                       detected_at=now, hold_seconds=hold)
                self.leases.add(task)
                self._seq += 1
                self.journal.save_task(task, self._seq)
                if task.state is TaskState.SUCCEEDED:
                    self.succeeded += 1
                    self._update_best(task)
                elif task.state is TaskState.FAILED:
                    self.failed += 1
                elif task.state is TaskState.STOPPED:
                    self.stopped += 1
                    self._update_best(task)
            self._restore_curves()
            self._restore_segments(tasks)
            self.retries = self.journal.count_events("retry")
            self._losses_of.update(e["task_id"] for e in self.journal.events("requeued")
                                   if e["detail"].get("detected_by") in COUNTED_LOSSES)
            self.stale_results = self.journal.count_results("stale")
            self.loss_seq = self.journal.last_loss_seq()
            self.results_by_disposition.update(self.journal.count_results_by_disposition())
            self.losses_by_reason.update(self.journal.count_losses_by_reason())
            self.losses.extend(self.journal.losses(latest=RECENT_LOSSES))
            phase = self.journal.get_meta("phase")
            if phase in (SUCCEEDED, FAILED):
                self.phase = phase
                self.message = self.journal.get_meta("message", "")
                self._done_committed = True
            self.journal.set_meta("name", self.settings.name)
            self._lease_secret = self.journal.get_meta("lease_secret")
            if self._lease_secret is None:
                self._lease_secret = secrets.token_hex(32)
                self.journal.set_meta("lease_secret", self._lease_secret)
            self.journal.event(now, "master_started", restored_tasks=len(tasks), phase=self.phase)
            if tasks:
                log.info("restored %d tasks from %s (%d succeeded, %d failed)", len(tasks), self.journal.path,
                         self.succeeded, self.failed)

    def _restore_curves(self) -> None:
        """The scheduler's state and the stop decisions after a restart: the journaled curves fed
        again in order (their decisions are journaled already), and the stop_decided events."""
        reports = []
        for point in self.journal.curves():
            key = (point["task_id"], point["attempt"])
            self._last_report[key] = (point["step"], point["metrics"])
            value = point["metrics"].get(self.settings.metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                reports.append(Report(point["task_id"], point["step"], float(value)))
        self.scheduler.restore(reports)
        for event in self.journal.events("stop_decided"):
            self._stop_decided.add((event["task_id"], event["attempt"]))

    def _restore_segments(self, tasks: list[Task]) -> None:
        """After a restart: the epochs leased, the checkpoints in the store and what each attempt
        resumed from, and (asha/hyperband) every trial's bracket, rung results and promotions, all
        from the journal's events in the order they happened."""
        self.epochs_leased = int(self.journal.get_meta("epochs_leased", 0))
        for event in self.journal.events(("checkpoint_saved", "checkpoint_deleted", "resumed")):
            d, task_id = event["detail"], event["task_id"]
            if event["kind"] == "checkpoint_saved":
                self._add_checkpoint(CheckpointRef(task_id, d["epoch"], d["key"], d["sha256"], d["size"],
                                                   d["arch_hash"]))
            elif event["kind"] == "checkpoint_deleted":
                refs = self._checkpoints.get(task_id, [])
                refs[:] = [r for r in refs if r.key != d["key"]]
            else:
                self._resume.setdefault(task_id, {})[event["attempt"]] = CheckpointRef(
                    task_id, d["epoch"], d["key"], d["sha256"], d["size"], d["arch_hash"])
        if self._asha is None:
            return
        for task in tasks:  # brackets are dealt round-robin in proposal order: the same again
            self._asha.assign(task.task_id)
            if task.finished:
                self._told.add(task.task_id)
        for event in self.journal.events(("rung_result", "promoted")):
            d = event["detail"]
            if event["kind"] == "rung_result":
                value = d["value"]
                self._asha.record(event["task_id"], d["epoch"], tuple(value) if isinstance(value, list) else value)
                self._told.add(event["task_id"])
            else:
                self._asha.promote(Promotion(event["task_id"], d["from_epoch"], d["to_epoch"], d.get("bracket", 0)))

    def _finished_count(self) -> int:
        return self.succeeded + self.failed + self.stopped

    def _replay_optimizer(self, after_seq: int) -> None:
        """Re-applies the asks and tells logged after the last snapshot."""
        ops = self.journal.optimizer_ops_after(after_seq)
        for seq, op, arg in ops:
            if op == "ask":
                asked = list(self.optimizer.ask(arg["n"]))
                ids = [str(c.id) for c in asked]
                # Journals written before the hashes were logged carry ids only.
                hashes = [_arch_hash(c) for c in asked] if "hashes" in arg else None
                if ids != arg["ids"] or (hashes is not None and hashes != arg["hashes"]):
                    raise RuntimeError(
                        f"journal {self.journal.path}: replaying optimizer op {seq} (ask {arg['n']}) gave candidates "
                        f"{ids} (architectures {hashes}), the journal has {arg['ids']} ({arg.get('hashes')}); the "
                        f"optimizer is not deterministic or the manifest changed since the journal was written")
            elif op == "tell":
                self.optimizer.tell(arg["id"], arg["metrics"])
            elif op == "update":
                self.optimizer.update(arg["id"], arg["metrics"])
        self._ops_since_snapshot = len(ops)
        if ops:
            self._last_op_seq = ops[-1][0]

    def _ask(self, n: int) -> list:
        candidates = list(self.optimizer.ask(n))[:n]
        refused = getattr(self.optimizer, "refused_in_last_ask", None)
        if refused:  # candidates a constraint refused before any lease (spec.constraints); replay skips this op
            self.journal.log_optimizer_op("refuse", {"candidates": list(refused)})
        # The hashes let a replay tell a different architecture behind the same id (ids are
        # positional, "c17"), which would attach journaled results to the wrong network.
        self._last_op_seq = self.journal.log_optimizer_op("ask", {
            "n": n, "ids": [str(c.id) for c in candidates], "hashes": [_arch_hash(c) for c in candidates]})
        self._ops_since_snapshot += 1
        return candidates

    def _tell(self, candidate_id: str, metrics: dict | None) -> None:
        self.optimizer.tell(candidate_id, metrics)
        self._last_op_seq = self.journal.log_optimizer_op("tell", {"id": candidate_id, "metrics": metrics})
        self._ops_since_snapshot += 1

    def _update_told(self, candidate_id: str, metrics: dict) -> None:
        """A told candidate's later result (asha/hyperband: its value at a higher rung), for an
        optimizer that takes one (`Optimizer.update`); logged only when it changed something."""
        update = getattr(self.optimizer, "update", None)
        if update is None or not update(candidate_id, metrics):
            return
        self._last_op_seq = self.journal.log_optimizer_op("update", {"id": candidate_id, "metrics": metrics})
        self._ops_since_snapshot += 1

    def _maybe_snapshot(self, force: bool = False) -> None:
        due = max(SNAPSHOT_EVERY, int(self._last_op_seq * SNAPSHOT_GROWTH))
        if self._ops_since_snapshot and (force or self._ops_since_snapshot >= due):
            state_json = getattr(self.optimizer, "state_json", None)  # morphml's optimizers: cheaper
            state = state_json() if state_json is not None else self.optimizer.state_dict()
            self.journal.save_optimizer(state, self.clock.wall(), self._last_op_seq)
            self._ops_since_snapshot = 0

    # --- workers -----------------------------------------------------------------------------
    def register(self, name: str, gpus: int, slots: int, hostname: str = "", pid: int = 0,
                 running: list[tuple[str, int]] | None = None) -> tuple[str, list[tuple[str, int]]]:
        if not name:
            raise ValueError("worker_name: must not be empty")
        if slots < 1 or gpus < 0:
            raise ValueError(f"slots={slots} gpus={gpus}: slots must be >= 1 and gpus >= 0")
        with self._lock, self._change():
            now = self.clock.wall()
            rec = self.registry.register(name, gpus, slots, hostname, pid)
            rec.prefetch = self._prefetch()
            self._outboxes[rec.worker_id] = self.new_outbox()
            self.journal.event(now, "worker_registered", worker_id=rec.worker_id, worker_name=name, gpus=gpus,
                               slots=slots, hostname=hostname, pid=pid)
            adopted = []
            for task_id, attempt in running or []:
                att = self.leases.adopt(task_id, attempt, rec.worker_id, name, now)
                if att is None:
                    continue
                rec.leases.add((task_id, attempt))
                adopted.append((task_id, attempt))
                self.journal.save_attempt(att)
                self._save_task(self.leases.tasks[task_id])
                self.journal.event(now, "adopted", task_id, attempt, rec.worker_id, name)
            return rec.worker_id, adopted

    def connect(self, worker_id: str) -> queue.Queue | None:
        """The worker's session stream opened; returns its outbox (None: unknown or dead)."""
        with self._lock, self._change():
            rec = self.registry.get(worker_id)
            if rec is None or not rec.alive:
                return None
            self.registry.connected(worker_id)
            self._dispatch()  # while Pending: only proposes
            self._maybe_start()
            outbox = self._outboxes[worker_id]
            if self.phase in (SUCCEEDED, FAILED):
                outbox.put(ShutdownMessage(f"experiment {self.phase.lower()}"))
            self._dispatch()
            return outbox

    def _maybe_start(self) -> None:
        """Pending -> Running once enough workers are connected (or the wait is over)."""
        if self.phase != PENDING:
            return
        connected = sum(1 for w in self.registry.live() if w.state is not WorkerState.REGISTERING)
        waited = self.clock.monotonic() - self._started_mono
        if connected and (connected >= self.settings.min_workers or waited >= self.settings.min_workers_wait_seconds):
            self._set_phase(RUNNING, "")

    def heartbeat(self, worker_id: str) -> bool:
        """Records a heartbeat; False when the worker is unknown or already declared dead."""
        with self._lock:
            self._check_running()
            rec = self.registry.get(worker_id)
            if rec is None or not rec.alive:
                return False
            self.registry.heartbeat(worker_id)
            return True

    def drain(self, worker_id: str, reason: str) -> None:
        with self._lock, self._change():
            rec = self.registry.get(worker_id)
            if rec is None or not rec.alive:
                return
            self.registry.drain(worker_id)
            self.journal.event(self.clock.wall(), "worker_draining", worker_id=worker_id, worker_name=rec.name,
                               reason=reason)

    def worker_lost(self, worker_id: str, reason: LossReason, detail: str = "") -> list[tuple[str, int]]:
        """Declares a worker dead; its leases go back to the queue at once (no retry used) and
        are re-leased right away to workers with free slots."""
        with self._lock, self._change():
            now = self.clock.wall()
            rec = self.registry.mark_dead(worker_id, reason.value)
            if rec is None:
                return []
            counted = reason.value in COUNTED_LOSSES
            give_up = {task_id for task_id, _ in self.leases.live_leases(worker_id)
                       if counted and self._losses_of[task_id] + 1 >= self.settings.max_task_losses}
            message = (f"the trial lost its worker {self.settings.max_task_losses} times "
                       f"(spec.faultTolerance.maxTaskLosses={self.settings.max_task_losses}; the last: {rec.name}, "
                       f"{reason.value}): it may be what takes its workers down (out of memory for the whole "
                       f"container, a crash); see the worker's logs")
            released = self.leases.release_worker(worker_id, reason.value, now, give_up=give_up,
                                                  give_up_kind=LOST_FAILURE_KIND, give_up_message=message)
            rec.leases.clear()
            for task_id, attempt in released:
                self.journal.save_attempt(self.leases.attempts[(task_id, attempt)])
                self._save_task(self.leases.tasks[task_id])
                if counted:
                    self._losses_of[task_id] += 1
                if task_id in give_up:
                    self._lost_for_good(self.leases.tasks[task_id], attempt, rec, reason, message, now)
                    continue
                self.journal.event(now, "requeued", task_id, attempt, worker_id, rec.name, detected_by=reason.value,
                                   detected_at=now)
            self.journal.event(now, "worker_dead", worker_id=worker_id, worker_name=rec.name,
                               detected_by=reason.value, detail=detail, requeued=[list(r) for r in released])
            if reason is not LossReason.DEREGISTER or released:  # a clean leave is not a loss
                self.loss_seq += 1
                self.journal.add_loss(self.loss_seq, worker_id, rec.name, reason.value, now, released)
                self.losses_by_reason[reason.value] += 1
                self.losses.append({"seq": self.loss_seq, "worker_id": worker_id, "worker_name": rec.name,
                                    "detected_by": reason.value, "detected_at": now, "requeued": released})
            self._outboxes.get(worker_id, queue.Queue()).put(END_OF_STREAM)
            if released or reason is not LossReason.DEREGISTER:
                log.warning("worker %s lost (%s); requeued %s", worker_id, reason.value, released or "nothing")
            self._dispatch()
            self.changed.notify_all()
            return released

    def _lost_for_good(self, task: Task, attempt: int, rec: Any, reason: LossReason, message: str,
                       now: float) -> None:
        """A trial out for its maxTaskLosses-th lost worker: failed (counts toward maxFailedTrials),
        the optimizer told, its checkpoints released like any failed trial's."""
        self.failed += 1
        if task.task_id not in self._told:
            if self._asha is not None:
                self._told.add(task.task_id)
            self._tell(task.candidate_id, None)
        self.journal.event(now, "failed", task.task_id, attempt, rec.worker_id, rec.name,
                           failure_kind=LOST_FAILURE_KIND, message=message, detected_by=reason.value,
                           losses=self._losses_of[task.task_id])
        log.warning("trial %s failed: %s", task.task_id, message)
        self._retain({task.task_id})
        self._check_done()

    def worker_gone(self, worker: str, reason: str) -> tuple[list[str], list[tuple[str, int]]]:
        """The operator says the pod is gone: every live registration of that name/id dies now."""
        with self._lock:
            self._check_running()
            ids, released = [], []
            for rec in self.registry.by_name_or_id(worker):
                ids.append(rec.worker_id)
                released += self.worker_lost(rec.worker_id, LossReason.POD_GONE, reason)
            return ids, released

    def deregister(self, worker_id: str, reason: str) -> list[tuple[str, int]]:
        return self.worker_lost(worker_id, LossReason.DEREGISTER, reason)

    def check_heartbeats(self) -> list[str]:
        """Declares dead every worker past interval x missed; also releases restart holds."""
        with self._lock:
            self._check_running()
            lost = []
            for rec in self.registry.expired():
                lost.append(rec.worker_id)
                self.worker_lost(rec.worker_id, LossReason.HEARTBEAT,
                                 f"no heartbeat for {self.registry.seconds_since_heartbeat(rec):.2f}s")
            if self.phase == PENDING:
                with self._change():
                    self._maybe_start()
                    self._dispatch()
            mono = self.clock.monotonic()
            if any(t.held_until is not None and t.held_until <= mono for t in self._pending_tasks()):
                with self._change():
                    self._dispatch()
            return lost

    # --- results -----------------------------------------------------------------------------
    def lease_key(self, task_id: str, attempt: int) -> str:
        """The key a worker must quote to report (task id, attempt): only its lease carries it."""
        message = f"{task_id}\x00{attempt}".encode()
        return hmac.new(bytes.fromhex(self._lease_secret), message, hashlib.sha256).hexdigest()[:32]

    def report_result(self, task_id: str, attempt: int, ok: bool, metrics: dict | None, failure_kind: str = "",
                      failure_message: str = "", worker_name: str = "", duration: float = 0.0,
                      lease_key: str | None = None) -> str:
        """Returns the disposition: accepted, stale, duplicate, unknown or refused, once it is journaled.

        `lease_key` is checked when given (the gRPC service always gives it): a result whose key
        is not the lease's is "refused", journaled as such and never counted. In-process callers
        that hold the coordinator itself may leave it None."""
        return self.report_results([ResultReport(task_id, attempt, ok, metrics, failure_kind, failure_message,
                                                 worker_name, duration, lease_key)])[0]

    def report_results(self, reports: list[ResultReport]) -> list[str]:
        """report_result for several results at once (a worker's batch); dispositions in order.

        Group commit: results that arrive while another batch is being journaled queue up, and
        the next caller to get the lock handles every queued one in one transaction (one fsync,
        one optimizer ask for all freed slots). That caller fsyncs after releasing the lock, so
        the next batch is built meanwhile; the batch's leases go out and every caller in it
        returns only after that fsync, so an acknowledged result is always durable."""
        items = []
        for r in reports:
            ok, metrics, failure_kind = r.ok, r.metrics, r.failure_kind
            if not ok and failure_kind not in FAILURE_KINDS:
                raise ValueError(f"failure_kind={failure_kind!r}: allowed {', '.join(FAILURE_KINDS)}")
            failure_message = (r.failure_message or "")[:MAX_ERROR_TEXT]
            if ok:
                ok, failure_kind, failure_message = self._check_metrics(metrics)
            forged = r.lease_key is not None and not hmac.compare_digest(r.lease_key,
                                                                          self.lease_key(r.task_id, r.attempt))
            items.append(_QueuedResult((r.task_id, r.attempt, ok, metrics, failure_kind, failure_message,
                                        r.worker_name, r.duration, forged)))
        if not items:
            return []
        self._check_running()
        with self._queue_lock:  # all of them in one go: whichever batch takes one takes all
            self._result_queue.extend(items)
        pending, batch = None, []
        with self._lock:
            if not items[0].claimed:
                with self._queue_lock:
                    batch, self._result_queue = self._result_queue, []
                for queued in batch:
                    queued.claimed = True
                if self._halted is not None:  # halted while these queued: none of them is journaled
                    self._release(batch, self._halted)
                    self._check_running()
                dispositions = []
                try:
                    with self.journal.deferred_transaction() as pending:
                        for queued in batch:
                            dispositions.append(self._apply_result(*queued.args))
                        self._check_done()
                        self._dispatch()
                        self._maybe_snapshot(force=self.phase in (SUCCEEDED, FAILED))
                except BaseException as exc:
                    self._halt(exc)
                    self._release(batch, exc)
                    raise
                for queued, disposition in zip(batch, dispositions, strict=True):
                    queued.disposition = disposition
                self.changed.notify_all()
        if pending is not None:  # this caller committed the batch: make it durable, then release it
            try:
                pending.finish()
            except BaseException as exc:
                self._halt(exc)  # written but maybe not durable: nothing of it may be acknowledged
                self._release(batch, exc)
                raise
            self._release(batch)
        else:
            items[0].durable.wait()
        if items[0].error is not None:
            raise items[0].error
        return [str(item.disposition) for item in items]

    @staticmethod
    def _release(batch: list[_QueuedResult], error: BaseException | None = None) -> None:
        for queued in batch:
            if error is not None:
                queued.error = error
            queued.durable.set()

    def _apply_result(self, task_id: str, attempt: int, ok: bool, metrics: dict | None, failure_kind: str,
                      failure_message: str, worker_name: str, duration: float, forged: bool = False) -> str:
        """One result's effect, inside the caller's transaction; returns its disposition."""
        now = self.clock.wall()
        match = self.leases.match(task_id, attempt)
        disposition = {ResultMatch.LIVE: "accepted", ResultMatch.ORPHAN: "accepted",
                       ResultMatch.DUPLICATE: "duplicate", ResultMatch.UNKNOWN: "unknown"}.get(match, "stale")
        if forged and disposition != "unknown":
            disposition = "refused"
            self.journal.add_result(now, task_id, attempt, worker_name, disposition, False, None, "", "", duration)
            self.results_by_disposition[disposition] += 1
            self.journal.event(now, "refused_result", task_id, attempt, worker_name=worker_name,
                               reason="lease_key does not match")
            return disposition
        self.journal.add_result(now, task_id, attempt, worker_name, disposition, ok, metrics if ok else None,
                                failure_kind, failure_message, duration)
        self.results_by_disposition[disposition] += 1
        if disposition == "stale":
            self.stale_results += 1
            self.journal.event(now, "stale_result", task_id, attempt, worker_name=worker_name)
            return disposition
        if disposition != "accepted":
            return disposition
        att = self.leases.attempts[(task_id, attempt)]
        holder = self.registry.get(att.worker_id)
        task = self.leases.tasks[task_id]
        old_best = self.best.task_id if self.best is not None else None
        self._account_result(task, att, metrics if ok else None, now)
        self._recent_durations.append(max(0.0, float(duration or 0.0)))
        if self.on_accepted_result is not None:
            self.on_accepted_result(max(0.0, now - att.leased_at), max(0.0, float(duration or 0.0)))
        if ok and (task_id, attempt) in self._stop_decided:
            assert metrics is not None
            metrics = self._stopped_metrics(task_id, attempt, metrics)
            self.leases.succeed(task_id, attempt, metrics, worker_name or att.worker_name, duration, now, stopped=True)
            self.stopped += 1
            self._tell(task.candidate_id, metrics)
            self.journal.event(now, "stopped", task_id, attempt, att.worker_id, worker_name or att.worker_name,
                               metric=metrics.get(self.settings.metric), epochs=metrics.get("epochs"))
        elif ok and self._asha is not None:
            assert metrics is not None
            self._segment_result(task, att, metrics, worker_name or att.worker_name, duration, now)
        elif ok:
            assert metrics is not None  # _check_metrics made ok mean "a dict with the objective"
            self.leases.succeed(task_id, attempt, metrics, worker_name or att.worker_name, duration, now)
            self.succeeded += 1
            self._tell(task.candidate_id, metrics)
            self.journal.event(now, "succeeded", task_id, attempt, att.worker_id, worker_name or att.worker_name,
                               metric=metrics.get(self.settings.metric))
            self._update_best(task, journal=True)
        else:
            retried = self.leases.fail(task_id, attempt, failure_kind, failure_message,
                                       worker_name or att.worker_name, duration, self.settings.max_task_retries, now)
            if retried:
                self.retries += 1
                self.journal.event(now, "retry", task_id, attempt, att.worker_id, worker_name or att.worker_name,
                                   failure_kind=failure_kind, message=failure_message,
                                   retries_used=task.retries_used)
            else:
                self.failed += 1
                if task_id not in self._told:  # asha: a promoted trial was told at its first rung
                    if self._asha is not None:
                        self._told.add(task_id)
                    self._tell(task.candidate_id, None)
                self.journal.event(now, "failed", task_id, attempt, att.worker_id, worker_name or att.worker_name,
                                   failure_kind=failure_kind, message=failure_message)
        self.journal.save_attempt(att)
        self._save_task(task)
        if holder is not None:
            holder.leases.discard((task_id, attempt))
            self.registry.refresh_load(holder)
        self._retain({task_id, old_best or task_id, self.best.task_id if self.best is not None else task_id})
        self._check_done()
        return disposition

    def _account_result(self, task: Task, att: Attempt, metrics: dict | None, now: float) -> None:
        """The epochs an accepted result used: a segment that ended early (median stop, fewer
        epochs) gives the rest back to the epoch budget; a checkpoint the worker could not use
        (it trained from 0, metrics["checkpoint_fallback"]) is journaled and costs the epochs it
        retrained."""
        ref = self._resume.get(task.task_id, {}).get(att.attempt)
        start = ref.epoch if ref is not None else 0
        if metrics is not None and metrics.get("checkpoint_fallback"):
            self.journal.event(now, "checkpoint_fallback", task.task_id, att.attempt, att.worker_id, att.worker_name,
                               key=ref.key if ref is not None else "", reason=str(metrics["checkpoint_fallback"]))
            self.epochs_leased += start
            start = 0
        before = self.epochs_leased
        # A failed attempt keeps its whole segment (unknown how far it got); so does one leased
        # before a restart (which start it had is not known).
        if metrics is not None and task.orphan_attempt != att.attempt:
            stop = self._asha.target(task.task_id) if self._asha is not None else 0
            end = stop or self.full_epochs
            reached = metrics.get("epochs")
            if isinstance(reached, int) and not isinstance(reached, bool) and start <= reached < end:
                self.epochs_leased -= end - reached
        if self.epochs_leased != before:
            self.journal.set_meta("epochs_leased", self.epochs_leased)

    def _rung_value(self, metrics: dict) -> Value:
        """What ranks a trial at its rung: the objective's value, or with several objectives one
        value per objective (a missing one ranks worst)."""
        if len(self._objective_metrics) == 1:
            return float(metrics[self.settings.metric])
        assert self._asha is not None
        values = []
        for metric, goal in zip(self._objective_metrics, self._asha.goals, strict=True):
            value = metrics.get(metric)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            values.append(float(value) if ok else (-math.inf if goal == "maximize" else math.inf))  # type: ignore[arg-type]
        return tuple(values)

    def _segment_result(self, task: Task, att: Attempt, metrics: dict, worker_name: str, duration: float,
                        now: float) -> None:
        """asha/hyperband: a segment's result is the trial's result at the rung it was leased to
        reach. Below the full budget the trial PAUSES there (a promotion may resume it); at the
        full budget (or if it trained that far anyway) it SUCCEEDS. The optimizer is told at a
        trial's first rung result, so evolution and TPE learn while the search runs, and updated
        with each later rung's result, so what it learns is the longest training the trial got."""
        assert self._asha is not None
        rung = self._asha.target(task.task_id)
        reached = metrics.get("epochs")
        if isinstance(reached, bool) or not isinstance(reached, int):
            metrics = {**metrics, "epochs": rung}
            reached = rung
        value = self._rung_value(metrics)
        final = self._asha.record(task.task_id, rung, value) or reached >= self._asha.full
        self.journal.event(now, "rung_result", task.task_id, att.attempt, att.worker_id, worker_name, epoch=rung,
                           value=list(value) if isinstance(value, tuple) else value, epochs=reached,
                           bracket=self._asha.bracket_of[task.task_id])
        self.leases.succeed(task.task_id, att.attempt, metrics, worker_name, duration, now, paused=not final)
        if task.task_id not in self._told:
            self._told.add(task.task_id)
            self._tell(task.candidate_id, metrics)
        else:  # a promoted trial's result at a higher rung: the optimizer learns its longer training
            self._update_told(task.candidate_id, metrics)
        if final:
            self.succeeded += 1
            self.journal.event(now, "succeeded", task.task_id, att.attempt, att.worker_id, worker_name,
                               metric=metrics.get(self.settings.metric), epochs=reached)
            self._update_best(task, journal=True)
        else:
            self.journal.event(now, "paused", task.task_id, att.attempt, att.worker_id, worker_name, epoch=rung,
                               metric=metrics.get(self.settings.metric))

    def _stopped_metrics(self, task_id: str, attempt: int, metrics: dict) -> dict:
        """A stopped trial's metrics: its result's, with the objective's value and the step of its
        last report (what the scheduler judged; the optimizer learns that value) as `epochs`."""
        out = dict(metrics)
        last = self._last_report.get((task_id, attempt))
        if last is not None:
            step, reported = last
            value = reported.get(self.settings.metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[self.settings.metric] = value
            out["epochs"] = step
        return out

    # --- progress ----------------------------------------------------------------------------
    def report_progress(self, reports: list[ProgressReport], worker_name: str = "") -> list[bool]:
        """Journals the progress reports of live attempts as their trials' curves and returns, per
        report, whether the trial must stop. Durable first: the curve points and any stop are
        committed (fsynced) before this returns, so a stop a worker obeys survives a restart.

        A report of an attempt that is not live (stale, unknown, finished) or with a wrong
        lease_key is not recorded and answered "continue" (its result is not counted either)."""
        self._check_running()
        decisions = []
        with self._lock, self._change():
            now = self.clock.wall()
            for r in reports:
                key = (r.task_id, r.attempt)
                forged = r.lease_key is not None and not hmac.compare_digest(r.lease_key,
                                                                              self.lease_key(r.task_id, r.attempt))
                match = self.leases.match(r.task_id, r.attempt)
                if forged or match not in (ResultMatch.LIVE, ResultMatch.ORPHAN) or r.step < 1:
                    decisions.append(False)
                    continue
                self.journal.add_curve_point(r.task_id, r.attempt, r.step, now, r.metrics)
                self._last_report[key] = (r.step, dict(r.metrics))
                stop = key in self._stop_decided
                if not stop and self._asha is not None and r.step >= self._asha.target(r.task_id):
                    # The segment's end (its lease's stop_epoch): said again here for a worker or
                    # evaluator that does not stop there itself; the result then pauses the trial.
                    decisions.append(True)
                    continue
                value = r.metrics.get(self.settings.metric)
                if not stop and isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    stop = self.scheduler.observe(Report(r.task_id, r.step, float(value))) is Decision.STOP
                    if stop:
                        self._stop_decided.add(key)
                        self.journal.event(now, "stop_decided", r.task_id, r.attempt, worker_name=worker_name,
                                           step=r.step, metric=value, scheduler=self.settings.early_stopping.type)
                decisions.append(stop)
        return decisions

    # --- checkpoints -------------------------------------------------------------------------
    def record_checkpoint(self, task_id: str, attempt: int, lease_key: str, epoch: int, key: str, sha256: str,
                          size: int) -> bool:
        """A checkpoint of a live attempt is in the store (the servicer stored it durably first):
        journals `checkpoint_saved` and returns True once that is committed and fsynced. False,
        nothing journaled, when the attempt is not live (or orphaned by a restart), the lease_key
        is wrong, or epoch/key are not valid. Older checkpoints it supersedes are deleted
        (spec.artifacts.keep: best)."""
        self._check_running()
        with self._lock, self._change():
            if not hmac.compare_digest(str(lease_key), self.lease_key(task_id, attempt)):
                return False
            if self.leases.match(task_id, attempt) not in (ResultMatch.LIVE, ResultMatch.ORPHAN):
                return False
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
                return False
            try:
                validate_key(key)
            except ValueError:
                return False
            task = self.leases.tasks[task_id]
            ref = CheckpointRef(task_id, epoch, key, str(sha256), int(size), task.arch_hash)
            self.journal.event(self.clock.wall(), "checkpoint_saved", task_id, attempt, epoch=epoch, key=key,
                               sha256=ref.sha256, size=ref.size, arch_hash=ref.arch_hash)
            self._add_checkpoint(ref)
            self._retain({task_id})
            return True

    def checkpoint_for(self, task_id: str, attempt: int, lease_key: str) -> CheckpointRef | None:
        """The checkpoint that live attempt was leased to resume from (None: none, or the
        attempt is not live, or the lease_key is wrong). The download RPC checks with this."""
        with self._lock:
            self._check_running()
            if not hmac.compare_digest(str(lease_key), self.lease_key(task_id, attempt)):
                return None
            if self.leases.match(task_id, attempt) not in (ResultMatch.LIVE, ResultMatch.ORPHAN):
                return None
            return self._resume.get(task_id, {}).get(attempt)

    def _add_checkpoint(self, ref: CheckpointRef) -> None:
        # Stable by epoch: of two checkpoints of the same epoch (a retried segment) the later one
        # is the latest, and retention deletes the earlier like any superseded one.
        refs = [r for r in self._checkpoints.get(ref.task_id, []) if r.key != ref.key]
        self._checkpoints[ref.task_id] = sorted(refs + [ref], key=lambda r: r.epoch)

    def _final_checkpoint(self, task_id: str) -> CheckpointRef | None:
        refs = self._checkpoints.get(task_id)
        return refs[-1] if refs else None

    def _retain(self, task_ids: set[str]) -> None:
        """spec.artifacts.keep best: of these trials' checkpoints keep only what a trial can still
        resume from (the latest of a trial not finished; what a live attempt resumes from) and the
        best trial's final one; the rest are journaled `checkpoint_deleted` here and deleted from
        the store after the commit (a crash between the two leaves a file no journal row names;
        never a row naming a deleted file)."""
        if self.artifact_store is None or self.settings.artifacts.keep == "all":
            return
        best = self.best.task_id if self.best is not None else None
        now = self.clock.wall()
        for task_id in sorted(task_ids):
            refs = self._checkpoints.get(task_id)
            if not refs:
                continue
            task = self.leases.tasks.get(task_id)
            keep = {ref.key for attempt, ref in self._resume.get(task_id, {}).items()
                    if self.leases.match(task_id, attempt) in (ResultMatch.LIVE, ResultMatch.ORPHAN)}
            if task is None or not task.finished or task_id == best:
                keep.add(refs[-1].key)
            for ref in [r for r in refs if r.key not in keep]:
                refs.remove(ref)
                self.journal.event(now, "checkpoint_deleted", task_id, key=ref.key, epoch=ref.epoch, size=ref.size)
                self.journal.after_commit(functools.partial(self._delete_stored, self.artifact_store, ref.key))

    @staticmethod
    def _delete_stored(store: ArtifactStore, key: str) -> None:
        try:
            store.delete(key)
        except Exception as exc:  # the journal says it is gone: a leftover file only costs disk
            log.warning("could not delete checkpoint %s from %s: %s", key, store.describe(), exc)

    def _artifacts_status(self) -> dict:
        refs = [r for refs in self._checkpoints.values() for r in refs]
        return {"checkpoints": len(refs), "bytes": sum(r.size for r in refs),
                "store": self.artifact_store.describe() if self.artifact_store is not None else None}

    def _check_metrics(self, metrics: Any) -> tuple[bool, str, str]:
        metric = self.settings.metric
        if not isinstance(metrics, dict):
            return False, "invalid", f"evaluator returned {type(metrics).__name__}, expected a dict of metrics"
        value = metrics.get(metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, "invalid", f"metrics lack a number for the objective {metric!r}: got {value!r}"
        if not math.isfinite(value):
            return False, "nan", f"objective {metric!r} is {value!r}"
        return True, "", ""

    # --- dispatching -------------------------------------------------------------------------
    def _prefetch(self) -> int:
        """Leases to queue per worker beyond its slots (see ExperimentSettings.prefetch)."""
        if self.settings.prefetch is not None:
            return self.settings.prefetch
        if not self._recent_durations:
            return 0  # nothing known yet: trials may be long
        median = statistics.median(self._recent_durations)
        if median < AUTO_PREFETCH_2_BELOW_SECONDS:
            return 2
        return 1 if median < AUTO_PREFETCH_BELOW_SECONDS else 0

    def _pending_tasks(self) -> list[Task]:
        return [self.leases.tasks[i] for i in self.leases.pending_ids()]

    def _ready_pending(self) -> int:
        mono = self.clock.monotonic()
        return sum(1 for t in self._pending_tasks() if t.held_until is None or t.held_until <= mono)

    def _refill(self) -> None:
        """Fills the free slots without a pending task: first with promotions of paused trials
        (asha/hyperband), then with new candidates from the optimizer, never beyond the trial or
        epoch budget."""
        if self.settings.prefetch is None:
            prefetch = self._prefetch()
            for w in self.registry.live():
                w.prefetch = prefetch
        free = sum(w.free_slots for w in self.registry.live())
        want = free - self._ready_pending()
        if want > 0 and self._asha is not None:
            want -= self._promote(want)
        if self._exhausted:
            self._check_done()
            return
        budget_left = self.settings.max_trials - len(self.leases.tasks)
        n = min(want, budget_left, self._new_trials_that_fit(want))
        if n <= 0:
            if self.settings.max_epochs is not None or self._asha is not None:
                self._check_done()  # the epoch budget or the last paused trials may end the search here
            return
        if self.optimizer.is_finished():
            candidates = []
        else:
            candidates = self._ask(n)
        now = self.clock.wall()
        for cand in candidates:
            cid, arch_text, arch_hash, summary, generation = describe_candidate(cand)
            self._seq += 1
            task = Task(task_id=f"t{self._seq:06d}", candidate_id=cid, arch_json=arch_text, arch_hash=arch_hash,
                        summary=summary, generation=generation, seed=self.settings.seed * 1_000_003 + self._seq,
                        proposed_at=now)
            self.leases.add(task)
            if self._asha is not None:
                self._asha.assign(task.task_id)
            self.journal.save_task(task, self._seq)
            self.journal.event(now, "proposed", task.task_id, candidate_id=cid, arch_hash=arch_hash,
                               generation=generation)
        active = len(self.leases.pending_ids()) + self.leases.count(TaskState.LEASED)
        if not candidates and active == 0:
            # Nothing in flight and the optimizer has nothing more: the search is over (paused
            # trials that can still be promoted go on: see _end_paused).
            self._exhausted = True
            self._check_done()

    # --- segments and the epoch budget (asha/hyperband, spec.budget.maxEpochs) ---------------
    def _segment(self, task: Task) -> tuple[int, int, CheckpointRef | None]:
        """(start_epoch, stop_epoch, checkpoint) of the task's next lease: stop at its rung (asha;
        0 = the full budget otherwise), resume from its latest checkpoint below that, else from 0."""
        stop = self._asha.target(task.task_id) if self._asha is not None else 0
        end = stop or self.full_epochs
        ref = None
        if self.artifact_store is not None:
            usable = [r for r in self._checkpoints.get(task.task_id, ())
                      if r.epoch < end and r.arch_hash == task.arch_hash]
            ref = usable[-1] if usable else None
        return (ref.epoch if ref else 0), stop, ref

    def _segment_epochs(self, task: Task) -> int:
        start, stop, _ = self._segment(task)
        return (stop or self.full_epochs) - start

    def _reserved_epochs(self) -> int:
        """Epochs the pending tasks will lease (counted before they are leased, so that new
        trials and promotions never promise more than spec.budget.maxEpochs)."""
        return sum(self._segment_epochs(t) for t in self._pending_tasks())

    def _epochs_left(self) -> int | None:
        if self.settings.max_epochs is None:
            return None
        return self.settings.max_epochs - self.epochs_leased - self._reserved_epochs()

    def _new_trials_that_fit(self, want: int) -> int:
        left = self._epochs_left()
        if left is None or want <= 0:
            return want
        n = 0
        while n < want:
            first = self._asha.next_first_epochs(n) if self._asha is not None else self.full_epochs
            if first > left:
                break
            left -= first
            n += 1
        return n

    def _epochs_spent(self) -> bool:
        """True when spec.budget.maxEpochs leaves no room for another new trial."""
        left = self._epochs_left()
        if left is None:
            return False
        first = self._asha.next_first_epochs() if self._asha is not None else self.full_epochs
        return first > left

    def _promotion_epochs(self, promotion: Promotion) -> int:
        task = self.leases.tasks[promotion.trial_id]
        refs = [r for r in self._checkpoints.get(task.task_id, ()) if r.epoch < promotion.to_epoch] \
            if self.artifact_store is not None else []
        return promotion.to_epoch - (refs[-1].epoch if refs else 0)

    def _next_promotion(self) -> Promotion | None:
        """The promotion ASHA takes next among those that fit the epoch budget (None: none)."""
        assert self._asha is not None
        left = self._epochs_left()
        for promotion in self._asha.promotions(left):
            task = self.leases.tasks.get(promotion.trial_id)
            if task is None or task.state is not TaskState.PAUSED:
                continue
            if left is None or self._promotion_epochs(promotion) <= left:
                return promotion
        return None

    def _promote(self, slots: int) -> int:
        """Promotes up to `slots` paused trials (ASHA's rule); returns how many."""
        made = 0
        now = self.clock.wall()
        while made < slots:
            promotion = self._next_promotion()
            if promotion is None:
                break
            assert self._asha is not None
            # the end game's promotions say so, with the epochs that were left (before this one)
            closing: dict[str, Any] = \
                {"closing": True, "epochs_left": self._epochs_left()} if promotion.closing else {}
            self._asha.promote(promotion)
            task = self.leases.promote(promotion.trial_id)
            self._save_task(task)
            self.journal.event(now, "promoted", task.task_id, task.attempt, from_epoch=promotion.from_epoch,
                               to_epoch=promotion.to_epoch, bracket=promotion.bracket, **closing)
            made += 1
        return made

    def _save_epochs(self, start: int, end: int) -> tuple[int, ...]:
        """The epochs after which the worker saves a checkpoint: every checkpointIntervalEpochs
        and the segment's last (asha/hyperband: at least the rung it ends at); () without a store."""
        if self.artifact_store is None:
            return ()
        interval = self.settings.artifacts.checkpoint_interval
        if interval <= 0 and self._asha is None:
            return ()
        epochs = {e for e in range(start + 1, end + 1) if interval > 0 and e % interval == 0}
        return tuple(sorted(epochs | {end}))

    def _stop_task(self, task: Task, reason: str, now: float) -> None:
        """A paused trial at the end of the search, or a pending one whose next segment does not
        fit the epoch budget, finishes STOPPED with its last rung result (never a failure)."""
        orphan = task.orphan_attempt
        self.leases.stop(task.task_id, now)
        if orphan is not None:
            self.journal.save_attempt(self.leases.attempts[(task.task_id, orphan)])
        self.stopped += 1
        if task.task_id not in self._told:
            self._told.add(task.task_id)
            self._tell(task.candidate_id, task.metrics)
        metrics = task.metrics or {}
        self._save_task(task)
        self.journal.event(now, "stopped", task.task_id, task.attempt, reason=reason,
                           metric=metrics.get(self.settings.metric), epochs=metrics.get("epochs", 0))
        self._update_best(task, journal=True)
        self._retain({task.task_id})

    def _end_paused(self) -> None:
        """The search can start nothing more (no new trial: trial or epoch budget used up, or the
        optimizer exhausted; no promotion allowed; nothing pending or running): every paused
        trial finishes STOPPED with the epochs it got."""
        if self._asha is None or self.leases.pending_ids() or self.leases.count(TaskState.LEASED):
            return
        paused = self.leases.in_state(TaskState.PAUSED)
        if not paused:
            return
        can_start = not self._exhausted and len(self.leases.tasks) < self.settings.max_trials \
            and not self._epochs_spent()
        if can_start or self._next_promotion() is not None:
            return
        now = self.clock.wall()
        for task in paused:
            self._stop_task(task, "search over", now)

    def _dispatch(self) -> None:
        if self.phase == PENDING:
            # Waiting for --min-workers: propose the first candidates for the workers already
            # connected now, so the start hands out leases without waiting for the optimizer.
            self._refill()
            return
        if self.phase != RUNNING:
            return
        self._refill()
        if not self.leases.pending_ids():
            return
        mono, now = self.clock.monotonic(), self.clock.wall()
        live = [w for w in self.registry.live() if w.accepts_work]
        names = [w.name for w in live]
        open_ = [w for w in live if w.free_slots > 0]
        while open_:
            progress = False
            for rec in sorted(open_, key=lambda w: len(w.leases)):
                if rec.free_slots <= 0:
                    continue
                task = self.leases.choose_for(rec.name, names, mono)
                if task is None:
                    continue
                if self.settings.max_epochs is not None and \
                        self.epochs_leased + self._segment_epochs(task) > self.settings.max_epochs:
                    # A re-lease (lost worker, retry) the epoch budget has no room for.
                    self._stop_task(task, f"spec.budget.maxEpochs={self.settings.max_epochs} reached", now)
                    progress = True
                    continue
                self._lease(task, rec, now)
                progress = True
            if not progress:
                break
            open_ = [w for w in open_ if w.free_slots > 0]

    def _lease(self, task: Task, rec: WorkerRecord, now: float) -> None:
        orphan = task.orphan_attempt
        previous = self.leases.attempts.get((task.task_id, task.attempt))
        start, stop, ref = self._segment(task)
        att = self.leases.lease(task.task_id, rec.worker_id, rec.name, now)
        if orphan is not None:
            self.journal.save_attempt(self.leases.attempts[(task.task_id, orphan)])
        rec.leases.add((task.task_id, att.attempt))
        self.registry.refresh_load(rec)
        self.journal.save_attempt(att)
        self._save_task(task)
        end = stop or self.full_epochs
        self.epochs_leased += end - start
        self.journal.set_meta("epochs_leased", self.epochs_leased)
        segment = {"start_epoch": start, "stop_epoch": stop} if start or stop else {}
        self.journal.event(now, "leased", task.task_id, att.attempt, rec.worker_id, rec.name, **segment)
        if ref is not None:
            self._resume.setdefault(task.task_id, {})[att.attempt] = ref
            after = "promoted" if previous is not None and previous.outcome == "paused" else "requeued"
            self.journal.event(now, "resumed", task.task_id, att.attempt, rec.worker_id, rec.name, epoch=ref.epoch,
                               key=ref.key, sha256=ref.sha256, size=ref.size, arch_hash=ref.arch_hash, after=after)
        # Sent once the lease is durable: a worker never runs a lease a master crash could forget.
        message = LeaseMessage(task.task_id, att.attempt, task.arch_json, self._evaluation_json, task.seed,
                               self.lease_key(task.task_id, att.attempt), start_epoch=start, stop_epoch=stop,
                               checkpoint=ref, save_epochs=self._save_epochs(start, end))
        self.journal.after_commit(functools.partial(self._outboxes[rec.worker_id].put, message))
        if self._checkpoints.get(task.task_id):
            self._retain({task.task_id})  # what the attempt this replaces resumed from may go now

    # --- completion --------------------------------------------------------------------------
    def _check_done(self) -> None:
        if self.phase in (SUCCEEDED, FAILED):
            return
        s = self.settings
        if self.failed > s.max_failed_trials:
            self._finish(FAILED,
                         f"{self.failed} failed trials exceed spec.budget.maxFailedTrials={s.max_failed_trials}")
            return
        self._end_paused()
        if self._finished_count() >= s.max_trials:
            self._finish(SUCCEEDED, f"{self._finished_count()} trials finished (budget {s.max_trials})")
        elif self._exhausted and len(self.leases.tasks) == self._finished_count():
            self._finish(SUCCEEDED, f"optimizer finished after {self._finished_count()} trials")
        elif len(self.leases.tasks) == self._finished_count() and self._epochs_spent():
            self._finish(SUCCEEDED, f"spec.budget.maxEpochs={s.max_epochs} reached: {self.epochs_leased} epochs "
                                    f"leased over {self._finished_count()} trials")

    def _finish(self, phase: str, message: str) -> None:
        self._set_phase(phase, message)
        log.info("experiment %s: %s", phase, message)
        shutdown = ShutdownMessage(f"experiment {phase.lower()}: {message}")
        for rec in self.registry.live():
            # After the commit, like leases: a worker told "done" by a commit that then fails
            # would be gone when the restarted master needs it.
            self.journal.after_commit(functools.partial(self._outboxes[rec.worker_id].put, shutdown))
        self.changed.notify_all()

    def _set_phase(self, phase: str, message: str) -> None:
        self.phase, self.message = phase, message
        if phase in (SUCCEEDED, FAILED):
            self.journal.after_commit(self._phase_committed)
        now = self.clock.wall()
        self.journal.set_meta("phase", phase)
        self.journal.set_meta("message", message)
        self.journal.event(now, "phase", phase=phase, message=message)

    @property
    def done(self) -> bool:
        """The experiment is over and that is durable (phase may say so a commit earlier)."""
        return self._done_committed

    def wait_done(self, timeout: float | None = None) -> bool:
        """True once the experiment is over; raises the JournalError if the coordinator halted."""
        with self._lock:
            self.changed.wait_for(lambda: self.done or self._halted is not None, timeout)
            self._check_running()
            return self.done

    # --- fail-stop ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _change(self) -> Iterator[None]:
        """One journaled change (one transaction, or joined to the caller's). Any error inside
        halts the coordinator: its memory may already hold what the journal rolled back."""
        self._check_running()
        try:
            with self.journal.transaction():
                yield
        except BaseException as exc:
            self._halt(exc)
            raise

    def _halt(self, exc: BaseException) -> None:
        """Fail-stop: from now on every call raises `halted`, and the on_halt callbacks (the
        master server: health NOT_SERVING, stop serving, exit) run once. The journal is what
        it committed before; a restart on it resumes from there."""
        with self._lock:
            if self._halted is not None:
                return
            if isinstance(exc, JournalError):
                self._halted = exc
            else:
                self._halted = JournalError(
                    f"journal {self.journal.path}: a change failed after it had changed the master's memory "
                    f"({type(exc).__name__}: {exc}); the master stops and a restart resumes from the journal")
            log.critical("master halted: %s", self._halted)
            with self._queue_lock:
                waiting, self._result_queue = self._result_queue, []
            for queued in waiting:
                queued.claimed = True
            self._release(waiting, self._halted)
            self.changed.notify_all()
            callbacks = list(self.on_halt)
        for callback in callbacks:
            try:
                callback(self._halted)
            except Exception:
                log.exception("on_halt callback failed")

    def _phase_committed(self) -> None:
        with self._lock:
            self._done_committed = True
            self.changed.notify_all()

    @property
    def halted(self) -> JournalError | None:
        """The error that stopped the coordinator (None while it runs)."""
        return self._halted

    def _check_running(self) -> None:
        if self._halted is not None:
            raise JournalError(str(self._halted)) from self._halted

    # --- helpers -----------------------------------------------------------------------------
    def _save_task(self, task: Task) -> None:
        seq = int(task.task_id[1:]) if task.task_id[1:].isdigit() else 0
        self.journal.save_task(task, seq)

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.settings.goal == "maximize" else a < b

    def _update_best(self, task: Task, journal: bool = False) -> None:
        """The best trial: the best objective value among the trials that trained their full
        budget (SUCCEEDED); with asha/hyperband, while none has, among the stopped ones too."""
        value = task.metrics.get(self.settings.metric) if task.metrics else None
        if value is None:
            return
        full = task.state is TaskState.SUCCEEDED
        if not full and (self._asha is None or task.state is not TaskState.STOPPED):
            return
        best_full = self.best is not None and self.best.state is TaskState.SUCCEEDED
        if self.best is None or (full and not best_full) or (
                full == best_full and self._better(value, (self.best.metrics or {})[self.settings.metric])):
            self.best = task
            if journal:
                self.journal.set_meta("best", {"trial_id": task.task_id, "metric": value, "summary": task.summary,
                                               "arch_hash": task.arch_hash})
                self.journal.event(self.clock.wall(), "new_best", task.task_id, task.finished_attempt, metric=value)

    def counts(self) -> dict[str, Any]:
        """What the metrics read at scrape time: counts over the whole journal and current states
        (cheaper than status(): no worker or loss lists). Raises the JournalError once halted."""
        with self._lock:
            self._check_running()
            best = self.best
            workers: collections.Counter[str] = collections.Counter(
                w.state.value for w in self.registry.workers.values())
            return {"phase": self.phase, "experiment_name": self.settings.name, "budget": self.settings.max_trials,
                    "metric": self.settings.metric, "goal": self.settings.goal,
                    "succeeded": self.succeeded, "failed": self.failed, "stopped": self.stopped,
                    "running": self.leases.count(TaskState.LEASED), "pending": len(self.leases.pending_ids()),
                    "retries": self.retries, "results": dict(self.results_by_disposition),
                    "losses": dict(self.losses_by_reason), "workers": dict(workers),
                    "best": None if best is None else (best.metrics or {}).get(self.settings.metric)}

    def _pareto_status(self) -> dict | None:
        """With several objectives: the optimizer's Pareto front, {size, best: [{metric, goal, value,
        trial_id}] (each objective's best value on the front)}; None with one objective."""
        objectives = getattr(self.optimizer, "objectives", None)
        summary = getattr(self.optimizer, "pareto_summary", None)
        if summary is None or not objectives or len(objectives) < 2:
            return None
        front = summary()
        task_of = {task.candidate_id: task.task_id for task in self.leases.tasks.values()}
        best = [{"metric": o["metric"], "goal": o["goal"], "value": front["best"][o["metric"]]["value"],
                 "trial_id": task_of.get(front["best"][o["metric"]]["candidate"], "")}
                for o in objectives if o["metric"] in front["best"]]
        return {"size": front["size"], "best": best}

    def status(self, include_dead: bool = True, losses_after_seq: int | None = None) -> dict:
        """The experiment's progress. `losses` holds the worker losses numbered after
        losses_after_seq (oldest first, at most MAX_LOSSES_PER_STATUS), or the most recent
        RECENT_LOSSES when it is None; `loss_seq` is the latest loss number."""
        with self._lock:
            self._check_running()  # a halted master's counts may be ahead of its journal
            if losses_after_seq is None:
                losses = list(self.losses)
            elif self.losses and losses_after_seq >= self.losses[0]["seq"] - 1:
                losses = [loss for loss in self.losses if loss["seq"] > losses_after_seq][:MAX_LOSSES_PER_STATUS]
            else:  # older than what memory keeps: the journal has them all
                losses = self.journal.losses(after_seq=losses_after_seq, limit=MAX_LOSSES_PER_STATUS)
            workers = []
            for rec in self.registry.workers.values():
                if not include_dead and not rec.alive:
                    continue
                workers.append({"worker_id": rec.worker_id, "worker_name": rec.name, "state": rec.state.value,
                                "slots": rec.slots, "gpus": rec.gpus, "running": sorted(rec.leases),
                                "seconds_since_heartbeat": self.registry.seconds_since_heartbeat(rec)})
            best = None
            if self.best is not None:
                b = self.best
                metrics = b.metrics or {}  # a best trial succeeded: it has its metrics
                final = self._final_checkpoint(b.task_id)
                best = {"trial_id": b.task_id, "metric": metrics[self.settings.metric], "summary": b.summary,
                        "arch_json": b.arch_json, "metrics": metrics, "arch_hash": b.arch_hash,
                        "status": b.state.value, "checkpoint": final.key if final is not None else None}
            return {"phase": self.phase, "message": self.message, "experiment_name": self.settings.name,
                    "succeeded": self.succeeded, "failed": self.failed, "stopped": self.stopped,
                    "running": self.leases.count(TaskState.LEASED), "pending": len(self.leases.pending_ids()),
                    "budget": self.settings.max_trials, "workers": workers, "best": best,
                    "stale_results": self.stale_results, "retries": self.retries, "losses": losses,
                    "loss_seq": self.loss_seq,
                    "metric": self.settings.metric, "goal": self.settings.goal,
                    "workers_alive": sum(1 for w in self.registry.workers.values()
                                         if w.alive and w.state is not WorkerState.REGISTERING),
                    "pareto": self._pareto_status(),
                    "paused": self.leases.count(TaskState.PAUSED) if self._asha is not None else 0,
                    "epochs": self.epochs_leased, "max_epochs": self.settings.max_epochs,
                    "scheduler": self._scheduler_status(), "artifacts": self._artifacts_status()}

    def _scheduler_status(self) -> dict:
        """spec.earlyStopping's type and, with asha/hyperband, each bracket's rungs (epochs,
        results, promoted)."""
        out: dict[str, Any] = {"type": self.settings.early_stopping.type}
        if self._asha is not None:
            out["rungs"] = self._asha.rungs_status()
        return out
