"""Process tier, issue 12: ASHA on digits with the built-in trainer, real master and worker
processes on loopback, checkpoints in the master's store beside the journal.

- acceptance 1: `morphml run` with spec.earlyStopping asha stops most trials at the first rung,
  promotes the top 1/reductionFactor (each promotion checked against the rung results journaled
  before it), finishes within spec.budget.maxEpochs, and every trial is once in trials.csv with
  its epochs and status; promoted trials resumed from their rung's checkpoint (the curve is one
  continuous run, no epoch trained twice).
- acceptance 3: the master SIGKILLed mid-ASHA (promotions made, trials paused, a segment out) and
  restarted on the same journal: rungs, promotions, paused trials and checkpoints are known again;
  no trial is promoted twice, counted twice at a rung, or lost.
"""

from __future__ import annotations

import collections
import csv
import os
import signal

import pytest
import yaml

from proc_helpers import finished, free_port, reading, status, wait_for

pytestmark = pytest.mark.process

EPOCHS, MIN_RESOURCE, ETA = 9, 1, 3  # rungs at 1, 3 and 9 epochs
RUNGS = [1, 3, 9]
MAX_TRIALS, MAX_EPOCHS = 9, 30
LAYERS = [  # small networks (a digits epoch in well under a second), 72 of them: more than the trials
    {"type": "conv2d", "filters": [8, 16, 24], "kernelSize": [3, 5], "activation": ["relu", "gelu"]},
    {"type": "maxpool", "poolSize": [2]},
    {"type": "flatten"},
    {"type": "dense", "units": [16, 32, 64], "activation": ["relu"]},
    {"type": "dropout", "rate": [0.0, 0.2]},
]


def asha_manifest(path, name="digits-asha", max_trials=MAX_TRIALS, max_epochs=MAX_EPOCHS):
    doc = {"apiVersion": "morphml.io/v1alpha1", "kind": "NASExperiment", "metadata": {"name": name}, "spec": {
        "searchSpace": {"layers": LAYERS},
        "optimizer": {"algorithm": "random", "seed": 5},
        "evaluation": {"dataset": {"name": "digits"}, "epochs": EPOCHS, "batchSize": 64, "learningRate": 0.003,
                       "timeoutSeconds": 120},
        "objective": {"metric": "val_accuracy", "goal": "maximize"},
        "budget": {"maxTrials": max_trials, "maxFailedTrials": 0, "maxEpochs": max_epochs},
        "earlyStopping": {"type": "asha", "minResource": MIN_RESOURCE, "reductionFactor": ETA},
    }}
    path.write_text(yaml.safe_dump(doc))
    return path


def read_trials(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def check_promotions_follow_asha(journal):
    """Every promotion was of a trial in the top floor(n_k / eta) of its rung by the rung results
    journaled before it (or, in the epoch budget's end game, when fewer epochs than a full trial's
    were left, one that fitted them), and no trial was promoted twice from a rung or counted twice
    at one."""
    results: dict[int, dict[str, float]] = collections.defaultdict(dict)
    promoted = collections.Counter()
    for event in journal.events(("rung_result", "promoted")):
        d = event["detail"]
        if event["kind"] == "rung_result":
            assert event["task_id"] not in results[d["epoch"]], f"{event['task_id']} counted twice at {d['epoch']}"
            results[d["epoch"]][event["task_id"]] = d["value"]
        else:
            rung = results[d["from_epoch"]]
            ranked = sorted(rung, key=lambda t: (-rung[t], t))
            top = ranked[: len(rung) // ETA]
            if d.get("closing"):
                assert d["to_epoch"] - d["from_epoch"] <= d["epochs_left"] < EPOCHS, event
            else:
                assert event["task_id"] in top, (event, rung)
            assert d["to_epoch"] == RUNGS[RUNGS.index(d["from_epoch"]) + 1]
            promoted[(event["task_id"], d["from_epoch"])] += 1
    assert promoted and max(promoted.values()) == 1, promoted
    return results, promoted


def check_curves_are_continuous(journal, rows):
    """A promoted trial resumed from its rung's checkpoint: its curve is steps 1..epochs, each once,
    and each later attempt starts right after the rung the previous one ended at."""
    curves = collections.defaultdict(list)
    for point in journal.curves():
        curves[point["task_id"]].append((point["attempt"], point["step"]))
    resumed = {(e["task_id"], e["attempt"]): e["detail"]["epoch"] for e in journal.events("resumed")}
    for row in rows:
        points = curves[row["trial_id"]]
        assert [s for _, s in points] == list(range(1, int(row["epochs"]) + 1)), (row["trial_id"], points)
        for attempt in sorted({a for a, _ in points})[1:]:
            first = min(s for a, s in points if a == attempt)
            assert resumed.get((row["trial_id"], attempt)) == first - 1 and first - 1 in RUNGS, (row, points)


@pytest.mark.timeout(420)
def test_asha_run_on_digits_stops_most_at_the_first_rung_promotes_the_top_third_within_max_epochs(procs, tmp_path):
    manifest = asha_manifest(tmp_path / "asha.yaml")
    out = tmp_path / "out"
    proc = procs.spawn(["run", str(manifest), "--workers", "2", "--output", str(out)], "run.log")
    assert proc.wait(timeout=400) == 0, proc.log_path.read_text()[-3000:]
    rows = read_trials(out / "trials.csv")
    assert len(rows) == MAX_TRIALS and len({r["trial_id"] for r in rows}) == MAX_TRIALS, rows
    assert {r["status"] for r in rows} <= {"succeeded", "stopped"}  # maxFailedTrials 0 never touched
    epochs = collections.Counter(int(r["epochs"]) for r in rows)
    assert set(epochs) <= set(RUNGS)
    assert epochs[RUNGS[0]] >= MAX_TRIALS - MAX_TRIALS // ETA, epochs  # most stopped at the first rung
    assert epochs[RUNGS[1]] + epochs[RUNGS[2]] >= 1
    for r in rows:  # a trial trained to the full budget succeeded, one paused below it was stopped
        assert (r["status"] == "succeeded") == (int(r["epochs"]) == EPOCHS), r
    with reading(out / "journal.db") as journal:
        results, promoted = check_promotions_follow_asha(journal)
        check_curves_are_continuous(journal, rows)
        leased = journal.get_meta("epochs_leased")
        trained = len(journal.curves())
        saved = {e["detail"]["key"] for e in journal.events("checkpoint_saved")}
        deleted = {e["detail"]["key"] for e in journal.events("checkpoint_deleted")}
        assert journal.events("checkpoint_fallback") == []
        best = journal.get_meta("best")
    assert len(results[RUNGS[0]]) == MAX_TRIALS
    assert trained == sum(int(r["epochs"]) for r in rows) <= leased <= MAX_EPOCHS  # no epoch trained twice
    # retention: what is left is the best trial's final checkpoint, in the store beside the journal
    kept = saved - deleted
    assert len(kept) == 1 and kept.pop().startswith(f"checkpoints/{best['trial_id']}/")
    assert (out / "best" / "model.pt").exists()
    print(f"\nASHA on digits: {MAX_TRIALS} trials, epochs by trial {dict(sorted(epochs.items()))}, "
          f"{trained} epochs trained ({leased} leased, maxEpochs {MAX_EPOCHS}; full fidelity would train "
          f"{MAX_TRIALS * EPOCHS}), promotions {len(promoted)}, best {best['metric']:.4f}")


@pytest.mark.timeout(420)
def test_master_sigkilled_mid_asha_restarts_with_rungs_promotions_and_checkpoints_nothing_promoted_twice(
        procs, tmp_path):
    manifest = asha_manifest(tmp_path / "asha.yaml", max_trials=12, max_epochs=60)
    port = free_port()
    journal_path = tmp_path / "journal.db"
    hb = ["--heartbeat-interval", "0.5", "--missed-heartbeats", "6"]
    master = procs.master(manifest, port, journal_path, extra=hb)
    for name in ("wa", "wb"):
        procs.worker(port, name)

    def mid_asha():
        with reading(journal_path) as journal:
            tasks = journal.load_tasks()
            return (journal.count_events("promoted") >= 1 and any(t.state.value == "paused" for t in tasks)
                    and any(t.state.value == "leased" for t in tasks))

    wait_for(mid_asha, 300, "a promotion, a paused trial and a segment out", interval=0.2)
    os.killpg(master.pid, signal.SIGKILL)
    master.wait()
    with reading(journal_path) as journal:
        before_rungs = {(e["task_id"], e["detail"]["epoch"]) for e in journal.events("rung_result")}
        before_promoted = {(e["task_id"], e["detail"]["from_epoch"]) for e in journal.events("promoted")}
        paused_before = {t.task_id for t in journal.load_tasks() if t.state.value == "paused"}
        saved_before = {e["detail"]["key"] for e in journal.events("checkpoint_saved")}
        deleted_before = {e["detail"]["key"] for e in journal.events("checkpoint_deleted")}
    assert before_promoted and paused_before
    for key in saved_before - deleted_before:  # every checkpoint the journal names is in the store
        assert (tmp_path / key).exists(), key

    procs.master(manifest, port, journal_path, extra=hb, log_name="master2.log")
    st = wait_for(lambda: finished(s := status(port)) and s, 360, "the restarted master to finish", interval=0.2)
    assert st.phase == "Succeeded", st.message
    with reading(journal_path) as journal:
        tasks = journal.load_tasks()
        _, promoted = check_promotions_follow_asha(journal)  # nothing promoted twice, across the restart
        after_rungs = {(e["task_id"], e["detail"]["epoch"]) for e in journal.events("rung_result")}
        resumed_after_restart = [e for e in journal.events("resumed")
                                 if e["seq"] > journal.events("master_started")[1]["seq"]]
        saved = {e["detail"]["key"] for e in journal.events("checkpoint_saved")}
        assert len(journal.events("master_started")) == 2
    assert set(promoted) >= before_promoted and after_rungs >= before_rungs
    assert len(tasks) == 12 and all(t.state.value in ("succeeded", "stopped") for t in tasks)  # none lost
    # a trial paused before the kill was promoted afterwards or stopped at the end: not forgotten
    for task in tasks:
        if task.task_id in paused_before:
            assert task.state.value == "stopped" or any(t == task.task_id for t, _ in promoted)
    # the restarted master resumed promotions from checkpoints it knew from the journal
    for event in resumed_after_restart:
        assert event["detail"]["key"] in saved
    wait_for((tmp_path / "trials.csv").exists, 30, "trials.csv beside the journal")
    rows = read_trials(tmp_path / "trials.csv")
    assert sorted(r["trial_id"] for r in rows) == sorted(t.task_id for t in tasks)
    print(f"\nkilled with {len(before_promoted)} promotions and {len(paused_before)} paused trials; "
          f"finished with {len(promoted)} promotions, {len(resumed_after_restart)} resumes after the restart")


@pytest.mark.timeout(420)
def test_hyperband_run_deals_trials_to_brackets_in_turn_within_max_epochs(procs, tmp_path):
    manifest = asha_manifest(tmp_path / "hb.yaml", name="digits-hb", max_trials=9, max_epochs=40)
    doc = yaml.safe_load(manifest.read_text())
    doc["spec"]["earlyStopping"]["type"] = "hyperband"
    manifest.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    proc = procs.spawn(["run", str(manifest), "--workers", "2", "--output", str(out)], "run.log")
    assert proc.wait(timeout=400) == 0, proc.log_path.read_text()[-3000:]
    rows = read_trials(out / "trials.csv")
    with reading(out / "journal.db") as journal:
        first = {}
        for event in journal.events("leased"):
            first.setdefault(event["task_id"], event["detail"]["stop_epoch"])
        promotions = [e["detail"] for e in journal.events("promoted")]
        leased = journal.get_meta("epochs_leased")
        trained = len(journal.curves())
        tasks = journal.load_tasks()
        check_curves_are_continuous(journal, rows)
    # trial i starts at bracket i mod 3's first rung: 1, 3, 9, 1, 3, 9, ...
    assert [first[t.task_id] for t in tasks] == [RUNGS[i % 3] for i in range(len(tasks))]
    assert all(p["from_epoch"] >= RUNGS[p["bracket"]] for p in promotions)
    assert sorted(r["trial_id"] for r in rows) == sorted(t.task_id for t in tasks)
    assert trained == sum(int(r["epochs"]) for r in rows) <= leased <= 40
    assert {r["status"] for r in rows} <= {"succeeded", "stopped"}
    print(f"\nHyperband on digits: {len(rows)} trials, {trained} epochs trained ({leased} leased, maxEpochs 40), "
          f"{len(promotions)} promotions")
