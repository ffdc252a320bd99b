"""Unit tests: the experiment coordinator (leases, heartbeats, retries, budget, restart) with an
injected clock and a real SQLite journal in a temp dir; no gRPC, no sleeping."""

from __future__ import annotations

import queue

import pytest

from morphml.distributed.clock import ManualClock
from morphml.distributed.coordinator import ExperimentCoordinator, ExperimentSettings, LeaseMessage
from morphml.distributed.journal import Journal
from morphml.distributed.states import LossReason

pytestmark = pytest.mark.unit


class FakeGraph:
    def __init__(self, i):
        self.i = i
        self.arch_hash = f"hash{i:04d}"

    def to_json(self):
        return {"input_shape": [4], "num_classes": 2, "nodes": [{"id": "n0", "op": "input", "params": {}}],
                "edges": [], "i": self.i}

    def summary(self):
        return f"arch{self.i}"


class FakeCandidate:
    def __init__(self, i, generation=0):
        self.id, self.graph, self.generation = f"c{i}", FakeGraph(i), generation


class CountingOptimizer:
    """Ask/tell contract: numbered candidates; `generation_size` makes it generational (ask
    returns [] until the current generation is fully told)."""

    def __init__(self, total=1000, generation_size=None):
        self.total, self.generation_size = total, generation_size
        self.next, self.outstanding, self.told = 0, [], []

    def ask(self, n):
        if self.generation_size and self.outstanding:
            return []
        if self.generation_size:
            n = self.generation_size
        out = []
        while len(out) < n and self.next < self.total:
            out.append(FakeCandidate(self.next, self.next // (self.generation_size or 10**9)))
            self.outstanding.append(f"c{self.next}")
            self.next += 1
        return out

    def tell(self, cid, metrics):
        self.outstanding.remove(cid)
        self.told.append((cid, metrics))

    def is_finished(self):
        return self.next >= self.total and not self.outstanding

    def state_dict(self):
        return {"next": self.next, "outstanding": list(self.outstanding), "told": [list(t) for t in self.told]}

    def load_state_dict(self, state):
        self.next, self.outstanding = state["next"], list(state["outstanding"])
        self.told = [tuple(t) for t in state["told"]]


def make(tmp_path, optimizer=None, **kw):
    clock = ManualClock()
    settings = ExperimentSettings(**{"max_trials": 5, "heartbeat_interval": 1.0, "missed_heartbeats": 3, **kw})
    coord = ExperimentCoordinator(optimizer or CountingOptimizer(), settings, Journal(tmp_path / "j.db"), clock)
    return coord, clock


def join(coord, name, slots=1):
    worker_id, _ = coord.register(name, 0, slots)
    return worker_id, coord.connect(worker_id)


def leases(outbox: queue.Queue) -> list[LeaseMessage]:
    out = []
    while not outbox.empty():
        item = outbox.get_nowait()
        if isinstance(item, LeaseMessage):
            out.append(item)
    return out


def test_master_asks_only_for_free_slots_and_never_beyond_the_budget(tmp_path):
    opt = CountingOptimizer()
    coord, _ = make(tmp_path, opt, max_trials=3)
    _, box = join(coord, "a", slots=2)
    assert [m.task_id for m in leases(box)] == ["t000001", "t000002"] and opt.next == 2
    _, box_b = join(coord, "b", slots=4)
    assert len(leases(box_b)) == 1 and opt.next == 3  # budget 3: only one more
    for task_id in ("t000001", "t000002", "t000003"):
        attempt = coord.leases.tasks[task_id].attempt
        assert coord.report_result(task_id, attempt, True, {"val_accuracy": 0.5}) == "accepted"
    assert coord.phase == "Succeeded" and coord.succeeded == 3 and opt.next == 3


def test_generational_optimizer_breeds_only_after_the_whole_generation_is_told(tmp_path):
    opt = CountingOptimizer(total=6, generation_size=3)
    coord, _ = make(tmp_path, opt, max_trials=6)
    _, box = join(coord, "a", slots=5)
    first = leases(box)
    assert len(first) == 3  # 5 free slots, but the generation has 3
    coord.report_result(first[0].task_id, 1, True, {"val_accuracy": 0.1})
    coord.report_result(first[1].task_id, 1, True, {"val_accuracy": 0.2})
    assert leases(box) == []
    coord.report_result(first[2].task_id, 1, True, {"val_accuracy": 0.3})
    assert len(leases(box)) == 3


def test_heartbeat_timeout_requeues_without_retry_and_late_result_is_stale(tmp_path):
    coord, clock = make(tmp_path, max_trials=1)
    a, box_a = join(coord, "a")
    (lease,) = leases(box_a)
    b, box_b = join(coord, "b")
    clock.advance(2.5)
    coord.heartbeat(b)
    assert coord.check_heartbeats() == []
    clock.advance(0.6)  # a: 3.1 s silent > 1 s x 3
    assert coord.check_heartbeats() == [a]
    assert box_a.get_nowait() is None  # a's session stream is ended
    (relet,) = leases(box_b)
    assert (relet.task_id, relet.attempt) == (lease.task_id, 2)
    assert coord.leases.tasks[lease.task_id].retries_used == 0
    assert coord.report_result(lease.task_id, 1, True, {"val_accuracy": 0.9}) == "stale"
    assert coord.succeeded == 0 and coord.stale_results == 1
    assert coord.report_result(lease.task_id, 2, True, {"val_accuracy": 0.8}) == "accepted"
    assert coord.report_result(lease.task_id, 2, True, {"val_accuracy": 0.8}) == "duplicate"
    assert coord.succeeded == 1 and coord.best.metrics["val_accuracy"] == 0.8
    events = coord.journal.events("requeued")
    assert events[0]["detail"]["detected_by"] == "heartbeat"


def test_failures_are_retried_then_counted_and_too_many_fail_the_experiment(tmp_path):
    opt = CountingOptimizer()
    coord, _ = make(tmp_path, opt, max_trials=4, max_task_retries=1, max_failed_trials=1)
    _, box = join(coord, "a")
    for expected in ("t000001", "t000001", "t000002", "t000002"):
        (m,) = leases(box)
        assert m.task_id == expected
        coord.report_result(m.task_id, m.attempt, False, None, "exception", "boom")
    assert coord.phase == "Failed" and coord.failed == 2 and coord.retries == 2
    assert "maxFailedTrials=1" in coord.message
    assert list(opt.told) == [("c0", None), ("c1", None)]


def test_a_trial_that_loses_its_worker_max_task_losses_times_fails_and_a_restart_keeps_counting(tmp_path):
    """maxTaskLosses 3: a trial whose workers keep dying under it (stream, heartbeat, pod gone)
    goes back to the queue twice, and fails (kind lost) at the third loss instead of taking the
    next worker down. A clean leave (deregister) and a master restart do not count, and the count
    survives the restart (it is the journal's requeued events)."""
    opt = CountingOptimizer()
    coord, _ = make(tmp_path, opt, max_trials=1, max_task_losses=3, max_failed_trials=0)
    w, box = join(coord, "a")
    (m,) = leases(box)
    coord.worker_lost(w, LossReason.STREAM)  # loss 1
    w, box = join(coord, "b")
    (m,) = leases(box)
    assert coord.deregister(w, "SIGTERM") == [(m.task_id, m.attempt)]  # a clean leave: not a loss
    w, box = join(coord, "c")
    (m,) = leases(box)
    coord.worker_lost(w, LossReason.HEARTBEAT)  # loss 2
    w, box = join(coord, "d")
    (m,) = leases(box)
    coord.journal.close()  # the master dies with the lease out

    coord, _ = make(tmp_path, CountingOptimizer(), max_trials=1, max_task_losses=3, max_failed_trials=0)
    w, adopted = coord.register("d", 0, 1, running=[(m.task_id, m.attempt)])  # "d" reconnects with it
    assert adopted == [(m.task_id, m.attempt)]
    coord.connect(w)
    assert m.attempt == 4 and coord.leases.tasks[m.task_id].retries_used == 0  # losses use no retry
    assert coord.worker_lost(w, LossReason.POD_GONE) == [(m.task_id, 4)]  # loss 3: failed, not requeued
    task = coord.leases.tasks[m.task_id]
    assert task.state.value == "failed" and task.error_kind == "lost"
    assert "maxTaskLosses=3" in task.error_message and "d" in task.error_message and "pod_gone" in task.error_message
    (event,) = coord.journal.events("failed")
    assert (event["task_id"], event["attempt"], event["detail"]["losses"]) == (m.task_id, 4, 3)
    assert [e["detail"]["detected_by"] for e in coord.journal.events("requeued")] == \
        ["stream", "deregister", "heartbeat", "restart"]
    assert coord.phase == "Failed" and "maxFailedTrials=0" in coord.message  # counted like any failed trial
    _, box = join(coord, "e")
    assert leases(box) == []  # nobody else is taken down
    coord.journal.close()
    again, _ = make(tmp_path, CountingOptimizer(), max_trials=1, max_task_losses=3)
    assert again.failed == 1 and again.leases.tasks[m.task_id].error_kind == "lost"
    again.journal.close()


def test_max_task_losses_below_one_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"spec\.faultTolerance\.maxTaskLosses=0"):
        ExperimentSettings(max_task_losses=0)


def test_metrics_without_the_objective_or_with_nan_are_failures(tmp_path):
    coord, _ = make(tmp_path, max_trials=2, max_task_retries=0)
    _, box = join(coord, "a", slots=2)
    m1, m2 = leases(box)
    coord.report_result(m1.task_id, 1, True, {"loss": 1.0})
    coord.report_result(m2.task_id, 1, True, {"val_accuracy": float("nan")})
    kinds = sorted(coord.leases.tasks[t].error_kind for t in (m1.task_id, m2.task_id))
    assert kinds == ["invalid", "nan"]


def test_restart_restores_finished_trials_optimizer_state_and_holds_orphaned_leases(tmp_path):
    opt = CountingOptimizer()
    coord, _ = make(tmp_path, opt, max_trials=4)
    _, box = join(coord, "a", slots=2)
    m1, m2 = leases(box)
    coord.report_result(m1.task_id, 1, True, {"val_accuracy": 0.7})
    (m3,) = leases(box)
    coord.journal.close()
    # a new master process on the same journal
    opt2 = CountingOptimizer()
    coord2, clock2 = make(tmp_path, opt2, max_trials=4)
    assert coord2.succeeded == 1 and opt2.next == 3 and opt2.outstanding == ["c1", "c2"]
    assert coord2.best.task_id == m1.task_id
    # the worker that ran m2 comes back and re-adopts it; m3's worker is gone
    wid, adopted = coord2.register("a", 0, 2, running=[(m2.task_id, 1)])
    assert adopted == [(m2.task_id, 1)]
    box2 = coord2.connect(wid)
    # m3 is held for its worker (hold = heartbeat timeout); the free slot gets a new proposal
    assert [m.task_id for m in leases(box2)] == ["t000004"]
    assert coord2.leases.choose_for("b", ["a", "b"], clock2.monotonic()) is None
    clock2.advance(3.1)
    coord2.heartbeat(wid)
    assert coord2.check_heartbeats() == []
    assert coord2.leases.choose_for("b", ["a", "b"], clock2.monotonic()).task_id == m3.task_id
    # the adopted lease's result is counted for its original attempt
    assert coord2.report_result(m2.task_id, 1, True, {"val_accuracy": 0.6}) == "accepted"
    assert coord2.leases.tasks[m2.task_id].finished_attempt == 1
    assert coord2.leases.tasks[m1.task_id].finished_attempt == 1 and coord2.succeeded == 2


def test_orphaned_result_delivered_after_restart_is_counted_for_the_journaled_attempt(tmp_path):
    coord, _ = make(tmp_path, max_trials=1)
    _, box = join(coord, "a")
    (m,) = leases(box)
    coord.journal.close()
    coord2, _ = make(tmp_path, max_trials=1)
    assert coord2.report_result(m.task_id, 1, True, {"val_accuracy": 0.75}) == "accepted"
    assert coord2.phase == "Succeeded" and coord2.succeeded == 1
    assert coord2.leases.tasks[m.task_id].finished_attempt == 1


def test_worker_gone_is_death_at_once_by_name(tmp_path):
    coord, _ = make(tmp_path, max_trials=2)
    _, box = join(coord, "pod-x", slots=2)
    assert len(leases(box)) == 2
    ids, released = coord.worker_gone("pod-x", "pod deleted")
    assert len(ids) == 1 and len(released) == 2
    assert coord.losses[0]["detected_by"] == LossReason.POD_GONE.value
    assert coord.worker_gone("pod-x", "again") == ([], [])


def test_settings_errors_name_the_manifest_field():
    with pytest.raises(ValueError, match=r"spec.budget.maxTrials=0"):
        ExperimentSettings(max_trials=0)
    with pytest.raises(ValueError, match=r"spec.objective.goal='up'"):
        ExperimentSettings(goal="up")


def test_optimizer_state_is_snapshot_plus_replayed_asks_and_tells(tmp_path, monkeypatch):
    import morphml.distributed.coordinator as coordinator_module

    monkeypatch.setattr(coordinator_module, "SNAPSHOT_EVERY", 3)
    opt = CountingOptimizer()
    coord, _ = make(tmp_path, opt, max_trials=20)
    _, box = join(coord, "a", slots=2)
    for _ in range(8):  # 16 ops: snapshots at 3-op steps, the last op(s) only in the log
        m = leases(box)[0]
        coord.report_result(m.task_id, m.attempt, True, {"val_accuracy": 0.1})
    state, op_seq = coord.journal.load_optimizer()
    assert state is not None and op_seq < coord._last_op_seq  # some ops only in the log
    expected = opt.state_dict()
    coord.journal.close()
    opt2 = CountingOptimizer()
    make(tmp_path, opt2, max_trials=20)
    assert opt2.state_dict() == expected


def test_replay_that_does_not_reproduce_the_journal_is_refused(tmp_path):
    coord, _ = make(tmp_path, CountingOptimizer(), max_trials=3)
    join(coord, "a", slots=2)
    coord.journal.close()
    different = CountingOptimizer()
    different.next = 50  # proposes other candidates than the journal recorded
    with pytest.raises(RuntimeError, match="not deterministic or the manifest changed"):
        make(tmp_path, different, max_trials=3)


def test_prefetch_queues_one_extra_lease_per_worker_and_zero_keeps_free_slots_only(tmp_path):
    coord, _ = make(tmp_path, max_trials=10)
    _, box = join(coord, "a", slots=2)
    assert len(leases(box)) == 2
    coord2, _ = make(tmp_path / "p", max_trials=10, prefetch=1)
    _, box2 = join(coord2, "a", slots=2)
    assert len(leases(box2)) == 3


def test_auto_prefetch_queues_a_lease_only_while_trials_are_short(tmp_path):
    coord, _ = make(tmp_path, max_trials=50, prefetch=None)
    _, box = join(coord, "a", slots=1)
    first = leases(box)
    assert len(first) == 1  # nothing known about trial durations yet: no prefetch
    coord.report_result(first[0].task_id, first[0].attempt, True, {"val_accuracy": 0.1}, duration=0.05)
    short = leases(box)
    assert len(short) == 2  # a short trial: the next lease plus one queued
    for m in short:
        coord.report_result(m.task_id, m.attempt, True, {"val_accuracy": 0.1}, duration=600.0)
    after_long = leases(box)
    # median of (0.05, 600, 600) is long: back to one lease at a time once the queue drains
    assert 1 <= len(after_long) <= 2
    for m in after_long:
        coord.report_result(m.task_id, m.attempt, True, {"val_accuracy": 0.1}, duration=600.0)
    assert len(leases(box)) == 1


def test_auto_prefetch_queues_two_leases_while_trials_are_shorter_than_a_round_trip(tmp_path):
    coord, _ = make(tmp_path, max_trials=50, prefetch=None)
    _, box = join(coord, "a", slots=1)
    first = leases(box)
    coord.report_result(first[0].task_id, first[0].attempt, True, {"val_accuracy": 0.1}, duration=0.01)
    assert len(leases(box)) == 3  # the next lease plus two queued


def test_grouped_results_are_each_acknowledged_after_their_commit(tmp_path):
    import threading
    import time

    coord, _ = make(tmp_path, max_trials=40)
    ids = [join(coord, f"w{i}", slots=1) for i in range(8)]
    msgs = [(w, leases(box)[0]) for w, box in ids]
    journal = coord.journal
    got, durable_on_return = {}, {}

    def report(m):
        got[m.task_id] = coord.report_result(m.task_id, m.attempt, True, {"val_accuracy": 0.2}, duration=1.0)
        durable_on_return[m.task_id] = journal._synced  # commits fsynced when this result was answered

    threads = [threading.Thread(target=report, args=(m,), daemon=True) for _, m in msgs]
    with coord._lock:  # results queue up behind the lock, then go in one transaction
        commits_before = journal._commits
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(coord._result_queue) < len(threads):
            assert time.monotonic() < deadline, f"only {len(coord._result_queue)} of 8 results queued after 10 s"
            time.sleep(0.001)
    for t in threads:
        t.join(10)
        assert not t.is_alive(), "a report_result call did not return within 10 s"
    assert set(got.values()) == {"accepted"} and len(got) == 8
    # One commit for all eight (one transaction each would make eight), and every caller was
    # answered only once that commit was fsynced.
    assert journal._commits - commits_before == 1
    assert all(synced >= commits_before + 1 for synced in durable_on_return.values()), durable_on_return
    assert journal.count_results("accepted") == 8 and coord.succeeded == 8


def test_result_without_the_lease_key_is_refused_and_never_counted(tmp_path):
    coord, _ = make(tmp_path, max_trials=1)
    _, box = join(coord, "a")
    (m,) = leases(box)
    assert m.lease_key and m.lease_key == coord.lease_key(m.task_id, m.attempt)
    assert coord.lease_key(m.task_id, m.attempt + 1) != m.lease_key  # keys are per attempt
    for forged in ("", "0" * 32, coord.lease_key(m.task_id, m.attempt + 1)):
        assert coord.report_result(m.task_id, m.attempt, True, {"val_accuracy": 1.0}, worker_name="rogue",
                                   lease_key=forged) == "refused"
    assert coord.succeeded == 0 and coord.phase != "Succeeded"
    assert [e["task_id"] for e in coord.journal.events("refused_result")] == [m.task_id] * 3
    assert coord.report_result(m.task_id, m.attempt, True, {"val_accuracy": 0.7}, lease_key=m.lease_key) == "accepted"
    assert coord.succeeded == 1 and coord.best.metrics["val_accuracy"] == 0.7


def test_lease_keys_survive_a_master_restart(tmp_path):
    coord, _ = make(tmp_path, max_trials=1)
    _, box = join(coord, "a")
    (m,) = leases(box)
    coord.journal.close()
    coord2, _ = make(tmp_path, max_trials=1)
    assert coord2.lease_key(m.task_id, m.attempt) == m.lease_key
    assert coord2.report_result(m.task_id, 1, True, {"val_accuracy": 0.75}, lease_key=m.lease_key) == "accepted"


def test_worker_losses_are_numbered_from_one_and_the_numbers_survive_a_restart(tmp_path):
    coord, _ = make(tmp_path, max_trials=50)
    for i in range(3):
        worker_id, _ = join(coord, f"w{i}")
        coord.worker_lost(worker_id, LossReason.HEARTBEAT)
    clean, _ = coord.register("leaver", 0, 1)  # never connected: holds no lease
    coord.worker_lost(clean, LossReason.DEREGISTER)  # a clean leave holding nothing is not a loss
    st = coord.status()
    assert st["loss_seq"] == 3 and [loss["seq"] for loss in st["losses"]] == [1, 2, 3]
    assert [loss["worker_name"] for loss in coord.status(losses_after_seq=1)["losses"]] == ["w1", "w2"]
    coord.journal.close()

    coord2, _ = make(tmp_path, max_trials=50)  # a restarted master continues the numbering
    assert coord2.status()["loss_seq"] == 3
    assert [loss["seq"] for loss in coord2.status()["losses"]] == [1, 2, 3]
    worker_id, _ = join(coord2, "w3")
    coord2.worker_lost(worker_id, LossReason.STREAM)
    st = coord2.status(losses_after_seq=3)
    assert st["loss_seq"] == 4
    assert [(loss["seq"], loss["worker_name"], loss["detected_by"]) for loss in st["losses"]] == [(4, "w3", "stream")]
    assert coord2.status(losses_after_seq=4)["losses"] == []


def test_status_pages_losses_after_a_number_beyond_the_recent_ones_kept_in_memory(tmp_path):
    import asyncio

    from morphml.distributed import coordinator as coordinator_module
    from morphml.distributed.master import MasterServicer, status_to_proto
    from morphml.distributed.proto import worker_pb2 as pb

    coord, _ = make(tmp_path, max_trials=50)
    total = coordinator_module.RECENT_LOSSES + 30
    for i in range(total):
        worker_id, _ = join(coord, f"w{i}")
        coord.worker_lost(worker_id, LossReason.HEARTBEAT)
    assert [loss["seq"] for loss in coord.status()["losses"]] == list(range(31, total + 1))  # the latest 100
    assert [loss["seq"] for loss in coord.status(losses_after_seq=5)["losses"]] == list(range(6, total + 1))
    proto = status_to_proto(coord.status(losses_after_seq=total - 2))
    assert proto.loss_seq == total and [loss.seq for loss in proto.losses] == [total - 1, total]
    coord.journal.close()
    coord2, _ = make(tmp_path, max_trials=50)
    assert [loss["seq"] for loss in coord2.status(losses_after_seq=0)["losses"]] == list(range(1, total + 1))
    servicer = MasterServicer(coord2)  # GetStatus: an unset losses_after_seq is "the latest 100", 0 is "from 1"
    latest = asyncio.run(servicer.GetStatus(pb.StatusRequest(), None))
    assert [loss.seq for loss in latest.losses] == list(range(31, total + 1))
    from_one = asyncio.run(servicer.GetStatus(pb.StatusRequest(losses_after_seq=0), None))
    assert [loss.seq for loss in from_one.losses] == list(range(1, total + 1)) and from_one.loss_seq == total
    servicer.close()


class RelabellingOptimizer(CountingOptimizer):
    """Same candidate ids as CountingOptimizer, other architectures behind them."""

    def ask(self, n):
        out = super().ask(n)
        for cand in out:
            cand.graph = FakeGraph(cand.graph.i + 500)
        return out


def test_replay_with_the_same_ids_but_other_architectures_is_refused(tmp_path):
    coord, _ = make(tmp_path, CountingOptimizer(), max_trials=3)
    join(coord, "a", slots=2)
    coord.journal.close()
    with pytest.raises(RuntimeError, match="architectures"):
        make(tmp_path, RelabellingOptimizer(), max_trials=3)
