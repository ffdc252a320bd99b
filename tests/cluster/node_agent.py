#!/usr/bin/env python3
"""Test-only process node: a stand-in kubelet that runs pods' commands as local processes.

What lives here: ``NodeAgent`` (registers a Node with cpu / memory / pods /
``nvidia.com/gpu`` allocatable, keeps it Ready with status heartbeats and a node
Lease, binds pending PersistentVolumeClaims to hostPath PersistentVolumes) and
``PodRunner`` (one thread per pod bound to the node: volumes, env, service-name
rewriting, processes, probes, restarts, status, graceful deletion). What it
emulates and what it does not is written down in docs/testing.md ("The process
node"); keep the two in step.

Runs as its own process: ``python node_agent.py --kubeconfig K --node-name N
--state-dir D``. Imports: the standard library only, plus ``grpc`` /
``grpc_health`` lazily for gRPC probes and PyYAML lazily for a YAML kubeconfig.
It talks to the API server with a small HTTPS client of its own (no kubernetes
package) so it starts fast and controls every request.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import http.client
import ipaddress
import json
import math
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import traceback
import urllib.parse
from pathlib import Path

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
LOG_LOCK = threading.Lock()


def log(msg: str) -> None:
    with LOG_LOCK:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ------------------------------------------------------------------------------------------------
# A small Kubernetes REST client
# ------------------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, body: str, method: str, path: str):
        super().__init__(f"{method} {path} -> {status}: {body[:500]}")
        self.status = status


class KubeClient:
    """HTTPS JSON client from a kubeconfig (client certificate or bearer token)."""

    def __init__(self, kubeconfig: str):
        text = Path(kubeconfig).read_text()
        try:
            config = json.loads(text)
        except json.JSONDecodeError:
            import yaml  # only for a kubeconfig written as YAML by something else

            config = yaml.safe_load(text)
        context_name = config["current-context"]
        context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
        url = urllib.parse.urlparse(cluster["server"])
        self.server = cluster["server"]
        self.host, self.port = url.hostname, url.port or 443
        self.ca_file = cluster.get("certificate-authority")
        self._tmp = tempfile.mkdtemp(prefix="node-agent-kubeconfig-")
        if cluster.get("certificate-authority-data"):
            self.ca_file = self._write("ca.crt", cluster["certificate-authority-data"])
        self.ctx = ssl.create_default_context(cafile=self.ca_file)
        cert, key = user.get("client-certificate"), user.get("client-key")
        if user.get("client-certificate-data"):
            cert = self._write("client.crt", user["client-certificate-data"])
            key = self._write("client.key", user["client-key-data"])
        if cert:
            self.ctx.load_cert_chain(cert, key)
        self.token = user.get("token")

    def _write(self, name: str, b64: str) -> str:
        path = Path(self._tmp) / name
        path.write_bytes(base64.b64decode(b64))
        return str(path)

    def _conn(self, timeout: float | None) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=timeout)

    def _headers(self, content_type: str) -> dict:
        headers = {"Accept": "application/json", "Content-Type": content_type, "User-Agent": "morphml-node-agent"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def request(self, method: str, path: str, body=None, params: dict | None = None,
                content_type: str = "application/json", timeout: float = 30.0):
        if params:
            path += "?" + urllib.parse.urlencode(params)
        conn = self._conn(timeout)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body),
                         headers=self._headers(content_type))
            resp = conn.getresponse()
            data = resp.read().decode()
        finally:
            conn.close()
        if resp.status >= 400:
            raise ApiError(resp.status, data, method, path)
        return json.loads(data) if data else {}

    def get(self, path, **params):
        return self.request("GET", path, params=params or None)

    def get_or_none(self, path):
        try:
            return self.get(path)
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def merge_patch(self, path, body):
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def watch(self, path: str, params: dict, stop: threading.Event):
        """Yield watch events (dicts with type/object) until the server closes the stream."""
        params = dict(params, watch="1", allowWatchBookmarks="true")
        conn = self._conn(timeout=None)
        try:
            conn.request("GET", path + "?" + urllib.parse.urlencode(params), headers=self._headers("application/json"))
            resp = conn.getresponse()
            if resp.status >= 400:
                raise ApiError(resp.status, resp.read().decode(), "WATCH", path)
            while not stop.is_set():
                line = resp.readline()
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()


def informer(client: KubeClient, path: str, params: dict, on_event, stop: threading.Event, name: str) -> None:
    """List then watch ``path`` forever, calling ``on_event(type, obj)``; relists after errors / 410 Gone.

    After each (re)list a synthetic ("SYNC", {uid set}) event lets the handler drop objects
    that disappeared while it was not watching.
    """
    while not stop.is_set():
        try:
            listing = client.get(path, **params)
            rv = listing["metadata"]["resourceVersion"]
            for item in listing.get("items", []):
                on_event("ADDED", item)
            on_event("SYNC", {item["metadata"]["uid"] for item in listing.get("items", [])})
            while not stop.is_set():
                relist = False
                for event in client.watch(path, dict(params, resourceVersion=rv, timeoutSeconds="240"), stop):
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":
                        relist = True
                        break
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if kind != "BOOKMARK":
                        on_event(kind, obj)
                if relist:
                    break
        except Exception as exc:  # keep the node alive through API hiccups; the next list resyncs
            if stop.is_set():
                return
            log(f"{name} informer error: {exc!r}; relisting in 1 s")
            stop.wait(1.0)


# ------------------------------------------------------------------------------------------------
# Quantities
# ------------------------------------------------------------------------------------------------
_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
           "n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def parse_quantity(value) -> float:
    match = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?\d+)?)([a-zA-Z]*)", str(value).strip())
    if not match or match.group(2) not in _SUFFIX:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


# ------------------------------------------------------------------------------------------------
# Errors that keep a container waiting (the kubelet's CreateContainerConfigError & co.)
# ------------------------------------------------------------------------------------------------
class NotYet(Exception):
    """Something the container needs is missing (Secret, ConfigMap, Service backend); retry soon."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Unsupported(Exception):
    """The pod asks for something the process node cannot emulate; the container stays Waiting."""


# ------------------------------------------------------------------------------------------------
# Probes
# ------------------------------------------------------------------------------------------------
class ProbeState:
    def __init__(self, spec: dict):
        self.spec = spec
        self.initial_delay = float(spec.get("initialDelaySeconds", 0))
        self.period = max(float(spec.get("periodSeconds", 10)), 0.1)
        self.timeout = max(float(spec.get("timeoutSeconds", 1)), 0.1)
        self.success_threshold = int(spec.get("successThreshold", 1))
        self.failure_threshold = int(spec.get("failureThreshold", 3))
        self.successes = 0
        self.failures = 0
        self.result: bool | None = None  # None until the first verdict
        self.next_at = 0.0

    def reset(self, started_at: float) -> None:
        self.successes = self.failures = 0
        self.result = None
        self.next_at = started_at + self.initial_delay

    def record(self, ok: bool) -> None:
        if ok:
            self.successes += 1
            self.failures = 0
            if self.successes >= self.success_threshold:
                self.result = True
        else:
            self.failures += 1
            self.successes = 0
            if self.failures >= self.failure_threshold:
                self.result = False


def run_probe(spec: dict, pod_ip: str, ports: dict, env: dict, timeout: float, rewrite) -> bool:
    def port_of(value) -> int:
        if isinstance(value, int) or str(value).isdigit():
            return int(value)
        if value in ports:
            return ports[value]
        raise Unsupported(f"probe port {value!r} names no containerPort")

    try:
        if "httpGet" in spec:
            http_get = spec["httpGet"]
            host = http_get.get("host") or pod_ip
            port = port_of(http_get["port"])
            path = http_get.get("path", "/") or "/"
            cls = http.client.HTTPSConnection if http_get.get("scheme", "HTTP").upper() == "HTTPS" else \
                http.client.HTTPConnection
            kwargs = {"context": ssl._create_unverified_context()} if cls is http.client.HTTPSConnection else {}
            conn = cls(host, port, timeout=timeout, **kwargs)
            try:
                headers = {h["name"]: h["value"] for h in http_get.get("httpHeaders", [])}
                conn.request("GET", path, headers=headers)
                return 200 <= conn.getresponse().status < 400
            finally:
                conn.close()
        if "tcpSocket" in spec:
            host = spec["tcpSocket"].get("host") or pod_ip
            with socket.create_connection((host, port_of(spec["tcpSocket"]["port"])), timeout=timeout):
                return True
        if "grpc" in spec:
            import grpc
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            with grpc.insecure_channel(f"{pod_ip}:{port_of(spec['grpc']['port'])}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=spec["grpc"].get("service", "")), timeout=timeout)
                return reply.status == health_pb2.HealthCheckResponse.SERVING
        if "exec" in spec:
            argv = [rewrite(a) for a in spec["exec"].get("command", [])]
            if not argv:
                raise Unsupported("exec probe without command")
            done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=timeout, start_new_session=True)
            return done.returncode == 0
    except Unsupported:
        raise
    except Exception:
        return False
    raise Unsupported(f"probe has no handler the process node knows: {sorted(spec)}")


# ------------------------------------------------------------------------------------------------
# Containers
# ------------------------------------------------------------------------------------------------
class Container:
    """One container of a pod: its process, restart bookkeeping and probe states."""

    def __init__(self, spec: dict, init: bool = False):
        self.spec = spec
        self.name = spec["name"]
        self.init = init
        self.proc: subprocess.Popen | None = None
        self.restart_count = 0
        self.started_at = 0.0
        self.started_at_str = ""
        self.state: dict = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: dict = {}
        self.ready = False
        self.started = False  # startup probe passed (or none)
        self.next_start_at = 0.0
        self.backoff = 0.0
        self.completed = False  # init container finished successfully
        self.readiness = ProbeState(spec["readinessProbe"]) if spec.get("readinessProbe") else None
        self.liveness = ProbeState(spec["livenessProbe"]) if spec.get("livenessProbe") else None
        self.startup = ProbeState(spec["startupProbe"]) if spec.get("startupProbe") else None
        self.env: dict = {}
        self.rewrite = lambda s: s
        self.kill_reason = ""

    def status(self, image_id: str = "") -> dict:
        status = {
            "name": self.name, "image": self.spec.get("image", ""), "imageID": image_id,
            "containerID": f"process://{self.proc.pid}" if self.proc else "",
            "restartCount": self.restart_count, "ready": self.ready, "state": self.state,
            "lastState": self.last_state,
        }
        if not self.init:
            status["started"] = "running" in self.state and self.started
        return status


def _pod_key(pod: dict) -> str:
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


class PodRunner(threading.Thread):
    """Runs one pod bound to this node until it is deleted."""

    def __init__(self, agent: NodeAgent, pod: dict):
        super().__init__(name=f"pod-{_pod_key(pod)}", daemon=True)
        self.agent = agent
        self.client = agent.client
        self.pod = pod
        self.uid = pod["metadata"]["uid"]
        self.ns = pod["metadata"]["namespace"]
        self.name = pod["metadata"]["name"]
        self.key = _pod_key(pod)
        self.wake = threading.Event()
        self.gone = False  # the API object was removed outright (force delete)
        # hostNetwork pods share the node's address, as on a real node.
        self.pod_ip = "127.0.0.1" if pod["spec"].get("hostNetwork") else agent.allocate_ip(self.ns, self.name)
        self.dir = agent.state_dir / "pods" / f"{self.ns}_{self.name}_{self.uid[:8]}"
        self.log_dir = agent.state_dir / "logs" / f"{self.ns}_{self.name}_{self.uid[:8]}"
        spec = pod["spec"]
        self.restart_policy = spec.get("restartPolicy", "Always")
        self.init_containers = [Container(c, init=True) for c in spec.get("initContainers", []) or []]
        self.containers = [Container(c) for c in spec.get("containers", [])]
        self.volume_dirs: dict[str, Path] = {}
        self.volumes_ready = False
        self.volume_error: NotYet | Exception | None = None
        self.last_status: dict | None = None
        self.start_time = now_rfc3339()
        self.conditions_time: dict[str, tuple[str, str]] = {}
        self.phase = "Pending"
        self.gpu_ids: list[int] = []

    def event(self, reason: str, message: str, kind: str = "Normal", container: str | None = None) -> None:
        """Record a core/v1 Event on the pod, as the kubelet does (Started, Killing, Unhealthy, BackOff...)."""
        stamp = now_rfc3339()
        involved = {"apiVersion": "v1", "kind": "Pod", "namespace": self.ns, "name": self.name, "uid": self.uid}
        if container:
            involved["fieldPath"] = f"spec.containers{{{container}}}"
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{self.name}.", "namespace": self.ns},
                "involvedObject": involved, "reason": reason, "message": message, "type": kind,
                "source": {"component": "kubelet", "host": self.agent.node_name},
                "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1}
        try:
            self.client.request("POST", f"/api/v1/namespaces/{self.ns}/events", body, timeout=5)
        except (ApiError, OSError):
            pass  # events are best effort, as in the kubelet

    # -- events from the informer ----------------------------------------------------------------
    def update(self, pod: dict) -> None:
        self.pod = pod
        self.wake.set()

    def removed(self) -> None:
        self.gone = True
        self.wake.set()

    # -- main loop -------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log(f"pod {self.key}: runner crashed:\n{traceback.format_exc()}")
            self._kill_all(0)
        finally:
            self.agent.forget(self)

    def _deleting(self) -> bool:
        return self.gone or bool(self.pod["metadata"].get("deletionTimestamp"))

    def _run(self) -> None:
        log(f"pod {self.key}: bound to node, pod IP {self.pod_ip}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.gpu_ids = self.agent.allocate_gpus(self.uid, self._gpu_request())
        while True:
            if self._deleting():
                self._terminate()
                return
            if self.phase not in ("Succeeded", "Failed"):
                self._step()
            self._report()
            self.wake.wait(self._next_wait())
            self.wake.clear()

    def _gpu_request(self) -> int:
        total = 0
        for c in self.pod["spec"].get("containers", []):
            res = c.get("resources", {}) or {}
            value = (res.get("limits") or {}).get("nvidia.com/gpu") or (res.get("requests") or {}).get("nvidia.com/gpu")
            total += int(value or 0)
        return total

    def _next_wait(self) -> float:
        if self.phase in ("Succeeded", "Failed"):
            return 5.0
        moment = time.monotonic()
        soonest = moment + 1.0
        for c in self.init_containers + self.containers:
            if c.proc is None and c.next_start_at:
                soonest = min(soonest, c.next_start_at)
            for probe in (c.readiness, c.liveness, c.startup):
                if probe and c.proc is not None:
                    soonest = min(soonest, probe.next_at)
        # Running processes are polled every 0.2 s so an exit is noticed quickly.
        running = any(c.proc is not None for c in self.init_containers + self.containers)
        if running:
            soonest = min(soonest, moment + 0.2)
        return max(0.02, soonest - moment)

    # -- one reconcile step ----------------------------------------------------------------------
    def _step(self) -> None:
        if not self.volumes_ready:
            try:
                self._setup_volumes()
                self.volumes_ready = True
                self.volume_error = None
            except (NotYet, Unsupported) as err:
                self.volume_error = err
                return
        for c in self.init_containers:
            if c.completed:
                continue
            self._drive(c)
            if not c.completed:
                return  # init containers run one at a time, in order
        for c in self.containers:
            self._drive(c)
        self._compute_phase()

    def _drive(self, c: Container) -> None:
        moment = time.monotonic()
        if c.proc is not None:
            code = c.proc.poll()
            if code is None:
                self._probe(c, moment)
                return
            self._record_exit(c, code)
        if c.completed or c.next_start_at == -1:
            return
        if c.next_start_at and moment < c.next_start_at:
            return
        self._start(c)

    def _record_exit(self, c: Container, code: int) -> None:
        pid = c.proc.pid if c.proc else 0
        if pid:
            self.agent.unregister_pgid(pid)
            try:
                os.killpg(pid, signal.SIGKILL)  # stray children of the container's process group
            except (ProcessLookupError, PermissionError):
                pass
        ran = time.monotonic() - c.started_at
        reason = c.kill_reason or ("Completed" if code == 0 else "Error")
        exit_code = code if code >= 0 else 128 + (-code)
        terminated = {"exitCode": exit_code, "reason": reason, "startedAt": c.started_at_str,
                      "finishedAt": now_rfc3339(), "containerID": f"process://{pid}" if pid else ""}
        if code < 0:
            terminated["signal"] = -code
        log(f"pod {self.key}: container {c.name} exited {exit_code} ({reason}) after {ran:.1f} s")
        c.proc = None
        c.ready = False
        c.kill_reason = ""
        if c.init and exit_code == 0:
            c.completed = True
            c.state = {"terminated": terminated}
            return
        policy = self.restart_policy
        restart = policy == "Always" or (policy == "OnFailure" and exit_code != 0)
        if c.init and policy == "Always":
            restart = exit_code != 0
        if not restart:
            c.state = {"terminated": terminated}
            c.next_start_at = -1
            return
        # Back-off like the kubelet (doubling, capped), shortened for tests; a container that
        # ran for a while starts again from the initial delay.
        if ran > self.agent.backoff_reset:
            c.backoff = 0.0
        c.backoff = self.agent.backoff_initial if not c.backoff else min(c.backoff * 2, self.agent.backoff_max)
        c.next_start_at = time.monotonic() + c.backoff
        c.last_state = {"terminated": terminated}
        c.restart_count += 1
        self.event("BackOff", f"Back-off {c.backoff:g}s restarting failed container {c.name}", "Warning", c.name)
        c.state = {"waiting": {"reason": "CrashLoopBackOff",
                               "message": f"back-off {c.backoff:g}s restarting failed container={c.name} "
                                          f"pod={self.name}_{self.ns}({self.uid})"}}

    def _start(self, c: Container) -> None:
        try:
            argv, env, cwd = self._container_command(c)
        except NotYet as err:
            c.state = {"waiting": {"reason": err.reason, "message": str(err)}}
            c.next_start_at = time.monotonic() + 1.0
            return
        except Unsupported as err:
            c.state = {"waiting": {"reason": "CreateContainerError", "message": str(err)}}
            c.next_start_at = time.monotonic() + 5.0
            return
        log_path = self.log_dir / f"{c.name}.{c.restart_count}.log"
        out = open(log_path, "ab")
        try:
            c.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as err:
            # Like a runtime's StartError: the container "ran" and failed with 128, so the
            # restart policy and back-off apply and a Never pod ends Failed.
            out.close()
            message = f"cannot run {argv[0]!r}: {err.strerror or err}"
            log(f"pod {self.key}: container {c.name}: {message}")
            with open(log_path, "a") as f:
                f.write(f"node agent: {message}\n")
            c.started_at, c.started_at_str = time.monotonic(), now_rfc3339()
            c.kill_reason = "StartError"
            self._record_exit(c, 128)
            for state in (c.state, c.last_state):
                if "terminated" in state:
                    state["terminated"]["message"] = message
            return
        out.close()
        self.agent.register_pgid(c.proc.pid)
        latest = self.log_dir / f"{c.name}.log"
        try:
            latest.unlink(missing_ok=True)
            latest.symlink_to(log_path.name)
        except OSError:
            pass
        c.env, c.next_start_at = env, 0.0
        c.started_at = time.monotonic()
        c.started_at_str = now_rfc3339()
        c.state = {"running": {"startedAt": c.started_at_str}}
        c.started = c.startup is None
        c.ready = False
        for probe in (c.readiness, c.liveness, c.startup):
            if probe:
                probe.reset(c.started_at)
        log(f"pod {self.key}: started container {c.name} pid {c.proc.pid}: {' '.join(argv)[:300]}")
        self.event("Started", f"Started container {c.name} (process {c.proc.pid})", container=c.name)

    def _probe(self, c: Container, moment: float) -> None:
        if c.init:
            return
        ports = {p["name"]: int(p["containerPort"]) for p in c.spec.get("ports", []) or [] if p.get("name")}

        def due(probe: ProbeState | None) -> bool:
            return probe is not None and moment >= probe.next_at

        def run(probe: ProbeState) -> bool:
            probe.next_at = moment + probe.period
            try:
                ok = run_probe(probe.spec, self.pod_ip, ports, c.env, probe.timeout, c.rewrite)
            except Unsupported as err:
                log(f"pod {self.key}: container {c.name}: {err}")
                ok = False
            before = probe.result
            probe.record(ok)
            if probe.result is False and before is not False:
                kind = {id(c.readiness): "Readiness", id(c.liveness): "Liveness", id(c.startup): "Startup"}[id(probe)]
                self.event("Unhealthy", f"{kind} probe failed {probe.failures} times", "Warning", c.name)
            return ok

        if not c.started:
            if due(c.startup):
                run(c.startup)
                if c.startup.result is True:
                    c.started = True
                elif c.startup.result is False:
                    self._kill_container(c, "startup probe failed")
                    return
            if not c.started:
                return
        if c.readiness is None:
            c.ready = True
        elif due(c.readiness):
            run(c.readiness)
            c.ready = c.readiness.result is True
        if due(c.liveness):
            run(c.liveness)
            if c.liveness.result is False:
                self._kill_container(c, "liveness probe failed")

    def _kill_container(self, c: Container, why: str) -> None:
        log(f"pod {self.key}: container {c.name} {why}, will be restarted")
        self.event("Killing", f"Container {c.name} {why}, will be restarted", container=c.name)
        grace = c.spec.get("livenessProbe", {}).get("terminationGracePeriodSeconds") or \
            self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        self._signal_and_wait([c], float(grace))
        code = c.proc.poll()
        c.kill_reason = "Error"
        self._record_exit(c, 137 if code is None else code)

    # -- phase and status ------------------------------------------------------------------------
    def _compute_phase(self) -> None:
        if any(not c.completed for c in self.init_containers):
            failed_init = any(c.next_start_at == -1 and not c.completed for c in self.init_containers)
            self.phase = "Failed" if failed_init else "Pending"
            return
        states = [c.state for c in self.containers]
        if all("terminated" in s for s in states) and all(c.next_start_at == -1 for c in self.containers):
            self.phase = "Succeeded" if all(s["terminated"]["exitCode"] == 0 for s in states) else "Failed"
        elif any(c.proc is not None or c.restart_count for c in self.containers):
            self.phase = "Running"
        else:
            self.phase = "Pending"

    def _condition(self, kind: str, status: bool, reason: str = "") -> dict:
        value = "True" if status else "False"
        previous = self.conditions_time.get(kind)
        if previous is None or previous[0] != value:
            self.conditions_time[kind] = (value, now_rfc3339())
        cond = {"type": kind, "status": value, "lastTransitionTime": self.conditions_time[kind][1],
                "lastProbeTime": None}
        if reason and not status:
            cond["reason"] = reason
        return cond

    def _report(self) -> None:
        init_done = all(c.completed for c in self.init_containers)
        ready = init_done and all(c.ready for c in self.containers) and self.phase == "Running"
        if self.phase == "Succeeded":
            ready = False
        status = {
            "phase": self.phase,
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.pod_ip, "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.start_time,
            "conditions": [
                self._condition("PodReadyToStartContainers", self.volumes_ready),
                self._condition("Initialized", init_done, "ContainersNotInitialized"),
                self._condition("Ready", ready, "ContainersNotReady"),
                self._condition("ContainersReady", ready, "ContainersNotReady"),
                self._condition("PodScheduled", True),
            ],
            "containerStatuses": [c.status() for c in self.containers],
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.status() for c in self.init_containers]
        if self.volume_error is not None:
            for cs in status["containerStatuses"]:
                reason = getattr(self.volume_error, "reason", "ContainerCreating")
                cs["state"] = {"waiting": {"reason": reason, "message": str(self.volume_error)}}
        if status == self.last_status:
            return
        path = f"/api/v1/namespaces/{self.ns}/pods/{self.name}/status"
        try:
            body = {"metadata": {"uid": self.uid}, "status": status}
            self.client.merge_patch(path, body)
            self.last_status = status
        except ApiError as err:
            if err.status in (404, 409):
                return  # gone or replaced; the informer tells us
            log(f"pod {self.key}: status update failed: {err}")
        except OSError as err:
            log(f"pod {self.key}: status update failed: {err!r}")

    # -- termination -----------------------------------------------------------------------------
    def _signal_and_wait(self, containers: list[Container], grace: float) -> None:
        running = [c for c in containers if c.proc is not None and c.proc.poll() is None]
        for c in running:
            try:
                os.killpg(c.proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(c.proc.poll() is None for c in running):
            time.sleep(0.05)
        for c in containers:
            if c.proc is not None:
                try:
                    os.killpg(c.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    c.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass

    def _kill_all(self, grace: float) -> None:
        everything = self.init_containers + self.containers
        self._signal_and_wait(everything, grace)
        for c in everything:
            if c.proc is not None:
                self.agent.unregister_pgid(c.proc.pid)

    def _terminate(self) -> None:
        meta = self.pod["metadata"]
        grace = 0.0 if self.gone else float(meta.get("deletionGracePeriodSeconds",
                                                     self.pod["spec"].get("terminationGracePeriodSeconds", 30)))
        log(f"pod {self.key}: deleting, SIGTERM then SIGKILL after {grace:g} s")
        if not self.gone:
            for c in self.containers:
                if c.proc is not None:
                    self.event("Killing", f"Stopping container {c.name}", container=c.name)
        self._kill_all(grace)
        if self.gone:
            return
        # Like the kubelet: once the containers are gone, remove the object for good.
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                "preconditions": {"uid": self.uid}}
        try:
            self.client.request("DELETE", f"/api/v1/namespaces/{self.ns}/pods/{self.name}", body)
        except ApiError as err:
            if err.status not in (404, 409):
                log(f"pod {self.key}: final delete failed: {err}")
        log(f"pod {self.key}: deleted")

    # -- volumes ---------------------------------------------------------------------------------
    def _get(self, kind: str, name: str, optional: bool = False) -> dict | None:
        obj = self.client.get_or_none(f"/api/v1/namespaces/{self.ns}/{kind}/{name}")
        if obj is None and not optional:
            singular = {"secrets": "secret", "configmaps": "configmap"}.get(kind, kind)
            raise NotYet("CreateContainerConfigError", f'{singular} "{name}" not found')
        return obj

    @staticmethod
    def _data(obj: dict | None, kind: str) -> dict[str, bytes]:
        if obj is None:
            return {}
        if kind == "secrets":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    @staticmethod
    def _write_items(target: Path, data: dict[str, bytes], items, mode: int | None) -> None:
        selected = [(i["key"], i.get("path", i["key"]), i.get("mode")) for i in items] if items else \
            [(k, k, None) for k in data]
        for key, rel, item_mode in selected:
            if key not in data:
                raise NotYet("CreateContainerConfigError", f"key {key!r} not found")
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[key])
            path.chmod(item_mode or mode or 0o644)

    def _downward(self, ref: dict) -> str:
        field = ref["fieldPath"]
        meta = self.pod["metadata"]
        simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
                  "metadata.uid": meta["uid"], "spec.nodeName": self.agent.node_name,
                  "spec.serviceAccountName": self.pod["spec"].get("serviceAccountName", "default"),
                  "status.hostIP": "127.0.0.1", "status.hostIPs": "127.0.0.1",
                  "status.podIP": self.pod_ip, "status.podIPs": self.pod_ip}
        if field in simple:
            return simple[field]
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", field)
        if match:
            return (meta.get(match.group(1)) or {}).get(match.group(2), "")
        if field in ("metadata.labels", "metadata.annotations"):
            values = meta.get(field.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
        raise Unsupported(f"downward API fieldPath {field!r} is not emulated")

    def _resource_field(self, ref: dict, container_spec: dict | None) -> str:
        container = container_spec
        if ref.get("containerName"):
            container = next((c for c in self.pod["spec"]["containers"] if c["name"] == ref["containerName"]), None)
        resources = (container or {}).get("resources") or {}
        section, _, resource = ref["resource"].partition(".")
        value = (resources.get(section) or {}).get(resource)
        if value is None and section == "limits":
            value = {"cpu": self.agent.cpu, "memory": self.agent.memory}.get(resource, "0")
        divisor = parse_quantity(ref.get("divisor", "1"))
        return str(math.ceil(parse_quantity(value or "0") / divisor))

    def _service_account_token(self, audience: str | None, seconds: int) -> str:
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [audience] if audience else None, "expirationSeconds": seconds,
                         "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}}}
        if not audience:
            del body["spec"]["audiences"]
        try:
            reply = self.client.request(
                "POST", f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token", body)
        except ApiError as err:
            raise NotYet("CreateContainerConfigError", f"token for serviceaccount {sa!r}: {err}") from err
        return reply["status"]["token"]

    def _setup_volumes(self) -> None:
        for volume in self.pod["spec"].get("volumes", []) or []:
            name = volume["name"]
            target = self.dir / "volumes" / name
            if "emptyDir" in volume:
                target.mkdir(parents=True, exist_ok=True)
            elif "hostPath" in volume:
                target = Path(volume["hostPath"]["path"])
                if volume["hostPath"].get("type") in ("DirectoryOrCreate", None, ""):
                    target.mkdir(parents=True, exist_ok=True)
            elif "secret" in volume or "configMap" in volume:
                kind, src = ("secrets", volume["secret"]) if "secret" in volume else ("configmaps", volume["configMap"])
                obj_name = src.get("secretName") if kind == "secrets" else src.get("name")
                obj = self._get(kind, obj_name, bool(src.get("optional")))
                self._fresh(target)
                self._write_items(target, self._data(obj, kind), src.get("items"), src.get("defaultMode"))
            elif "downwardAPI" in volume:
                self._fresh(target)
                for item in volume["downwardAPI"].get("items", []):
                    self._write_downward_item(target, item)
            elif "projected" in volume:
                self._fresh(target)
                for source in volume["projected"].get("sources", []):
                    self._write_projected(target, source, volume["projected"].get("defaultMode"))
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                pvc = self.client.get_or_none(f"/api/v1/namespaces/{self.ns}/persistentvolumeclaims/{claim}")
                if pvc is None:
                    raise NotYet("ContainerCreating", f'persistentvolumeclaim "{claim}" not found')
                target = self.agent.claim_dir(self.ns, claim, pvc["metadata"]["uid"])
                target.mkdir(parents=True, exist_ok=True)
            else:
                kinds = sorted(k for k in volume if k != "name")
                raise Unsupported(f"volume {name!r}: type {kinds} is not emulated by the process node "
                                  f"(supported: emptyDir, secret, configMap, persistentVolumeClaim, projected, "
                                  f"downwardAPI, hostPath)")
            self.volume_dirs[name] = target

    @staticmethod
    def _fresh(target: Path) -> None:
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)

    def _write_downward_item(self, target: Path, item: dict) -> None:
        path = target / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        if "fieldRef" in item:
            path.write_text(self._downward(item["fieldRef"]))
        elif "resourceFieldRef" in item:
            container = next((c for c in self.pod["spec"]["containers"]
                              if c["name"] == item["resourceFieldRef"].get("containerName")), None)
            path.write_text(self._resource_field(item["resourceFieldRef"], container))

    def _write_projected(self, target: Path, source: dict, mode: int | None) -> None:
        if "serviceAccountToken" in source:
            spec = source["serviceAccountToken"]
            token = self._service_account_token(spec.get("audience"), int(spec.get("expirationSeconds", 3600)))
            (target / spec["path"]).write_text(token)
        elif "configMap" in source or "secret" in source:
            kind, src = ("secrets", source["secret"]) if "secret" in source else ("configmaps", source["configMap"])
            obj = self._get(kind, src["name"], bool(src.get("optional")))
            self._write_items(target, self._data(obj, kind), src.get("items"), mode)
        elif "downwardAPI" in source:
            for item in source["downwardAPI"].get("items", []):
                self._write_downward_item(target, item)
        elif "clusterTrustBundle" in source or "podCertificate" in source:
            raise Unsupported(f"projected source {sorted(source)} is not emulated")

    # -- the command line ------------------------------------------------------------------------
    def _mount_map(self, c: Container) -> list[tuple[str, str]]:
        mounts = []
        for mount in c.spec.get("volumeMounts", []) or []:
            local = self.volume_dirs.get(mount["name"])
            if local is None:
                raise Unsupported(f"volumeMount {mount['mountPath']!r} names unknown volume {mount['name']!r}")
            if mount.get("subPath"):
                local = local / mount["subPath"]
                if not local.exists() and "." not in mount["subPath"]:
                    local.mkdir(parents=True, exist_ok=True)
            mounts.append((mount["mountPath"].rstrip("/") or "/", str(local)))
        return sorted(mounts, key=lambda m: -len(m[0]))

    def _env(self, c: Container) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in c.spec.get("envFrom", []) or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source or "secretRef" in source:
                kind, ref = ("configmaps", source["configMapRef"]) if "configMapRef" in source else \
                    ("secrets", source["secretRef"])
                obj = self._get(kind, ref["name"], bool(ref.get("optional")))
                for k, v in self._data(obj, kind).items():
                    env[prefix + k] = v.decode(errors="replace")
        for var in c.spec.get("env", []) or []:
            name = var["name"]
            if "valueFrom" not in var:
                env[name] = expand(var.get("value", ""), env)
                continue
            source = var["valueFrom"]
            if "fieldRef" in source:
                env[name] = self._downward(source["fieldRef"])
            elif "resourceFieldRef" in source:
                env[name] = self._resource_field(source["resourceFieldRef"], c.spec)
            elif "secretKeyRef" in source or "configMapKeyRef" in source:
                kind, ref = ("secrets", source["secretKeyRef"]) if "secretKeyRef" in source else \
                    ("configmaps", source["configMapKeyRef"])
                obj = self._get(kind, ref["name"], bool(ref.get("optional")))
                data = self._data(obj, kind)
                if ref["key"] in data:
                    env[name] = data[ref["key"]].decode(errors="replace")
                elif not ref.get("optional"):
                    singular = "secret" if kind == "secrets" else "configmap"
                    raise NotYet("CreateContainerConfigError",
                                 f"couldn't find key {ref['key']} in {singular} {self.ns}/{ref['name']}")
            else:
                raise Unsupported(f"env {name}: valueFrom {sorted(source)} is not emulated")
        return env

    def _container_command(self, c: Container) -> tuple[list[str], dict, str]:
        spec = c.spec
        pod_env = self._env(c)
        argv = [expand(a, pod_env) for a in (spec.get("command") or []) + (spec.get("args") or [])]
        if not argv:
            raise Unsupported(f"container {c.name!r} has no command/args: the process node runs "
                              f"commands, it cannot know the image's entrypoint")
        mounts = self._mount_map(c)
        services = self.agent.service_resolver(self.ns)

        def rewrite(text: str) -> str:
            # Service names first: their replacements (IP:port) contain no paths.
            return rewrite_mount_paths(services.rewrite(text), mounts)

        argv = [rewrite(a) for a in argv]
        pod_env = {k: rewrite(v) for k, v in pod_env.items()}
        env = {k: v for k, v in os.environ.items()
               if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")
               and not k.startswith("MORPHML_NODE_AGENT")}
        env["HOSTNAME"] = self.name
        if self.gpu_ids:
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(map(str, self.gpu_ids))
        sa_mount = next((local for path, local in mounts if path == SA_DIR), None)
        if sa_mount and (Path(sa_mount) / "token").exists():
            env["KUBECONFIG"] = str(self._pod_kubeconfig(Path(sa_mount)))
        env.update(pod_env)
        cwd = spec.get("workingDir")
        cwd = rewrite(cwd) if cwd else str(self.dir / "workdir" / c.name)
        Path(cwd).mkdir(parents=True, exist_ok=True)
        c.rewrite = rewrite
        return argv, env, cwd

    def _pod_kubeconfig(self, sa_dir: Path) -> Path:
        """In-cluster credentials as a kubeconfig: the pod's service-account token and the cluster CA."""
        path = self.dir / "kubeconfig"
        token = (sa_dir / "token").read_text().strip()
        ca = sa_dir / "ca.crt"
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "in-cluster",
                  "clusters": [{"name": "in-cluster", "cluster": {
                      "server": self.client.server,
                      "certificate-authority": str(ca if ca.exists() else self.client.ca_file)}}],
                  "users": [{"name": "sa", "user": {"token": token}}],
                  "contexts": [{"name": "in-cluster", "context": {"cluster": "in-cluster", "user": "sa",
                                                                   "namespace": self.ns}}]}
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known names are replaced, unknown left as written, ``$$`` -> ``$``."""
    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(sub, text)


def rewrite_mount_paths(text: str, mounts: list[tuple[str, str]]) -> str:
    """Replace each container mountPath in ``text`` by its local directory.

    ``mounts`` is (mountPath, local dir) pairs. A mountPath matches only as a
    whole path prefix: at the start of the string or after a character that cannot be part of a
    path (space, '=', ':', quote...), and followed by the end, '/', or such a character. So
    ``/etc/morphml/token/token`` and ``--journal=/var/lib/morphml/j.db`` are rewritten, while
    ``/data`` inside ``/srv/data`` or ``/etc/morphml-other`` are not.
    """
    if not mounts:
        return text
    # One pass over the text with every mount path in one alternation (longest first), so a
    # replacement is never rewritten again (a mount at /tmp must not touch the local dirs, which
    # may live under /tmp themselves).
    ordered = sorted(mounts, key=lambda m: -len(m[0]))
    local_of = dict(ordered)
    pattern = r"(?<![\w./-])(" + "|".join(re.escape(path) for path, _ in ordered) + r")(?=$|[/\s:;,'\"=)])"
    return re.sub(pattern, lambda m: local_of[m.group(1)], text)


def service_host_patterns(name: str, namespace: str, same_namespace: bool) -> list[re.Pattern]:
    """Regexes for the DNS names of Service ``name`` in ``namespace``; group 1 is an optional port.

    ``name.ns.svc.cluster.local``, ``name.ns.svc`` and ``name.ns`` match wherever they stand as a
    whole host name. The bare ``name`` (only from the same namespace) matches only where it clearly
    is a host: followed by ``:<port>`` or right after ``//`` (a URL), so a Service called ``worker``
    does not rewrite the word ``worker`` in ``morphml worker --master ...``.
    """
    patterns = []
    for host in (f"{name}.{namespace}.svc.cluster.local", f"{name}.{namespace}.svc", f"{name}.{namespace}"):
        patterns.append(re.compile(r"(?<![\w.-])" + re.escape(host) + r"(?![\w-]|\.[\w-])(?::(\d+))?"))
    if same_namespace:
        bare = re.escape(name)
        patterns.append(re.compile(r"(?:(?<=//)" + bare + r"(?![\w.-])(?::(\d+))?"
                                   r"|(?<![\w./-])" + bare + r":(\d+)(?![\w.-]))"))
    return patterns


class ServiceResolver:
    """Maps Service DNS names, as seen from one namespace, to the pod IP of a backing pod.

    Only used to rewrite strings (command, args, env values) when a container starts.
    """

    def __init__(self, agent: NodeAgent, namespace: str):
        self.agent, self.namespace = agent, namespace
        self._names: list[tuple[re.Pattern, dict]] | None = None

    def _build(self) -> list[tuple[re.Pattern, dict]]:
        entries = []
        services = self.agent.client.get("/api/v1/services").get("items", [])
        for svc in services:
            name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
            for pattern in service_host_patterns(name, ns, ns == self.namespace):
                entries.append((pattern, svc))
        entries.sort(key=lambda e: -len(e[0].pattern))
        return entries

    def rewrite(self, text: str) -> str:
        if self._names is None:
            self._names = self._build()
        for pattern, svc in self._names:
            if pattern.search(text):
                text = pattern.sub(lambda m, svc=svc: self._target(svc, next((g for g in m.groups() if g), None)),
                                   text)
        return text

    def _target(self, svc: dict, port: str | None) -> str:
        spec, ns = svc.get("spec", {}), svc["metadata"]["namespace"]
        if spec.get("type") == "ExternalName":
            host = spec.get("externalName", "")
            return f"{host}:{port}" if port else host
        pod = self.agent.backing_pod(ns, spec.get("selector") or {})
        if pod is None:
            raise NotYet("ContainerCreating",
                         f"service {ns}/{svc['metadata']['name']} has no backing pod yet (its DNS name is "
                         f"rewritten to a pod IP when the container starts)")
        ip = self.agent.allocate_ip(ns, pod["metadata"]["name"])
        if port is None:
            return ip
        target = port
        for p in spec.get("ports", []):
            if str(p.get("port")) == port:
                tp = p.get("targetPort", p["port"])
                if isinstance(tp, int) or str(tp).isdigit():
                    target = str(tp)
                else:
                    for c in pod["spec"].get("containers", []):
                        for cp in c.get("ports", []) or []:
                            if cp.get("name") == tp:
                                target = str(cp["containerPort"])
        return f"{ip}:{target}"


# ------------------------------------------------------------------------------------------------
# The kubelet's log endpoint, so `kubectl logs [-f] [--previous]` works through the API server
# ------------------------------------------------------------------------------------------------
class LogServer:
    """HTTPS server for GET /containerLogs/<ns>/<pod>/<container> (follow, previous, tailLines)."""

    def __init__(self, agent: NodeAgent, cert: str, key: str, port: int):
        import http.server
        import socketserver

        agent_ref = agent

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):  # keep the agent's log for pod events
                pass

            def do_GET(self):
                url = urllib.parse.urlparse(self.path)
                parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404, "only /containerLogs/<namespace>/<pod>/<container> is served")
                    return
                query = urllib.parse.parse_qs(url.query)

                def flag(name: str) -> bool:
                    return query.get(name, ["false"])[0] in ("true", "1")

                tail_lines = int(query["tailLines"][0]) if "tailLines" in query else None
                found = agent_ref.find_container(parts[1], parts[2], parts[3])
                if found is None:
                    self.send_error(404, f"container {parts[3]!r} of pod {parts[1]}/{parts[2]} is not on this node")
                    return
                runner, container = found
                run = container.restart_count - (1 if flag("previous") else 0)
                path = runner.log_dir / f"{container.name}.{run}.log"
                if not flag("previous") and not path.exists() and run > 0:
                    run -= 1  # waiting to restart: like the kubelet, show the last run
                    path = runner.log_dir / f"{container.name}.{run}.log"
                if run < 0 or not path.exists():
                    self.send_error(400, f"previous terminated container {container.name!r} not found")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                with open(path, "rb") as f:
                    data = f.read()
                    if tail_lines is not None:
                        data = b"".join(data.splitlines(keepends=True)[-tail_lines:]) if tail_lines else b""
                    self.wfile.write(data)
                    self.wfile.flush()
                    while flag("follow") and not agent_ref.stop.is_set():
                        chunk = f.read()
                        if chunk:
                            self.wfile.write(chunk)
                            self.wfile.flush()
                        elif container.restart_count != run or container.proc is None:
                            break
                        else:
                            time.sleep(0.2)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", port), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]

    def serve(self) -> None:
        threading.Thread(target=self.httpd.serve_forever, name="log-server", daemon=True).start()


# ------------------------------------------------------------------------------------------------
# The node
# ------------------------------------------------------------------------------------------------
class NodeAgent:
    def __init__(self, args):
        self.client = KubeClient(args.kubeconfig)
        self.node_name = args.node_name
        self.state_dir = Path(args.state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "process-groups").mkdir(exist_ok=True)
        self.cpu, self.memory, self.pods, self.gpus = args.cpu, args.memory, args.pods, args.gpus
        self.backoff_initial, self.backoff_max = args.backoff_initial, args.backoff_max
        self.backoff_reset = args.backoff_reset
        self.stop = threading.Event()
        self.lock = threading.RLock()
        self.runners: dict[str, PodRunner] = {}
        # Pod IPs: 127.<b>.<x>.<y>, <b> from the state directory so two agents (two test
        # sessions) rarely share a range; one address per namespace/name, kept for the
        # agent's lifetime so a pod recreated under the same name gets the same IP.
        digest = hashlib.sha256(str(self.state_dir).encode()).digest()
        self.ip_base = int(ipaddress.ip_address(f"127.{16 + digest[0] % 224}.0.0"))
        self.ips: dict[str, str] = {}
        self.gpu_owner: dict[int, str] = {}
        self.boot_time = now_rfc3339()
        self.log_server = LogServer(self, args.serving_cert, args.serving_key, args.port) \
            if args.serving_cert else None

    # -- shared bookkeeping ----------------------------------------------------------------------
    def allocate_ip(self, ns: str, name: str) -> str:
        with self.lock:
            key = f"{ns}/{name}"
            if key not in self.ips:
                self.ips[key] = str(ipaddress.ip_address(self.ip_base + 2 + len(self.ips)))
            return self.ips[key]

    def allocate_gpus(self, uid: str, count: int) -> list[int]:
        with self.lock:
            free = [i for i in range(self.gpus) if i not in self.gpu_owner]
            chosen = free[:count]
            for i in chosen:
                self.gpu_owner[i] = uid
            return chosen

    def register_pgid(self, pgid: int) -> None:
        (self.state_dir / "process-groups" / str(pgid)).touch()

    def unregister_pgid(self, pgid: int) -> None:
        (self.state_dir / "process-groups" / str(pgid)).unlink(missing_ok=True)

    def claim_dir(self, ns: str, claim: str, uid: str) -> Path:
        return self.state_dir / "volumes" / ns / f"{claim}-{uid[:8]}"

    def forget(self, runner: PodRunner) -> None:
        with self.lock:
            if self.runners.get(runner.uid) is runner:
                del self.runners[runner.uid]
            for i, owner in list(self.gpu_owner.items()):
                if owner == runner.uid:
                    del self.gpu_owner[i]

    def find_container(self, ns: str, name: str, container: str):
        with self.lock:
            runners = [r for r in self.runners.values() if r.ns == ns and r.name == name]
        for runner in runners:
            for c in runner.containers + runner.init_containers:
                if c.name == container:
                    return runner, c
        return None

    def service_resolver(self, namespace: str) -> ServiceResolver:
        return ServiceResolver(self, namespace)

    def backing_pod(self, ns: str, selector: dict) -> dict | None:
        if not selector:
            return None
        label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        pods = self.client.get(f"/api/v1/namespaces/{ns}/pods", labelSelector=label_selector).get("items", [])
        pods = [p for p in pods if not p["metadata"].get("deletionTimestamp")]

        def rank(pod):
            conditions = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", []) or []}
            return (conditions.get("Ready") != "True", pod.get("status", {}).get("phase") != "Running",
                    pod["metadata"]["creationTimestamp"])

        return sorted(pods, key=rank)[0] if pods else None

    # -- node registration and heartbeats --------------------------------------------------------
    def node_status(self) -> dict:
        resources = {"cpu": self.cpu, "memory": self.memory, "pods": str(self.pods),
                     "nvidia.com/gpu": str(self.gpus), "ephemeral-storage": "100Gi"}
        stamp = now_rfc3339()

        def cond(kind, status, reason, message):
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": stamp, "lastTransitionTime": self.boot_time}

        return {
            "capacity": resources, "allocatable": resources,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "process node"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "process node"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "process node"),
                cond("Ready", "True", "KubeletReady", "morphml process node agent is posting ready status"),
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": self.node_name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_server.port if self.log_server else 10250}},
            "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": os.uname().release,
                         "osImage": "morphml process node", "containerRuntimeVersion": "process://0",
                         "kubeletVersion": "v0.0.0-process-node", "kubeProxyVersion": "", "operatingSystem": "linux",
                         "architecture": "amd64"},
        }

    def register(self) -> None:
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node_name,
                             "labels": {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux",
                                        "kubernetes.io/arch": "amd64", "morphml.io/process-node": "true"}},
                "spec": {}, "status": self.node_status()}
        try:
            self.client.request("POST", "/api/v1/nodes", node)
        except ApiError as err:
            if err.status != 409:
                raise
        self.client.merge_patch(f"/api/v1/nodes/{self.node_name}/status", {"status": self.node_status()})
        log(f"node {self.node_name} registered: allocatable cpu={self.cpu} memory={self.memory} "
            f"pods={self.pods} nvidia.com/gpu={self.gpus}")

    def heartbeat_loop(self) -> None:
        lease_path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        last_status = 0.0
        while not self.stop.is_set():
            try:
                lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                         "metadata": {"name": self.node_name, "namespace": "kube-node-lease"},
                         "spec": {"holderIdentity": self.node_name, "leaseDurationSeconds": 40,
                                  "renewTime": now_micro()}}
                try:
                    self.client.merge_patch(lease_path, {"spec": lease["spec"]})
                except ApiError as err:
                    if err.status != 404:
                        raise
                    self.client.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease)
                if time.monotonic() - last_status > 20:
                    self.client.merge_patch(f"/api/v1/nodes/{self.node_name}/status", {"status": self.node_status()})
                    last_status = time.monotonic()
            except Exception as exc:
                log(f"heartbeat failed: {exc!r}")
            self.stop.wait(5.0)

    # -- pods ------------------------------------------------------------------------------------
    def on_pod_event(self, kind: str, obj) -> None:
        with self.lock:
            if kind == "SYNC":
                for uid, runner in list(self.runners.items()):
                    if uid not in obj:
                        runner.removed()
                return
            uid = obj["metadata"]["uid"]
            runner = self.runners.get(uid)
            if kind == "DELETED":
                if runner:
                    runner.removed()
                return
            if runner is None:
                phase = obj.get("status", {}).get("phase")
                if phase in ("Succeeded", "Failed") and not obj["metadata"].get("deletionTimestamp"):
                    return  # finished before this agent started; nothing to run
                runner = PodRunner(self, obj)
                self.runners[uid] = runner
                runner.start()
            else:
                runner.update(obj)

    # -- volumes: one hostPath PersistentVolume per claim (no provisioner exists here) -----------
    def on_claim_event(self, kind: str, obj) -> None:
        if kind == "DELETED":
            # The claim is gone (no pod can use it any more: pvc-protection): drop its volume and data.
            meta = obj["metadata"]
            try:
                self.client.request("DELETE", f"/api/v1/persistentvolumes/pvc-{meta['uid']}")
            except ApiError as err:
                if err.status != 404:
                    log(f"claim {meta['namespace']}/{meta['name']}: deleting its volume failed: {err}")
            except OSError:
                pass
            shutil.rmtree(self.claim_dir(meta["namespace"], meta["name"], meta["uid"]), ignore_errors=True)
            return
        if kind not in ("ADDED", "MODIFIED"):
            return
        spec, meta = obj.get("spec", {}), obj["metadata"]
        if spec.get("volumeName") or obj.get("status", {}).get("phase") != "Pending" or meta.get("deletionTimestamp"):
            return
        if spec.get("storageClassName") and spec.get("storageClassName") != "manual" and \
                self.client.get_or_none(f"/apis/storage.k8s.io/v1/storageclasses/{spec['storageClassName']}"):
            # A real StorageClass exists: leave the claim to its provisioner.
            return
        directory = self.claim_dir(meta["namespace"], meta["name"], meta["uid"])
        directory.mkdir(parents=True, exist_ok=True)
        pv = {"apiVersion": "v1", "kind": "PersistentVolume",
              "metadata": {"name": f"pvc-{meta['uid']}", "labels": {"morphml.io/process-node": "true"}},
              "spec": {"capacity": {"storage": spec.get("resources", {}).get("requests", {}).get("storage", "1Gi")},
                       "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                       # Retain: the agent itself removes the volume when the claim goes (no
                       # hostPath deleter runs in the controller manager).
                       "persistentVolumeReclaimPolicy": "Retain",
                       "storageClassName": spec.get("storageClassName") or "",
                       "volumeMode": spec.get("volumeMode", "Filesystem"),
                       "hostPath": {"path": str(directory), "type": "DirectoryOrCreate"},
                       "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
                                    "name": meta["name"], "uid": meta["uid"]}}}
        try:
            self.client.request("POST", "/api/v1/persistentvolumes", pv)
            log(f"claim {meta['namespace']}/{meta['name']}: created PersistentVolume {pv['metadata']['name']} "
                f"-> {directory}")
        except ApiError as err:
            if err.status != 409:
                log(f"claim {meta['namespace']}/{meta['name']}: creating its volume failed: {err}")

    # -- lifetime --------------------------------------------------------------------------------
    def run(self) -> None:
        if self.log_server:
            self.log_server.serve()
        self.register()
        threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True).start()
        threading.Thread(target=informer, name="claims", daemon=True, args=(
            self.client, "/api/v1/persistentvolumeclaims", {}, self.on_claim_event, self.stop, "claims")).start()
        informer(self.client, "/api/v1/pods", {"fieldSelector": f"spec.nodeName={self.node_name}"},
                 self.on_pod_event, self.stop, "pods")

    def shutdown(self, *_args) -> None:
        if self.stop.is_set():
            return
        self.stop.set()
        log("node agent stopping: killing all pod processes")
        with self.lock:
            runners = list(self.runners.values())
        for runner in runners:
            runner._kill_all(2.0)
        for entry in (self.state_dir / "process-groups").iterdir():
            try:
                os.killpg(int(entry.name), signal.SIGKILL)
            except (ValueError, ProcessLookupError, PermissionError):
                pass
            entry.unlink(missing_ok=True)
        os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", default="morphml-node-0")
    parser.add_argument("--state-dir", required=True, help="pod logs, volumes and bookkeeping go here")
    parser.add_argument("--cpu", default="32")
    parser.add_argument("--memory", default="128Gi")
    parser.add_argument("--pods", type=int, default=110)
    parser.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu allocatable (fake devices)")
    parser.add_argument("--backoff-initial", type=float, default=1.0, help="first restart delay, seconds")
    parser.add_argument("--backoff-max", type=float, default=30.0, help="restart delay cap, seconds")
    parser.add_argument("--backoff-reset", type=float, default=60.0,
                        help="a container that ran this long restarts with the initial delay again")
    parser.add_argument("--serving-cert", help="TLS certificate for the log endpoint (kubectl logs)")
    parser.add_argument("--serving-key", help="its key")
    parser.add_argument("--port", type=int, default=0, help="log endpoint port (0: any free port)")
    args = parser.parse_args(argv)
    agent = NodeAgent(args)
    signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=agent.shutdown).start())
    signal.signal(signal.SIGINT, lambda *a: threading.Thread(target=agent.shutdown).start())
    try:
        agent.run()
    finally:
        agent.shutdown()


if __name__ == "__main__":
    main()
