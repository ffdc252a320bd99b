"""Process tests: `morphml run` end to end, Ctrl-C and resume, the seed Python API, health
probes, and torch-free workers."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from morphml.distributed.journal import JournalError
from proc_helpers import (
    REPO,
    finished,
    free_port,
    health_ok,
    journal_tasks,
    pids_with_torch,
    status,
    wait_for,
    write_manifest,
)

pytestmark = pytest.mark.process


def run_cli(procs, args, log_name, env=None):
    return procs.spawn(["run", *args], log_name, env)


def read_trials(out):
    with open(out / "trials.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.timeout(120)
def test_run_writes_trials_best_and_plot_with_every_trial_once_and_rerun_resumes(procs, tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", max_trials=10, algorithm="genetic", population=4, generations=6)
    out = tmp_path / "out"
    proc = run_cli(procs, [str(manifest), "--workers", "3", "--output", str(out)], "run.log")
    assert proc.wait(timeout=90) == 0, proc.log_path.read_text()
    log = proc.log_path.read_text()
    assert "/10 done | running" in log and "workers" in log and "ETA" in log
    assert "Succeeded: 10 trials finished" in log
    rows = read_trials(out)
    assert len(rows) == 10 and len({r["trial_id"] for r in rows}) == 10 and len({r["arch_hash"] for r in rows}) == 10
    assert {r["status"] for r in rows} == {"succeeded"}
    assert set(rows[0]) >= {"trial_id", "attempt", "worker", "status", "val_accuracy", "arch_hash"}
    best = json.loads((out / "best.json").read_text())
    assert best["value"] == max(float(r["val_accuracy"]) for r in rows)
    assert best["architecture"]["nodes"][0]["op"] == "input" and best["metrics"]["val_accuracy"] == best["value"]
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "journal.db").exists()
    again = run_cli(procs, [str(manifest), "--workers", "3", "--output", str(out)], "run2.log")
    assert again.wait(timeout=60) == 0
    assert "resuming: 10 trials already finished" in again.log_path.read_text()
    assert len(read_trials(out)) == 10


@pytest.mark.timeout(150)
def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(procs, tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:sleepy", max_trials=12)
    out = tmp_path / "out"
    env = {"MORPHML_TEST_SLEEP": "0.5"}
    proc = run_cli(procs, [str(manifest), "--workers", "2", "--output", str(out)], "run.log", env)
    journal = out / "journal.db"
    def succeeded():
        try:
            return len(journal_tasks(journal, ("succeeded",)))
        except JournalError:  # not created yet
            return 0

    wait_for(lambda: succeeded() >= 3, 60, "3 finished trials")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert "rerun the same command to resume" in proc.log_path.read_text()
    first = {r["trial_id"]: r for r in read_trials(out)}
    assert 3 <= len(first) < 12
    again = run_cli(procs, [str(manifest), "--workers", "2", "--output", str(out)], "run2.log", env)
    assert again.wait(timeout=90) == 0, again.log_path.read_text()
    rows = read_trials(out)
    assert len(rows) == 12 and len({r["trial_id"] for r in rows}) == 12
    for row in rows:  # trials finished before Ctrl-C kept their result, none re-ran
        if row["trial_id"] in first:
            assert row == first[row["trial_id"]]


@pytest.mark.timeout(60)
def test_workers_running_user_evaluators_never_load_torch_and_serve_health(procs, tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:sleepy", max_trials=2)
    port, health_port = free_port(), free_port()
    master = procs.master(manifest, port)
    worker = procs.worker(port, "wa", extra=["--health-port", str(health_port)], env={"MORPHML_TEST_SLEEP": "2"})
    wait_for(lambda: (s := status(port)) and s.running == 1, 30, "a running trial")
    time.sleep(0.3)
    assert health_ok(f"127.0.0.1:{health_port}")
    assert pids_with_torch(worker.pid) == []
    assert pids_with_torch(master.pid) == []
    wait_for(lambda: finished(status(port)), 30, "the experiment to finish")


@pytest.mark.timeout(90)
def test_seed_python_api_master_node_and_worker_node(procs, tmp_path):
    port = free_port()
    master_script = tmp_path / "seed_master.py"
    master_script.write_text(textwrap.dedent(f"""
        import json
        from morphml.space import SearchSpace, Layer
        from morphml.optimizers import GeneticAlgorithm
        from morphml.distributed import MasterNode

        space = SearchSpace("seed", input_shape=[1, 8, 8], num_classes=10)
        space.add_layer(Layer.conv2d(filters=[8, 16, 32], kernel_size=[3, 5]))
        space.add_layer(Layer.maxpool(pool_size=2))
        space.add_layer(Layer.flatten())
        space.add_layer(Layer.dense(units=[16, 32, 64, 128]))
        optimizer = GeneticAlgorithm(space, population_size=4, seed=3)
        master = MasterNode(optimizer, {{'port': {port}, 'num_workers': 2,
                                        'evaluation': {{'evaluator': 'tests.evaluators:instant'}}}})
        master.start()
        best = master.run_experiment(num_generations=2, timeout=60)
        candidate, metrics = best
        print("BEST", json.dumps({{"id": candidate.id, "metrics": metrics}}))
        print("STATUS", json.dumps({{k: master.status()[k] for k in ("phase", "succeeded", "budget")}}))
        master.stop()
    """))
    worker_script = tmp_path / "seed_worker.py"
    worker_script.write_text(textwrap.dedent(f"""
        import sys
        from morphml.distributed import WorkerNode
        sys.exit(WorkerNode({{'master_host': 'localhost', 'master_port': {port}, 'port': {free_port()},
                             'num_gpus': 0}}).start())
    """))
    env = {k: v for k, v in procs.env.items() if k != "MORPHML_TOKEN"}
    m = subprocess.Popen([sys.executable, str(master_script)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    procs.started.append(m)
    workers = []
    for i in range(2):
        log = open(tmp_path / f"seed-worker-{i}.log", "wb")
        w = subprocess.Popen([sys.executable, str(worker_script)], cwd=REPO, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        procs.started.append(w)
        workers.append(w)
    output, _ = m.communicate(timeout=75)
    assert m.returncode == 0, output
    best = json.loads(output.split("BEST ", 1)[1].splitlines()[0])
    st = json.loads(output.split("STATUS ", 1)[1].splitlines()[0])
    # population x generations bounds the budget; elites are carried over, not re-evaluated
    assert st["phase"] == "Succeeded" and st["budget"] == 8 and 4 < st["succeeded"] <= 8
    assert 0.5 <= best["metrics"]["val_accuracy"] <= 1.0
    # A worker that got the shutdown exits 0 (one that never reached the master before it stopped
    # keeps retrying until give_up_after_seconds; the fixture kills it).
    wait_for(lambda: any(w.poll() == 0 for w in workers), 20, "a worker to exit after the shutdown")
