"""Fail-stop on the cluster tier (issue 10, acceptance 1): the master pod's journal fills up mid-run.

The suite's volume binder (``tests.cluster.provisioner.HostPathBinder``) backs the experiment's
journal claim with a host directory, ``<binder root>/<namespace>/<claim>-<uid>``, mounted into the
master container as a hostPath volume. Before the experiment exists, the test mounts a small tmpfs
over ``<binder root>/<namespace>``, so the claim's directory, and the master's ``journal.db``, are
created on it. Once a few trials are
journaled the test fills the tmpfs: SQLite's next commit fails with SQLITE_FULL (no hook in the
product). The master must exit non-zero (status 3, naming the journal and the error) and the
pod restart in place (restartPolicy Always: restartCount grows; a master that starts while the
disk is still full exits the same way). Then the test frees the space: the next master resumes
from the journal and the experiment reaches Succeeded with every trial counted exactly once.

Needs root (mount) and the suite's own node (the journal's volume must be a directory on this host).
Imports: pytest, the standard library, morphml's Journal, the e2e module's operator fixture and
helpers, tests.cluster.operator_trials.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from morphml.distributed.journal import Journal, JournalError
from tests.disk import fill

from .operator_trials import finished_once, journal_file, read_journal
from .test_operator_e2e import quick_trials, wait_status

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NAME = "fullpvc"
BUDGET = 16
TRIAL_SECONDS = 2
FILL_AFTER = 3  # trials journaled as succeeded before the disk fills
MASTER = f"morphml.io/experiment={NAME},app.kubernetes.io/component=master"
FAILED_COMMIT = re.compile(r"journal \S*journal\.db: (commit|a write) failed: \w+: .*(full|space)")


def succeeded_in_journal(path: Path) -> int:
    """Trials the journal holds as succeeded (0 while the master has not created it yet)."""
    if not path.exists():
        return 0
    try:
        reader = Journal.open_read_only(path)
    except JournalError:  # created but its schema not yet committed
        return 0
    try:
        return sum(1 for t in reader.load_tasks() if t.state.value == "succeeded")
    finally:
        reader.close()


def master_pod(kube, ns: str) -> dict | None:
    pods = [p for p in kube.pods(ns, MASTER) if not p["metadata"].get("deletionTimestamp")]
    return pods[0] if pods else None


def master_status(pod: dict | None) -> dict:
    statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
    return statuses[0] if statuses else {}


@pytest.mark.timeout(600)
def test_a_full_journal_volume_restarts_the_master_pod_and_the_experiment_completes_counting_each_trial_once(
        real_kube, operator, real_namespace):
    kube, ns = real_kube, real_namespace
    assert kube.binder is not None, "the suite's volume binder is not running"
    volumes = kube.binder.root / ns
    volumes.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(volumes)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"mount tmpfs (the cluster tier runs as root): {mounted.stderr}"
    try:
        kube.apply(quick_trials(NAME, TRIAL_SECONDS, workers={"replicas": 2},
                                optimizer={"algorithm": "random", "seed": 11},
                                budget={"maxTrials": BUDGET, "maxFailedTrials": 2}), ns)
        journal = kube.wait_for(lambda: journal_file(kube, ns, NAME), 120, 0.5, "the journal claim bound")
        assert volumes in journal.parents, f"{journal} is not on the tmpfs at {volumes}"
        kube.wait_for(lambda: succeeded_in_journal(journal) >= FILL_AFTER, 240, 0.2,
                      f"{FILL_AFTER} trials journaled")
        pod = master_pod(kube, ns)
        assert pod is not None and master_status(pod).get("restartCount", 0) == 0, master_status(pod)
        uid, container = pod["metadata"]["uid"], pod["spec"]["containers"][0]["name"]

        filler = fill(volumes)
        restarted = kube.wait_for(lambda: (s := master_status(master_pod(kube, ns))).get("restartCount", 0) >= 1
                                  and s, 120, 0.2, "the master to exit on the full journal and its pod to restart")
        terminated = restarted["lastState"]["terminated"]
        assert terminated["exitCode"] == 3, terminated
        log = kube.pod_log(ns, pod["metadata"]["name"], container, previous=True)
        assert FAILED_COMMIT.search(log), log[-3000:]
        halted_at = read_journal(journal)
        done_at_halt = sum(1 for t in halted_at["tasks"] if t["state"] == "succeeded")
        assert FILL_AFTER <= done_at_halt < BUDGET, "the disk filled after the run, not in the middle of it"
        # The same pod restarts in place: no second master ever writes this journal.
        assert master_pod(kube, ns)["metadata"]["uid"] == uid

        time.sleep(3)  # masters restarted meanwhile meet the full disk too (and exit 3 again)
        restarts_while_full = master_status(master_pod(kube, ns)).get("restartCount", 0)
        filler.unlink()
        status = wait_status(kube, operator, ns, NAME, lambda s: s if s.get("phase") in ("Succeeded", "Failed")
                             else None, 300, f"{NAME} to end after the disk has room again")
        assert status["phase"] == "Succeeded", status
        assert status["trials"]["done"] == BUDGET, status["trials"]

        final = read_journal(journal)
        accepted, twice = finished_once(final)
        assert twice == [], f"trials counted more than once: {twice}"
        assert len(accepted) == BUDGET and len(final["tasks"]) == BUDGET, (len(accepted), final["tasks"])
        assert {t["state"] for t in final["tasks"]} == {"succeeded"} and final["phase"] == "Succeeded"
        reader = Journal.open_read_only(journal)
        try:
            counted = Counter(e["task_id"] for e in reader.events("succeeded") + reader.events("failed"))
            starts = reader.events("master_started")
        finally:
            reader.close()
        assert sorted(counted) == sorted(accepted) and set(counted.values()) == {1}, counted
        # Every trial finished before the halt kept its one count; the resumed master restored them.
        assert len(starts) >= 2 and starts[-1]["detail"]["restored_tasks"] >= done_at_halt, starts
        print(f"\njournal full after {done_at_halt} of {BUDGET} trials; master exited "
              f"{terminated['exitCode']}, pod restarted {restarts_while_full} time(s) while the disk was full, "
              f"{len(starts)} master starts journaled")
    finally:
        # The master holds the journal open: delete the experiment (its pods stop) before the
        # tmpfs goes; a lazy unmount still detaches it if something lingers.
        kube.kubectl("delete", "nasexperiment", NAME, "-n", ns, "--wait=true", timeout=120, check=False)
        try:
            kube.wait_for(lambda: not kube.pods(ns, f"morphml.io/experiment={NAME}"), 60, 0.5, "the pods gone")
        except AssertionError:  # WaitTimeout: unmount lazily all the same
            pass
        subprocess.run(["umount", "-l", str(volumes)], check=False)
