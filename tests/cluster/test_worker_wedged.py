"""Cluster tier: a worker pod whose trial runner is wedged turns unready through its gRPC readiness
probe, and the operator reports it gone (issue 10, item 4).

The worker Deployment is the operator's own (readiness probe: grpc.health.v1 `morphml.Worker`
every 5 s, 2 failures), probed by the real kubelet; the worker is a container of the test image.
The runner is wedged by SIGSTOP on that child process only (a process of this host in the
container's namespaces, found through /proc): the worker keeps its
stream and its heartbeats, so neither of the master's own paths can fire; only the worker's
liveness check (NOT_SERVING after 3 x heartbeatIntervalSeconds = 30 s) and, through the probe,
the operator's unready path can. Imports: pytest, the standard library, this package's helpers.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from .test_operator_e2e import master_status_reader, quick_trials, wait_status

pytestmark = pytest.mark.cluster

STUCK_AFTER = 30.0  # liveness_bounds(10 s): 3 heartbeat intervals
REPLACE_AFTER = 60.0  # the worker's own replacement comes after the operator's report


def runner_pids(pod_name: str) -> list[int]:
    """Trial runner processes of a pod's container, as host pids (they inherit the pod's POD_NAME)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"morphml.distributed.trial_runner" in cmdline and f"POD_NAME={pod_name}".encode() in environ:
            found.append(int(entry.name))
    return found


def ready(pod: dict) -> bool | None:
    for condition in pod.get("status", {}).get("conditions", []):
        if condition["type"] == "Ready":
            return condition["status"] == "True"
    return None


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_worker_pod_with_a_wedged_runner_turns_unready_and_is_reported_gone(kube, operator, kube_namespace):
    ns = kube_namespace
    # Trials of 150 s: the wedged one is still mid-trial when it is reported.
    kube.apply(quick_trials("wedged", 150, workers={"replicas": 2}, optimizer={"algorithm": "random", "seed": 3},
                            budget={"maxTrials": 4, "maxFailedTrials": 2}), ns)
    wait_status(kube, operator, ns, "wedged", lambda s: s.get("phase") == "Running", 240, "Running")
    master_status = master_status_reader(kube, ns, "wedged")

    def busy_ready_worker():
        for w in master_status()["workers"]:
            if w["state"] != "dead" and w["running"]:
                pod = kube.kubectl_json("get", "pod", w["worker_name"], "-n", ns)
                if ready(pod) and runner_pids(w["worker_name"]):
                    return w["worker_name"], w["running"][0]
        return None

    victim, lease = kube.wait_for(busy_ready_worker, 180, 0.5, "a Ready worker pod running a trial")
    time.sleep(1.0)  # the lease has reached the runner
    [runner] = runner_pids(victim)
    os.kill(runner, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        kube.wait_for(lambda: ready(kube.kubectl_json("get", "pod", victim, "-n", ns)) is False,
                      STUCK_AFTER + 25, 0.5, "the wedged worker's pod to turn unready")
        unready_s = time.time() - stopped_at

        def loss():
            return next((x for x in master_status()["losses"] if x["worker_name"] == victim), None)

        recorded = kube.wait_for(loss, 30, 0.3, "the operator to report the unready pod")
        reported_s = recorded["detected_at"] - stopped_at
        print(f"\nrunner SIGSTOP -> pod unready {unready_s:.1f} s, reported gone ({recorded['detected_by']}) "
              f"{reported_s:.1f} s (worker bound {STUCK_AFTER:g} s)")
        assert recorded["detected_by"] == "pod_gone", recorded
        assert {"task_id": lease["task_id"], "attempt": lease["attempt"]} in recorded["requeued"], recorded
        # NOT_SERVING at 30 s (+1 s beat, +1 s check), then 2 failed probes 5 s apart, then the
        # operator's 5 s unready threshold: well before the worker's own replacement at 60 s.
        assert STUCK_AFTER - 2 <= unready_s <= STUCK_AFTER + 15, unready_s
        assert reported_s < REPLACE_AFTER, reported_s
        assert runner_pids(victim) == [runner]  # reported by the pod path, before any replacement
        pod = kube.kubectl_json("get", "pod", victim, "-n", ns)
        assert not pod["metadata"].get("deletionTimestamp")  # nobody deleted it: the unready path fired

        def worker_lost_event():  # posted on the operator's next status tick (2 s here)
            events = kube.kubectl_json("get", "events", "-n", ns, "--field-selector", "reason=WorkerLost")["items"]
            return [e["message"] for e in events if victim in e["message"]]

        kube.wait_for(worker_lost_event, 30, 0.5, "a WorkerLost Event naming the wedged pod")
    finally:
        try:
            os.kill(runner, signal.SIGCONT)
        except ProcessLookupError:
            pass
    kube.kubectl("delete", "nasexperiment", "wedged", "-n", ns, "--wait=true", timeout=120)
