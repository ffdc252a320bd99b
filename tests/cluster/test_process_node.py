"""Process node specifics beyond the acceptance list: init containers and terminal phases, start
failures, and the in-cluster identity a pod gets (its ServiceAccount token through KUBECONFIG).

Imports: pytest and the standard library; the cluster through the ``kube`` fixture.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.cluster

PYTHON_IMAGE = "python:3.12-slim"


def _finished(kube, ns: str, name: str, timeout: float = 40) -> dict:
    def done():
        pod = kube.kubectl_json("get", "pod", name, "-n", ns)
        return pod if pod["status"].get("phase") in ("Succeeded", "Failed") else None

    return kube.wait_for(done, timeout, 0.3, f"pod {name} to finish")


@pytest.mark.timeout(60)
def test_init_container_runs_first_and_pod_succeeds(kube, kube_namespace):
    ns = kube_namespace
    kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "job-like"}, "spec": {
        "restartPolicy": "OnFailure",
        "initContainers": [{"name": "prepare", "image": PYTHON_IMAGE,
                            "command": ["sh", "-c", "echo prepared > /work/flag"],
                            "volumeMounts": [{"name": "work", "mountPath": "/work"}]}],
        "containers": [{"name": "main", "image": PYTHON_IMAGE, "command": ["cat", "/work/flag"],
                        "volumeMounts": [{"name": "work", "mountPath": "/work"}]}],
        "volumes": [{"name": "work", "emptyDir": {}}]}}, ns)
    pod = _finished(kube, ns, "job-like")
    assert pod["status"]["phase"] == "Succeeded", pod["status"]
    assert pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    assert kube.kubectl("logs", "-n", ns, "job-like").stdout == "prepared\n"


@pytest.mark.timeout(60)
def test_missing_executable_fails_never_pod_with_start_error(kube, kube_namespace):
    ns = kube_namespace
    kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "no-such-command"}, "spec": {
        "restartPolicy": "Never",
        "containers": [{"name": "main", "image": PYTHON_IMAGE, "command": ["morphml-no-such-program"]}]}}, ns)
    pod = _finished(kube, ns, "no-such-command")
    assert pod["status"]["phase"] == "Failed"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["reason"] == "StartError" and "morphml-no-such-program" in terminated["message"]


@pytest.mark.timeout(90)
def test_pod_acts_as_its_service_account(kube, kube_namespace):
    """A pod's processes get KUBECONFIG with the pod's ServiceAccount token, so RBAC applies to them."""
    if not kube.process_node:
        pytest.skip("in-cluster identity on a real cluster is the kubelet's business")
    ns = kube_namespace
    kube.kubectl("create", "serviceaccount", "lister", "-n", ns)

    def lister_pod(name: str) -> dict:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {
            "restartPolicy": "Never", "serviceAccountName": "lister",
            "containers": [{"name": "main", "image": "bitnami/kubectl",
                            "command": [kube.kubectl_path, "get", "configmaps", "-o", "name"]}]}}

    kube.apply(lister_pod("denied"), ns)
    pod = _finished(kube, ns, "denied")
    assert pod["status"]["phase"] == "Failed"
    assert f'"system:serviceaccount:{ns}:lister" cannot list resource "configmaps"' in kube.pod_log(ns, "denied")

    kube.kubectl("create", "role", "cm-reader", "-n", ns, "--verb=list", "--resource=configmaps")
    kube.kubectl("create", "rolebinding", "lister-reads", "-n", ns, "--role=cm-reader", f"--serviceaccount={ns}:lister")
    kube.apply(lister_pod("allowed"), ns)
    pod = _finished(kube, ns, "allowed")
    assert pod["status"]["phase"] == "Succeeded", kube.pod_log(ns, "allowed")
    assert "configmap/kube-root-ca.crt" in kube.pod_log(ns, "allowed")
