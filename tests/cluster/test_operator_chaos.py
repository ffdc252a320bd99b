"""Chaos on the cluster (issue 6, acceptance 3): a seeded script deletes a random worker pod every
few seconds for a whole small experiment; every trial still finishes exactly once.

The same experiment runs first undisturbed (the baseline wall time), then under chaos. Figures
(deletions, re-leases by detection path, median detection and re-lease latency, wall times) are
measured from the master's journal and printed; docs/reliability.md quotes them. Run it with

    python3 -m pytest -q -s tests/cluster/test_operator_chaos.py

(`MORPHML_CHAOS_SEED` picks another seed). Imports: pytest, the standard library, the e2e module's
operator fixture and helpers, tests.cluster.operator_trials.
"""

from __future__ import annotations

import os
import random
import statistics
import time

import pytest

from .operator_trials import finished_once, journal_file, next_lease, read_journal
from .test_operator_e2e import quick_trials, wait_status

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SEED = int(os.environ.get("MORPHML_CHAOS_SEED", "6"))
TRIAL_SECONDS = 4
BUDGET = 36
WORKERS = 3
MIN_DELETIONS = 10


def search(name: str) -> dict:
    return quick_trials(name, TRIAL_SECONDS, workers={"replicas": WORKERS},
                        optimizer={"algorithm": "random", "seed": 7},
                        budget={"maxTrials": BUDGET, "maxFailedTrials": 2})


def run_wall_seconds(journal: dict) -> float:
    """First lease to last accepted result, on the master's clock."""
    start = min(a["leased_at"] for a in journal["attempts"])
    end = max(r["received_at"] for r in journal["results"] if r["disposition"] == "accepted")
    return end - start


def check_every_trial_finished_once(journal: dict) -> None:
    finished, twice = finished_once(journal)
    assert twice == [], f"trials finished more than once: {twice}"
    assert len(finished) == BUDGET, (len(finished), journal["tasks"])
    assert len(journal["tasks"]) == BUDGET and {t["state"] for t in journal["tasks"]} == {"succeeded"}
    assert journal["phase"] == "Succeeded", journal["phase"]
    # The evaluator never fails: a failed attempt would be a pod loss miscounted as a trial failure
    # (a retry used up by infrastructure).
    assert [r for r in journal["results"] if not r["ok"]] == []


def finish(kube, running_operator, ns: str, name: str) -> dict:
    status = wait_status(kube, running_operator, ns, name,
                         lambda s: s if s.get("phase") in ("Succeeded", "Failed") else None, 400, f"{name} to end")
    assert status["phase"] == "Succeeded", status
    assert status["trials"]["done"] == BUDGET, status["trials"]
    return read_journal(journal_file(kube, ns, name))


@pytest.mark.timeout(1000)
def test_deleting_random_worker_pods_every_few_seconds_loses_and_repeats_no_trial(kube, operator, kube_namespace):
    ns = kube_namespace
    rng = random.Random(SEED)

    # Baseline: the same search, nobody deleting anything.
    kube.apply(search("calm"), ns)
    calm = finish(kube, operator, ns, "calm")
    check_every_trial_finished_once(calm)
    calm_wall = run_wall_seconds(calm)
    kube.kubectl("delete", "nasexperiment", "calm", "-n", ns, "--wait=true", timeout=120)

    kube.apply(search("chaos"), ns)
    wait_status(kube, operator, ns, "chaos", lambda s: (s.get("trials") or {}).get("running", 0) >= 1, 180,
                "a first trial running")
    selector = "morphml.io/experiment=chaos,app.kubernetes.io/component=worker"
    deletions: list[tuple[str, float]] = []
    while experiment_phase(kube, ns, "chaos") not in ("Succeeded", "Failed"):
        time.sleep(rng.uniform(2.0, 4.0))
        ready = sorted(p["metadata"]["name"] for p in kube.pods(ns, selector)
                       if not p["metadata"].get("deletionTimestamp") and kube.pod_ready(p))
        if not ready or experiment_phase(kube, ns, "chaos") in ("Succeeded", "Failed"):
            continue
        victim = rng.choice(ready)
        deletions.append((victim, time.time()))
        kube.kubectl("delete", "pod", victim, "-n", ns, "--wait=false", check=False)
    chaos = finish(kube, operator, ns, "chaos")
    check_every_trial_finished_once(chaos)
    chaos_wall = run_wall_seconds(chaos)

    # Per lease a pod held when it was deleted: how its loss was detected, when, and when the trial
    # was leased again (to another worker).
    by_path: dict[str, int] = {}
    for requeue in chaos["requeues"]:
        by_path[requeue["detected_by"]] = by_path.get(requeue["detected_by"], 0) + 1
    requeue_of = {(r["task_id"], r["attempt"]): r for r in chaos["requeues"]}
    held_paths: list[str] = []
    detection, relet = [], []
    leased_after_deletion = 0
    for victim, t0 in deletions:
        for attempt in (a for a in chaos["attempts"] if a["worker_name"] == victim):
            if attempt["leased_at"] > t0:
                leased_after_deletion += 1  # a terminating worker that registered again (see docs)
                continue
            if attempt["ended_at"] is not None and attempt["ended_at"] < t0:
                continue  # finished before the deletion
            requeue = requeue_of.get((attempt["task_id"], attempt["attempt"]))
            if requeue is None:
                continue  # its result arrived first: the trial finished on the dying pod
            held_paths.append(requeue["detected_by"])
            detection.append(requeue["detected_at"] - t0)
            following = next_lease(chaos, attempt["task_id"], attempt["attempt"])
            if following is not None:
                relet.append(following["leased_at"] - t0)
    stale = sum(1 for r in chaos["results"] if r["disposition"] == "stale")
    print(f"\nchaos (seed {SEED}, {WORKERS} workers, {BUDGET} trials of {TRIAL_SECONDS} s):"
          f"\n  worker pods deleted: {len(deletions)}; leases they held: {len(held_paths)}"
          f"\n  how those were detected: { {p: held_paths.count(p) for p in sorted(set(held_paths))} }"
          f"\n  leases given to pods after their deletion: {leased_after_deletion}"
          f"\n  all re-leases, by path (journal 'requeued' events): {dict(sorted(by_path.items()))}"
          f"\n  detection after deletion: median {statistics.median(detection):.3f} s, "
          f"max {max(detection):.3f} s (n={len(detection)})"
          f"\n  re-lease after deletion:  median {statistics.median(relet):.3f} s, "
          f"max {max(relet):.3f} s (n={len(relet)})"
          f"\n  stale results (late, recorded, not counted): {stale}"
          f"\n  wall, first lease to last result: undisturbed {calm_wall:.1f} s, chaos {chaos_wall:.1f} s "
          f"(x{chaos_wall / calm_wall:.2f})")
    assert len(deletions) >= MIN_DELETIONS, f"only {len(deletions)} deletions: the run ended too soon"
    assert detection, "no deleted pod held a lease: nothing was tested"
    # Each loss was seen through the pod path (or the broken stream) within 2 s, never by waiting
    # for heartbeats.
    assert set(held_paths) <= {"pod_gone", "stream"}, held_paths
    assert max(detection) <= 2.0, detection
    kube.kubectl("delete", "nasexperiment", "chaos", "-n", ns, "--wait=true", timeout=120)


def experiment_phase(kube, ns: str, name: str) -> str | None:
    return kube.kubectl_json("get", "nasexperiment", name, "-n", ns).get("status", {}).get("phase")
