"""Process tests: model-based and multi-objective search through `morphml run` on digits.

A TPE run whose `morphml run` is SIGKILLed mid-run and rerun on the same output (the restarted
master rebuilds the Optuna study from the journal and finishes the budget, each trial once), an
NSGA-II run over val_accuracy and params that writes a Pareto front, a `maxParams` run whose
over-budget candidates are refused before any lease, and bad inputs refused in one line.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from morphml.graph import ArchitectureGraph
from morphml.pareto import dominates
from proc_helpers import REPO, assert_each_trial_once, journal_events, journal_rows, wait_for

pytestmark = pytest.mark.process

DIGITS = REPO / "examples" / "digits.yaml"
TWO = [{"metric": "val_accuracy", "goal": "maximize"}, {"metric": "params", "goal": "minimize"}]


def search_manifest(
    path: Path, algorithm: str, max_trials: int, population: int = 4, *, evaluator: str | None = None, **spec: object
) -> Path:
    """examples/digits.yaml's space and data, one epoch, the given optimizer and extra spec fields."""
    doc = yaml.safe_load(DIGITS.read_text())
    doc["metadata"]["name"] = f"search-{algorithm.lower()}"
    doc["spec"]["optimizer"] = {"algorithm": algorithm, "populationSize": population, "seed": 7}
    doc["spec"]["evaluation"] = {"dataset": {"name": "digits"}, "epochs": 1, "batchSize": 64, "timeoutSeconds": 120}
    if evaluator:
        doc["spec"]["evaluation"]["evaluator"] = evaluator
    doc["spec"]["budget"] = {"maxTrials": max_trials, "maxFailedTrials": 2}
    doc["spec"].update(spec)
    path.write_text(yaml.safe_dump(doc))
    return path


def run_cli(procs, manifest: Path, out: Path, log_name: str, env: dict | None = None, workers: int = 2):
    return procs.spawn(["run", str(manifest), "--workers", str(workers), "--output", str(out)], log_name, env)


def finished_count(journal: Path) -> int:
    if not journal.exists():
        return 0
    try:
        return journal_rows(journal, "SELECT COUNT(*) FROM tasks WHERE state IN ('succeeded', 'failed')")[0][0]
    except Exception:  # the master may not have created the table yet
        return 0


def final_state(journal: Path) -> dict:
    return json.loads(journal_rows(journal, "SELECT state_json FROM optimizer WHERE id = 1")[0][0])


def candidate_of_task(journal: Path) -> dict[str, str]:
    return {e["task_id"]: e["detail"]["candidate_id"] for e in journal_events(journal, "proposed")}


def read_csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.timeout(240)
def test_tpe_run_killed_mid_search_and_rerun_continues_the_same_study_each_trial_once(procs, tmp_path):
    budget = 12
    manifest = search_manifest(tmp_path / "tpe.yaml", "tpe", budget, population=4, evaluator="tests.evaluators:sleepy")
    out = tmp_path / "out"
    journal = out / "journal.db"
    env = {"MORPHML_TEST_SLEEP": "0.4"}
    first = run_cli(procs, manifest, out, "run1.log", env)
    wait_for(lambda: finished_count(journal) >= 5 or first.poll() is not None, 120, "5 finished trials")
    assert first.poll() is None, first.log_path.read_text()
    os.killpg(first.pid, signal.SIGKILL)  # the master dies with no chance to flush anything
    first.wait()
    done_before = {
        task_id for task_id, state in journal_rows(journal, "SELECT task_id, state FROM tasks") if state == "succeeded"
    }
    assert 5 <= len(done_before) < budget
    time.sleep(1.0)  # the orphaned workers notice their parent is gone and exit
    second = run_cli(procs, manifest, out, "run2.log", env)
    assert second.wait(timeout=180) == 0, second.log_path.read_text()
    assert "resuming:" in second.log_path.read_text()
    assert_each_trial_once(journal, budget)
    assert len(journal_events(journal, "master_started")) == 2
    # The restarted master's sampler holds every trial journaled before the kill, as COMPLETE with
    # its val_accuracy: the study was rebuilt from them (add_trial), then asked further.
    state = final_state(journal)
    assert state["algorithm"] == "tpe"
    records = {r["candidate"]: r for r in state["trials"] if r["candidate"] is not None}
    cids = candidate_of_task(journal)
    metrics = {
        t: json.loads(m) for t, m in journal_rows(journal, "SELECT task_id, metrics_json FROM tasks") if m is not None
    }
    for task_id in done_before:
        record = records[cids[task_id]]
        assert record["state"] == "COMPLETE"
        assert record["values"] == [metrics[task_id]["val_accuracy"]]
    assert len(records) == len(cids) and len(state["trials"]) >= budget
    # The restarted master replayed the journaled asks to the same architectures: its candidates
    # are exactly the journaled tasks' (a sampler that drew differently would differ here).
    hashes = {c["candidate"]["id"]: c["candidate"]["arch_hash"] for c in state["candidates"]}
    tasks = journal_rows(journal, "SELECT candidate_id, arch_hash FROM tasks")
    assert dict(tasks) == {cid: hashes[cid] for cid, _ in tasks}


@pytest.mark.timeout(300)
def test_nsga2_two_objective_run_writes_a_pareto_front_that_dominates_every_other_trial(procs, tmp_path):
    budget = 8
    manifest = search_manifest(tmp_path / "nsga2.yaml", "nsga2", budget, population=4, objectives=TWO)
    out = tmp_path / "out"
    proc = run_cli(procs, manifest, out, "run.log")
    assert proc.wait(timeout=280) == 0, proc.log_path.read_text()
    assert "| front " in proc.log_path.read_text()  # the progress line shows the front's size
    assert_each_trial_once(out / "journal.db", budget)
    trials = [t for t in read_csv(out / "trials.csv") if t["status"] == "succeeded"]
    assert len(trials) >= budget - 2
    assert all(float(t["latency_ms"]) > 0 for t in trials)  # measured by the worker after training
    front = read_csv(out / "pareto.csv")
    assert front and set(front[0]) >= {"trial_id", "val_accuracy", "params", "knee"}

    def point(row: dict) -> tuple[float, float]:
        return float(row["val_accuracy"]), -float(row["params"])

    for a in front:
        assert not any(dominates(point(b), point(a)) for b in front)  # mutually non-dominated
    for trial in trials:  # every finished trial is on the front or dominated by (or equal to) a front row
        assert any(point(r) == point(trial) or dominates(point(r), point(trial)) for r in front)
    assert {r["trial_id"] for r in front} <= {t["trial_id"] for t in trials}
    assert sum(r["knee"] == "True" for r in front) == 1
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = json.loads((out / "best.json").read_text())  # best/ is the best of the first objective
    assert best["metric"] == "val_accuracy" and best["value"] == max(float(t["val_accuracy"]) for t in trials)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("algorithm", ["random", "tpe"])
def test_max_params_candidates_are_refused_before_any_lease_and_no_trained_one_exceeds_it(procs, tmp_path, algorithm):
    budget, limit = 6, 20000
    manifest = search_manifest(tmp_path / "small.yaml", algorithm, budget, constraints={"maxParams": limit})
    out = tmp_path / "out"
    proc = run_cli(procs, manifest, out, "run.log")
    assert proc.wait(timeout=280) == 0, proc.log_path.read_text()
    journal = out / "journal.db"
    assert_each_trial_once(journal, budget)
    tasks = journal_rows(journal, "SELECT task_id, arch_hash, arch_json, metrics_json FROM tasks")
    for _, _, arch_json, metrics_json in tasks:
        assert ArchitectureGraph.from_json(json.loads(arch_json)).param_count() <= limit
        assert json.loads(metrics_json)["params"] <= limit  # as the worker's model counted them
    ops = journal_rows(journal, "SELECT seq, op, arg_json FROM optimizer_ops ORDER BY seq")
    refused = [(seq, c) for seq, op, arg in ops if op == "refuse" for c in json.loads(arg)["candidates"]]
    assert refused, "the digits space has candidates over 20000 parameters; none was refused"
    assert all(c["params"] > limit and f"maxParams {limit}" in c["reason"] for _, c in refused)
    # Refused candidates never became tasks: never leased, never trained.
    assert {c["arch_hash"] for _, c in refused}.isdisjoint({h for _, h, _, _ in tasks})
    leased_ids = {e["task_id"] for e in journal_events(journal, "leased")}
    assert leased_ids == {t for t, _, _, _ in tasks}
    # Each refusal is journaled in the same ask, before the ask op that hands out its survivors.
    asks = [seq for seq, op, _ in ops if op == "ask"]
    assert all(any(a == seq + 1 for a in asks) for seq, _ in refused)
    state = final_state(journal)
    assert [r["id"] for r in state["constraints"]["refused"]] == [c["id"] for _, c in refused]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("tpe-without-optuna", "spec.optimizer.algorithm"),
        ("duplicate-metric", "spec.objectives"),
        ("unknown-algorithm", "spec.optimizer.algorithm"),
        ("unmeasured-objective", "spec.objectives"),
    ],
)
def test_bad_search_input_exits_2_naming_the_field(procs, tmp_path, case, field):
    env = None
    if case == "tpe-without-optuna":
        manifest = search_manifest(tmp_path / "m.yaml", "tpe", 4)
        hidden = tmp_path / "hide" / "optuna"
        hidden.mkdir(parents=True)
        (hidden / "__init__.py").write_text("raise ImportError('optuna is not installed on this master')\n")
        env = {"PYTHONPATH": f"{hidden.parent}{os.pathsep}{REPO}"}
    elif case == "duplicate-metric":
        manifest = search_manifest(tmp_path / "m.yaml", "nsga2", 4, objectives=[TWO[0], TWO[0]])
    elif case == "unknown-algorithm":
        manifest = search_manifest(tmp_path / "m.yaml", "bayesian", 4)
    else:
        energy = {"metric": "energy_mj", "goal": "minimize"}  # the built-in trainer does not measure it
        manifest = search_manifest(tmp_path / "m.yaml", "nsga2", 4, objectives=[TWO[0], energy])
    proc = run_cli(procs, manifest, tmp_path / "out", "run.log", env)
    assert proc.wait(timeout=60) == 2
    text = proc.log_path.read_text()
    assert field in text and "Traceback" not in text, text
    if case == "tpe-without-optuna":
        assert "needs Optuna on the master" in text and "morphml[search]" in text
