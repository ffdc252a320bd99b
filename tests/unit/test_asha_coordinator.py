"""ASHA / Hyperband through the coordinator: segments leased up to a rung, a rung result pauses
the trial, a free slot promotes the top 1/eta (a new lease resuming from the checkpoint, no
retry used), the end stops the paused trials, spec.budget.maxEpochs, checkpoint bookkeeping
(record, resume after a lost worker, fallback, retention) and a restart on the same journal.
Real SQLite journal and a real LocalStore in a temp dir, injected clock, fake workers (their
outboxes), no gRPC."""

from __future__ import annotations

import collections

import pytest

from morphml.distributed.checkpoints import ArtifactSettings, LocalStore, checkpoint_key
from morphml.distributed.clock import ManualClock
from morphml.distributed.coordinator import ExperimentCoordinator, ExperimentSettings, ProgressReport, ResultReport
from morphml.distributed.journal import Journal
from morphml.distributed.schedulers import EarlyStoppingSettings
from morphml.distributed.states import LossReason, TaskState
from test_leases_coordinator import CountingOptimizer, join, leases

pytestmark = pytest.mark.unit

# Each candidate's accuracy at any epoch: candidate i is better the larger i % 5 is.
def accuracy(task_id: str, epoch: int) -> float:
    i = int(task_id[1:])
    return round(0.1 * (i % 5) + 0.01 * epoch, 4)


def make(tmp_path, optimizer=None, kind="asha", store=True, keep="best", **kw):
    settings = ExperimentSettings(**{
        "max_trials": 9, "max_failed_trials": 0, "heartbeat_interval": 1.0, "evaluation": {"epochs": 9},
        "early_stopping": EarlyStoppingSettings(kind, min_resource=1, reduction_factor=3),
        "artifacts": ArtifactSettings(checkpoint_interval=0, keep=keep), **kw})
    coord = ExperimentCoordinator(optimizer or CountingOptimizer(), settings, Journal(tmp_path / "j.db"),
                                  ManualClock())
    if store:
        coord.artifact_store = LocalStore(tmp_path)
    return coord


def train(coord, lease, tmp_path=None, value=None, save=True):
    """What a worker does with a lease: train start_epoch+1..stop, save a checkpoint at each of
    save_epochs (the file, then record_checkpoint), report the result."""
    stop = lease.stop_epoch or 9
    key = coord.lease_key(lease.task_id, lease.attempt)
    if save and coord.artifact_store is not None:
        for epoch in lease.save_epochs:
            name = checkpoint_key(lease.task_id, epoch)
            path = tmp_path / "upload.bin"
            path.write_bytes(f"{lease.task_id}@{epoch}".encode())
            coord.artifact_store.put_file(name, path)
            assert coord.record_checkpoint(lease.task_id, lease.attempt, key, epoch, name, "ab" * 32, 10)
    metrics = {"val_accuracy": accuracy(lease.task_id, stop) if value is None else value, "epochs": stop}
    return coord.report_result(lease.task_id, lease.attempt, True, metrics, lease_key=key)


def drive(coord, box, tmp_path, limit=200):
    """Runs every lease the worker gets until the experiment is over; returns the leases."""
    done = []
    for _ in range(limit):
        batch = leases(box)
        if not batch:
            break
        for lease in batch:
            assert train(coord, lease, tmp_path) == "accepted"
            done.append(lease)
    return done


def promoted_events(coord):
    return [(e["task_id"], e["detail"]["from_epoch"]) for e in coord.journal.events("promoted")]


def test_asha_pauses_at_rung_promotes_the_top_third_from_its_checkpoint_and_stops_the_rest(tmp_path):
    opt = CountingOptimizer()
    coord = make(tmp_path, opt)
    _, box = join(coord, "w", slots=1)
    first = leases(box)
    assert [(m.task_id, m.start_epoch, m.stop_epoch, m.checkpoint, m.save_epochs) for m in first] == \
        [("t000001", 0, 1, None, (1,))]
    assert train(coord, first[0], tmp_path) == "accepted"
    assert coord.leases.tasks["t000001"].state is TaskState.PAUSED
    assert opt.told[-1][0] == "c0"  # told at its first rung result, once
    second = leases(box)
    assert second[0].task_id == "t000002" and second[0].stop_epoch == 1  # 1 result: nothing to promote
    train(coord, second[0], tmp_path)
    third = leases(box)
    train(coord, third[0], tmp_path)
    # three rung-1 results (t1: 0.11, t2: 0.21, t3: 0.31): the free slot promotes t3, the best
    promotion = leases(box)[0]
    task = coord.leases.tasks["t000003"]
    assert (promotion.task_id, promotion.attempt, promotion.start_epoch, promotion.stop_epoch) == \
        ("t000003", 2, 1, 3)
    assert promotion.checkpoint is not None and promotion.checkpoint.epoch == 1
    assert promotion.checkpoint.key == checkpoint_key("t000003", 1) and promotion.save_epochs == (3,)
    assert task.retries_used == 0 and coord.retries == 0  # a promotion is not a retry
    assert coord.checkpoint_for("t000003", 2, coord.lease_key("t000003", 2)) == promotion.checkpoint
    resumed = coord.journal.events("resumed")
    assert [(e["task_id"], e["attempt"], e["detail"]["epoch"], e["detail"]["after"]) for e in resumed] == \
        [("t000003", 2, 1, "promoted")]
    train(coord, promotion, tmp_path)
    rest = drive(coord, box, tmp_path)
    st = coord.status()
    assert st["phase"] == "Succeeded", st["message"]
    states = collections.Counter(t.state for t in coord.leases.tasks.values())
    assert len(coord.leases.tasks) == 9 and states[TaskState.PAUSED] == 0
    assert states[TaskState.STOPPED] >= 6 and states[TaskState.SUCCEEDED] >= 1 and st["failed"] == 0
    # every trial once per rung at most, and told exactly once
    promos = promoted_events(coord)
    assert len(promos) == len(set(promos))
    assert sorted(cid for cid, _ in opt.told) == sorted(t.candidate_id for t in coord.leases.tasks.values())
    # rung sizes: 9 at rung 1, their top third (3) at rung 3, its top third (1) at rung 9
    assert [(r["epochs"], r["results"], r["promoted"]) for r in st["scheduler"]["rungs"]] == \
        [(1, 9, 3), (3, 3, 1), (9, 1, 0)]
    assert st["best"]["trial_id"] == "t000004" and st["best"]["status"] == "succeeded"
    assert sum((m.stop_epoch or 9) - m.start_epoch for m in first + second + third + [promotion] + rest) == \
        st["epochs"] == 9 * 1 + 3 * 2 + 1 * 6
    for task in coord.leases.tasks.values():  # a stopped trial keeps the epochs it got
        if task.state is TaskState.STOPPED:
            assert task.metrics["epochs"] in (1, 3)
    coord.journal.close()


def test_retention_keeps_the_best_final_and_each_paused_trials_latest_checkpoint(tmp_path):
    coord = make(tmp_path)
    _, box = join(coord, "w", slots=1)
    drive(coord, box, tmp_path)
    best = coord.status()["best"]
    assert best["checkpoint"] == checkpoint_key(best["trial_id"], 9)
    deleted = {e["detail"]["key"] for e in coord.journal.events("checkpoint_deleted")}
    saved = {e["detail"]["key"] for e in coord.journal.events("checkpoint_saved")}
    # the search is over: every stopped trial's checkpoints and the best's earlier ones are deleted
    assert saved - deleted == {best["checkpoint"]}
    for key in saved:
        assert coord.artifact_store.exists(key) is (key not in deleted)
    assert coord.status()["artifacts"] == {"checkpoints": 1, "bytes": 10, "store": f"local {tmp_path}"}
    coord.journal.close()


def test_keep_all_deletes_nothing(tmp_path):
    coord = make(tmp_path, keep="all")
    _, box = join(coord, "w", slots=1)
    drive(coord, box, tmp_path)
    assert coord.journal.events("checkpoint_deleted") == []
    assert coord.status()["artifacts"]["checkpoints"] == len(coord.journal.events("checkpoint_saved"))
    coord.journal.close()


def test_without_a_store_a_promotion_retrains_from_zero_to_the_next_rung(tmp_path):
    coord = make(tmp_path, store=False, max_trials=3)
    _, box = join(coord, "w", slots=1)
    for _ in range(3):
        (lease,) = leases(box)
        assert lease.save_epochs == () and lease.stop_epoch == 1
        train(coord, lease)
    (promotion,) = leases(box)
    assert (promotion.task_id, promotion.start_epoch, promotion.stop_epoch, promotion.checkpoint) == \
        ("t000003", 0, 3, None)
    assert coord.journal.events("resumed") == []
    coord.journal.close()


def test_a_worker_that_ignores_stop_epoch_is_told_stop_at_the_rung(tmp_path):
    coord = make(tmp_path, store=False, max_trials=3)
    _, box = join(coord, "w", slots=1)
    (lease,) = leases(box)
    key = coord.lease_key(lease.task_id, lease.attempt)
    assert coord.report_progress([ProgressReport(lease.task_id, lease.attempt, 1, {"val_accuracy": 0.5},
                                                 lease_key=key)]) == [True]
    assert coord.journal.curves(lease.task_id)[0]["step"] == 1  # journaled like any report
    coord.journal.close()


def test_a_lost_worker_resumes_from_the_latest_checkpoint_elsewhere_counted_once(tmp_path):
    coord = make(tmp_path, max_trials=3, artifacts=ArtifactSettings(checkpoint_interval=1))
    w1, box1 = join(coord, "w1", slots=1)
    for _ in range(3):
        train(coord, leases(box1)[0], tmp_path)
    (promotion,) = leases(box1)
    assert promotion.save_epochs == (2, 3)  # every epoch (interval 1) up to the rung
    # w1 saves epoch 2 of the promoted segment, then dies
    key = coord.lease_key(promotion.task_id, promotion.attempt)
    name = checkpoint_key(promotion.task_id, 2)
    (tmp_path / "u").write_bytes(b"x")
    coord.artifact_store.put_file(name, tmp_path / "u")
    assert coord.record_checkpoint(promotion.task_id, promotion.attempt, key, 2, name, "cd" * 32, 1)
    assert not coord.record_checkpoint(promotion.task_id, promotion.attempt, "0" * 32, 2, name, "cd" * 32, 1)
    assert not coord.record_checkpoint(promotion.task_id, 1, coord.lease_key(promotion.task_id, 1), 2, name,
                                       "cd" * 32, 1)  # not the live attempt
    # epoch 1's checkpoint is still what the live attempt resumes from: kept
    assert coord.artifact_store.exists(checkpoint_key(promotion.task_id, 1))
    coord.worker_lost(w1, LossReason.STREAM)
    _, box2 = join(coord, "w2", slots=1)
    (again,) = leases(box2)
    assert (again.task_id, again.attempt, again.start_epoch, again.stop_epoch) == (promotion.task_id, 3, 2, 3)
    assert again.checkpoint.key == name
    assert coord.journal.events("resumed")[-1]["detail"]["after"] == "requeued"
    assert coord.leases.tasks[again.task_id].retries_used == 0
    # the lost attempt's checkpoint from epoch 1 can go now
    assert not coord.artifact_store.exists(checkpoint_key(promotion.task_id, 1))
    # the worker could not read it and trained from 0: journaled with the reason
    metrics = {"val_accuracy": 0.9, "epochs": 3, "checkpoint_fallback": "sha256 mismatch"}
    assert coord.report_result(again.task_id, again.attempt, True, metrics,
                               lease_key=coord.lease_key(again.task_id, again.attempt)) == "accepted"
    (fallback,) = coord.journal.events("checkpoint_fallback")
    assert (fallback["task_id"], fallback["detail"]["key"], fallback["detail"]["reason"]) == \
        (again.task_id, name, "sha256 mismatch")
    rungs = [e for e in coord.journal.events("rung_result") if e["task_id"] == again.task_id]
    assert [e["detail"]["epoch"] for e in rungs] == [1, 3]  # counted once per rung
    coord.journal.close()


def test_max_epochs_is_never_exceeded_even_with_a_lost_worker(tmp_path):
    coord = make(tmp_path, max_trials=50, max_epochs=20)
    w1, box1 = join(coord, "w1", slots=2)
    first = leases(box1)
    train(coord, first[0], tmp_path)
    coord.worker_lost(w1, LossReason.HEARTBEAT)  # first[1]'s epoch is spent, and leased again
    _, box2 = join(coord, "w2", slots=2)
    drive(coord, box2, tmp_path)
    st = coord.status()
    assert st["phase"] == "Succeeded" and "spec.budget.maxEpochs=20 reached" in st["message"], st["message"]
    assert st["epochs"] <= 20
    leased = coord.journal.events("leased")
    # the lost lease was leased again (and later, in the budget's end game, promoted: from epoch 1)
    assert [e["task_id"] for e in leased if e["detail"].get("start_epoch", 0) == 0].count(first[1].task_id) == 2
    spent = sum((e["detail"].get("stop_epoch") or 9) - e["detail"].get("start_epoch", 0) for e in leased)
    assert spent <= 20 and st["paused"] == 0 and st["failed"] == 0
    coord.journal.close()


@pytest.mark.parametrize("restart_after", [None, 1, 2])
def test_the_last_epochs_of_max_epochs_take_the_best_paused_trial_to_the_full_budget(tmp_path, restart_after):
    """maxEpochs 20, rungs 1/3/9: ASHA's own rule needs 9 first-rung and 3 second-rung results
    (15 epochs) before a promotion to 9 (6 more: 21). Once fewer than 9 epochs are left (no new
    trial can reach 9), the paused trials are promoted instead, highest rung first, best first:
    the best second-rung trial trains to 9. A master restarted after the first or second such
    promotion goes on from the journal: nothing promoted twice, the same end."""
    coord = make(tmp_path, max_trials=50, max_epochs=20)
    _, box = join(coord, "w", slots=1)
    closing, batch = 0, leases(box)
    for _ in range(100):
        if not batch:
            break
        (lease,) = batch
        assert train(coord, lease, tmp_path) == "accepted"
        batch = leases(box)
        now_closing = sum(1 for e in coord.journal.events("promoted") if e["detail"].get("closing"))
        if now_closing > closing:
            closing = now_closing
            if restart_after == closing:  # the master dies with the promoted segment out
                (out,) = batch
                coord.journal.close()
                coord = make(tmp_path, max_trials=50, max_epochs=20)
                worker_id, adopted = coord.register("w", 0, 1, running=[(out.task_id, out.attempt)])
                assert adopted == [(out.task_id, out.attempt)]
                box = coord.connect(worker_id)
                assert coord._asha.target(out.task_id) == out.stop_epoch
    st = coord.status()
    assert st["phase"] == "Succeeded" and "spec.budget.maxEpochs=20 reached" in st["message"], st["message"]
    assert st["epochs"] <= 20 and st["failed"] == 0
    promoted = coord.journal.events("promoted")
    ends = [(e["task_id"], e["detail"]["from_epoch"]) for e in promoted]
    assert len(ends) == len(set(ends))  # each trial promoted at most once from a rung
    first = next(e for e in promoted if e["detail"].get("closing"))
    assert all(e["detail"]["epochs_left"] < 9 for e in promoted if e["detail"].get("closing"))
    assert (first["detail"]["from_epoch"], first["detail"]["to_epoch"]) == (3, 9)
    at_three = {e["task_id"]: e["detail"]["value"] for e in coord.journal.events("rung_result")
                if e["detail"]["epoch"] == 3 and e["seq"] < first["seq"]}
    assert first["task_id"] == max(at_three, key=at_three.get)  # the best at rung 3 then
    assert st["succeeded"] == 1 and coord.best is not None and coord.best.task_id == first["task_id"]
    coord.journal.close()


def test_max_epochs_with_scheduler_none_gives_back_what_median_stopped_trials_did_not_train(tmp_path):
    coord = make(tmp_path, kind="none", store=False, max_trials=10, max_epochs=30)
    _, box = join(coord, "w", slots=1)
    for _ in range(10):
        batch = leases(box)
        if not batch:
            break
        (lease,) = batch
        assert (lease.start_epoch, lease.stop_epoch) == (0, 0)
        # every trial stops after 3 of its 9 epochs: 6 given back each time
        coord.report_result(lease.task_id, lease.attempt, True, {"val_accuracy": 0.5, "epochs": 3})
    st = coord.status()
    # 8 trials used 24 epochs; a ninth would lease 9 more (33 > 30): not leased, the search is over
    assert (st["epochs"], st["succeeded"], st["phase"]) == (24, 8, "Succeeded")
    assert "spec.budget.maxEpochs=30 reached" in st["message"]
    coord.journal.close()


def test_generational_ga_gets_its_next_generation_once_each_trial_has_a_first_rung_result(tmp_path):
    opt = CountingOptimizer(total=6, generation_size=3)
    coord = make(tmp_path, opt, store=False, max_trials=6)
    _, box = join(coord, "w", slots=5)
    gen0 = leases(box)
    assert len(gen0) == 3 and all(m.stop_epoch == 1 for m in gen0)  # 5 slots, the generation has 3
    for lease in gen0[:2]:
        train(coord, lease)
    assert leases(box) == []  # the generation waits for its last trial's first rung result
    train(coord, gen0[2])
    nxt = leases(box)
    # the top third of rung 1 (one trial) is promoted, and the next generation fills other slots
    assert sorted(m.stop_epoch for m in nxt) == [1, 1, 1, 3]
    for lease in nxt:
        train(coord, lease)
    drive(coord, box, tmp_path)
    assert coord.phase == "Succeeded" and len(opt.told) == 6
    coord.journal.close()


def test_hyperband_brackets_start_trials_at_their_first_rungs(tmp_path):
    coord = make(tmp_path, kind="hyperband", store=False, max_trials=6)
    _, box = join(coord, "w", slots=6)
    assert [m.stop_epoch for m in leases(box)] == [1, 3, 9, 1, 3, 9]
    coord.journal.close()


def test_failures_in_a_promoted_segment_are_retried_and_stopped_trials_never_fail_the_experiment(tmp_path):
    coord = make(tmp_path, store=False, max_trials=3, max_task_retries=1)
    _, box = join(coord, "w", slots=1)
    for _ in range(3):
        train(coord, leases(box)[0])
    (promotion,) = leases(box)
    coord.report_result(promotion.task_id, promotion.attempt, False, None, "exception", "boom")
    (retry,) = leases(box)
    assert (retry.task_id, retry.stop_epoch, coord.leases.tasks[retry.task_id].retries_used) == \
        (promotion.task_id, 3, 1)
    train(coord, retry)
    drive(coord, box, tmp_path)
    st = coord.status()
    assert st["phase"] == "Succeeded" and st["failed"] == 0 and st["stopped"] >= 2  # maxFailedTrials 0
    coord.journal.close()


def test_restart_mid_asha_knows_rungs_promotions_paused_trials_and_checkpoints(tmp_path):
    opt = CountingOptimizer()
    coord = make(tmp_path, opt)
    _, box = join(coord, "w", slots=1)
    for _ in range(5):  # t1..t3 at rung 1, t3 promoted and trained to rung 3, t4 at rung 1
        train(coord, leases(box)[0], tmp_path)
    (running,) = leases(box)  # t4, now the best of four at rung 1, promoted: out when the master dies
    assert (running.task_id, running.attempt, running.start_epoch, running.stop_epoch) == ("t000004", 2, 1, 3)
    before = coord.status()
    coord.journal.close()  # the master dies here (nothing after the last commit is in the file)

    again = make(tmp_path, CountingOptimizer())
    st = again.status()
    assert st["scheduler"] == before["scheduler"] and st["paused"] == before["paused"] == 3
    assert st["artifacts"] == before["artifacts"] and st["epochs"] == before["epochs"]
    assert again._asha.target(running.task_id) == running.stop_epoch
    assert {t.task_id for t in again.leases.tasks.values() if t.state is TaskState.PAUSED} == \
        {"t000001", "t000002", "t000003"}
    assert again.checkpoint_for(running.task_id, running.attempt,
                                again.lease_key(running.task_id, running.attempt)) == running.checkpoint
    # the worker reconnects with its lease and finishes it: counted once, under the same attempt
    worker_id, adopted = again.register("w", 0, 1, running=[(running.task_id, running.attempt)])
    assert adopted == [(running.task_id, running.attempt)]
    box2 = again.connect(worker_id)
    assert train(again, running, tmp_path) == "accepted"
    drive(again, box2, tmp_path)
    assert again.phase == "Succeeded"
    promos = promoted_events(again)
    assert len(promos) == len(set(promos))  # nothing promoted twice across the restart
    assert len(again.leases.tasks) == 9 and all(t.finished for t in again.leases.tasks.values())
    rungs = collections.Counter((e["task_id"], e["detail"]["epoch"]) for e in again.journal.events("rung_result"))
    assert max(rungs.values()) == 1  # each trial counted once per rung
    again.journal.close()


class TwoObjectiveOptimizer(CountingOptimizer):
    def __init__(self):
        super().__init__()
        self.objectives = [{"metric": "val_accuracy", "goal": "maximize"}, {"metric": "params", "goal": "minimize"}]


def test_with_two_objectives_a_rung_promotes_by_non_dominated_rank_then_crowding(tmp_path):
    settings = ExperimentSettings(max_trials=4, max_failed_trials=0, evaluation={"epochs": 4},
                                  early_stopping=EarlyStoppingSettings("asha", min_resource=1, reduction_factor=2))
    coord = ExperimentCoordinator(TwoObjectiveOptimizer(), settings, Journal(tmp_path / "j.db"), ManualClock())
    _, box = join(coord, "w", slots=4)
    first = leases(box)
    assert [m.stop_epoch for m in first] == [1, 1, 1, 1]  # rungs 1, 2, 4
    # (accuracy, params): t1 and t3 are the extremes of the first front, t2 is on it between them,
    # t4 is dominated. By accuracy alone the top two would be t1 and t2.
    values = {"t000001": (0.9, 1000), "t000002": (0.85, 900), "t000003": (0.5, 100), "t000004": (0.4, 2000)}
    coord.report_results([ResultReport(m.task_id, m.attempt, True, {"val_accuracy": values[m.task_id][0],
                                                                     "params": values[m.task_id][1], "epochs": 1})
                          for m in first])
    promoted = leases(box)
    assert sorted(m.task_id for m in promoted) == ["t000001", "t000003"]
    assert all((m.start_epoch, m.stop_epoch) == (0, 2) for m in promoted)  # no store: from 0
    rung = {e["task_id"]: e["detail"]["value"] for e in coord.journal.events("rung_result")}
    assert rung["t000003"] == [0.5, 100.0]  # journaled per objective, so a restart ranks the same
    coord.journal.close()
    again = ExperimentCoordinator(TwoObjectiveOptimizer(), settings, Journal(tmp_path / "j.db"), ManualClock())
    assert sorted(again._asha.brackets[0].top(0)) == ["t000001", "t000003"]
    again.journal.close()


def test_when_no_trial_trains_the_full_budget_the_best_stopped_trial_is_best(tmp_path):
    coord = make(tmp_path, store=False, max_trials=3)
    _, box = join(coord, "w", slots=1)
    for value in (0.5, 0.7, 0.6):  # t1..t3 at rung 1; t2 is promoted
        (lease,) = leases(box)
        train(coord, lease, value=value)
    (promotion,) = leases(box)
    assert coord.best is None  # nothing stopped or succeeded yet: paused trials are not best
    train(coord, promotion, value=0.8)  # rung 3: paused again; no more trials, nothing promotable
    st = coord.status()
    # the search is over with nobody at the full budget: the best stopped trial is the best
    assert st["phase"] == "Succeeded" and st["succeeded"] == 0 and st["stopped"] == 3
    assert (st["best"]["trial_id"], st["best"]["status"], st["best"]["metric"]) == (promotion.task_id, "stopped", 0.8)
    coord.journal.close()
    again = make(tmp_path, store=False, max_trials=3)  # the same after a restart
    assert again.status()["best"]["trial_id"] == promotion.task_id
    again.journal.close()


@pytest.mark.parametrize("snapshot_every", [3, 10**6])
def test_promoted_trials_update_the_optimizer_with_their_highest_rung_and_a_restart_replays_it(
        tmp_path, monkeypatch, snapshot_every):
    """The optimizer is told a trial's first rung result, then updated with each higher rung's:
    what it learns is the longest training each trial got. The updates are optimizer ops in the
    journal, so a master restarted mid-search (from a snapshot, or replaying every op) has the
    same optimizer state."""
    import morphml.distributed.coordinator as coordinator_module
    from morphml.optimizers import RegularizedEvolution
    from test_optimizers import space

    monkeypatch.setattr(coordinator_module, "SNAPSHOT_EVERY", snapshot_every)

    def optimizer():
        return RegularizedEvolution(space(), population_size=4, sample_size=2, max_trials=9, seed=1)

    coord = make(tmp_path, optimizer())
    _, box = join(coord, "w", slots=1)
    for _ in range(8):  # first-rung results and promotions of the best so far to rung 3
        assert train(coord, leases(box)[0], tmp_path) == "accepted"
    updates = [arg for _, op, arg in coord.journal.optimizer_ops_after(0) if op == "update"]
    promoted = [coord.leases.tasks[task_id] for task_id, _ in promoted_events(coord)]
    assert len(updates) == len(promoted) == 2 and all(u["metrics"]["epochs"] == 3 for u in updates)
    assert [u["id"] for u in updates] == [t.candidate_id for t in promoted]
    assert all(coord.optimizer.result_for(t.arch_hash)["epochs"] == 3 for t in promoted)
    (running,) = leases(box)  # out when the master dies
    before = coord.optimizer.state_dict()
    coord.journal.close()

    again = make(tmp_path, optimizer())
    assert again.optimizer.state_dict() == before
    worker_id, _ = again.register("w", 0, 1, running=[(running.task_id, running.attempt)])
    box2 = again.connect(worker_id)
    assert train(again, running, tmp_path) == "accepted"
    drive(again, box2, tmp_path)
    assert again.phase == "Succeeded"
    last = {}  # each trial's highest rung result, from the journal
    for event in again.journal.events("rung_result"):
        if event["detail"]["epoch"] >= last.get(event["task_id"], (0, None))[0]:
            last[event["task_id"]] = (event["detail"]["epoch"], event["detail"]["value"])
    for task in again.leases.tasks.values():
        epoch, value = last[task.task_id]
        assert again.optimizer.result_for(task.arch_hash)["epochs"] == epoch
        assert again.optimizer.result_for(task.arch_hash)["val_accuracy"] == value
    assert max(epoch for epoch, _ in last.values()) == 9
    again.journal.close()
