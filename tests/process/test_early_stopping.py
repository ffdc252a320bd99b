"""Process tier: `morphml run` with spec.earlyStopping median and a custom evaluator that calls
report() (issue 12, acceptance 4): weak trials are stopped by the median rule over the journaled
curves, finish as `stopped` (not failed: maxFailedTrials is 0) with the epochs they got, and the
curves survive a restart of the master on the same journal. A three-argument evaluator under
the same setting runs unchanged."""

from __future__ import annotations

import csv
import statistics

import pytest
import yaml

from proc_helpers import reading, write_manifest

pytestmark = pytest.mark.process

STEPS = 6  # tests/report_evaluators.py
WARMUP = 1


def median_manifest(path, evaluator, max_trials):
    write_manifest(path, evaluator=evaluator, max_trials=max_trials, max_failed=0, retries=0)
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["earlyStopping"] = {"type": "median", "warmupSteps": WARMUP}
    path.write_text(yaml.safe_dump(doc))
    return path


def read_trials(out):
    with open(out / "trials.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.timeout(150)
def test_median_rule_stops_weak_reporting_trials_which_finish_stopped_and_keep_their_curves(procs, tmp_path):
    manifest = median_manifest(tmp_path / "m.yaml", "tests.report_evaluators:curve", max_trials=10)
    out = tmp_path / "out"
    # One worker: trials run one after another, so each is judged against all the earlier ones.
    proc = procs.spawn(["run", str(manifest), "--workers", "1", "--output", str(out)], "run.log")
    assert proc.wait(timeout=120) == 0, proc.log_path.read_text()
    rows = read_trials(out)
    assert len(rows) == 10 and len({r["trial_id"] for r in rows}) == 10
    statuses = {r["status"] for r in rows}
    assert statuses == {"succeeded", "stopped"}, rows  # none failed: maxFailedTrials 0 was never touched
    for r in rows:
        epochs = int(r["epochs"])
        if r["status"] == "succeeded":
            assert epochs == STEPS
        else:
            assert WARMUP < epochs < STEPS
    with reading(out / "journal.db") as journal:
        curves = {}
        for point in journal.curves():
            curves.setdefault(point["task_id"], []).append(point)
        stops = journal.events("stop_decided")
        tasks = {t.task_id: t for t in journal.load_tasks()}
    assert sorted(e["task_id"] for e in stops) == sorted(r["trial_id"] for r in rows if r["status"] == "stopped")
    for r in rows:  # each curve is steps 1..epochs, and the trial's result is its last point
        points = curves[r["trial_id"]]
        assert [p["step"] for p in points] == list(range(1, int(r["epochs"]) + 1))
        assert float(r["val_accuracy"]) == pytest.approx(points[-1]["metrics"]["val_accuracy"])
        assert tasks[r["trial_id"]].state.value == r["status"]
    for stop in stops:  # the median rule, recomputed from the journal: what the others had reported by then
        step = stop["detail"]["step"]
        mine = [p["metrics"]["val_accuracy"] for p in curves[stop["task_id"]] if p["step"] <= step]
        others = [p["metrics"]["val_accuracy"] for t, c in curves.items() if t != stop["task_id"]
                  for p in c if p["step"] == step and p["reported_at"] <= stop["ts"]]
        assert step > WARMUP and others and max(mine) < statistics.median(others)
    # the best trial is a fully trained one
    assert max(rows, key=lambda r: float(r["val_accuracy"]))["status"] == "succeeded"

    again = procs.spawn(["run", str(manifest), "--workers", "1", "--output", str(out)], "run2.log")
    assert again.wait(timeout=60) == 0, again.log_path.read_text()
    assert "resuming: 10 trials already finished" in again.log_path.read_text()
    with reading(out / "journal.db") as journal:  # the restarted master kept every curve point
        assert sum(len(c) for c in curves.values()) == len(journal.curves())
    assert read_trials(out) == rows


@pytest.mark.timeout(180)
def test_the_builtin_trainer_reports_every_epoch_and_stops_where_the_median_rule_says(procs, tmp_path):
    manifest = median_manifest(tmp_path / "m.yaml", "tests.report_evaluators:curve", max_trials=5)
    doc = yaml.safe_load(manifest.read_text())
    del doc["spec"]["evaluation"]["evaluator"]  # the built-in trainer on digits
    doc["spec"]["evaluation"].update({"epochs": 3, "batchSize": 64})
    manifest.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    proc = procs.spawn(["run", str(manifest), "--workers", "1", "--output", str(out)], "run.log")
    assert proc.wait(timeout=160) == 0, proc.log_path.read_text()
    rows = read_trials(out)
    # the seeded search's 4th trial is far below the others after epoch 2 (about 0.78 against 0.85-0.94)
    assert len(rows) == 5 and {r["status"] for r in rows} == {"succeeded", "stopped"}, rows
    with reading(out / "journal.db") as journal:
        curves = {r["trial_id"]: journal.curves(r["trial_id"]) for r in rows}
        stopped = {e["task_id"]: e["detail"]["step"] for e in journal.events("stop_decided")}
    for r in rows:
        points = curves[r["trial_id"]]
        assert [p["step"] for p in points] == [p["metrics"]["epoch"] for p in points] == \
            list(range(1, int(r["epochs"]) + 1))
        assert all(set(p["metrics"]) == {"epoch", "val_accuracy", "val_loss", "train_loss", "seconds"} for p in points)
        # the result is the last epoch's validation
        assert float(r["val_accuracy"]) == pytest.approx(points[-1]["metrics"]["val_accuracy"])
        if r["status"] == "stopped":
            assert int(r["epochs"]) == stopped[r["trial_id"]] > WARMUP
        else:
            assert int(r["epochs"]) == 3 and r["trial_id"] not in stopped


@pytest.mark.timeout(90)
def test_a_three_argument_evaluator_runs_unchanged_under_the_median_rule(procs, tmp_path):
    manifest = median_manifest(tmp_path / "m.yaml", "tests.evaluators:instant", max_trials=4)
    out = tmp_path / "out"
    proc = procs.spawn(["run", str(manifest), "--workers", "2", "--output", str(out)], "run.log")
    assert proc.wait(timeout=75) == 0, proc.log_path.read_text()
    rows = read_trials(out)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"succeeded"}
    assert {r["epochs"] for r in rows} == {""}  # it reports nothing: no curve, no epochs
    with reading(out / "journal.db") as journal:
        assert journal.curves() == [] and journal.events("stop_decided") == []


@pytest.mark.timeout(90)
def test_a_worker_whose_master_does_not_answer_progress_lets_its_trials_go_on_at_once(tmp_path):
    """A master from before progress reports (simulated: a real in-process master whose Register
    leaves answers_progress unset and which drops progress messages, as an old master drops the
    unknown oneof) never answers a report; the worker must not make each one wait for an answer
    (DECISION_WAIT, 30 s): it answers "continue" itself and the trials finish at their pace."""
    import time

    from morphml.cli import build_search, load_experiment
    from morphml.distributed.coordinator import ExperimentCoordinator
    from morphml.distributed.journal import Journal
    from morphml.distributed.master import MasterServer
    from morphml.distributed.worker import WorkerConfig, WorkerNode
    from proc_helpers import TOKEN

    manifest = median_manifest(tmp_path / "m.yaml", "tests.report_evaluators:curve", max_trials=3)
    optimizer, settings = build_search(load_experiment(str(manifest)), heartbeat_interval=1.0)
    coordinator = ExperimentCoordinator(optimizer, settings, Journal(tmp_path / "journal.db"))
    server = MasterServer(coordinator, 0, "127.0.0.1", TOKEN)
    servicer = server.servicer  # changed before start(): the server binds its methods then
    register = servicer.Register

    async def old_register(request, context):
        reply = await register(request, context)
        reply.answers_progress = False
        return reply

    async def drop_progress(worker_id, batch, outbox):
        return None

    servicer.Register = old_register
    servicer._accept_progress = drop_progress
    server.start()
    node = WorkerNode(WorkerConfig(master=f"127.0.0.1:{server.port}", token=TOKEN, name="new-worker"))
    started = time.monotonic()
    node.start(block=False)
    try:
        assert coordinator.wait_done(60), coordinator.status()
        took = time.monotonic() - started
        st = coordinator.status()
        assert (st["succeeded"], st["stopped"]) == (3, 0)  # nothing reported, nothing judged
        assert coordinator.journal.curves() == []
        assert took < 25, took  # one unanswered report alone would have waited 30 s
    finally:
        if not node.wait(5):  # told "experiment over" by the master, it leaves by itself
            node.drain("test over")
            node.wait(30)
        server.stop()
        coordinator.journal.close()
