"""Start and stop a real Kubernetes control plane on loopback for the cluster test tier.

What lives here: ``ControlPlane`` (etcd, kube-apiserver, kube-controller-manager and
kube-scheduler, each a child process in its own process group with its log in a file)
and the kubeconfigs it writes. Its node is ``tests.cluster.node.RealNode``, started on
top of it.

Imports: the standard library, ``tests.cluster.build`` and ``tests.cluster.pki``
(relative imports, so this works both as ``tests.cluster`` from ``python -m``
and as pytest's rootdir-relative package).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from . import build, pki

NODE_NAME = "morphml-node-0"
SERVICE_CIDR = "10.96.0.0/16"  # blackholed on the host: only kube-proxy's DNAT (real node) gets a packet through
POD_CIDR = "10.244.0.0/16"  # the real node's pods (tests/cluster/node.py); blackholed beyond its bridge's /24


def host_ipv4() -> str | None:
    """The host's first global IPv4 address (the API server's advertised address, the real node's
    InternalIP), or None on a machine with only loopback."""
    try:
        out = subprocess.run(["ip", "-j", "-4", "addr", "show", "scope", "global"], capture_output=True,
                             text=True, timeout=10).stdout
        links = json.loads(out or "[]")
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    for link in links:
        if link.get("ifname", "").startswith(("mml-", "cni", "veth")):
            continue  # the node's own bridge and pod interfaces
        for addr in link.get("addr_info", []):
            if addr.get("family") == "inet":
                return addr["local"]
    return None


def _route_exists(cidr: str) -> bool:
    out = subprocess.run(["ip", "route", "show", "type", "blackhole", cidr], capture_output=True, text=True).stdout
    return bool(out.strip())


def add_blackhole_routes() -> list[str]:
    """Blackhole the service and pod ranges so that a packet to a ClusterIP that nothing DNATs, or
    to a pod address that is not on the node's bridge, is dropped here instead of following the
    default route off the machine (where something answered HTTP 404 in a trial). Root only;
    returns the routes added (the caller deletes those, and only those, at stop)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return []
    added = []
    for cidr in (SERVICE_CIDR, POD_CIDR):
        if not _route_exists(cidr) and subprocess.run(["ip", "route", "add", "blackhole", cidr],
                                                      capture_output=True).returncode == 0:
            added.append(cidr)
    return added


def delete_blackhole_routes(cidrs: list[str]) -> None:
    for cidr in cidrs:
        subprocess.run(["ip", "route", "del", "blackhole", cidr], capture_output=True)


class ControlPlaneError(RuntimeError):
    """A component did not start; the message carries the tail of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def write_kubeconfig(path: Path, server: str, ca: Path, cert: Path | None = None, key: Path | None = None,
                     token: str | None = None, user: str = "admin", namespace: str = "default") -> Path:
    """A kubeconfig with one cluster/user/context; certificates are embedded by path."""
    user_entry: dict = {}
    if cert and key:
        user_entry = {"client-certificate": str(cert), "client-key": str(key)}
    if token:
        user_entry = {"token": token}
    config = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "morphml-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": user_entry}],
        "contexts": [{"name": "morphml-test", "context": {"cluster": "morphml-test", "user": user,
                                                           "namespace": namespace}}],
        "current-context": "morphml-test",
    }
    path.write_text(json.dumps(config, indent=1))  # JSON is valid YAML; no PyYAML needed here
    path.chmod(0o600)
    return path


# setpriv (util-linux, on every Debian) sets the parent-death signal and execs the component: the
# kernel sends it SIGKILL when the test process that started it dies. A run killed with SIGKILL (or
# by a timeout) cannot run its teardown, and its etcd, apiserver, kubelet ... would otherwise live
# on, orphaned, into the next run. (Not a preexec_fn: unsafe in a process with threads.)
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


class Component:
    """One child process in its own process group, its output in ``log``; it dies with the thread
    that started it (``DIE_WITH_PARENT``), so components are started from the main thread."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None):
        self.name, self.argv, self.log = name, argv, log
        self._log_file = open(log, "ab")
        self.proc = subprocess.Popen([*DIE_WITH_PARENT, *argv], stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=env)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise ControlPlaneError(f"{self.name} exited with code {self.proc.returncode}; "
                                    f"last lines of {self.log}:\n{tail(self.log)}")

    def stop(self, grace: float = 5.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # the group may hold children even after the leader exited
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log_file.close()


class ControlPlane:
    """etcd + kube-apiserver + controllers + scheduler; the node (tests/cluster/node.py) registers later.

    Attributes once ``start()`` returned: ``kubeconfig`` (admin, system:masters),
    ``server`` (https URL), ``bin_dir`` (kubectl, helm, ...), ``workdir``,
    ``logs`` (component name -> log path).
    """

    def __init__(self, workdir: Path | None = None, bin_dir: Path | None = None, node_name: str = NODE_NAME):
        self.blackholes: list[str] = []
        self.advertise_address: str | None = None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="morphml-kube-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bin_dir = bin_dir
        self.node_name = node_name
        self.components: list[Component] = []
        self.logs: dict[str, Path] = {}
        self.kubeconfig: Path | None = None
        self.server = ""
        self.timings: dict[str, float] = {}

    # -- helpers ---------------------------------------------------------------------------------
    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> Component:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        component = Component(name, argv, log, env)
        self.components.append(component)
        self.logs[name] = log
        return component

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki["ca.crt"]))
        ctx.load_cert_chain(str(self.pki["admin.crt"]), str(self.pki["admin.key"]))
        return ctx

    def api_get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET against the API server as admin; returns (status, body) without raising on HTTP errors."""
        try:
            with urllib.request.urlopen(self.server + path, context=self._ssl_context(), timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def _wait(self, what: str, ready, component: Component | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if component is not None:
                component.check_alive()
            try:
                if ready():
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        detail = f"; last lines of {component.log}:\n{tail(component.log)}" if component else ""
        raise ControlPlaneError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")

    # -- start / stop ----------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> ControlPlane:
        started = time.monotonic()
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        self.timings["start_seconds"] = time.monotonic() - started
        return self

    def _start(self, timeout: float) -> None:
        if self.bin_dir is None:
            self.bin_dir = build.ensure_built()
        t0 = time.monotonic()
        self.pki = pki.generate(self.workdir / "pki")
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        etcd = self._spawn("etcd", [
            self._bin("etcd"), "--name=default", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
            "--log-level=warn", "--unsafe-no-fsync",  # a throwaway store: durability is not needed
            "--quota-backend-bytes=2147483648",
        ])

        def etcd_ready() -> bool:
            with urllib.request.urlopen(etcd_url + "/health", timeout=2) as resp:
                return json.loads(resp.read()).get("health") == "true"

        self._wait("etcd /health", etcd_ready, etcd, 30)
        self.timings["etcd_seconds"] = time.monotonic() - t0

        p = self.pki
        self.server = f"https://127.0.0.1:{api_port}"
        self.blackholes = add_blackhole_routes()
        # Pods reach the API server through the 'kubernetes' Service, whose endpoint is the
        # advertised address: that must be a real address of this host (Endpoints refuse
        # loopback), so listen on all addresses and advertise the first global one.
        self.advertise_address = host_ipv4()
        if self.advertise_address:
            addresses = ["--bind-address=0.0.0.0", f"--advertise-address={self.advertise_address}"]
        else:  # loopback only: no endpoint for the 'kubernetes' Service (in-cluster clients get a kubeconfig)
            addresses = ["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none"]
        apiserver = self._spawn("kube-apiserver", [
            self._bin("kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            *addresses, f"--secure-port={api_port}",
            f"--tls-cert-file={p['apiserver.crt']}", f"--tls-private-key-file={p['apiserver.key']}",
            f"--client-ca-file={p['ca.crt']}",
            f"--kubelet-client-certificate={p['kubelet-client.crt']}",
            f"--kubelet-client-key={p['kubelet-client.key']}",
            f"--service-account-key-file={p['sa.pub']}",
            f"--service-account-signing-key-file={p['sa.key']}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            # The node's Hostname address does not resolve; reach its log endpoint on 127.0.0.1.
            "--kubelet-preferred-address-types=InternalIP",
            "--profiling=false", "--v=1",
        ])

        def apiserver_ready() -> bool:
            return self.api_get("/readyz", timeout=3)[0] == 200

        self._wait("kube-apiserver /readyz", apiserver_ready, apiserver, timeout)
        self.timings["apiserver_seconds"] = time.monotonic() - t0

        kubeconfigs = self.workdir / "kubeconfig"
        kubeconfigs.mkdir(exist_ok=True)
        self.kubeconfig = write_kubeconfig(kubeconfigs / "admin.yaml", self.server, p["ca.crt"],
                                           p["admin.crt"], p["admin.key"], user="admin")
        kcm_config = write_kubeconfig(kubeconfigs / "controller-manager.yaml", self.server, p["ca.crt"],
                                      p["controller-manager.crt"], p["controller-manager.key"],
                                      user="system:kube-controller-manager")
        scheduler_config = write_kubeconfig(kubeconfigs / "scheduler.yaml", self.server, p["ca.crt"],
                                            p["scheduler.crt"], p["scheduler.key"], user="system:kube-scheduler")
        self._spawn("kube-controller-manager", [
            self._bin("kube-controller-manager"), f"--kubeconfig={kcm_config}",
            f"--authentication-kubeconfig={kcm_config}", f"--authorization-kubeconfig={kcm_config}",
            "--secure-port=0", "--leader-elect=false",
            # Every default controller (Deployments -> ReplicaSets -> Pods, garbage collector,
            # service-account and token controllers, node lifecycle, endpoints...).
            "--controllers=*",
            f"--service-account-private-key-file={p['sa.key']}", f"--root-ca-file={p['ca.crt']}",
            "--use-service-account-credentials=true",
            f"--cluster-signing-cert-file={p['ca.crt']}", f"--cluster-signing-key-file={p['ca.key']}",
            # Two shared cores: small worker pools, quick reaction to a silent node.
            "--concurrent-deployment-syncs=2", "--concurrent-replicaset-syncs=2",
            "--concurrent-gc-syncs=5", "--concurrent-service-endpoint-syncs=2",
            "--concurrent-serviceaccount-token-syncs=2", "--concurrent-namespace-syncs=2",
            "--node-monitor-period=2s", "--node-monitor-grace-period=40s",
            "--kube-api-qps=100", "--kube-api-burst=200",
            "--profiling=false", "--v=1",
        ])
        self._spawn("kube-scheduler", [
            self._bin("kube-scheduler"), f"--kubeconfig={scheduler_config}",
            f"--authentication-kubeconfig={scheduler_config}", f"--authorization-kubeconfig={scheduler_config}",
            "--secure-port=0", "--leader-elect=false", "--profiling=false", "--v=1",
        ])
        self._wait_default_service_account(timeout)
        self.timings["ready_seconds"] = time.monotonic() - t0

    def _wait_default_service_account(self, timeout: float) -> None:
        def default_service_account() -> bool:
            return self.api_get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200

        # Pods are refused until the service-account controller made 'default'.
        self._wait("ServiceAccount default/default", default_service_account, self.components[2], timeout)
        for component in self.components:
            component.check_alive()

    def stop(self) -> None:
        for component in reversed(self.components):
            component.stop()
        self.components.clear()
        delete_blackhole_routes(self.blackholes)
        self.blackholes = []

    def check_alive(self) -> None:
        for component in self.components:
            component.check_alive()

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(f"----- {name} ({path}) -----\n{tail(path, lines)}" for name, path in self.logs.items())

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
