"""A real Kubernetes node for the cluster tier: containerd + kubelet + CNI + kube-proxy + CoreDNS +
a NetworkPolicy enforcer, on this machine, registered with the suite's control plane.

What lives here:

- ``RealNode``: starts, on top of a started ``ControlPlane`` (one without the process node):
  containerd (private root, state dir and socket, runc, the CRI plugin with the suite's pause
  image as sandbox image, ``restrict_oom_score_adj``, a private CNI config dir), the kubelet
  (cgroupfs driver, ``failCgroupV1: false``, webhook authentication, its own certificates signed
  by the test CA), the CNI bridge + host-local + portmap plugins on bridge ``mml-cni0`` (pod
  subnet 10.244.0.0/24), kube-proxy in iptables mode, kube-router's NetworkPolicy controller
  only (iptables + ipset), CoreDNS as a pod behind the ``kube-dns`` Service 10.96.0.10, and the
  one stand-in: ``nvidia.com/gpu`` advertised on the node's capacity (the documented node-status
  patch for extended resources; no device exists).
- ``build_images``: the small images the node needs (pause, testbox, coredns), each ``buildah from
  scratch`` + one static binary, pushed to an OCI archive cached by the binary's hash.
- ``teardown_host``: undoes everything the node changed on the host (processes, mounts, network
  namespaces, the bridge, iptables chains, ipsets, nfacct counters, cgroups, sysctls, files outside
  the private dirs). It runs at stop, and at start to clean what a killed run left; what the
  host looked like before the first start is recorded in ``/run/morphml-node/host.json``.
- ``host_leftovers``: what of the node is still on the host (the teardown test and the start check).

Everything is on this machine: pods reach each other over the bridge, Services through kube-proxy's
DNAT, the API server on the node address; a FORWARD rule drops anything a pod sends that would
leave through another interface, and the control plane blackholes the pod and service ranges.

Imports: the standard library, ``cryptography`` (via pki's helpers), this package's modules
(relative imports).
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import build, hostdeps
from .controlplane import (
    POD_CIDR,
    SERVICE_CIDR,
    Component,
    ControlPlane,
    ControlPlaneError,
    free_port,
    host_ipv4,
    tail,
    write_kubeconfig,
)

NODE_NAME = "morphml-real-node-0"
NODE_POD_SUBNET = "10.244.0.0/24"
CLUSTER_DNS_IP = "10.96.0.10"
BRIDGE = "mml-cni0"
CNI_NETWORK = "morphml-pods"
CNI_BIN_DIR = "/usr/lib/cni"
GPUS = 8
IMAGE_REPO = "morphml.test"
#: Our own filter chain (jumped to from FORWARD): pods cannot send anything off the bridge.
EGRESS_CHAIN = "MORPHML-NODE-EGRESS"

HOST_RECORD_DIR = Path("/run/morphml-node")
HOST_RECORD = HOST_RECORD_DIR / "host.json"
#: Held (flock) while a node runs: one node per host (the bridge, the chains and the cgroups are
#: global), so a second test session waits here instead of tearing the first one's node down.
NODE_LOCK = HOST_RECORD_DIR / "node.lock"

#: Sysctls the kubelet (setupKernelTunables), the bridge plugin, kube-proxy and kube-router may set.
SYSCTLS = (
    "vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes", "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding", "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables",
    "net.netfilter.nf_conntrack_max", "net.ipv4.conf.all.rp_filter",
)
#: Paths outside the private dirs that containerd, the kubelet and CNI write to (hard-coded there).
#: Removed at teardown if they did not exist before the first start; otherwise only ``OWN_SUBPATHS``.
OUTSIDE_PATHS = ("/run/containerd", "/var/lib/kubelet", "/var/lib/cni", "/var/log/containers", "/var/log/pods",
                 "/run/netns", "/var/run/netns", "/etc/cni", "/opt/cni")
OWN_SUBPATHS = ("/var/lib/kubelet/device-plugins", "/var/lib/kubelet/pki", "/run/containerd/runc/k8s.io",
                "/run/containerd/s", "/var/lib/cni/results", f"/var/lib/cni/networks/{CNI_NETWORK}")
OUR_CHAIN = re.compile(r"^(KUBE-|CNI-|KUBE-ROUTER-|MORPHML-)")
OUR_IPSET = re.compile(r"^(inet6:)?(KUBE-|kube-router-)")
NFACCT_COUNTERS = ("ct_state_invalid_dropped_pkts", "localhost_nps_accepted_pkts")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_NAME = "kubepods"
PROCESS_NAMES = ("kubelet", "containerd", "containerd-shim", "containerd-shim-runc-v2", "kube-proxy",
                 "kube-router", "coredns")


class NodeError(RuntimeError):
    """The node did not start or could not be cleaned; the message says which part and why."""


def _run(argv: list[str], check: bool = True, timeout: float = 60, input: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise NodeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return done


# -- host state: record, leftovers, teardown ------------------------------------------------------

def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls() -> dict[str, str]:
    values: dict[str, str] = {}
    for name in SYSCTLS:
        try:
            values[name] = _sysctl_path(name).read_text().strip()
        except OSError:
            pass  # not on this kernel (or its module is not loaded)
    return values


def _record_host(state_dir: Path) -> dict[str, Any]:
    """Write what the host looks like now (before any node part ran) unless a record is already there.

    An existing record belongs to a run that did not finish its teardown: it holds the true
    original values, so it is kept (``teardown_host`` at start consumes it first).
    """
    HOST_RECORD_DIR.mkdir(parents=True, exist_ok=True)
    if HOST_RECORD.exists():
        record: dict[str, Any] = json.loads(HOST_RECORD.read_text())
    else:
        record = {"sysctls": read_sysctls(),
                  "existing": [p for p in OUTSIDE_PATHS + OWN_SUBPATHS if os.path.lexists(p)],
                  "state_dirs": []}
    if str(state_dir) not in record["state_dirs"]:
        record["state_dirs"].append(str(state_dir))
    HOST_RECORD.write_text(json.dumps(record, indent=1))
    return record


def load_record() -> dict[str, Any] | None:
    """The host record of the node that is running (or was killed), None if there is none."""
    if not HOST_RECORD.exists():
        return None
    record: dict[str, Any] = json.loads(HOST_RECORD.read_text())
    return record


def _mounts() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point))
    return points


def _our_mount(point: str, state_dirs: list[str]) -> bool:
    if any(point == d or point.startswith(d.rstrip("/") + "/") for d in state_dirs):
        return True
    return bool(re.match(r"^(/var)?/run/netns/cni-", point) or point.startswith(("/run/containerd/",
                                                                                "/var/lib/kubelet/")))


def _cgroup_dirs() -> list[Path]:
    """Every ``kubepods`` cgroup directory, in all hierarchies (v1 controllers and the unified one)."""
    found = []
    if CGROUP_ROOT.is_dir():
        for hierarchy in CGROUP_ROOT.iterdir():
            candidate = hierarchy / CGROUP_NAME
            if candidate.is_dir():
                found.append(candidate)
        if (CGROUP_ROOT / CGROUP_NAME).is_dir():  # a pure cgroup v2 host
            found.append(CGROUP_ROOT / CGROUP_NAME)
    return found


def _node_pids(state_dirs: list[str]) -> list[int]:
    """Processes of the node: in a kubepods cgroup (containers), or one of the node's programs."""
    pids: set[int] = set()
    for directory in _cgroup_dirs():
        # os.walk, not rglob: cgroups of exiting containers vanish while we look (walk skips those)
        for root, _dirs, files in os.walk(directory):
            if "cgroup.procs" in files:
                try:
                    pids.update(int(p) for p in Path(root, "cgroup.procs").read_text().split())
                except (OSError, ValueError):
                    pass
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if os.path.basename(argv0) in PROCESS_NAMES and _ours(entry, state_dirs):
            pids.add(int(entry.name))
    pids.discard(os.getpid())
    return sorted(pids)


def _ours(proc: Path, state_dirs: list[str]) -> bool:
    """A containerd/kubelet/... process is the node's only when its command line names one of the
    node's state dirs (configs, sockets) or the node's name: a containerd or kubelet the machine
    runs for itself (Docker's, a real node's) is never touched."""
    try:
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return NODE_NAME in cmdline or any(d and d.rstrip("/") + "/" in cmdline for d in state_dirs)


def _iptables_chains() -> dict[str, list[str]]:
    """``{"iptables:<table>": [our chains]}`` for IPv4 and IPv6."""
    found: dict[str, list[str]] = {}
    for tool in ("iptables", "ip6tables"):
        if shutil.which(f"{tool}-save") is None:
            continue
        dump = _run([f"{tool}-save"], check=False).stdout
        table = ""
        for line in dump.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":"):
                chain = line[1:].split()[0]
                if OUR_CHAIN.match(chain):
                    found.setdefault(f"{tool}:{table}", []).append(chain)
    return found


def _ipsets() -> list[str]:
    if shutil.which("ipset") is None:
        return []
    return [n for n in _run(["ipset", "list", "-n"], check=False).stdout.split() if OUR_IPSET.match(n)]


def _nfacct() -> list[str]:
    if shutil.which("nfacct") is None:
        return []
    listing = _run(["nfacct", "list"], check=False).stdout
    return [n for n in NFACCT_COUNTERS if f"= {n};" in listing or f" {n} " in listing or f"{n};" in listing]


def _bridges() -> list[str]:
    names = [p.name for p in Path("/sys/class/net").iterdir()]
    return [n for n in names if n == BRIDGE or n.startswith(("cni", "kube-"))]


def _netns() -> list[str]:
    found = []
    for directory in ("/run/netns", "/var/run/netns"):
        if os.path.isdir(directory):
            found += [os.path.join(directory, n) for n in os.listdir(directory) if n.startswith("cni-")]
    return sorted({os.path.realpath(p) for p in found})


def host_leftovers(record: dict[str, Any] | None = None) -> dict[str, Any]:
    """What of a node is on the host now (empty dict: nothing). Keys name the kind of leftover."""
    if record is None:
        record = load_record()
    state_dirs = (record or {}).get("state_dirs", [])
    leftovers: dict[str, Any] = {
        "processes": [f"{pid} {_cmdline(pid)}" for pid in _node_pids(state_dirs)],
        "mounts": [m for m in _mounts() if _our_mount(m, state_dirs) or "/kubelet/" in m or "/containerd/" in m],
        "netns": _netns(),
        "bridges": _bridges(),
        "iptables": _iptables_chains(),
        "ipsets": _ipsets(),
        "nfacct": _nfacct(),
        "cgroups": [str(d) for d in _cgroup_dirs()],
    }
    existing = set((record or {}).get("existing", []))
    leftovers["paths"] = [p for p in OUTSIDE_PATHS + OWN_SUBPATHS
                          if os.path.lexists(p) and p not in existing and record is not None
                          and not any(p.startswith(e + "/") for e in existing if e in OWN_SUBPATHS)]
    if record is not None:
        before = record.get("sysctls", {})
        now = read_sysctls()
        leftovers["sysctls"] = {k: (before[k], now.get(k)) for k in before if now.get(k) != before[k]}
    return {k: v for k, v in leftovers.items() if v}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return "?"


def _kill_node_processes(deadline: float, state_dirs: list[str]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _node_pids(state_dirs)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        grace = time.monotonic() + (3 if sig == signal.SIGTERM else 10)
        while _node_pids(state_dirs) and time.monotonic() < min(grace, deadline):
            time.sleep(0.1)
        if not _node_pids(state_dirs):
            return


def _umount(point: str) -> None:
    # Lazy: a mount held by an exiting process must not block the teardown.
    subprocess.run(["umount", "-l", point], capture_output=True, stdin=subprocess.DEVNULL)


def _clean_iptables() -> None:
    for tool in ("iptables", "ip6tables"):
        if shutil.which(f"{tool}-save") is None:
            continue
        dump = _run([f"{tool}-save"], check=False).stdout
        table = ""
        rules: dict[str, list[str]] = {}
        chains: dict[str, list[str]] = {}
        for line in dump.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":"):
                chain = line[1:].split()[0]
                if OUR_CHAIN.match(chain):
                    chains.setdefault(table, []).append(chain)
            elif line.startswith("-A "):
                parts = line.split()
                chain = parts[1]
                target = parts[parts.index("-j") + 1] if "-j" in parts else (
                    parts[parts.index("-g") + 1] if "-g" in parts else "")
                if not OUR_CHAIN.match(chain) and OUR_CHAIN.match(target):
                    rules.setdefault(table, []).append(line)
        for table, lines in rules.items():  # jumps from the built-in chains into ours
            for line in lines:
                subprocess.run(f"{tool} -w -t {table} -D {line[3:]}", shell=True, capture_output=True)
        for table, names in chains.items():
            for name in names:
                _run([tool, "-w", "-t", table, "-F", name], check=False)
            for name in names:
                _run([tool, "-w", "-t", table, "-X", name], check=False)


def _rmdir_tree(directory: Path) -> None:
    """rmdir a cgroup tree bottom-up (cgroup dirs cannot be removed recursively in one go)."""
    for root, _dirs, _files in os.walk(directory, topdown=False):  # children first; vanished ones skipped
        try:
            os.rmdir(root)
        except OSError:
            pass
    try:
        directory.rmdir()
    except OSError:
        pass


def teardown_host(extra_state_dirs: list[Path] | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """Undo everything a node (this run's or a killed earlier one's) left on the host.

    Order matters: processes first (a live kubelet would recreate things), then mounts and network
    namespaces, network devices, iptables rules before the ipsets and nfacct counters they use,
    cgroups, files, sysctls last. Returns what is still left (empty when clean).
    """
    deadline = time.monotonic() + timeout
    record = load_record()
    state_dirs = list((record or {}).get("state_dirs", [])) + [str(d) for d in extra_state_dirs or []]
    _kill_node_processes(deadline, state_dirs)
    for point in sorted((m for m in _mounts() if _our_mount(m, state_dirs)), key=len, reverse=True):
        _umount(point)
    for path in _netns():
        _umount(path)
        try:
            os.unlink(path)
        except OSError:
            pass
    for name in _bridges():
        _run(["ip", "link", "delete", name], check=False)
    if shutil.which("iptables-save"):
        _clean_iptables()
    for name in _ipsets():
        _run(["ipset", "destroy", name], check=False)
    for name in _nfacct():
        _run(["nfacct", "delete", name], check=False)
    if shutil.which("conntrack"):  # entries of pod/service flows would outlive the node otherwise
        for cidr in (POD_CIDR, SERVICE_CIDR):
            _run(["conntrack", "-D", "-s", cidr], check=False)
            _run(["conntrack", "-D", "-d", cidr], check=False)
    for directory in _cgroup_dirs():
        _rmdir_tree(directory)
    existing = set((record or {}).get("existing", []))
    for path in OWN_SUBPATHS + OUTSIDE_PATHS:
        if record is None or path in existing or not os.path.lexists(path):
            continue
        if path in OUTSIDE_PATHS and any(e.startswith(path + "/") for e in existing):
            continue  # something that was there before lives inside
        if path in ("/run/netns", "/var/run/netns") and os.path.isdir(path) and os.listdir(path):
            continue  # network namespaces that are not ours
        if os.path.islink(path):
            os.unlink(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
    for logs in ("/var/log/containers",):  # the kubelet's symlinks into its pod log dir
        if os.path.isdir(logs):
            for entry in os.listdir(logs):
                target = os.path.realpath(os.path.join(logs, entry))
                if any(target.startswith(d) for d in state_dirs):
                    os.unlink(os.path.join(logs, entry))
    if record is not None:
        for name, value in record.get("sysctls", {}).items():
            try:
                if _sysctl_path(name).read_text().strip() != value:
                    _sysctl_path(name).write_text(value + "\n")
            except OSError:
                pass
    left = host_leftovers(record)
    if not left and record is not None:
        HOST_RECORD.unlink(missing_ok=True)
    return left


# -- certificates -----------------------------------------------------------------------------------

def _issue(directory: Path, stem: str, ca_crt: Path, ca_key: Path, cn: str, org: str | None,
           client: bool, server_ips: list[str] | None = None, dns: list[str] | None = None) -> tuple[Path, Path]:
    """A leaf certificate signed by the test CA (client and/or server usage)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    ca_private = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    now = datetime.datetime.now(datetime.UTC)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    if server_ips is not None:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (x509.CertificateBuilder().subject_name(x509.Name(attrs)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=7))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if server_ips is not None:
        import ipaddress

        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns or []]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_private, hashes.SHA256())  # type: ignore[arg-type]
    crt, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return crt, key_path


# -- images -----------------------------------------------------------------------------------------

SIGNATURE_POLICY = '{"default": [{"type": "insecureAcceptAnything"}]}\n'


def _buildah(store: Path, *args: str, timeout: float = 300) -> str:
    policy = store / "policy.json"
    if not policy.exists():
        store.mkdir(parents=True, exist_ok=True)
        policy.write_text(SIGNATURE_POLICY)
    argv = ["buildah", "--root", str(store / "root"), "--runroot", str(store / "runroot"),
            "--storage-driver", "vfs", *args]
    if args and args[0] in ("commit", "push"):
        argv[argv.index(args[0]) + 1:argv.index(args[0]) + 1] = ["--signature-policy", str(policy)]
    return _run(argv, timeout=timeout).stdout.strip()


def scratch_image(binary: Path, name: str, entrypoint: list[str], out_dir: Path) -> tuple[str, Path]:
    """``buildah from scratch`` + ``binary`` at ``/<its name>`` -> an OCI archive, cached by the binary's hash.

    Returns (image reference, archive path). The buildah store is private (under ``out_dir``)
    and emptied after each build, so nothing is left mounted or stored.
    """
    digest = hashlib.sha256(binary.read_bytes() + json.dumps(entrypoint).encode()).hexdigest()[:12]
    ref = f"{IMAGE_REPO}/{name}:{digest}"
    archive = out_dir / f"{name}-{digest}.oci.tar"
    if archive.exists():
        return ref, archive
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / "buildah"
    container = _buildah(store, "from", "--name", f"morphml-{name}-{os.getpid()}", "scratch")
    try:
        _buildah(store, "copy", "--chmod", "0755", container, str(binary), f"/{binary.name}")
        _buildah(store, "config", "--entrypoint", json.dumps(entrypoint), "--cmd", "", "--os", "linux",
                 "--arch", "amd64", container)
        _buildah(store, "commit", "--rm", container, ref)
        container = ""
        tmp = archive.with_suffix(".partial")
        tmp.unlink(missing_ok=True)
        _buildah(store, "push", ref, f"oci-archive:{tmp}:{ref}")
        tmp.rename(archive)
    finally:
        if container:
            _buildah(store, "rm", container)
        shutil.rmtree(store, ignore_errors=True)
    return ref, archive


def build_images(bin_dir: Path, addons_dir: Path) -> dict[str, tuple[str, Path]]:
    """The node's own images: ``pause`` (sandbox), ``testbox`` (test pods), ``coredns``."""
    hostdeps.ensure(["buildah"])
    out = build.cache_root() / "images"
    return {
        "pause": scratch_image(bin_dir / "pause", "pause", ["/pause"], out),
        "testbox": scratch_image(bin_dir / "testbox", "testbox", ["/testbox"], out),
        "coredns": scratch_image(addons_dir / "coredns", "coredns", ["/coredns"], out),
    }


# -- the node -----------------------------------------------------------------------------------------

COREDNS_MANIFEST = """
apiVersion: v1
kind: ServiceAccount
metadata: {{name: coredns, namespace: kube-system}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: "system:coredns"}}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: "system:coredns"}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}}
subjects: [{{kind: ServiceAccount, name: coredns, namespace: kube-system}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: coredns, namespace: kube-system}}
data:
  Corefile: |
    .:53 {{
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {{
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
            ttl 5
        }}
        cache 5
        loadbalance
    }}
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {{k8s-app: kube-dns}}
spec:
  clusterIP: {dns_ip}
  selector: {{k8s-app: kube-dns}}
  ports:
  - {{name: dns, port: 53, protocol: UDP, targetPort: 53}}
  - {{name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: coredns, namespace: kube-system, labels: {{k8s-app: kube-dns}}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{k8s-app: kube-dns}}}}
  template:
    metadata: {{labels: {{k8s-app: kube-dns}}}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      priorityClassName: system-cluster-critical
      containers:
      - name: coredns
        image: {image}
        imagePullPolicy: Never
        args: ["-conf", "/etc/coredns/Corefile"]
        ports:
        - {{containerPort: 53, name: dns, protocol: UDP}}
        - {{containerPort: 53, name: dns-tcp, protocol: TCP}}
        readinessProbe: {{httpGet: {{path: /ready, port: 8181}}, periodSeconds: 1}}
        livenessProbe: {{httpGet: {{path: /health, port: 8080}}, periodSeconds: 10}}
        resources: {{requests: {{cpu: 10m, memory: 32Mi}}, limits: {{memory: 128Mi}}}}
        securityContext: {{readOnlyRootFilesystem: true, allowPrivilegeEscalation: false}}
        volumeMounts: [{{name: config, mountPath: /etc/coredns, readOnly: true}}]
      volumes:
      - name: config
        configMap: {{name: coredns}}
"""


class RealNode:
    """containerd + kubelet + kube-proxy + kube-router + CoreDNS registered with ``plane``.

    After ``start()``: ``name``, ``ip`` (InternalIP), ``state_dir``, ``images`` (name -> reference,
    e.g. ``images["testbox"]``), ``logs`` (component -> log path), ``timings``,
    ``ctr(*args)`` (containerd's CLI in the CRI namespace), ``import_image(archive)``.
    """

    def __init__(self, plane: ControlPlane, state_dir: Path | None = None, name: str = NODE_NAME,
                 gpus: int = GPUS):
        if plane.kubeconfig is None or plane.bin_dir is None:
            raise NodeError("the control plane must be started before the node")
        self.plane = plane
        self.name = name
        self.gpus = gpus
        self.state_dir = Path(state_dir or plane.workdir / "realnode")
        self.ip = ""
        self.components: list[Component] = []
        self.logs: dict[str, Path] = {}
        self.images: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.socket = self.state_dir / "containerd" / "containerd.sock"
        self._lock_file: Any = None

    # -- helpers ---------------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Component:
        log = self.state_dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        component = Component(name, argv, log, env)
        self.components.append(component)
        self.logs[name] = log
        self.plane.logs[f"node/{name}"] = log
        return component

    def _wait(self, what: str, ready: Any, component: Component | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if component is not None and not component.alive():
                raise NodeError(f"{component.name} exited with code {component.proc.returncode} while waiting "
                                f"for {what}; last lines of {component.log}:\n{tail(component.log)}")
            try:
                if ready():
                    return
            except (OSError, ValueError, KeyError, subprocess.SubprocessError, NodeError):
                pass
            time.sleep(0.2)
        detail = f"; last lines of {component.log}:\n{tail(component.log)}" if component else ""
        raise NodeError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")

    def ctr(self, *args: str, timeout: float = 300) -> str:
        return _run(["ctr", "--address", str(self.socket), "-n", "k8s.io", *args], timeout=timeout).stdout

    def import_image(self, archive: Path) -> None:
        """Import an OCI archive (e.g. one of the images built from the Dockerfiles) into the node."""
        self.ctr("images", "import", "--no-unpack=false", str(archive), timeout=900)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        argv = [str(self.plane.bin_dir / "kubectl"), f"--kubeconfig={self.plane.kubeconfig}", *args]
        done = _run(argv, check=False, input=input)
        if check and done.returncode != 0:
            raise NodeError(f"kubectl {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    # -- start / stop ----------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> RealNode:
        started = time.monotonic()
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        self.timings["start_seconds"] = time.monotonic() - started
        return self

    def _lock(self) -> None:
        """Wait for the host. ``_lock_file`` is set only once the lock is held: ``stop()`` undoes the
        host only then, so a run interrupted while it waits (Ctrl-C, SIGTERM) leaves the node of
        the run that holds the host alone."""
        HOST_RECORD_DIR.mkdir(parents=True, exist_ok=True)
        lock_file = open(NODE_LOCK, "w")  # held open (flocked) for the node's lifetime
        try:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"morphml: another real node runs on this host; waiting for {NODE_LOCK}", file=sys.stderr,
                      flush=True)
                fcntl.flock(lock_file, fcntl.LOCK_EX)
        except BaseException:
            lock_file.close()
            raise
        self._lock_file = lock_file

    def _unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def _start(self, timeout: float) -> None:
        t0 = time.monotonic()
        hostdeps.ensure(hostdeps.NODE_TOOLS)
        self._lock()
        self.timings["lock_wait_seconds"] = time.monotonic() - t0
        left = teardown_host()  # a killed earlier run's leftovers
        if left:
            raise NodeError(f"leftovers of an earlier node could not be removed: {left}")
        ip = host_ipv4()
        if not ip:
            raise NodeError("the host has no global IPv4 address to use as the node address")
        self.ip = ip
        assert self.plane.bin_dir is not None
        bin_dir = self.plane.bin_dir
        missing = [b for b in ("kubelet", "kube-proxy", "pause", "testbox") if not (bin_dir / b).exists()]
        if missing:
            raise NodeError(f"{missing} are not in {bin_dir}; rebuild with python -m tests.cluster build")
        addons = build.ensure_addons_built()
        images = build_images(bin_dir, addons)
        self.images = {name: ref for name, (ref, _) in images.items()}
        self.timings["build_seconds"] = time.monotonic() - t0

        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.state_dir.mkdir(parents=True)
        _record_host(self.state_dir)
        self._host_network()
        t1 = time.monotonic()
        self._start_containerd()
        for _, archive in images.values():
            self.import_image(archive)
        self.timings["containerd_seconds"] = time.monotonic() - t1
        self._write_cni_config()
        self._start_kubelet(timeout)
        self.timings["node_ready_seconds"] = time.monotonic() - t1
        self._advertise_gpus()
        self._start_kube_proxy(timeout)
        self._start_kube_router(timeout)
        self._start_coredns(timeout)
        self.timings["ready_seconds"] = time.monotonic() - t1

    def _host_network(self) -> None:
        # Bridged pod-to-pod traffic must pass iptables (kube-router's policy, kube-proxy's
        # conntrack); the bridge plugin turns on ip_forward itself. Both restored at teardown.
        Path("/proc/sys/net/bridge/bridge-nf-call-iptables").write_text("1\n")
        # Nothing a pod sends may leave the machine: drop what is forwarded off the bridge.
        # In mangle, which runs before filter: kube-router's filter rules ACCEPT what a policy allows.
        _run(["iptables", "-w", "-t", "mangle", "-N", EGRESS_CHAIN])
        _run(["iptables", "-w", "-t", "mangle", "-A", EGRESS_CHAIN, "-i", BRIDGE, "!", "-o", BRIDGE, "-j", "DROP"])
        _run(["iptables", "-w", "-t", "mangle", "-I", "FORWARD", "1", "-j", EGRESS_CHAIN])

    def _start_containerd(self) -> None:
        base = self.state_dir / "containerd"
        (base / "root").mkdir(parents=True)
        (base / "state").mkdir()
        config = base / "config.toml"
        config.write_text(f"""version = 2
root = "{base / 'root'}"
state = "{base / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{base / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{self.images['pause']}"
  # CAP_SYS_RESOURCE is not in this machine's bounding set: never lower a score below ours.
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  # Pod network namespaces in the private state dir, not /var/run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{shutil.which('runc')}"
        Root = "{base / 'runc'}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{self.state_dir / 'cni' / 'net.d'}"
    max_conf_num = 1
""")
        containerd = self._spawn("containerd", ["containerd", "--config", str(config), "--log-level", "info"])
        self._wait("containerd's socket", lambda: self.ctr("version", timeout=5) != "", containerd, 30)

    def _write_cni_config(self) -> None:
        conf_dir = self.state_dir / "cni" / "net.d"
        conf_dir.mkdir(parents=True, exist_ok=True)  # containerd makes it when it starts
        conf = {
            "cniVersion": "1.0.0", "name": CNI_NETWORK,
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "dataDir": str(self.state_dir / "cni" / "ipam"),
                          "ranges": [[{"subnet": NODE_POD_SUBNET}]], "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (conf_dir / "10-morphml.conflist").write_text(json.dumps(conf, indent=1))

    def _start_kubelet(self, timeout: float) -> None:
        p = self.plane.pki
        kdir = self.state_dir / "kubelet"
        certs = kdir / "pki"
        certs.mkdir(parents=True)
        client_crt, client_key = _issue(certs, "kubelet-client", p["ca.crt"], p["ca.key"],
                                        f"system:node:{self.name}", "system:nodes", client=True)
        serving_crt, serving_key = _issue(certs, "kubelet-serving", p["ca.crt"], p["ca.key"],
                                          f"system:node:{self.name}", "system:nodes", client=False,
                                          server_ips=[self.ip, "127.0.0.1"], dns=[self.name, "localhost"])
        kubeconfig = write_kubeconfig(kdir / "kubeconfig.yaml", self.plane.server, p["ca.crt"], client_crt,
                                      client_key, user=f"system:node:{self.name}")
        port = free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.socket}", "imageServiceEndpoint": f"unix://{self.socket}",
            "address": self.ip, "port": port, "readOnlyPort": 0, "healthzPort": 0,
            "tlsCertFile": str(serving_crt), "tlsPrivateKeyFile": str(serving_key),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(p["ca.crt"])}},
            "authorization": {"mode": "Webhook"},
            "clusterDNS": [CLUSTER_DNS_IP], "clusterDomain": "cluster.local",
            "resolvConf": str(self._resolv_conf()),
            "podLogsDir": str(kdir / "pod-logs"),
            "volumePluginDir": str(kdir / "volume-plugins"),
            "rotateCertificates": False, "serverTLSBootstrap": False,
            # This VM's disk is shared with image stores: evict and garbage-collect only near full.
            "evictionHard": {"memory.available": "64Mi", "nodefs.available": "2%", "imagefs.available": "2%",
                             "nodefs.inodesFree": "2%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "imageMinimumGCAge": "24h",
            "nodeStatusUpdateFrequency": "4s", "nodeStatusReportFrequency": "20s",
            "syncFrequency": "10s", "fileCheckFrequency": "10s",
            "serializeImagePulls": False,
            "maxPods": 110,
            "staticPodPath": "",
            "makeIPTablesUtilChains": True,
        }
        config_path = kdir / "config.json"
        config_path.write_text(json.dumps(config, indent=1))
        kubelet = self._spawn("kubelet", [
            str(self.plane.bin_dir / "kubelet"), f"--config={config_path}", f"--kubeconfig={kubeconfig}",
            f"--root-dir={kdir / 'root'}", f"--cert-dir={certs}", f"--node-ip={self.ip}",
            f"--hostname-override={self.name}", "--node-labels=morphml.io/real-node=true", "--v=1",
        ])

        def ready() -> bool:
            status, body = self.plane.api_get(f"/api/v1/nodes/{self.name}")
            if status != 200:
                return False
            node = json.loads(body)
            conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
            return conditions.get("Ready") == "True"

        self._wait(f"node {self.name} Ready", ready, kubelet, timeout)

    def _resolv_conf(self) -> Path:
        """The resolv.conf pods with dnsPolicy Default get: no name server, so nothing resolves off the machine."""
        path = self.state_dir / "resolv.conf"
        path.write_text("# the test node's pods resolve only through the cluster DNS\noptions ndots:1\n")
        return path

    def _advertise_gpus(self) -> None:
        """The stand-in: ``nvidia.com/gpu`` on the node's capacity (the kubelet copies it to allocatable)."""
        if not self.gpus:
            return
        patch = json.dumps([{"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": str(self.gpus)}])
        self.kubectl("patch", "node", self.name, "--subresource=status", "--type=json", "-p", patch)

        def allocatable() -> bool:
            node = json.loads(self.kubectl("get", "node", self.name, "-o", "json"))
            return node["status"].get("allocatable", {}).get("nvidia.com/gpu") == str(self.gpus)

        self._wait("nvidia.com/gpu in the node's allocatable", allocatable, self.components[-1], 30)

    def _start_kube_proxy(self, timeout: float) -> None:
        p = self.plane.pki
        pdir = self.state_dir / "kube-proxy"
        pdir.mkdir(parents=True)
        crt, key = _issue(pdir, "client", p["ca.crt"], p["ca.key"], "system:kube-proxy", None, client=True)
        kubeconfig = write_kubeconfig(pdir / "kubeconfig.yaml", self.plane.server, p["ca.crt"], crt, key,
                                      user="system:kube-proxy")
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "iptables", "clusterCIDR": POD_CIDR, "hostnameOverride": self.name,
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "bindAddress": "0.0.0.0",
            "healthzBindAddress": f"127.0.0.1:{free_port()}", "metricsBindAddress": f"127.0.0.1:{free_port()}",
            # Leave the conntrack table size and timeouts as they are (maxPerCore 0, timeouts 0).
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            # No NodePorts on 127.0.0.1: that would need route_localnet=1 on the host.
            "iptables": {"localhostNodePorts": False, "syncPeriod": "30s", "minSyncPeriod": "0s"},
            "nodePortAddresses": [f"{self.ip}/32"],
        }
        config_path = pdir / "config.json"
        config_path.write_text(json.dumps(config, indent=1))
        proxy = self._spawn("kube-proxy", [str(self.plane.bin_dir / "kube-proxy"), f"--config={config_path}",
                                           "--v=1"])

        def synced() -> bool:
            return "KUBE-SVC-" in _run(["iptables-save", "-t", "nat"]).stdout  # the kubernetes Service

        self._wait("kube-proxy's first iptables sync", synced, proxy, timeout)

    def _start_kube_router(self, timeout: float) -> None:
        addons = build.ensure_addons_built()
        rdir = self.state_dir / "kube-router"
        rdir.mkdir(parents=True)
        router = self._spawn("kube-router", [
            str(addons / "kube-router"), f"--kubeconfig={self.plane.kubeconfig}", f"--hostname-override={self.name}",
            "--run-firewall=true", "--run-router=false", "--run-service-proxy=false", "--run-loadbalancer=false",
            "--enable-cni=false", f"--service-cluster-ip-range={SERVICE_CIDR}", "--metrics-port=0",
            f"--health-port={free_port()}", "--iptables-sync-period=30s", "--v=1",
        ])

        def synced() -> bool:
            return ":KUBE-ROUTER-FORWARD" in _run(["iptables-save", "-t", "filter"]).stdout

        self._wait("kube-router's NetworkPolicy chains", synced, router, timeout)

    def _start_coredns(self, timeout: float) -> None:
        manifest = COREDNS_MANIFEST.format(dns_ip=CLUSTER_DNS_IP, image=self.images["coredns"])
        self.kubectl("apply", "-f", "-", input=manifest)

        def ready() -> bool:
            out = self.kubectl("get", "deployment", "coredns", "-n", "kube-system", "-o",
                               "jsonpath={.status.readyReplicas}", check=False)
            return out.strip() == "1"

        self._wait("CoreDNS Ready", ready, None, timeout)

    def check_alive(self) -> None:
        for component in self.components:
            if not component.alive():
                raise ControlPlaneError(f"node {component.name} exited with code {component.proc.returncode}; "
                                        f"last lines of {component.log}:\n{tail(component.log)}")

    def stop(self) -> dict[str, Any]:
        """Stop every node process and undo the host changes; returns what is still left (empty: clean)."""
        for component in reversed(self.components):
            component.stop(grace=5.0)
        self.components.clear()
        if self._lock_file is None:
            return {}  # never got the host: nothing of ours to undo (another node may be running)
        try:
            return teardown_host([self.state_dir])
        finally:
            self._unlock()

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(f"----- node/{name} ({path}) -----\n{tail(path, lines)}" for name, path in self.logs.items())
