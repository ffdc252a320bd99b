"""The real node (tests/cluster/node.py): kubelet + containerd + CNI + kube-proxy + CoreDNS + kube-router.

Each test runs pods from the suite's own ``testbox`` image (one static binary, built from
kubebin/cmd/testbox) on the node and checks what a pod sees: its logs and exec, a ClusterIP
Service's response body (not an exit code: before kube-proxy, such traffic once reached something
off the machine that answered 404), a Service name through CoreDNS, a NetworkPolicy enforced by
kube-router, and the GPU stand-in. See docs/testing.md, "The real node".
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

from tests.cluster.kube import Kube

pytestmark = [pytest.mark.cluster, pytest.mark.real_node]


def _pod(kube: Kube, ns: str, name: str, args: list[str], labels: dict[str, str] | None = None,
         restart: str = "Never", extra: dict[str, Any] | None = None) -> None:
    container: dict[str, Any] = {"name": "main", "image": kube.node.images["testbox"],  # type: ignore[attr-defined]
                                 "imagePullPolicy": "Never", "args": args}
    container.update(extra or {})
    kube.apply({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}},
                "spec": {"restartPolicy": restart, "terminationGracePeriodSeconds": 1,
                         "containers": [container]}})


def _phase(kube: Kube, ns: str, name: str) -> str:
    return kube.kubectl("get", "pod", name, "-n", ns, "-o", "jsonpath={.status.phase}", check=False).stdout


def _run_to_end(kube: Kube, ns: str, name: str, args: list[str], labels: dict[str, str] | None = None,
                timeout: float = 60) -> tuple[str, str]:
    """Run a one-shot pod; returns (phase, logs)."""
    _pod(kube, ns, name, args, labels)
    kube.wait_for(lambda: _phase(kube, ns, name) in ("Succeeded", "Failed"), timeout, 0.2, f"pod {name} to end")
    return _phase(kube, ns, name), kube.kubectl("logs", name, "-n", ns).stdout


def _wait_running(kube: Kube, ns: str, name: str, timeout: float = 60) -> dict[str, Any]:
    kube.wait_for(lambda: kube.pod_ready(kube.kubectl_json("get", "pod", name, "-n", ns)), timeout, 0.2,
                  f"pod {name} Ready")
    pod: dict[str, Any] = kube.kubectl_json("get", "pod", name, "-n", ns)
    return pod


def _server(kube: Kube, ns: str, name: str, body: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    _pod(kube, ns, name, ["serve", "8080", body], labels, restart="Always",
         extra={"ports": [{"containerPort": 8080, "name": "http"}],
                "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}})
    return _wait_running(kube, ns, name)


def _service(kube: Kube, ns: str, name: str, selector: dict[str, str]) -> str:
    kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
                "spec": {"selector": selector, "ports": [{"port": 80, "targetPort": 8080}]}})
    return str(kube.kubectl("get", "service", name, "-n", ns, "-o", "jsonpath={.spec.clusterIP}").stdout)


def _exec(kube: Kube, ns: str, pod: str, *args: str) -> tuple[int, str]:
    done = kube.kubectl("exec", pod, "-n", ns, "--", "/testbox", *args, check=False, timeout=30)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.timeout(60)
def test_node_is_ready_with_the_built_versions_and_the_gpu_stand_in(real_kube: Kube) -> None:
    node = real_kube.kubectl_json("get", "node", real_kube.node.name)  # type: ignore[attr-defined]
    conditions = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert conditions["Ready"] == "True", conditions
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.37.2", info
    assert info.get("kubeProxyVersion", "") in ("", "v1.37.2"), info  # deprecated field, may be blank
    assert info["containerRuntimeVersion"].startswith("containerd://"), info
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == real_kube.node.ip  # type: ignore[attr-defined]
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    # The API server's own Service has the node address as endpoint (pods reach it through kube-proxy).
    endpoints = real_kube.kubectl_json("get", "endpoints", "kubernetes", "-n", "default")
    assert endpoints["subsets"][0]["addresses"][0]["ip"] == real_kube.node.ip  # type: ignore[attr-defined]


@pytest.mark.timeout(120)
def test_a_pod_runs_from_a_local_image_with_logs_and_exec(real_kube: Kube, real_namespace: str) -> None:
    ns = real_namespace
    phase, logs = _run_to_end(real_kube, ns, "hello", ["echo", "hello from a container"])
    assert phase == "Succeeded"
    assert "hello from a container" in logs
    assert "err: hello from a container" in logs  # stderr too, as kubectl logs shows it
    _pod(real_kube, ns, "sleeper", ["sleep", "600"], restart="Always")
    pod = _wait_running(real_kube, ns, "sleeper")
    assert pod["status"]["podIP"].startswith("10.244.0."), pod["status"]
    container_id = pod["status"]["containerStatuses"][0]["containerID"]
    assert container_id.startswith("containerd://")
    # The runtime really runs it, from the image the suite built and imported.
    listing = real_kube.node.ctr("containers", "list")  # type: ignore[attr-defined]
    line = next(ln for ln in listing.splitlines() if ln.startswith(container_id.split("//")[1]))
    assert real_kube.node.images["testbox"] in line  # type: ignore[attr-defined]
    code, out = _exec(real_kube, ns, "sleeper", "id")
    assert code == 0 and "uid=0 gid=0" in out, out
    code, out = _exec(real_kube, ns, "sleeper", "write", "/tmp-not-there/x", "1")
    assert code != 0 and "no such file or directory" in out, out  # exec's exit code comes back


@pytest.mark.timeout(120)
def test_a_cluster_ip_service_answers_from_a_pod(real_kube: Kube, real_namespace: str) -> None:
    ns = real_namespace
    token = f"body-{os.urandom(6).hex()}"
    _server(real_kube, ns, "web", token, {"app": "web"})
    cluster_ip = _service(real_kube, ns, "web", {"app": "web"})
    assert cluster_ip.startswith("10.96."), cluster_ip
    _pod(real_kube, ns, "client", ["sleep", "600"], restart="Always")
    _wait_running(real_kube, ns, "client")
    # kube-proxy programs the rule a moment after the endpoints appear.
    deadline = time.monotonic() + 30
    while True:
        code, out = _exec(real_kube, ns, "client", "get", f"http://{cluster_ip}/")
        if code == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert code == 0 and out.strip() == token, out


@pytest.mark.timeout(120)
def test_a_service_name_resolves_through_coredns(real_kube: Kube, real_namespace: str) -> None:
    ns = real_namespace
    token = f"dns-{os.urandom(6).hex()}"
    _server(real_kube, ns, "master", token, {"app": "master"})
    cluster_ip = _service(real_kube, ns, "exp-master", {"app": "master"})
    phase, logs = _run_to_end(real_kube, ns, "resolve", ["resolve", f"exp-master.{ns}.svc.cluster.local"])
    assert phase == "Succeeded", logs
    assert logs.split() == [cluster_ip]
    # The short name through the pod's search path, and the Service's answer by name.
    deadline = time.monotonic() + 30
    _pod(real_kube, ns, "client", ["sleep", "600"], restart="Always")
    _wait_running(real_kube, ns, "client")
    while True:
        code, out = _exec(real_kube, ns, "client", "get", "http://exp-master/")
        if code == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert code == 0 and out.strip() == token, out
    code, out = _exec(real_kube, ns, "client", "resolve", "no-such-service")
    assert code != 0, out


def _can_connect(kube: Kube, ns: str, pod: str, target: str) -> bool:
    code, _ = _exec(kube, ns, pod, "connect", target)
    return code == 0


@pytest.mark.timeout(180)
def test_a_network_policy_blocks_a_pod_it_does_not_allow(real_kube: Kube, real_namespace: str) -> None:
    ns = real_namespace
    server = _server(real_kube, ns, "master", "master", {"app": "master"})
    target = f"{server['status']['podIP']}:8080"
    for name, labels in (("worker", {"role": "worker"}), ("intruder", {"role": "other"})):
        _pod(real_kube, ns, name, ["sleep", "600"], labels, restart="Always")
    for name in ("worker", "intruder"):
        _wait_running(real_kube, ns, name)
    # Without a policy both connect: a refusal below is the policy's doing.
    assert _can_connect(real_kube, ns, "worker", target)
    assert _can_connect(real_kube, ns, "intruder", target)
    real_kube.apply({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "master-from-workers", "namespace": ns},
        "spec": {"podSelector": {"matchLabels": {"app": "master"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "worker"}}}],
                              "ports": [{"port": 8080, "protocol": "TCP"}]}]}})
    real_kube.wait_for(lambda: not _can_connect(real_kube, ns, "intruder", target), 60, 0.5,
                       "kube-router to block the intruder")
    assert _can_connect(real_kube, ns, "worker", target)
    code, out = _exec(real_kube, ns, "worker", "get", f"http://{target}/")
    assert code == 0 and out.strip() == "master", out
    assert not _can_connect(real_kube, ns, "intruder", target)
    # Deleting the policy lets it in again.
    real_kube.kubectl("delete", "networkpolicy", "master-from-workers", "-n", ns)
    real_kube.wait_for(lambda: _can_connect(real_kube, ns, "intruder", target), 60, 0.5, "the intruder back in")


@pytest.mark.timeout(120)
def test_a_gpu_pod_is_scheduled_against_the_advertised_gpus(real_kube: Kube, real_namespace: str) -> None:
    ns = real_namespace
    gpu = {"resources": {"limits": {"nvidia.com/gpu": "2"}}}
    _pod(real_kube, ns, "trainer", ["sleep", "600"], extra=gpu)
    pod = _wait_running(real_kube, ns, "trainer")
    assert pod["spec"]["nodeName"] == real_kube.node.name  # type: ignore[attr-defined]
    _pod(real_kube, ns, "too-big", ["sleep", "600"], extra={"resources": {"limits": {"nvidia.com/gpu": "9"}}})

    def unschedulable() -> bool:
        status = real_kube.kubectl_json("get", "pod", "too-big", "-n", ns)["status"]
        return any(c.get("reason") == "Unschedulable" and "nvidia.com/gpu" in c.get("message", "")
                   for c in status.get("conditions", []))

    real_kube.wait_for(unschedulable, 30, 0.2, "the 9-GPU pod to be unschedulable")


@pytest.mark.timeout(120)
def test_nothing_a_pod_sends_leaves_the_machine(real_kube: Kube, real_namespace: str) -> None:
    ns = real_namespace
    _pod(real_kube, ns, "client", ["sleep", "600"], restart="Always")
    _wait_running(real_kube, ns, "client")
    # The API server through the 'kubernetes' Service works (kube-proxy DNAT to the node address)...
    code, out = _exec(real_kube, ns, "client", "connect", "kubernetes.default.svc.cluster.local:443")
    assert code == 0, out
    # ...while an unallocated ClusterIP (blackholed), a pod address off the bridge (blackholed) and
    # the host's default gateway (forwarding off the bridge is dropped) are not reachable at all.
    for target in ("10.96.250.250:80", "10.244.7.7:80", f"{_gateway()}:80"):
        code, out = _exec(real_kube, ns, "client", "connect", target)
        assert code != 0, f"{target}: {out}"
    code, out = _exec(real_kube, ns, "client", "get", "http://10.96.250.250/")
    assert code != 0 and "404" not in out, out


def _gateway() -> str:
    import subprocess

    route = json.loads(subprocess.run(["ip", "-j", "route", "show", "default"], capture_output=True,
                                      text=True).stdout or "[]")
    return str(route[0]["gateway"]) if route else "192.0.2.1"


@pytest.mark.timeout(120)
def test_a_container_over_its_memory_limit_is_oom_killed_and_reported(real_kube: Kube, real_namespace: str) -> None:
    ns = real_namespace
    limits = {"resources": {"limits": {"memory": "48Mi"}, "requests": {"memory": "48Mi"}}}
    _pod(real_kube, ns, "hog", ["alloc", "200"], extra=limits)
    real_kube.wait_for(lambda: _phase(real_kube, ns, "hog") in ("Succeeded", "Failed"), 60, 0.2, "hog to end")
    status = real_kube.kubectl_json("get", "pod", "hog", "-n", ns)["status"]
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert status["phase"] == "Failed"
    assert terminated["reason"] == "OOMKilled", terminated
    assert terminated["exitCode"] == 137, terminated
    # Under the limit the same program runs (the kill above is the limit's doing).
    _pod(real_kube, ns, "small", ["alloc", "8"], extra=limits, restart="Always")
    _wait_running(real_kube, ns, "small")
    real_kube.wait_for(lambda: "allocated 8 MB" in real_kube.kubectl("logs", "small", "-n", ns).stdout, 30, 0.3,
                       "small to allocate")
