"""Unit tests: the task/attempt/worker state machines, the lease table and the worker registry
with an injected clock (no sleeping, no processes)."""

import pytest

from morphml.distributed.clock import ManualClock
from morphml.distributed.leases import LeaseTable, ResultMatch, Task
from morphml.distributed.registry import WorkerRegistry
from morphml.distributed.states import AttemptState, IllegalTransition, TaskState, WorkerState, check_transition

pytestmark = pytest.mark.unit


def make_task(i: int) -> Task:
    return Task(task_id=f"t{i:06d}", candidate_id=f"c{i}", arch_json="{}", arch_hash=f"h{i}", summary="s",
                generation=0, seed=i, proposed_at=0.0)


def test_finished_task_cannot_go_back_to_pending():
    with pytest.raises(IllegalTransition, match="'succeeded' cannot become 'pending'"):
        check_transition(TaskState.SUCCEEDED, TaskState.PENDING)


def test_pending_task_cannot_succeed_without_a_lease():
    with pytest.raises(IllegalTransition, match="allowed: leased"):
        check_transition(TaskState.PENDING, TaskState.SUCCEEDED)


def test_dead_worker_stays_dead_and_draining_worker_takes_no_work():
    with pytest.raises(IllegalTransition):
        check_transition(WorkerState.DEAD, WorkerState.IDLE)
    with pytest.raises(IllegalTransition):
        check_transition(WorkerState.DRAINING, WorkerState.BUSY)
    check_transition(WorkerState.BUSY, WorkerState.DEAD)


def test_stale_attempt_is_final():
    with pytest.raises(IllegalTransition):
        check_transition(AttemptState.STALE, AttemptState.SUCCEEDED)


def test_result_counts_only_for_the_live_attempt():
    table = LeaseTable()
    table.add(make_task(1))
    table.lease("t000001", "w1/1", "w1", 0.0)
    assert table.match("t000001", 1) == ResultMatch.LIVE
    released = table.release_worker("w1/1", "heartbeat", 1.0)
    assert released == [("t000001", 1)]
    assert table.tasks["t000001"].state is TaskState.PENDING
    assert table.attempts[("t000001", 1)].state is AttemptState.STALE
    table.lease("t000001", "w2/2", "w2", 2.0)
    assert table.tasks["t000001"].attempt == 2
    assert table.match("t000001", 1) == ResultMatch.STALE
    assert table.match("t000001", 2) == ResultMatch.LIVE
    table.succeed("t000001", 2, {"val_accuracy": 0.9}, "w2", 1.0, 3.0)
    assert table.match("t000001", 2) == ResultMatch.DUPLICATE
    assert table.match("t000009", 1) == ResultMatch.UNKNOWN


def test_worker_loss_does_not_use_the_retry_budget_but_failures_do():
    table = LeaseTable()
    table.add(make_task(1))
    table.lease("t000001", "w1/1", "w1", 0.0)
    table.release_worker("w1/1", "stream", 0.0)
    assert table.tasks["t000001"].retries_used == 0
    table.lease("t000001", "w2/2", "w2", 0.0)
    assert table.fail("t000001", 2, "exception", "boom", "w2", 0.1, max_retries=1, now_wall=0.0) is True
    assert table.tasks["t000001"].retries_used == 1
    table.lease("t000001", "w3/3", "w3", 0.0)
    assert table.fail("t000001", 3, "exception", "boom", "w3", 0.1, max_retries=1, now_wall=0.0) is False
    assert table.tasks["t000001"].state is TaskState.FAILED
    assert table.tasks["t000001"].error_message == "boom"


def test_failed_task_prefers_another_worker():
    table = LeaseTable()
    table.add(make_task(1))
    table.add(make_task(2))
    table.lease("t000001", "w1/1", "w1", 0.0)
    table.fail("t000001", 1, "exception", "x", "w1", 0.0, max_retries=2, now_wall=0.0)
    # w1 gets the other task, w2 would get the failed one
    assert table.choose_for("w1", ["w1", "w2"], 0.0).task_id == "t000002"
    assert table.choose_for("w2", ["w1", "w2"], 0.0).task_id == "t000001"
    # when w1 is the only live worker the task may come back to it
    table.lease("t000002", "w1/1", "w1", 0.0)
    assert table.choose_for("w1", ["w1"], 0.0).task_id == "t000001"


def test_orphaned_attempt_after_restart_is_adoptable_and_accepted_until_released():
    table = LeaseTable()
    task = make_task(1)
    task.attempt, task.orphan_attempt, task.held_until = 3, 3, 10.0
    table.add(task)
    from morphml.distributed.leases import Attempt
    table.attempts[("t000001", 3)] = Attempt("t000001", 3, "old/1", "w1", 0.0)
    assert table.match("t000001", 3) == ResultMatch.ORPHAN
    assert table.choose_for("w2", ["w2"], now=5.0) is None  # held for its worker
    assert table.adopt("t000001", 2, "w1/2", "w1", 6.0) is None  # wrong attempt
    att = table.adopt("t000001", 3, "w1/2", "w1", 6.0)
    assert att.attempt == 3 and table.tasks["t000001"].state is TaskState.LEASED
    assert table.match("t000001", 3) == ResultMatch.LIVE


def test_heartbeat_timeout_is_interval_times_missed():
    clock = ManualClock()
    reg = WorkerRegistry(clock, heartbeat_interval=10, missed_heartbeats=3)
    rec = reg.register("pod-a", gpus=0, slots=1)
    reg.connected(rec.worker_id)
    clock.advance(29.9)
    assert reg.expired() == []
    reg.heartbeat(rec.worker_id)
    clock.advance(30.0)
    assert reg.expired() == []
    clock.advance(0.2)
    assert [w.worker_id for w in reg.expired()] == [rec.worker_id]
    assert reg.mark_dead(rec.worker_id, "heartbeat") is rec
    assert reg.mark_dead(rec.worker_id, "heartbeat") is None
    assert reg.expired() == []


def test_registry_rejects_bad_settings_naming_the_value():
    with pytest.raises(ValueError, match="heartbeat interval 0"):
        WorkerRegistry(ManualClock(), 0, 3)
    with pytest.raises(ValueError, match="missed heartbeats 0"):
        WorkerRegistry(ManualClock(), 1, 0)


def test_state_counts_are_kept_in_step_through_leases_losses_successes_and_failures():
    table = LeaseTable()

    def recount(state):
        return sum(1 for t in table.tasks.values() if t.state is state)

    def check():
        for state in (TaskState.PENDING, TaskState.LEASED, TaskState.SUCCEEDED, TaskState.FAILED):
            assert table.count(state) == recount(state), state

    for i in range(1, 5):
        table.add(make_task(i))
    check()
    for i, worker in ((1, "w1/1"), (2, "w1/1"), (3, "w2/2")):
        table.lease(f"t{i:06d}", worker, worker[:2], 0.0)
        check()
    table.release_worker("w1/1", "heartbeat", 1.0)
    check()
    table.succeed("t000003", 1, {"val_accuracy": 0.5}, "w2", 1.0, 2.0)
    table.lease("t000001", "w2/2", "w2", 3.0)
    check()
    table.fail("t000001", 2, "exception", "boom", "w2", 1.0, 0, 4.0)
    check()
    assert table.count(TaskState.LEASED) == 0 and table.count(TaskState.FAILED) == 1


def test_the_transition_diagram_in_the_states_docstring_is_the_transition_table():
    import re

    from morphml.distributed import states

    tables = {"Task": states.TASK_TRANSITIONS, "Attempt": states.ATTEMPT_TRANSITIONS,
              "Worker": states.WORKER_TRANSITIONS}
    drawn: dict[str, set] = {name: set() for name in tables}
    section = None
    for line in states.__doc__.splitlines():
        header = re.match(r"^(Task|Attempt|Worker) \(", line)
        if header:
            section = header.group(1)
        arrow = re.match(r"^\s+([A-Z/]+) --.+?--> ([A-Z]+)\s*$", line)
        if arrow:
            assert section is not None, line
            enum = type(next(iter(tables[section])))
            for source in arrow.group(1).split("/"):
                drawn[section].add((enum[source], enum[arrow.group(2)]))
    for name, table in tables.items():
        allowed = {(a, b) for a, targets in table.items() for b in targets}
        assert drawn[name] == allowed, (f"{name}: drawn but not allowed {drawn[name] - allowed}, "
                                        f"allowed but not drawn {allowed - drawn[name]}")
