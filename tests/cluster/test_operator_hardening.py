"""The operator never loses a loss and never half-applies a spec change (issue 10, items 2, 3, 6).

- 150 worker losses with a master restart and an operator restart in the middle: exactly 150
  WorkerLost Events and status.workersLost == 150 (acceptance 2). The losses are real: worker sessions opened from this
  process with real gRPC and the experiment's token, broken on purpose (the master detects each by
  the stream and journals it with its number).
- WorkerGone to a master that is frozen (SIGSTOP of its container's process, a process of this
  host) while a worker pod is deleted: the operator
  retries until the master answers, and the pod path still re-leases the trial (acceptance 3).
- Spec changes: an immutable field is refused by the API server with a message naming it;
  faultTolerance and master.resources reach a restarted master; workers.resources reach the
  worker Deployment (docs/kubernetes.md, "Which spec fields apply live").

The fake workers reach the master pod's IP from the test process (the host is on the node's pod
bridge; kube-router's policy admits the node's own traffic). One operator (conftest's fixture)
serves the module. Imports: pytest,
PyYAML, the standard library, the e2e module's fixture and helpers, tests.cluster.operator_trials.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import signal
import time

import pytest
import yaml

from .operator_trials import FakeWorkerSession, image, lose_fake_workers, process_pid
from .test_operator_e2e import experiment, operator_log, quick_trials, wait_status

pytestmark = pytest.mark.cluster

# Worker pods that never schedule: the Deployment wants them (so no loss reads as a scale-down and
# every one is a Warning), but every worker session is this test's own.
NOWHERE = {"morphml.io/test-node": "nowhere"}


def token_of(kube, ns: str, name: str) -> str:
    return base64.b64decode(kube.kubectl_json("get", "secret", f"{name}-token", "-n", ns)["data"]["token"]).decode()


def serving_master(kube, ns: str, name: str, not_uid: str | None = None, timeout: float = 120) -> dict:
    """The experiment's master pod once Ready (a new one when `not_uid` is given)."""
    selector = f"morphml.io/experiment={name},app.kubernetes.io/component=master"

    def ready():
        pods = [p for p in kube.pods(ns, selector) if kube.pod_ready(p) and not p["metadata"].get("deletionTimestamp")
                and p["metadata"]["uid"] != not_uid]
        return pods[0] if pods else None

    return kube.wait_for(ready, timeout, 0.5, f"a Ready master pod of {name}")


def address_of(pod: dict) -> str:
    return f"{pod['status']['podIP']}:50051"


def events(kube, ns: str, name: str, reason: str) -> list[dict]:
    return kube.kubectl_json("get", "events", "-n", ns,
                             "--field-selector", f"involvedObject.name={name},reason={reason}")["items"]


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_150_worker_losses_across_master_and_operator_restarts_are_150_worker_lost_events(kube, operator,
                                                                                        kube_namespace):
    ns, name = kube_namespace, "losses"
    kube.apply(quick_trials(name, 30, workers={"replicas": 5, "nodeSelector": NOWHERE},
                            optimizer={"algorithm": "random", "seed": 1},
                            budget={"maxTrials": 1000, "maxFailedTrials": 10},
                            # each fake worker takes the same requeued trial: with the default
                            # maxTaskLosses (5) it would fail, ten such end the search, and the
                            # losses after that would be WorkerStopped Events, not WorkerLost
                            faultTolerance={"maxTaskLosses": 1000}), ns)
    master = serving_master(kube, ns, name)
    token = token_of(kube, ns, name)
    started = time.time()
    assert lose_fake_workers(address_of(master), token, 75, "fake-a") == 75

    # The master pod deleted mid-way; the operator makes a new one, which resumes the journal and
    # numbers the next loss 76.
    kube.kubectl("delete", "pod", f"{name}-master", "-n", ns, "--wait=false")
    master = serving_master(kube, ns, name, not_uid=master["metadata"]["uid"], timeout=180)
    assert lose_fake_workers(address_of(master), token, 40, "fake-b") == 115
    # The operator pod replaced too: the new one goes on from status.lastLossSeq.
    operator_ns, operator_pod = operator
    kube.kubectl("delete", "pod", operator_pod, "-n", operator_ns, "--wait=true", timeout=90)
    pods = kube.wait_pods_ready(operator_ns, "app.kubernetes.io/component=operator", 1, timeout=90)
    operator = (operator_ns, pods[0]["metadata"]["name"])
    assert lose_fake_workers(address_of(master), token, 35, "fake-c") == 150
    lost_at = time.time()

    status = wait_status(kube, operator, ns, name, lambda s: s if s.get("workersLost") == 150 else None, 60,
                         "status.workersLost to reach 150")
    caught_up = time.time()
    assert status["lastLossSeq"] == 150, status

    def posted() -> list[dict]:
        return events(kube, ns, name, "WorkerLost")

    lost = posted()
    print(f"\n150 losses (75, master restart, 40, operator restart, 35) made in {lost_at - started:.1f} s; "
          f"status caught up {caught_up - lost_at:.1f} s later; {len(lost)} WorkerLost Events")
    assert len(lost) == 150, sorted(e["metadata"]["name"] for e in lost)
    numbers = sorted(int(e["metadata"]["name"].split(".")[1].removeprefix("worker-loss-")) for e in lost)
    assert numbers == list(range(1, 151))
    assert all(e["type"] == "Warning" and e["count"] == 1 for e in lost)
    assert {e["message"].split()[1].rsplit("-", 1)[0] for e in lost} == {"fake-a", "fake-b", "fake-c"}
    # Later ticks (2 s apart) post nothing again and the count stays.
    time.sleep(6)
    assert len(posted()) == 150
    assert experiment(kube, ns, name)["status"]["workersLost"] == 150
    kube.kubectl("delete", "nasexperiment", name, "-n", ns, "--wait=true", timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_worker_gone_is_retried_until_a_frozen_master_answers_and_the_trial_is_re_leased(kube, operator,
                                                                                        kube_namespace):
    ns, name = kube_namespace, "frozen"
    kube.apply(quick_trials(name, 30, workers={"replicas": 1, "nodeSelector": NOWHERE},
                            optimizer={"algorithm": "random", "seed": 2},
                            budget={"maxTrials": 100, "maxFailedTrials": 10}), ns)
    master = serving_master(kube, ns, name)
    token = token_of(kube, ns, name)
    # A worker pod (labelled as the experiment's) whose registration this test holds: the pod is a
    # plain sleeper, the session lives here, so deleting the pod breaks no stream and the session
    # heartbeats on. Only WorkerGone (the pod path) can declare it dead.
    pod_name = f"{name}-held-worker"
    kube.apply({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name, "labels": {"morphml.io/experiment": name,
                                                          "app.kubernetes.io/component": "worker"}},
                "spec": {"terminationGracePeriodSeconds": 1, "automountServiceAccountToken": False,
                         "containers": [{"name": "worker", "image": image("testworker"), "imagePullPolicy": "Never",
                                         "command": ["sleep"], "args": ["600"]}]}}, ns)
    kube.wait_for(lambda: kube.pod_ready(kube.kubectl_json("get", "pod", pod_name, "-n", ns)), 60, 0.3,
                  f"{pod_name} Ready")
    session = FakeWorkerSession(address_of(master), token, pod_name)
    try:
        session.connected()
        kube.wait_for(lambda: session.leases, 30, 0.1, "a trial leased to the held worker")
        lease = session.leases[0]
        pid = process_pid(master)
        os.kill(pid, signal.SIGSTOP)
        try:
            kube.kubectl("delete", "pod", pod_name, "-n", ns, "--wait=false")
            time.sleep(7)  # the operator's first WorkerGone (3 s deadline) and its retries fail meanwhile
        finally:
            os.kill(pid, signal.SIGCONT)
        resumed_at = time.time()

        def loss():
            return next((lost for lost in session.status(losses_after_seq=0).losses if lost.worker_name == pod_name),
                        None)

        recorded = kube.wait_for(loss, 30, 0.2, "the master to record the held worker's loss once it runs again")
        log = operator_log(kube, operator)
        print(f"\nmaster frozen 7 s over the pod deletion: loss recorded via {recorded.detected_by} "
              f"{recorded.detected_at - resumed_at:.2f} s after the master ran again")
        assert recorded.detected_by == "pod_gone", recorded
        assert (lease[0], lease[1]) in {(r.task_id, r.attempt) for r in recorded.requeued}, recorded
        assert recorded.detected_at >= resumed_at - 0.5  # not before: the master was frozen
        assert recorded.detected_at - resumed_at <= 8.0  # a retry within one backoff step (<= 5 s) + its call
        assert f"could not tell the master that {pod_name} is gone (will retry)" in log, log
    finally:
        session.close()
    kube.kubectl("delete", "nasexperiment", name, "-n", ns, "--wait=true", timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_an_immutable_change_is_refused_naming_the_field_and_live_fields_apply(kube, operator, kube_namespace):
    ns, name = kube_namespace, "changes"
    manifest = quick_trials(name, 30, workers={"replicas": 1, "nodeSelector": NOWHERE},
                            optimizer={"algorithm": "random", "seed": 3},
                            budget={"maxTrials": 100, "maxFailedTrials": 10})
    kube.apply(manifest, ns)
    master = serving_master(kube, ns, name)

    # Refused, each with a message naming the field; the stored object is unchanged.
    for section, value, message in (
        ("master", {"persistence": {"size": "5Gi"}}, "master.persistence cannot change"),
        ("searchSpace", {"name": "another"}, "searchSpace cannot change"),
        ("objective", {"metric": "val_loss", "goal": "minimize"}, "objective cannot change"),
    ):
        changed = copy.deepcopy(manifest)
        changed["spec"][section] = {**(changed["spec"].get(section) or {}), **value}
        refused = kube.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(changed), check=False)
        assert refused.returncode != 0, f"spec.{section} change accepted"
        assert message in refused.stderr and f"spec.{section}" in refused.stderr, refused.stderr
    assert experiment(kube, ns, name)["metadata"]["generation"] == 1

    # Applied: faultTolerance and master.resources restart the master with them.
    kube.kubectl("patch", "nasexperiment", name, "-n", ns, "--type=merge", "-p", json.dumps({"spec": {
        "faultTolerance": {"heartbeatIntervalSeconds": 3},
        "master": {"resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "3Gi"}}},
        "workers": {"resources": {"requests": {"cpu": "200m", "memory": "300Mi"}}}}}))
    restarted = serving_master(kube, ns, name, not_uid=master["metadata"]["uid"], timeout=180)
    resources = restarted["spec"]["containers"][0]["resources"]
    assert resources["limits"]["memory"] == "3Gi" and resources["requests"]["cpu"] == "100m", resources
    probe = FakeWorkerSession(address_of(restarted), token_of(kube, ns, name), "interval-probe")
    try:
        assert probe.heartbeat_interval == 3.0, probe.heartbeat_interval  # the new master's Register reply
    finally:
        probe.close()
    restarting = events(kube, ns, name, "MasterRestarting")
    assert len(restarting) == 1, restarting
    assert "spec.faultTolerance" in restarting[0]["message"] and "spec.master" in restarting[0]["message"]
    assert "spec.budget" not in restarting[0]["message"]
    template = kube.kubectl_json("get", "deployment", f"{name}-worker", "-n", ns)["spec"]["template"]
    assert template["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "200m", "memory": "300Mi"}
    # Scaling is not a master change: the master pod stays.
    kube.kubectl("scale", "nasexperiment", name, "--replicas", "2", "-n", ns)
    kube.wait_for(lambda: kube.kubectl_json("get", "deployment", f"{name}-worker", "-n", ns)["spec"]["replicas"] == 2,
                  30, 0.5, "the worker Deployment to have 2 replicas")
    time.sleep(4)  # two operator ticks
    assert serving_master(kube, ns, name)["metadata"]["uid"] == restarted["metadata"]["uid"]

    # Once ended (the status says Succeeded; the operator then frees everything), nothing applies
    # a change any more, and the API server refuses each, scale included.
    kube.kubectl("patch", "nasexperiment", name, "-n", ns, "--subresource=status", "--type=merge",
                 "-p", json.dumps({"status": {"phase": "Succeeded"}}))
    for refused in (
        kube.kubectl("patch", "nasexperiment", name, "-n", ns, "--type=merge",
                     "-p", json.dumps({"spec": {"budget": {"maxTrials": 200}}}), check=False),
        kube.kubectl("scale", "nasexperiment", name, "--replicas", "3", "-n", ns, check=False),
    ):
        assert refused.returncode != 0 and "spec cannot change once the experiment has ended" in refused.stderr, refused
    assert experiment(kube, ns, name)["spec"]["budget"]["maxTrials"] == 100
    kube.kubectl("delete", "nasexperiment", name, "-n", ns, "--wait=true", timeout=120)
