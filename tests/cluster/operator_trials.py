"""Support for the operator's pod-loss and chaos tests (tests/cluster/test_operator_*.py).

- `sleep_epochs`: a user evaluator (`spec.evaluation.evaluator: "tests.cluster.operator_trials:sleep_epochs"`)
  that "trains" for `spec.evaluation.epochs` seconds and returns a fake accuracy derived from the
  architecture: trials of a known length, no torch, so "mid-trial" is real and CPU stays free.
  Worker pods import it from the test image (`morphml-testworker`: the master image plus this file
  on PYTHONPATH, `tests.cluster.images.ensure_test_image`). `oom_once`: the same, but the first trial
  a worker pod runs allocates memory until the kernel's OOM killer ends it; `oom_killed_once`: the
  same with the trial process made the OOM killer's choice (tests/cluster/test_worker_oom.py).
- `IMAGES`: image references the cluster fixtures fill in (`"testworker"` from `morphml_images`,
  `"worker"` from `worker_image`), read by the tests' manifest helpers; `WORKER_RESOURCES`: the small
  requests those helpers give worker pods (the node has this machine's CPUs, 2 here).
- `journal_file` / `read_journal`: the master's SQLite journal, read (through `Journal`, read-only)
  from the hostPath volume the suite's binder (`tests.cluster.provisioner`) bound the experiment's
  journal claim to, summarised for
  assertions: every lease, every re-lease with the path that fired (stream / heartbeat / pod_gone)
  and its timestamps, and every result with its disposition.
- `FakeWorkerSession` / `lose_fake_workers`: worker sessions opened by the test process itself
  with real gRPC (Register + Connect with the experiment's token) and broken on purpose, so the
  master records a loss detected by the stream: as many losses as a test wants, in seconds.
- `process_pid`: the host pid of a pod's container process (SIGSTOP / SIGCONT a master): containers
  are processes of this host in their own namespaces.

Imports: the standard library only at module level (workers import this module); grpc, the
generated protocol and morphml's Journal inside the functions that use them.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EVALUATOR = "tests.cluster.operator_trials:sleep_epochs"


#: Image references for the tests' manifests, filled in by the cluster fixtures (see the docstring).
IMAGES: dict[str, str] = {}
#: Worker pods' resources in the tests' experiments: small requests (the node has this machine's
#: CPUs; the default worker asks for a whole one each), a limit the trials stay far below.
WORKER_RESOURCES = {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}}


def image(role: str) -> str:
    """IMAGES[role], or an error naming the fixture that provides it."""
    fixture = {"testworker": "morphml_images (or operator)", "worker": "worker_image"}.get(role, role)
    if role not in IMAGES:
        raise AssertionError(f"no {role!r} image for the experiment: the test must request the {fixture} fixture")
    return IMAGES[role]


def sleep_epochs(arch_json: dict, evaluation_spec: dict, device: str | None) -> dict:
    """Sleeps evaluation_spec["epochs"] seconds, then returns a deterministic fake accuracy."""
    seconds = float(evaluation_spec.get("epochs", 1))
    time.sleep(seconds)
    digest = hashlib.sha256(json.dumps(arch_json, sort_keys=True).encode()).digest()
    return {"val_accuracy": 0.5 + digest[0] / 255.0 * 0.49, "train_seconds": seconds, "device": device or "cpu"}


def oom_once(arch_json: dict, evaluation_spec: dict, device: str | None) -> dict:
    """The first call in a pod (marker file in its /tmp emptyDir) allocates and touches memory,
    64 MiB at a time, until the OOM killer ends the process (the pod's memory limit must be below
    4 GiB); every later call is `sleep_epochs`. The runner process is the largest in the container,
    so it is the one the kernel kills (cgroup v1: one victim, the biggest)."""
    marker = Path("/tmp/oom-once")
    if not marker.exists():
        marker.write_text(f"{os.getpid()}\n")
        chunks = []
        for _ in range(64):
            chunks.append(b"\x01" * (64 << 20))  # written: every page is resident (calloc'd zeros are not)
        raise RuntimeError(f"allocated {len(chunks) * 64} MiB without being OOM-killed: is the memory limit set?")
    return sleep_epochs(arch_json, evaluation_spec, device)


def oom_killed_once(arch_json: dict, evaluation_spec: dict, device: str | None) -> dict:
    """`oom_once` with the victim chosen: the first call in a pod (marker /tmp/oom-killed-once)
    raises its own process's oom_score_adj to 1000, the most (any process may raise its own;
    lowering needs CAP_SYS_RESOURCE), then allocates and touches memory until the OOM killer ends
    it. The trial process is then both the largest process of the container and the one with the
    highest score adjustment (the kubelet gives all of a Burstable container's processes the same
    one), so the kernel kills it and not the worker beside it, as long as the memory limit is
    several times the worker's own size (the OOM test gives 512Mi; the worker is ~100 MiB). The
    worker lives on and reports the trial. Every later call is `sleep_epochs`. The process test
    (tests/process/test_worker_oom_cgroup.py) moves the marker with MORPHML_TEST_OOM_MARKER."""
    marker = Path(os.environ.get("MORPHML_TEST_OOM_MARKER", "/tmp/oom-killed-once"))
    if not marker.exists():
        Path("/proc/self/oom_score_adj").write_text("1000\n")
        marker.write_text(f"{os.getpid()} oom_score_adj={Path('/proc/self/oom_score_adj').read_text().strip()}\n")
        chunks = []
        for _ in range(64):
            chunks.append(b"\x01" * (64 << 20))  # written: every page is resident
        raise RuntimeError(f"allocated {len(chunks) * 64} MiB without being OOM-killed: is the memory limit set?")
    return sleep_epochs(arch_json, evaluation_spec, device)


def journal_file(kube, namespace: str, experiment: str) -> Path:
    """Where NAME-journal's volume is on this host (a hostPath PersistentVolume)."""
    claim = kube.kubectl_json("get", "pvc", f"{experiment}-journal", "-n", namespace)
    volume = kube.kubectl_json("get", "pv", claim["spec"]["volumeName"])
    return Path(volume["spec"]["hostPath"]["path"]) / "journal.db"


def read_journal(path: Path) -> dict:
    """The journal's tasks, attempts, results and re-leases as plain lists of dicts (read through
    `Journal.open_read_only`: the master may still be writing it)."""
    from morphml.distributed.journal import Journal

    journal = Journal.open_read_only(path)
    try:
        tasks = [{"task_id": t.task_id, "state": t.state.value, "attempt": t.attempt,
                  "finished_attempt": t.finished_attempt} for t in journal.load_tasks()]
        attempts = [{"task_id": a.task_id, "attempt": a.attempt, "worker_name": a.worker_name,
                     "leased_at": a.leased_at, "state": a.state.value, "ended_at": a.ended_at,
                     "outcome": a.outcome} for a in journal.load_attempts()]
        result_keys = ("task_id", "attempt", "worker_name", "disposition", "ok", "received_at")
        results = [{k: r[k] for k in result_keys} for r in journal.results()]
        requeues = [{"ts": e["ts"], "task_id": e["task_id"], "attempt": e["attempt"], "worker_name": e["worker_name"],
                     "detected_by": e["detail"].get("detected_by"),
                     "detected_at": e["detail"].get("detected_at", e["ts"])} for e in journal.events("requeued")]
        phase = journal.get_meta("phase")
    finally:
        journal.close()
    return {"tasks": tasks, "attempts": attempts, "results": results, "requeues": requeues, "phase": phase}


def next_lease(journal: dict, task_id: str, attempt: int) -> dict | None:
    """The lease that followed `attempt` of `task_id` (its re-lease), if any."""
    later = [a for a in journal["attempts"] if a["task_id"] == task_id and a["attempt"] > attempt]
    return min(later, key=lambda a: a["attempt"]) if later else None


def finished_once(journal: dict) -> tuple[list[str], list[str]]:
    """(task ids with an accepted success, task ids with more than one).

    A failed attempt that was retried is also "accepted" (it counted as that attempt's outcome);
    only successes can be double-counted trials.
    """
    accepted: dict[str, int] = {}
    for result in journal["results"]:
        if result["disposition"] == "accepted" and result["ok"]:
            accepted[result["task_id"]] = accepted.get(result["task_id"], 0) + 1
    return sorted(accepted), sorted(t for t, n in accepted.items() if n > 1)



class FakeWorkerSession:
    """One worker registration held by the test process: Register, then a Connect stream kept open.

    `connected()` waits until the master lists it as a live worker; `break_stream()` cancels the
    stream (the master sees the session end: a loss detected by "stream"); `close()` ends it.
    Heartbeats go out every `heartbeat_seconds` while the stream is open, so only the stream (or
    the pod path) can declare it dead.
    """

    def __init__(self, address: str, token: str, name: str, slots: int = 1, heartbeat_seconds: float = 1.0):
        import grpc

        from morphml.distributed.proto import worker_pb2 as pb
        from morphml.distributed.proto import worker_pb2_grpc as pb_grpc

        self._pb = pb
        self.address, self.name = address, name
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.MasterStub(self.channel)
        reply = self.stub.Register(pb.RegisterRequest(worker_name=name, slots=slots, hostname="test-process",
                                                      pid=os.getpid()), metadata=self.metadata, timeout=10)
        self.worker_id = reply.worker_id
        self.heartbeat_interval = reply.heartbeat_interval_seconds
        self._closed = threading.Event()
        self._heartbeat_seconds = heartbeat_seconds
        self.call = self.stub.Connect(self._messages(), metadata=self.metadata)
        self.leases: list[tuple[str, int]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _messages(self) -> Iterator[Any]:
        pb = self._pb
        yield pb.WorkerMessage(hello=pb.Hello(worker_id=self.worker_id))
        sequence = 0
        while not self._closed.wait(self._heartbeat_seconds):
            sequence += 1
            yield pb.WorkerMessage(heartbeat=pb.Heartbeat(
                sequence=sequence, running=[pb.LeaseRef(task_id=t, attempt=a) for t, a in self.leases]))

    def _read(self) -> None:
        try:
            for message in self.call:
                for lease in message.leases.leases:
                    self.leases.append((lease.task_id, lease.attempt))
        except Exception:  # the stream ended (cancelled by us or closed by the master)
            pass

    def status(self, losses_after_seq: int = 0) -> Any:
        pb = self._pb
        return self.stub.GetStatus(pb.StatusRequest(include_dead_workers=True, losses_after_seq=losses_after_seq),
                                   metadata=self.metadata, timeout=10)

    def connected(self, timeout: float = 20.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = {w.worker_id: w.state for w in self.status().workers}
            if states.get(self.worker_id) not in (None, "registering"):
                return
            time.sleep(0.02)
        raise AssertionError(f"{self.name} ({self.worker_id}) never connected to {self.address}")

    def break_stream(self) -> None:
        self._closed.set()
        self.call.cancel()

    def close(self) -> None:
        self._closed.set()
        self.call.cancel()
        self.channel.close()


def lose_fake_workers(address: str, token: str, count: int, prefix: str,
                      on_loss: Callable[[int], None] | None = None, timeout: float = 20.0) -> int:
    """Open and break `count` worker sessions one after another; each becomes one loss on the master.

    Waits for each loss to be recorded (GetStatus.loss_seq grows) before the next; returns the
    master's loss_seq at the end. `on_loss(i)` runs after the i-th (1-based) loss is recorded.
    """
    latest = 0
    for index in range(1, count + 1):
        session = FakeWorkerSession(address, token, f"{prefix}-{index}")
        try:
            session.connected(timeout)
            before = int(session.status().loss_seq)
            session.break_stream()
            deadline = time.time() + timeout
            while (latest := int(session.status().loss_seq)) <= before:
                if time.time() > deadline:
                    raise AssertionError(f"the master recorded no loss for {session.name} within {timeout} s")
                time.sleep(0.02)
        finally:
            session.close()
        if on_loss is not None:
            on_loss(index)
    return latest


def process_pid(pod: dict, container: str | None = None) -> int:
    """The host pid of a pod's container: the process whose environment names the pod (POD_NAME and
    POD_NAMESPACE, as the operator's builders set; `container` is not told apart)."""
    wanted = {f"POD_NAME={pod['metadata']['name']}".encode(), f"POD_NAMESPACE={pod['metadata']['namespace']}".encode()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if wanted <= environ:
            found.append(int(entry.name))
    if not found:
        raise AssertionError(f"no process of pod {pod['metadata']['name']} found")
    return min(found)  # the container's first process (its children have higher pids, mostly)
