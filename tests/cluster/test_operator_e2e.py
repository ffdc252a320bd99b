"""The operator end to end: `helm install` of the real chart, the real kopf operator as a pod of
the process node, real master and worker processes training on digits (issue 5, acceptance 1-4, 7).

One operator serves the whole module (installed once, uninstalled at the end); each test runs its
experiments in its own namespace. Imports: pytest, PyYAML, the standard library.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "morphml"
DIGITS = ROOT / "examples" / "digits.yaml"
OWNED_KINDS = "pods,deployments,replicasets,services,secrets,configmaps,persistentvolumeclaims,serviceaccounts"


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
