"""The operator end to end: `helm install` of the real chart, the real kopf operator as a pod of
the process node, real master and worker processes training on digits (issue 5, acceptance 1-4, 7).

One operator serves the whole module (installed once, uninstalled at the end); each test runs its
experiments in its own namespace. Imports: pytest, PyYAML, the standard library.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "morphml"
DIGITS = ROOT / "examples" / "digits.yaml"
OWNED_KINDS = ("pods,deployments,replicasets,services,secrets,configmaps,persistentvolumeclaims,serviceaccounts,"
               "networkpolicies")


def digits(name: str = "digits", **changes) -> dict:
    """examples/digits.yaml with `changes` merged into its spec (one level deep)."""
    manifest = yaml.safe_load(DIGITS.read_text())
    manifest["metadata"]["name"] = name
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(manifest["spec"].get(key), dict):
            manifest["spec"][key].update(value)
        else:
            manifest["spec"][key] = value
    return manifest


@pytest.fixture(scope="module")
def operator(kube):
    """The chart installed in its own namespace; yields (namespace, pod name)."""
    namespace = f"morphml-system-{os.urandom(2).hex()}"
    kube.kubectl("create", "namespace", namespace)
    kube.wait_for(lambda: kube.kubectl("get", "serviceaccount", "default", "-n", namespace, check=False).returncode == 0,
                  30, 0.1, "the default ServiceAccount")
    try:
        kube.helm("install", "morphml", str(CHART), "--namespace", namespace,
                  "--set", "operator.statusIntervalSeconds=2", "--set", "operator.postingLevel=WARNING",
                  "--wait", "--timeout", "120s", timeout=180)
        pods = kube.wait_pods_ready(namespace, "app.kubernetes.io/component=operator", 1, timeout=60)
        yield namespace, pods[0]["metadata"]["name"]
    finally:
        kube.helm("uninstall", "morphml", "--namespace", namespace, "--wait", "--timeout", "60s", check=False)
        kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def operator_log(kube, operator) -> str:
    namespace, pod = operator
    return kube.pod_log(namespace, pod)[-6000:]


def experiment(kube, namespace: str, name: str) -> dict:
    return kube.kubectl_json("get", "nasexperiment", name, "-n", namespace)


def wait_status(kube, operator, namespace, name, predicate, timeout, message):
    try:
        return kube.wait_for(lambda: predicate(experiment(kube, namespace, name).get("status", {})),
                             timeout, 1.0, message)
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- operator log ---\n{operator_log(kube, operator)}") from None


def owned_objects(kube, namespace: str, name: str) -> list[str]:
    items = kube.kubectl_json("get", OWNED_KINDS, "-n", namespace, "-l", f"morphml.io/experiment={name}")["items"]
    return [f"{i['kind']}/{i['metadata']['name']}" for i in items]


@pytest.mark.timeout(240)
def test_helm_install_runs_the_operator_as_a_ready_pod_of_the_process_node(kube, operator):
    namespace, pod_name = operator
    pod = kube.kubectl_json("get", "pod", pod_name, "-n", namespace)
    assert kube.pod_ready(pod)
    if kube.process_node:
        assert pod["spec"]["nodeName"] == kube.node_name
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["kopf"] and "--module=morphml_operator.handlers" in container["args"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_digits_goes_pending_running_succeeded_and_frees_its_workers(kube, operator, kube_namespace):
    ns = kube_namespace
    manifest = digits(optimizer={"populationSize": 4, "generations": 2, "elitism": 1, "tournamentSize": 2},
                      budget={"maxTrials": 6, "maxFailedTrials": 2}, evaluation={"epochs": 6})
    kube.apply(manifest, ns)
    phases: list[str] = []

    def record(status):
        phase = status.get("phase")
        if phase and (not phases or phases[-1] != phase):
            phases.append(phase)
        return phase == "Succeeded"

    wait_status(kube, operator, ns, "digits", record, 480, "digits to succeed")
    assert phases[-1] == "Succeeded" and "Running" in phases, phases
    assert phases.index("Running") < phases.index("Succeeded")
    assert set(phases) <= {"Pending", "Running", "Succeeded"}, phases

    status = experiment(kube, ns, "digits")["status"]
    assert status["trials"]["done"] == 6 and status["trialsSummary"] == "6/6"
    assert status["best"]["metric"] == "val_accuracy" and status["best"]["value"] >= 0.9, status["best"]
    assert status["startTime"] <= status["completionTime"]
    assert status["observedGeneration"] == experiment(kube, ns, "digits")["metadata"]["generation"]

    # GPUs (here CPUs) are freed: workers at 0, master gone, the journal claim kept.
    kube.wait_for(lambda: kube.kubectl_json("get", "deployment", "digits-worker", "-n", ns)["spec"]["replicas"] == 0,
                  30, 0.5, "workers scaled to 0")
    kube.wait_for(lambda: not kube.pods(ns, "morphml.io/experiment=digits"), 90, 1.0, "experiment pods to go")
    assert kube.kubectl_json("get", "pvc", "digits-journal", "-n", ns)["metadata"]["name"] == "digits-journal"

    table = kube.kubectl("get", "nasexperiments", "-n", ns).stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "WORKERS", "TRIALS", "BEST", "AGE"]
    row = table[1].split()
    assert row[:4] == ["digits", "Succeeded", "0/0", "6/6"], table
    assert float(row[4]) >= 0.9, table

    events = kube.kubectl_json("get", "events", "-n", ns, "--field-selector", "involvedObject.name=digits")["items"]
    reasons = {e["reason"] for e in events}
    assert {"Started", "NewBest", "Succeeded"} <= reasons, reasons


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_scale_to_three_workers_registers_three_and_delete_removes_everything(kube, operator, kube_namespace):
    ns = kube_namespace
    # A budget it will not reach while the test looks; one short epoch per trial.
    manifest = digits(name="scaled", budget={"maxTrials": 500, "maxFailedTrials": 50},
                      optimizer={"populationSize": 20, "generations": 100, "elitism": 1, "tournamentSize": 2},
                      evaluation={"epochs": 1}, workers={"replicas": 1})
    kube.apply(manifest, ns)
    wait_status(kube, operator, ns, "scaled", lambda s: s.get("phase") == "Running", 180, "the search to run")

    kube.kubectl("scale", "nasexperiment", "scaled", "--replicas", "3", "-n", ns)
    kube.wait_for(lambda: kube.kubectl_json("get", "deployment", "scaled-worker", "-n", ns)["spec"]["replicas"] == 3,
                  30, 0.5, "the worker Deployment to have 3 replicas")
    status = wait_status(kube, operator, ns, "scaled",
                         lambda s: s if (s.get("workers") or {}).get("registered") == 3 else None,
                         180, "three workers registered with the master")
    assert status["workers"]["desired"] == 3
    assert status["workersSummary"].endswith("/3")
    worker_pods = kube.pods(ns, "morphml.io/experiment=scaled,app.kubernetes.io/component=worker")
    assert len([p for p in worker_pods if not p["metadata"].get("deletionTimestamp")]) == 3

    assert sorted(owned_objects(kube, ns, "scaled")) != []
    kube.kubectl("delete", "nasexperiment", "scaled", "-n", ns, "--wait=true", timeout=120)
    kube.wait_for(lambda: owned_objects(kube, ns, "scaled") == [], 120, 1.0,
                  "every object the experiment owned to be deleted")


@pytest.mark.timeout(300)
def test_gpu_experiment_worker_requests_a_gpu_and_is_scheduled(kube, operator, kube_namespace):
    ns = kube_namespace
    manifest = digits(name="gpu", workers={"replicas": 1, "gpusPerWorker": 1},
                      budget={"maxTrials": 500, "maxFailedTrials": 50})
    kube.apply(manifest, ns)
    selector = "morphml.io/experiment=gpu,app.kubernetes.io/component=worker"

    def scheduled_worker():
        pods = [p for p in kube.pods(ns, selector) if not p["metadata"].get("deletionTimestamp")]
        return pods[0] if pods and pods[0]["spec"].get("nodeName") else None

    try:
        pod = kube.wait_for(scheduled_worker, 120, 0.5, "the GPU worker pod to be scheduled")
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- operator log ---\n{operator_log(kube, operator)}") from None
    resources = pod["spec"]["containers"][0]["resources"]
    assert str(resources["requests"]["nvidia.com/gpu"]) == "1" and str(resources["limits"]["nvidia.com/gpu"]) == "1"
    if kube.process_node:
        assert pod["spec"]["nodeName"] == kube.node_name
    assert pod["spec"]["containers"][0]["args"][-4:-2] == ["--gpus", "1"]
    kube.kubectl("delete", "nasexperiment", "gpu", "-n", ns, "--wait=true", timeout=120)


def count_owned(kube, namespace: str, name: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in owned_objects(kube, namespace, name):
        kind = entry.split("/")[0]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_operator_restart_duplicates_nothing_and_suspend_resume_move_the_workers(kube, operator, kube_namespace):
    ns = kube_namespace
    manifest = digits(name="longrun", budget={"maxTrials": 500, "maxFailedTrials": 50},
                      optimizer={"populationSize": 20, "generations": 100, "elitism": 1, "tournamentSize": 2},
                      evaluation={"epochs": 1}, workers={"replicas": 2})
    kube.apply(manifest, ns)
    wait_status(kube, operator, ns, "longrun", lambda s: (s.get("trials") or {}).get("done", 0) >= 1, 240,
                "a first finished trial")

    # The operator pod is replaced (kopf resumes every experiment): still one of everything.
    operator_ns, operator_pod = operator
    kube.kubectl("delete", "pod", operator_pod, "-n", operator_ns, "--wait=true", timeout=90)
    pods = kube.wait_pods_ready(operator_ns, "app.kubernetes.io/component=operator", 1, timeout=90)
    operator = (operator_ns, pods[0]["metadata"]["name"])
    before = experiment(kube, ns, "longrun")["status"]["trials"]["done"]
    wait_status(kube, operator, ns, "longrun", lambda s: s["trials"]["done"] > before, 120,
                "progress seen by the new operator")
    counts = count_owned(kube, ns, "longrun")
    assert {k: counts.get(k, 0) for k in ("Secret", "ConfigMap", "PersistentVolumeClaim", "Service", "Deployment",
                                          "ServiceAccount", "NetworkPolicy")} == {
        "Secret": 1, "ConfigMap": 1, "PersistentVolumeClaim": 1, "Service": 1, "Deployment": 1, "ServiceAccount": 1,
        "NetworkPolicy": 1}
    masters = [p for p in kube.pods(ns, "morphml.io/experiment=longrun,app.kubernetes.io/component=master")
               if not p["metadata"].get("deletionTimestamp")]
    assert len(masters) == 1

    # Suspend: workers to 0, phase Suspended; resume: back to 2 and Running.
    kube.kubectl("patch", "nasexperiment", "longrun", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_status(kube, operator, ns, "longrun",
                lambda s: s.get("phase") == "Suspended" and s["workers"]["desired"] == 0, 60, "Suspended")
    assert kube.kubectl_json("get", "deployment", "longrun-worker", "-n", ns)["spec"]["replicas"] == 0
    kube.kubectl("patch", "nasexperiment", "longrun", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_status(kube, operator, ns, "longrun",
                lambda s: s.get("phase") == "Running" and s["workers"]["ready"] == 2, 120, "Running with 2 workers")
    reasons = {e["reason"] for e in kube.kubectl_json("get", "events", "-n", ns,
                                                      "--field-selector", "involvedObject.name=longrun")["items"]}
    assert {"Started", "Suspended", "Resumed"} <= reasons, reasons
    assert "WorkerLost" not in reasons, reasons  # suspending stops workers on purpose

    # The master pod deleted: a new one resumes from the journal; the Trials column never goes back.
    selector = "morphml.io/experiment=longrun,app.kubernetes.io/component=master"
    old_uid = kube.pods(ns, selector)[0]["metadata"]["uid"]
    done_before = experiment(kube, ns, "longrun")["status"]["trials"]["done"]
    kube.kubectl("delete", "pod", "longrun-master", "-n", ns, "--wait=false")
    shown: list[int] = []

    def resumed():
        shown.append(experiment(kube, ns, "longrun")["status"]["trials"]["done"])
        fresh = [p for p in kube.pods(ns, selector) if p["metadata"]["uid"] != old_uid and kube.pod_ready(p)]
        return fresh and shown[-1] > done_before

    try:
        kube.wait_for(resumed, 180, 1.0, "a new master pod that resumes the search")
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- operator log ---\n{operator_log(kube, operator)}") from None
    assert shown == sorted(shown), f"done trials went backwards: {shown}"
    master_log = kube.pod_log(ns, "longrun-master")
    assert "restored" in master_log, master_log[-2000:]
    kube.kubectl("delete", "nasexperiment", "longrun", "-n", ns, "--wait=true", timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_raising_the_budget_of_a_running_search_extends_it(kube, operator, kube_namespace):
    ns = kube_namespace
    manifest = digits(name="extended", budget={"maxTrials": 8, "maxFailedTrials": 4},
                      optimizer={"populationSize": 4, "generations": 10, "elitism": 1, "tournamentSize": 2},
                      evaluation={"epochs": 3})
    kube.apply(manifest, ns)
    wait_status(kube, operator, ns, "extended", lambda s: s.get("phase") == "Running", 240, "Running")
    kube.kubectl("patch", "nasexperiment", "extended", "-n", ns, "--type=merge",
                 "-p", '{"spec":{"budget":{"maxTrials":12}}}')
    status = wait_status(kube, operator, ns, "extended",
                         lambda s: s if s.get("phase") in ("Succeeded", "Failed") else None, 420, "the end")
    assert status["phase"] == "Succeeded", status
    assert status["trials"]["done"] == 12 and status["trialsSummary"] == "12/12", status["trials"]
    reasons = {e["reason"] for e in kube.kubectl_json("get", "events", "-n", ns,
                                                      "--field-selector", "involvedObject.name=extended")["items"]}
    assert "BudgetChanged" in reasons, reasons


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_deleted_worker_pod_is_reported_gone_to_the_master_within_two_seconds(kube, operator, kube_namespace):
    import base64

    from morphml_operator.master_client import get_master_status

    ns = kube_namespace
    manifest = digits(name="podloss", budget={"maxTrials": 500, "maxFailedTrials": 50},
                      optimizer={"populationSize": 20, "generations": 100, "elitism": 1, "tournamentSize": 2},
                      evaluation={"epochs": 20}, workers={"replicas": 2})
    kube.apply(manifest, ns)
    wait_status(kube, operator, ns, "podloss", lambda s: (s.get("trials") or {}).get("running", 0) >= 2, 240,
                "both workers running a trial")
    token = base64.b64decode(kube.kubectl_json("get", "secret", "podloss-token", "-n", ns)["data"]["token"]).decode()

    def master_status():
        pod = kube.kubectl_json("get", "pod", "podloss-master", "-n", ns)
        return get_master_status(f"{pod['status']['podIP']}:50051", token)

    busy = [w for w in master_status()["workers"] if w["state"] == "busy" and w["running"]]
    assert busy, master_status()["workers"]
    victim = busy[0]["worker_name"]
    # (metadata.deletionTimestamp is when the grace period ends, not when deletion was asked for.)
    deleted_at = time.time()
    kube.kubectl("delete", "pod", victim, "-n", ns, "--wait=false")

    def loss():
        return next((l for l in master_status()["losses"] if l["worker_name"] == victim), None)

    recorded = kube.wait_for(loss, 60, 0.2, f"the master to record {victim}'s loss")
    assert recorded["detected_by"] == "pod_gone", recorded
    assert recorded["requeued"], recorded
    assert 0 <= recorded["detected_at"] - deleted_at <= 2.0, recorded["detected_at"] - deleted_at
    kube.kubectl("delete", "nasexperiment", "podloss", "-n", ns, "--wait=true", timeout=120)
