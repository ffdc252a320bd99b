"""Acceptance tests of the test control plane and its node (issue 4; the real node since issue 14).

Each test talks to the real kube-apiserver started by tests/cluster/conftest.py; pods run as
containers of the real node (kubelet + containerd) from the test image (``morphml-testworker``:
the master image's Python plus tests/cluster/testdata on its PYTHONPATH, as UID 1000), and the
test process reaches pod IPs over the node's pod bridge. Imports: pytest, the standard library,
the kubernetes client (through the ``kube`` fixture), this package's helpers.
"""

from __future__ import annotations

import base64
import json
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from . import images
from .operator_trials import image

pytestmark = pytest.mark.cluster

TESTDATA = Path(__file__).resolve().parent / "testdata"
#: The gRPC health server script inside the test image.
GRPC_SERVER = f"{images.TEST_DIR}/tests/cluster/testdata/grpc_health_server.py"


@pytest.fixture(autouse=True)
def _test_image(morphml_images):
    """Every pod here runs the test image (a Python with this package's test data)."""


def python_image() -> str:
    return image("testworker")


def http_server_deployment(name: str, replicas: int) -> dict:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {
            "replicas": replicas, "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {
                "terminationGracePeriodSeconds": 5,
                "containers": [{
                    "name": "web", "image": python_image(),
                    "command": ["python", "-m", "http.server", "8080", "--bind", "$(POD_IP)"],
                    "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
                }],
            }},
        },
    }


def http_get(url: str, timeout: float = 5) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status


@pytest.mark.timeout(120)
def test_deployment_pods_run_ready_reachable_and_replaced(kube, kube_namespace):
    ns = kube_namespace
    kube.apply(http_server_deployment("web", 2), ns)
    pods = kube.wait_pods_ready(ns, "app=web", 2, timeout=60)
    ips = {p["metadata"]["name"]: p["status"]["podIP"] for p in pods}
    assert len(set(ips.values())) == 2, ips
    for ip in ips.values():
        assert http_get(f"http://{ip}:8080/") == 200

    victim = sorted(ips)[0]
    kube.kubectl("delete", "pod", "-n", ns, victim, "--wait=true", timeout=60)
    replaced = kube.wait_pods_ready(ns, "app=web", 2, timeout=60)
    names = {p["metadata"]["name"] for p in replaced}
    assert victim not in names
    assert len(names - set(ips)) == 1, (names, ips)
    for pod in replaced:
        assert http_get(f"http://{pod['status']['podIP']}:8080/") == 200
    with pytest.raises(OSError):  # noqa: PT011 (refused or timed out: the deleted pod's server is gone)
        http_get(f"http://{ips[victim]}:8080/", timeout=2)
    rs = kube.kubectl_json("get", "replicasets", "-n", ns, "-l", "app=web")["items"]
    assert [r["status"]["readyReplicas"] for r in rs] == [2]


@pytest.mark.timeout(90)
def test_garbage_collector_removes_dependents(kube, kube_namespace):
    ns = kube_namespace
    owner = kube.kubectl_json("create", "configmap", "owner", "-n", ns, "--from-literal=a=1")
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "dependent", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                                                   "uid": owner["metadata"]["uid"]}]}, "data": {"b": "2"}}, ns)
    kube.kubectl("delete", "configmap", "owner", "-n", ns)
    kube.wait_for(lambda: kube.kubectl("get", "configmap", "dependent", "-n", ns, check=False).returncode != 0,
                  30, 0.2, "the garbage collector to delete the dependent ConfigMap")

    # A Deployment owns its ReplicaSet, which owns the pods: deleting the Deployment removes them all,
    # and the kubelet stops their containers.
    kube.apply(http_server_deployment("gc", 1), ns)
    kube.wait_pods_ready(ns, "app=gc", 1, timeout=60)
    kube.kubectl("delete", "deployment", "gc", "-n", ns, "--cascade=background")
    kube.wait_for(lambda: not kube.kubectl_json("get", "replicasets,pods", "-n", ns, "-l", "app=gc")["items"],
                  60, 0.3, "ReplicaSet and pods of the deleted Deployment to be garbage collected")


@pytest.mark.timeout(60)
def test_rbac_denies_without_role_and_allows_with_one(kube, kube_namespace):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    ns = kube_namespace
    kube.kubectl("create", "serviceaccount", "reader", "-n", ns)
    token = kube.kubectl("create", "token", "reader", "-n", ns).stdout.strip()
    reader = client.CoreV1Api(kube.client_with_token(token))
    with pytest.raises(ApiException) as denied:
        reader.list_namespaced_pod(ns)
    assert denied.value.status == 403, denied.value
    assert f"system:serviceaccount:{ns}:reader" in denied.value.body

    kube.kubectl("create", "role", "pod-reader", "-n", ns, "--verb=get,list,watch", "--resource=pods")
    kube.kubectl("create", "rolebinding", "reader-reads", "-n", ns, "--role=pod-reader",
                 f"--serviceaccount={ns}:reader")
    kube.wait_for(lambda: reader.list_namespaced_pod(ns) is not None, 20, 0.2, "the Role to take effect")
    # Still only what the Role grants: another resource and another namespace stay forbidden.
    with pytest.raises(ApiException) as still_denied:
        reader.list_namespaced_secret(ns)
    assert still_denied.value.status == 403
    with pytest.raises(ApiException) as other_ns:
        reader.list_namespaced_pod("default")
    assert other_ns.value.status == 403


@pytest.mark.timeout(90)
def test_failing_liveness_probe_restarts_container(kube, kube_namespace):
    ns = kube_namespace
    kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "unhealthy"}, "spec": {
        "terminationGracePeriodSeconds": 1,
        "containers": [{"name": "main", "image": python_image(),
                        "command": ["sh", "-c", "echo started; exec sleep 3600"],
                        "livenessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1,
                                          "failureThreshold": 2}}]}}, ns)

    def restarted_twice():
        pod = kube.kubectl_json("get", "pod", "unhealthy", "-n", ns)
        statuses = pod.get("status", {}).get("containerStatuses") or [{}]
        return pod if statuses[0].get("restartCount", 0) >= 2 else None

    pod = kube.wait_for(restarted_twice, 60, 0.5, "restartCount >= 2 after liveness failures")
    status = pod["status"]["containerStatuses"][0]
    assert status["lastState"]["terminated"]["exitCode"] != 0
    assert pod["status"]["phase"] == "Running"
    reasons = {e["reason"] for e in kube.kubectl_json("get", "events", "-n", ns, "--field-selector",
                                                     "involvedObject.name=unhealthy")["items"]}
    assert {"Scheduled", "Started", "Unhealthy", "Killing"} <= reasons, reasons
    # kubectl logs --previous goes API server -> the kubelet's log endpoint -> the previous run's file.
    assert kube.kubectl("logs", "-n", ns, "unhealthy", "--previous").stdout == "started\n"


@pytest.mark.timeout(60)
def test_gpu_request_beyond_node_stays_pending_with_scheduler_reason(kube, kube_namespace):
    ns = kube_namespace

    def gpu_pod(name: str, gpus: int) -> dict:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": python_image(), "command": ["sleep", "3600"],
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]}}

    kube.apply([gpu_pod("too-many-gpus", 16), gpu_pod("two-gpus", 2)], ns)

    def unschedulable():
        pod = kube.kubectl_json("get", "pod", "too-many-gpus", "-n", ns)
        cond = next((c for c in pod["status"].get("conditions", []) if c["type"] == "PodScheduled"), None)
        return cond if cond and cond["status"] == "False" else None

    cond = kube.wait_for(unschedulable, 30, 0.3, "the scheduler to refuse the 16-GPU pod")
    assert cond["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond["message"], cond
    kube.wait_for(lambda: kube.pod_ready(kube.kubectl_json("get", "pod", "two-gpus", "-n", ns)), 30, 0.3,
                  "the 2-GPU pod to run")
    time.sleep(1)
    pod = kube.kubectl_json("get", "pod", "too-many-gpus", "-n", ns)
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")
    events = kube.kubectl_json("get", "events", "-n", ns, "--field-selector",
                               "involvedObject.name=too-many-gpus,reason=FailedScheduling")["items"]
    assert any("Insufficient nvidia.com/gpu" in e["message"] for e in events), events


@pytest.mark.timeout(150)
def test_helm_lint_template_install_uninstall(kube, kube_namespace, tmp_path):
    ns = kube_namespace
    chart = str(TESTDATA / "demo-chart")
    lint = kube.helm("lint", chart)
    assert "1 chart(s) linted, 0 chart(s) failed" in lint.stdout
    rendered = kube.helm("template", "demo", chart, "--namespace", ns, "--set", "replicas=1").stdout
    assert "kind: Deployment" in rendered and "name: demo-web" in rendered
    kube.helm("install", "demo", chart, "--namespace", ns, "--set", "replicas=1", "--set", f"image={python_image()}",
              "--wait", "--timeout", "90s")
    releases = json.loads(kube.helm("list", "--namespace", ns, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in releases] == [("demo", "deployed")]
    pods = kube.wait_pods_ready(ns, "app.kubernetes.io/instance=demo", 1, timeout=30)
    assert http_get(f"http://{pods[0]['status']['podIP']}:8080/") == 200
    message = kube.kubectl_json("get", "configmap", "demo-message", "-n", ns)["data"]["message"]
    assert message == "hello from demo"
    kube.helm("uninstall", "demo", "--namespace", ns, "--wait", "--timeout", "60s")
    kube.wait_for(lambda: not kube.kubectl_json("get", "deployments,configmaps", "-n", ns,
                                                "-l", "app.kubernetes.io/instance=demo")["items"],
                  30, 0.3, "helm uninstall to remove the release's objects")


# The probe script prints what the pod sees as JSON; the test checks each emulated feature.
REPORT_SCRIPT = r"""
import json, os, sys, urllib.request
def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        return f"ERROR {e}"
counter_file = sys.argv[1] + "/runs"
runs = int(read(counter_file)) + 1 if os.path.exists(counter_file) else 1
with open(counter_file, "w") as f:
    f.write(str(runs))
try:
    web = urllib.request.urlopen(sys.argv[2], timeout=5).status
except Exception as e:
    web = repr(e)
print(json.dumps({
    "argv": sys.argv[1:], "runs": runs, "web": web,
    "env": {k: os.environ.get(k) for k in ("LITERAL", "EXPANDED", "FROM_SECRET", "FROM_CONFIGMAP",
                                          "POD_NAME", "POD_NAMESPACE", "POD_IP", "CONFIG_PATH", "WEB_URL",
                                          "PREFIX_color", "HOSTNAME")},
    "secret_file": read("/etc/demo/secret/password".replace("/etc/demo/secret", os.environ["SECRET_DIR"])),
    "config_file": read(os.environ["CONFIG_PATH"]),
    "scratch_is_dir": os.path.isdir(sys.argv[3]),
}), flush=True)
"""


@pytest.mark.timeout(120)
def test_pod_env_volumes_pvc_and_service_names(kube, kube_namespace):
    """Env sources, Secret/ConfigMap/emptyDir/PVC volumes, a Service reached by its DNS name."""
    ns = kube_namespace
    kube.apply([
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
         "data": {"password": base64.b64encode(b"s3cret").decode()}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
         "data": {"color": "blue", "app.yaml": "answer: 42\n"}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
         "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
         "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}},
        http_server_deployment("web", 1),
    ], ns)
    kube.wait_pods_ready(ns, "app=web", 1, timeout=60)
    kube.wait_for(lambda: kube.kubectl_json("get", "pvc", "data", "-n", ns)["status"].get("phase") == "Bound",
                  30, 0.3, "the claim to be bound to the suite's hostPath volume")

    def reporter(name: str) -> dict:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "report", "image": python_image(),
                "command": ["python", "-c", REPORT_SCRIPT],
                "args": ["/var/lib/demo", "http://web.$(POD_NAMESPACE).svc.cluster.local:80/", "/scratch"],
                "env": [
                    {"name": "LITERAL", "value": "plain"},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "EXPANDED", "value": "$(LITERAL)-$(POD_NAME)-$$(NOT_EXPANDED)"},
                    {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                    {"name": "FROM_CONFIGMAP", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "color"}}},
                    {"name": "CONFIG_PATH", "value": "/etc/demo/config/app.yaml"},
                    {"name": "SECRET_DIR", "value": "/etc/demo/secret"},
                    {"name": "WEB_URL", "value": "web:80"},
                ],
                "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "PREFIX_"}],
                "volumeMounts": [
                    {"name": "secret", "mountPath": "/etc/demo/secret", "readOnly": True},
                    {"name": "config", "mountPath": "/etc/demo/config"},
                    {"name": "data", "mountPath": "/var/lib/demo"},
                    {"name": "scratch", "mountPath": "/scratch"},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
            }],
            "volumes": [
                {"name": "secret", "secret": {"secretName": "creds"}},
                {"name": "config", "configMap": {"name": "settings"}},
                {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                {"name": "scratch", "emptyDir": {}},
                {"name": "tmp", "emptyDir": {}},
            ],
        }}

    def finished(name: str) -> dict:
        def done():
            pod = kube.kubectl_json("get", "pod", name, "-n", ns)
            return pod if pod["status"].get("phase") in ("Succeeded", "Failed") else None

        pod = kube.wait_for(done, 40, 0.3, f"pod {name} to finish")
        assert pod["status"]["phase"] == "Succeeded", (pod["status"], kube.pod_log(ns, name))
        return pod

    kube.apply(reporter("report-1"), ns)
    pod = finished("report-1")
    report = json.loads(kube.pod_log(ns, "report-1"))
    env = report["env"]
    assert env["LITERAL"] == "plain"
    assert env["EXPANDED"] == "plain-report-1-$(NOT_EXPANDED)"
    assert env["FROM_SECRET"] == "s3cret" and env["FROM_CONFIGMAP"] == "blue" and env["PREFIX_color"] == "blue"
    assert (env["POD_NAME"], env["POD_NAMESPACE"], env["HOSTNAME"]) == ("report-1", ns, "report-1")
    assert env["POD_IP"] == pod["status"]["podIP"] and env["POD_IP"].startswith("10.244.")
    assert report["secret_file"] == "s3cret"
    assert report["config_file"] == "answer: 42\n"
    assert report["scratch_is_dir"] is True
    # The Service by its DNS name (CoreDNS), through its ClusterIP (kube-proxy) to the pod's targetPort.
    assert report["argv"][1] == f"http://web.{ns}.svc.cluster.local:80/"
    assert env["WEB_URL"] == "web:80"
    assert report["web"] == 200
    assert report["runs"] == 1

    # The claim's data outlives the pod: a second pod on the same claim sees the first one's file.
    kube.kubectl("delete", "pod", "report-1", "-n", ns)
    kube.apply(reporter("report-2"), ns)
    finished("report-2")
    assert json.loads(kube.pod_log(ns, "report-2"))["runs"] == 2



@pytest.mark.timeout(90)
def test_probes_grpc_tcp_and_graceful_deletion(kube, kube_namespace):
    ns = kube_namespace
    kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probed"}, "spec": {
        "terminationGracePeriodSeconds": 10,
        "containers": [{
            "name": "grpc", "image": python_image(),
            # --not-serving-for: the health service answers NOT_SERVING first, so Ready must wait.
            "command": ["python", GRPC_SERVER, "--port", "50051", "--not-serving-for", "2"],
            "readinessProbe": {"grpc": {"port": 50051}, "periodSeconds": 1},
            "livenessProbe": {"tcpSocket": {"port": 50051}, "periodSeconds": 1, "initialDelaySeconds": 1},
        }],
    }}, ns)
    started = time.monotonic()
    pod = kube.wait_for(lambda: (lambda p: p if kube.pod_ready(p) else None)(
        kube.kubectl_json("get", "pod", "probed", "-n", ns)), 40, 0.2, "gRPC readiness")
    assert time.monotonic() - started >= 1.5, "Ready before the health service said SERVING"
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
    assert "serving" in kube.pod_log(ns, "probed")
    assert "serving" in kube.kubectl("logs", "-n", ns, "probed", "-c", "grpc").stdout

    # Deletion: SIGTERM reaches the process (it logs it and exits), then the object goes away.
    # The log is read from the node's file while the pod terminates (it goes with the pod).
    uid = pod["metadata"]["uid"]
    kube.kubectl("delete", "pod", "probed", "-n", ns, "--wait=false")
    if kube.node is not None:  # the kubelet's podLogsDir
        log_file = kube.node.state_dir / "kubelet" / "pod-logs" / f"{ns}_probed_{uid}" / "grpc" / "0.log"
        kube.wait_for(lambda: log_file.exists() and "got SIGTERM" in log_file.read_text(errors="replace"), 30, 0.1,
                      "the server to log SIGTERM")
    kube.wait_for(lambda: kube.kubectl("get", "pod", "probed", "-n", ns, check=False).returncode != 0, 40, 0.3,
                  "the pod to go")

    # A process that ignores SIGTERM is SIGKILLed when the grace period is over.
    kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stubborn"}, "spec": {
        "terminationGracePeriodSeconds": 2,
        "containers": [{"name": "main", "image": python_image(), "command": [
            "python", "-c", ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                             "print('ignoring SIGTERM', flush=True); time.sleep(3600)")]}]}}, ns)
    kube.wait_for(lambda: "ignoring SIGTERM" in kube.pod_log(ns, "stubborn"), 30, 0.2, "stubborn pod to start")
    started = time.monotonic()
    kube.kubectl("delete", "pod", "stubborn", "-n", ns, "--wait=true", timeout=40)
    took = time.monotonic() - started
    assert 1.8 <= took < 10, took


@pytest.mark.timeout(120)
def test_up_and_down_commands_run_a_cluster_a_person_can_use(kube, tmp_path):
    """`python -m tests.cluster up --no-node` starts a second, independent control plane and prints
    its kubeconfig; `down` stops every process of it. (No node: one real node per host, and the
    session's holds it; ``kube`` only makes sure the binaries are built.)"""
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, MORPHML_KUBE_STATE=str(tmp_path / "state"))
    up = subprocess.run([sys.executable, "-m", "tests.cluster", "up", "--no-node"], cwd=repo, env=env,
                        capture_output=True, text=True, timeout=90)
    try:
        assert up.returncode == 0, up.stderr
        kubeconfig = up.stdout.strip()
        assert kubeconfig != kube.kubeconfig and Path(kubeconfig).exists()
        namespaces = subprocess.run([kube.kubectl_path, f"--kubeconfig={kubeconfig}", "get", "namespaces", "-o",
                                     "json"], capture_output=True, text=True, timeout=30, check=True)
        assert "kube-system" in {n["metadata"]["name"] for n in json.loads(namespaces.stdout)["items"]}
        kube.wait_for(lambda: subprocess.run([kube.kubectl_path, f"--kubeconfig={kubeconfig}", "get", "serviceaccount",
                                              "default", "-n", "default"], capture_output=True, timeout=30
                                             ).returncode == 0, 30, 0.3, "the second plane's controllers")
        serve_pid = int((tmp_path / "state" / "pid").read_text())
    finally:
        down = subprocess.run([sys.executable, "-m", "tests.cluster", "down"], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(serve_pid, 0)
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "state")], capture_output=True, text=True)
    assert leftovers.stdout == "", f"processes of the stopped cluster still run: {leftovers.stdout}"


@pytest.mark.timeout(60)
def test_components_die_with_a_test_process_killed_before_its_teardown(tmp_path):
    """A run killed with SIGKILL cannot stop what it started: the kernel must (parent-death signal)."""
    import os
    import signal
    import subprocess

    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from tests.cluster.controlplane import Component\n"
        "c = Component('sleeper', ['sleep', '300'], Path(sys.argv[1]))\n"
        "print(c.proc.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    root = Path(__file__).resolve().parents[2]
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "sleeper.log")], cwd=root,
                              stdout=subprocess.PIPE, text=True)
    child = None
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 5  # setpriv execs the component: same pid, its own command line
        while Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":
            assert time.monotonic() < deadline, "the component never started"
            time.sleep(0.02)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{child}/stat").read_text().split()[2]
            except FileNotFoundError:
                break
            if state == "Z":  # killed, waiting for init to reap it
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"component {child} outlived the killed test process")
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None:
            try:
                os.killpg(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
