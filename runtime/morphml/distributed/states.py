r"""The explicit state machines of the distributed runtime, in one place.

Each arrow below is one allowed transition of the tables in this module (A/B: from each of
them); tests/unit/test_leases_state_machines.py checks that the arrows and the tables agree.

Task (one trial of one candidate architecture):

    PENDING --leased to a worker--> LEASED
    LEASED --result ok--> SUCCEEDED
    LEASED --result ok after the scheduler stopped it--> STOPPED
    LEASED --result ok at a rung below the full budget (asha/hyperband)--> PAUSED
    LEASED --failed with retries left / worker lost / master restarted--> PENDING
    LEASED --failed, no retries left--> FAILED
    PAUSED --promoted to the next rung--> PENDING
    PAUSED --search over, never promoted--> STOPPED
    PENDING --its next segment does not fit spec.budget.maxEpochs--> STOPPED

SUCCEEDED, STOPPED and FAILED are final. STOPPED is a trial an early-stopping scheduler ended
before its full budget (morphml.distributed.schedulers): finished, with the epochs it got, never
a failure. PAUSED is a trial waiting at an ASHA rung: not finished, holding no lease, maybe
promoted later (a new lease resuming from its checkpoint, attempt + 1, no retry used); the
paused trials left when the search ends become STOPPED. A task orphaned by a master restart is PENDING with its
attempt held for the old worker; a result for it passes through LEASED on its way to the end.

Attempt (one lease of a task, identified by (task id, attempt number)):

    LEASED --result ok--> SUCCEEDED
    LEASED --result failed--> FAILED
    LEASED --worker declared dead / orphan re-leased elsewhere--> STALE

An attempt becomes STALE when its worker is declared dead (or the task it was orphaned from
is leased again after a restart); a result that arrives later for it is recorded as stale and
never counted.

Worker (one registration):

    REGISTERING --session stream opened--> IDLE
    IDLE --holds a lease--> BUSY
    BUSY --holds none--> IDLE
    REGISTERING/IDLE/BUSY --drain--> DRAINING
    REGISTERING/IDLE/BUSY/DRAINING --stream broken / heartbeat timeout / pod gone / deregister--> DEAD

Imports: enum and typing only.
"""

from __future__ import annotations

import enum
from typing import Any


class IllegalTransition(RuntimeError):
    """A state change the state machine does not allow (a bug, never user input)."""


class TaskState(str, enum.Enum):
    PENDING = "pending"
    LEASED = "leased"
    SUCCEEDED = "succeeded"
    STOPPED = "stopped"
    FAILED = "failed"
    PAUSED = "paused"


class AttemptState(str, enum.Enum):
    LEASED = "leased"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STALE = "stale"


class WorkerState(str, enum.Enum):
    REGISTERING = "registering"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    DEAD = "dead"


TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.PENDING: frozenset({TaskState.LEASED, TaskState.STOPPED}),
    TaskState.LEASED: frozenset({TaskState.SUCCEEDED, TaskState.STOPPED, TaskState.FAILED, TaskState.PENDING,
                                 TaskState.PAUSED}),
    TaskState.PAUSED: frozenset({TaskState.PENDING, TaskState.STOPPED}),
    TaskState.SUCCEEDED: frozenset(),
    TaskState.STOPPED: frozenset(),
    TaskState.FAILED: frozenset(),
}

ATTEMPT_TRANSITIONS: dict[AttemptState, frozenset[AttemptState]] = {
    AttemptState.LEASED: frozenset({AttemptState.SUCCEEDED, AttemptState.FAILED, AttemptState.STALE}),
    AttemptState.SUCCEEDED: frozenset(),
    AttemptState.FAILED: frozenset(),
    AttemptState.STALE: frozenset(),
}

WORKER_TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.REGISTERING: frozenset({WorkerState.IDLE, WorkerState.DRAINING, WorkerState.DEAD}),
    WorkerState.IDLE: frozenset({WorkerState.BUSY, WorkerState.DRAINING, WorkerState.DEAD}),
    WorkerState.BUSY: frozenset({WorkerState.IDLE, WorkerState.DRAINING, WorkerState.DEAD}),
    WorkerState.DRAINING: frozenset({WorkerState.DEAD}),
    WorkerState.DEAD: frozenset(),
}

_TABLES: dict[type, dict[Any, frozenset[Any]]] = {
    TaskState: TASK_TRANSITIONS, AttemptState: ATTEMPT_TRANSITIONS, WorkerState: WORKER_TRANSITIONS}


def check_transition(current: enum.Enum, new: enum.Enum) -> None:
    """Raises IllegalTransition unless current -> new is allowed (same state is a no-op)."""
    if current is new:
        return
    allowed = _TABLES[type(current)][current]
    if new not in allowed:
        names = sorted(s.value for s in allowed) or ["none (final state)"]
        raise IllegalTransition(
            f"{type(current).__name__} {current.value!r} cannot become {new.value!r}; allowed: {', '.join(names)}"
        )


class LossReason(str, enum.Enum):
    """How a worker's death was detected; recorded per re-lease in the journal."""

    STREAM = "stream"  # the Connect stream broke (process died, connection reset)
    HEARTBEAT = "heartbeat"  # no heartbeat for interval x missed (hung, partitioned)
    POD_GONE = "pod_gone"  # the operator called WorkerGone
    DEREGISTER = "deregister"  # the worker left cleanly while holding leases
    RESTART = "restart"  # the master restarted while the lease was out
