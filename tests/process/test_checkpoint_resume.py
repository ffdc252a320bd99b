"""Process test of issue 12's checkpoints with real `morphml master` / `morphml worker` processes
and the built-in trainer on digits:

- acceptance 2: a worker SIGKILLed while its trial is past its first checkpoint; the trial is
  re-leased to another worker, which resumes at the journaled checkpoint's epoch (event `resumed`
  at that epoch, not 0), the learning curve is one continuous run 1..epochs, the result says it
  resumed, and the trial is counted once;
- acceptance 5: the same, with the stored checkpoint corrupted on the master's disk before the
  second worker starts: a fresh start (the result's checkpoint_fallback and the journal's
  `checkpoint_fallback` event name the file and the sha256 mismatch), all epochs trained, counted
  once;
- acceptance 6 (local): `morphml run` leaves runs/<name>/best/, and `load_model` of it scores the
  recorded val_accuracy on the validation split.

Both masters write best/ and trials.csv beside their journal when the experiment ends.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proc_helpers import REPO, assert_each_trial_once, finished, free_port, journal_events, reading, status, wait_for
from tests.architectures import FIXED_CNN

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.process
EPOCHS = 6



def manifest(path: Path, name: str, max_trials: int = 1, epochs: int = EPOCHS) -> Path:
    spec = {
        "searchSpace": {"layers": FIXED_CNN},
        "optimizer": {"algorithm": "random", "seed": 5},
        "evaluation": {"dataset": {"name": "digits"}, "epochs": epochs, "batchSize": 32, "learningRate": 0.003,
                       "optimizer": "adam", "timeoutSeconds": 600},
        "budget": {"maxTrials": max_trials, "maxFailedTrials": 1},
        "artifacts": {"checkpointIntervalEpochs": 1},
    }
    doc = {"apiVersion": "morphml.io/v1alpha1", "kind": "NASExperiment", "metadata": {"name": name}, "spec": spec}
    path.write_text(yaml.safe_dump(doc))
    return path


def checkpoints_of(journal: Path, task_id: str | None = None) -> list[dict]:
    return [e for e in journal_events(journal, "checkpoint_saved") if task_id in (None, e["task_id"])]


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def first_worker_killed_past_a_checkpoint(procs, tmp_path: Path, name: str) -> tuple[int, Path, str, int]:
    """Master + worker A; SIGKILL A (and its trial runner) once the trial has a checkpoint at
    epoch >= 2 journaled. Returns (port, journal, task id, epoch of the latest checkpoint)."""
    port, journal = free_port(), tmp_path / "journal.db"
    procs.master(manifest(tmp_path / "m.yaml", name), port, journal, ["--heartbeat-interval", "1"])
    worker_a = procs.worker(port, "a")
    saved = wait_for(lambda: [e for e in checkpoints_of(journal) if e["detail"]["epoch"] >= 2], 240,
                     "a checkpoint at epoch >= 2")
    kill_group(worker_a)
    wait_for(lambda: (st := status(port)) and not any(w.running for w in st.workers if w.state != "dead"), 30,
             "the master to see worker a gone")
    task_id = saved[0]["task_id"]
    latest = max(e["detail"]["epoch"] for e in checkpoints_of(journal, task_id))
    assert latest < EPOCHS, "the trial finished before it could be killed: make it slower"
    return port, journal, task_id, latest


def curve_steps(journal: Path, task_id: str) -> dict[int, list[int]]:
    with reading(journal) as reader:
        points = reader.curves(task_id)
    by_attempt: dict[int, list[int]] = {}
    for p in points:
        by_attempt.setdefault(p["attempt"], []).append(p["step"])
    return by_attempt


def result_metrics(journal: Path, task_id: str) -> dict:
    with reading(journal) as reader:
        (task,) = [t for t in reader.load_tasks() if t.task_id == task_id]
    assert task.state.value == "succeeded", task
    return task.metrics


@pytest.mark.timeout(420)
def test_a_trial_resumes_from_its_checkpoint_on_another_worker_after_sigkill(procs, tmp_path):
    port, journal, task_id, epoch = first_worker_killed_past_a_checkpoint(procs, tmp_path, "resume")
    procs.worker(port, "b")
    wait_for(lambda: finished(status(port)), 300, "the experiment to finish")
    assert status(port).phase == "Succeeded"

    resumed = [e for e in journal_events(journal, "resumed") if e["task_id"] == task_id]
    assert [(e["attempt"], e["detail"]["epoch"]) for e in resumed] == [(2, epoch)], resumed
    assert journal_events(journal, "checkpoint_fallback") == []
    metrics = result_metrics(journal, task_id)
    assert metrics["epochs"] == EPOCHS and metrics["resumed_from_epoch"] == epoch
    # One continuous run: the first attempt reported 1..epoch (a journaled checkpoint implies its
    # epoch's report is journaled), the second epoch+1..EPOCHS.
    steps = curve_steps(journal, task_id)
    assert steps[2] == list(range(epoch + 1, EPOCHS + 1)), steps
    assert steps[1][:epoch] == list(range(1, epoch + 1)), steps
    assert sorted(set(steps[1]) | set(steps[2])) == list(range(1, EPOCHS + 1))
    assert_each_trial_once(journal, 1)
    # The second attempt's checkpoints continue from the resumed epoch, and the best's final one is kept.
    assert {e["detail"]["epoch"] for e in checkpoints_of(journal, task_id) if e["attempt"] == 2} == \
        set(range(epoch + 1, EPOCHS + 1))
    best = wait_for(lambda: (tmp_path / "best" / "metrics.json").exists() and (tmp_path / "trials.csv").exists(),
                    30, "the master to write best/ and trials.csv")
    assert best
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert [(r["trial_id"], r["status"], r["epochs"]) for r in rows] == [(task_id, "succeeded", str(EPOCHS))]
    doc = json.loads((tmp_path / "best" / "metrics.json").read_text())
    assert doc["trial_id"] == task_id and doc["checkpoint"].startswith(f"checkpoints/{task_id}/epoch-{EPOCHS:04d}")
    assert (tmp_path / doc["checkpoint"]).read_bytes() == (tmp_path / "best" / "model.pt").read_bytes()


@pytest.mark.timeout(420)
def test_a_corrupt_checkpoint_means_a_fresh_start_with_the_reason_and_nothing_counted_twice(procs, tmp_path):
    port, journal, task_id, epoch = first_worker_killed_past_a_checkpoint(procs, tmp_path, "corrupt")
    (latest,) = [e for e in checkpoints_of(journal, task_id) if e["detail"]["epoch"] == epoch]
    key = latest["detail"]["key"]
    stored = tmp_path / key
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte on the master's disk
    stored.write_bytes(bytes(data))
    procs.worker(port, "b")
    wait_for(lambda: finished(status(port)), 300, "the experiment to finish")
    assert status(port).phase == "Succeeded"

    metrics = result_metrics(journal, task_id)
    assert metrics["checkpoint_fallback"].startswith(f"checkpoint {key}: sha256"), metrics
    assert "(corrupt)" in metrics["checkpoint_fallback"]
    assert metrics["epochs"] == EPOCHS and "resumed_from_epoch" not in metrics
    events = [e for e in journal_events(journal, "checkpoint_fallback") if e["task_id"] == task_id]
    assert len(events) == 1 and events[0]["attempt"] == 2 and key in json.dumps(events[0]["detail"]), events
    assert curve_steps(journal, task_id)[2] == list(range(1, EPOCHS + 1))  # trained from 0
    assert_each_trial_once(journal, 1)


@pytest.mark.timeout(420)
def test_load_model_of_a_local_runs_best_scores_its_recorded_val_accuracy(tmp_path):
    from morphml.evaluation import load_model, validation_metrics

    path = manifest(tmp_path / "digits-best.yaml", "digits-best", max_trials=1, epochs=3)
    out = tmp_path / "runs" / "digits-best"
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run([sys.executable, "-m", "morphml.cli", "run", str(path), "--workers", "2", "--output",
                           str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    best = out / "best"
    doc = json.loads((best / "metrics.json").read_text())
    rows = {r["trial_id"]: r for r in csv.DictReader((out / "trials.csv").open())}
    assert float(rows[doc["trial_id"]]["val_accuracy"]) == pytest.approx(doc["metrics"]["val_accuracy"], abs=1e-12)
    model = load_model(best)
    assert not model.training
    evaluation = yaml.safe_load(path.read_text())["spec"]["evaluation"]
    assert validation_metrics(model, evaluation)["val_accuracy"] == doc["metrics"]["val_accuracy"]
    assert json.loads((best / "architecture.json").read_text()) == json.loads(
        (out / "best.json").read_text())["architecture"]


@pytest.mark.timeout(300)
def test_a_worker_of_a_master_without_the_checkpoint_rpcs_trains_on_without_checkpoints(tmp_path):
    """A master from before checkpoints (simulated: a real in-process master whose UploadCheckpoint
    answers UNIMPLEMENTED, as the generated base servicer of an older proto does) gets no uploads
    after the first refusal; the trials train their epochs and succeed, none fails over it."""
    import grpc

    from morphml.cli import build_search, load_experiment
    from morphml.distributed.checkpoints import LocalStore
    from morphml.distributed.coordinator import ExperimentCoordinator
    from morphml.distributed.journal import Journal
    from morphml.distributed.master import MasterServer
    from morphml.distributed.worker import WorkerConfig, WorkerNode
    from proc_helpers import TOKEN

    path = manifest(tmp_path / "m.yaml", "old-master", max_trials=1, epochs=3)
    optimizer, settings = build_search(load_experiment(str(path)), heartbeat_interval=1.0)
    coordinator = ExperimentCoordinator(optimizer, settings, Journal(tmp_path / "journal.db"))
    coordinator.artifact_store = LocalStore(tmp_path)  # its leases still ask for checkpoints
    server = MasterServer(coordinator, 0, "127.0.0.1", TOKEN)
    calls = []

    async def unimplemented(request_iterator, context):
        calls.append(1)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")

    server.servicer.UploadCheckpoint = unimplemented  # before start(): the server binds its methods then
    server.start()
    node = WorkerNode(WorkerConfig(master=f"127.0.0.1:{server.port}", token=TOKEN, name="new-worker"))
    node.start(block=False)
    try:
        assert coordinator.wait_done(240), coordinator.status()
        st = coordinator.status()
        assert (st["succeeded"], st["failed"]) == (1, 0), st
        assert coordinator.journal.events("checkpoint_saved") == []
        assert len(calls) == 1  # refused once, then the worker stopped uploading
        with reading(tmp_path / "journal.db") as reader:
            assert [t.metrics["epochs"] for t in reader.load_tasks()] == [3]
    finally:
        if not node.wait(5):
            node.drain("test over")
            node.wait(30)
        server.stop()
        coordinator.journal.close()
