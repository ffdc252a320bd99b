"""Cluster tier: a trial over its worker container's memory limit is OOM-killed, reported as out of
memory, and re-leased; its second attempt succeeds and counts once (issue 14, item 5).

The worker pod is the operator's own, with a memory limit of 512Mi (spec.workers.resources), one
replica, running the test image's `oom_killed_once` evaluator: the first trial in the pod raises
its own oom_score_adj to 1000 and allocates until the kernel's OOM killer (the container's memory
cgroup; cgroup v1 on this node, which kills one process) ends it. The victim is chosen, so the
outcome is one path, not two: the trial runner dies by SIGKILL inside a live container (no
container restart), the worker reads the container cgroup's OOM kill count
(morphml.distributed.worker_memory) and reports the attempt failed, kind "oom", with a message
that says out of memory and names the limit, also in its log (`kubectl logs`); the master retries
it (faultTolerance.maxTaskRetries), on the same pod (the only one), where the marker in the pod's
/tmp makes it a 2 s trial that succeeds.

Seen failing: with maxTaskRetries 0 (no re-lease) the trial fails for good and the test fails
("was not re-leased"); without the worker's cgroup check the message assertion fails (seen on the
process tier's twin, tests/process/test_worker_oom_cgroup.py). Imports: pytest, the standard
library, morphml_operator.builders (labels), this package's helpers.
"""

from __future__ import annotations

import pytest

from morphml_operator.builders import COMPONENT_LABEL, EXPERIMENT_LABEL

from .operator_trials import finished_once, journal_file, next_lease, read_journal
from .test_operator_e2e import experiment, quick_trials, wait_status

pytestmark = pytest.mark.cluster

NAME = "oom"
LIMIT_MIB = 512
RESOURCES = {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": f"{LIMIT_MIB}Mi"}}
# Retries after a failed attempt: the OOM-killed one is retried once.
MAX_TASK_RETRIES = 1


def journal_failures(path) -> list[dict]:
    """The master's "retry" (a failed attempt put back in the queue) and "failed" (a trial failed for
    good) events, with the failure's kind and message."""
    from morphml.distributed.journal import Journal

    journal = Journal.open_read_only(path)
    try:
        return journal.events(("retry", "failed"))
    finally:
        journal.close()


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_a_trial_over_the_worker_memory_limit_is_oom_killed_reported_and_re_leased(kube, operator, kube_namespace):
    ns = kube_namespace
    manifest = quick_trials(NAME, 2, evaluator="tests.cluster.operator_trials:oom_killed_once",
                            workers={"replicas": 1, "resources": RESOURCES},
                            optimizer={"algorithm": "random", "seed": 5},
                            budget={"maxTrials": 2, "maxFailedTrials": 1},
                            faultTolerance={"maxTaskRetries": MAX_TASK_RETRIES})
    kube.apply(manifest, ns)
    wait_status(kube, operator, ns, NAME, lambda s: s.get("phase") == "Running", 240, "Running")
    path = journal_file(kube, ns, NAME)

    # Reported: the first attempt failed as out of memory, with the kernel's OOM kill as evidence.
    [retry] = kube.wait_for(lambda: journal_failures(path), 120, 0.5, "the OOM-killed attempt to be reported")
    message = retry["detail"]["message"]
    assert retry["kind"] == "retry", f"the OOM-killed trial was not re-leased: {retry}"
    assert retry["detail"]["failure_kind"] == "oom", retry
    assert message.startswith("out of memory: the kernel's OOM killer ended the trial process"), message
    assert f"memory limit of {LIMIT_MIB} MiB of the worker's cgroup" in message, message

    # The runner died, not the worker: the worker container has not restarted, and its log (what
    # `kubectl logs` shows the user) says out of memory. Read now: the pods go when the search ends.
    [pod] = [p for p in kube.pods(ns, f"{EXPERIMENT_LABEL}={NAME},{COMPONENT_LABEL}=worker")
             if not p["metadata"].get("deletionTimestamp")]
    assert pod["metadata"]["name"] == retry["worker_name"], (pod["metadata"]["name"], retry)
    [container] = pod["status"]["containerStatuses"]
    assert container["restartCount"] == 0 and "running" in container["state"], container
    log = kube.pod_log(ns, pod["metadata"]["name"])
    assert f"trial {retry['task_id']}/{retry['attempt']} failed (oom): out of memory" in log, log[-3000:]

    # Re-leased and finished once: the next attempt of the same trial succeeded; nothing counted
    # twice; the search ends with both trials succeeded and none failed.
    status = wait_status(kube, operator, ns, NAME, lambda s: s if s.get("phase") in ("Succeeded", "Failed") else None,
                         180, "the search to end")
    journal = read_journal(path)
    failed = [a for a in journal["attempts"] if a["state"] == "failed"]
    assert [(a["task_id"], a["attempt"], a["outcome"]) for a in failed] == [
        (retry["task_id"], retry["attempt"], "oom")], journal["attempts"]
    again = next_lease(journal, retry["task_id"], retry["attempt"])
    assert again is not None and again["state"] == "succeeded", journal["attempts"]
    first = next(a for a in journal["attempts"] if (a["task_id"], a["attempt"]) == (retry["task_id"], retry["attempt"]))
    reported_s, released_s = retry["ts"] - first["leased_at"], again["leased_at"] - retry["ts"]
    print(f"\nOOM-killed attempt {retry['task_id']}/{retry['attempt']}: reported {reported_s:.1f} s after its "
          f"lease; attempt {again['attempt']} leased {released_s:.2f} s after the report, succeeded "
          f"{again['ended_at'] - again['leased_at']:.1f} s later")
    succeeded, twice = finished_once(journal)
    assert len(succeeded) == 2 and retry["task_id"] in succeeded and twice == [], journal["results"]
    assert status["phase"] == "Succeeded", status
    assert status["trials"]["succeeded"] == 2 and status["trials"]["failed"] == 0, status
    assert experiment(kube, ns, NAME)["status"]["trialsSummary"] == "2/2"
    kube.kubectl("delete", "nasexperiment", NAME, "-n", ns, "--wait=true", timeout=120)
