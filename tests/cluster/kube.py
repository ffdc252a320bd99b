"""``Kube``: what a cluster-tier test holds to talk to the cluster (the ``kube`` fixture's value).

What lives here: kubectl / helm runners bound to the test kubeconfig, the Python
``kubernetes`` client objects, wait helpers, pod logs (``kubectl logs``) and
``ExistingCluster`` for ``MORPHML_TEST_KUBECONFIG``.

Imports: the standard library; ``kubernetes`` lazily (first use of ``api``/``core``...).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any


class WaitTimeout(AssertionError):
    """A wait_for condition did not hold in time (an AssertionError so pytest shows it as a failure)."""


class ExistingCluster:
    """A cluster the suite did not start (``MORPHML_TEST_KUBECONFIG``): nothing to stop, no node of ours."""

    def __init__(self, kubeconfig: str, bin_dir: Path):
        self.kubeconfig = Path(kubeconfig)
        self.bin_dir = bin_dir
        self.logs: dict[str, Path] = {}
        self.node_name = None
        self.timings: dict[str, float] = {}

    def stop(self) -> None:
        pass

    def check_alive(self) -> None:
        pass

    def log_tails(self, lines: int = 30) -> str:
        return "(existing cluster: component logs are not collected by the suite)"


class Kube:
    """Handle on the test cluster; see tests/cluster/conftest.py for how tests get one."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.kubeconfig = str(cluster.kubeconfig)
        self.bin_dir = Path(cluster.bin_dir)
        self.kubectl_path = str(self.bin_dir / "kubectl")
        self.helm_path = str(self.bin_dir / "helm")
        self.node_name = cluster.node_name
        #: The suite's ``RealNode`` (set by the ``kube`` fixture); None on an existing cluster.
        self.node: Any = None
        #: The suite's hostPath volume binder (``tests.cluster.provisioner``); None on an existing cluster.
        self.binder: Any = None
        self._api = None

    # -- subprocess environment ------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG (for an operator or any tool the test starts), kubectl/helm on PATH."""
        env = dict(os.environ)
        env["KUBECONFIG"] = self.kubeconfig
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("HELM_CACHE_HOME", str(Path(self.kubeconfig).parent / "helm-cache"))
        env.setdefault("HELM_CONFIG_HOME", str(Path(self.kubeconfig).parent / "helm-config"))
        env.setdefault("HELM_DATA_HOME", str(Path(self.kubeconfig).parent / "helm-data"))
        return env

    def _run(self, argv: list[str], input: str | None, check: bool, timeout: float) -> subprocess.CompletedProcess:
        done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {done.returncode}\nstdout:\n{done.stdout}\n"
                                 f"stderr:\n{done.stderr}")
        return done

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess:
        """Run kubectl with the test kubeconfig; raises AssertionError with its output if it fails and check."""
        return self._run([self.kubectl_path, f"--kubeconfig={self.kubeconfig}", *args], input, check, timeout)

    def kubectl_json(self, *args: str, timeout: float = 60):
        return json.loads(self.kubectl(*args, "-o", "json", timeout=timeout).stdout)

    def apply(self, manifest, namespace: str | None = None) -> subprocess.CompletedProcess:
        """kubectl apply of a dict, a list of dicts, or YAML/JSON text."""
        if isinstance(manifest, list):
            manifest = {"apiVersion": "v1", "kind": "List", "items": manifest}
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        ns = [f"--namespace={namespace}"] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", input=text)

    def helm(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        return self._run([self.helm_path, f"--kubeconfig={self.kubeconfig}", *args], None, check, timeout)

    # -- Python client ---------------------------------------------------------------------------
    @property
    def api(self):
        """kubernetes.client.ApiClient for the test kubeconfig (admin)."""
        if self._api is None:
            from kubernetes import config

            self._api = config.new_client_from_config(config_file=self.kubeconfig)
        return self._api

    @property
    def core(self):
        from kubernetes import client

        return client.CoreV1Api(self.api)

    @property
    def apps(self):
        from kubernetes import client

        return client.AppsV1Api(self.api)

    @property
    def rbac(self):
        from kubernetes import client

        return client.RbacAuthorizationV1Api(self.api)

    @property
    def custom(self):
        from kubernetes import client

        return client.CustomObjectsApi(self.api)

    def client_with_token(self, token: str):
        """An ApiClient that authenticates with a bearer token only (e.g. a ServiceAccount's)."""
        from kubernetes import client

        base = self.api.configuration
        conf = client.Configuration()
        conf.host = base.host
        conf.ssl_ca_cert = base.ssl_ca_cert
        conf.verify_ssl = base.verify_ssl
        conf.api_key = {"authorization": f"Bearer {token}"}
        return client.ApiClient(conf)

    # -- waiting ---------------------------------------------------------------------------------
    @staticmethod
    def wait_for(predicate, timeout: float = 60, interval: float = 0.2, message: str = "condition"):
        """Poll ``predicate()`` until it returns something truthy; return that value.

        Raises WaitTimeout naming ``message`` and the last value / exception seen.
        """
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                last = predicate()
                if last:
                    return last
            except Exception as exc:  # keep polling through transient API errors
                last = exc
            if time.monotonic() > deadline:
                raise WaitTimeout(f"timed out after {timeout:g} s waiting for {message}; last: {last!r}")
            time.sleep(interval)

    def pods(self, namespace: str, selector: str = "") -> list[dict]:
        args = ["get", "pods", "-n", namespace] + (["-l", selector] if selector else [])
        return self.kubectl_json(*args)["items"]

    @staticmethod
    def pod_ready(pod: dict) -> bool:
        if pod["metadata"].get("deletionTimestamp") or pod.get("status", {}).get("phase") != "Running":
            return False
        return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))

    def wait_pods_ready(self, namespace: str, selector: str, count: int, timeout: float = 60) -> list[dict]:
        """Wait until exactly ``count`` non-terminating pods match and all are Running and Ready."""
        def ready():
            pods = [p for p in self.pods(namespace, selector) if not p["metadata"].get("deletionTimestamp")]
            return pods if len(pods) == count and all(self.pod_ready(p) for p in pods) else None

        return self.wait_for(ready, timeout, 0.3, f"{count} ready pods {selector!r} in {namespace}")

    # -- logs ------------------------------------------------------------------------------------
    def pod_log(self, namespace: str, name: str, container: str | None = None, previous: bool = False) -> str:
        """The container's output (current run, or the one before with previous=True), from ``kubectl logs``."""
        args = ["logs", "-n", namespace, name] + (["-c", container] if container else []) + \
            (["--previous"] if previous else [])
        return self.kubectl(*args, check=False).stdout

    def namespace_logs(self, namespace: str, lines: int = 40) -> str:
        """Tails of every container log (and of the run before, when it restarted) of the pods in ``namespace``."""
        out = []
        try:
            pods = self.pods(namespace)
        except AssertionError:
            return ""
        for pod in pods:
            name = pod["metadata"]["name"]
            for status in (pod.get("status") or {}).get("containerStatuses") or []:
                runs = [False] + ([True] if status.get("restartCount") else [])
                for previous in runs:
                    args = ["logs", "-n", namespace, name, "-c", status["name"], f"--tail={lines}"]
                    text = self.kubectl(*args, *(["--previous"] if previous else []), check=False, timeout=20).stdout
                    label = "previous run" if previous else "log"
                    out.append(f"----- pod {name} container {status['name']} {label} -----\n{text}")
        return "\n".join(out)
