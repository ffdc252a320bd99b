"""Process-tier helpers: real `morphml master` / `morphml worker` processes on loopback.

Every process is started in its own process group (so its trial runner children die with it)
and the `procs` fixture (tests/process/conftest.py) kills every group it started when the test
ends, pass or fail.
Evaluators come from tests/evaluators.py through the real `spec.evaluation.evaluator` feature.
The journal is read through `Journal.open_read_only` (`reading`, `journal_tasks`, `journal_task`,
`journal_attempts`, `journal_results`, `journal_events`), not with SQL (`journal_rows` remains
for two files that still use it).
`free_port` and the manifest layout are shared with the benchmarks (tests/loopback.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import yaml

from morphml.distributed.auth import token_metadata
from morphml.distributed.journal import Journal
from morphml.distributed.leases import Attempt, Task
from morphml.distributed.proto import worker_pb2 as pb
from morphml.distributed.proto import worker_pb2_grpc as pb_grpc
from morphml.distributed.states import TaskState
from tests import loopback

free_port = loopback.free_port  # the process tests import it from here

REPO = Path(__file__).resolve().parents[2]
TOKEN = "process-test-token"


PROCESS_LAYERS = [
    {"type": "conv2d", "filters": [8, 16, 24, 32, 48, 64], "kernelSize": [3, 5],
     "activation": ["relu", "gelu", "silu", "tanh"]},
    {"type": "batchnorm", "optional": True},
    {"type": "maxpool", "poolSize": [2]},
    {"type": "flatten"},
    {"type": "dense", "units": [16, 32, 64, 96, 128, 256], "activation": ["relu", "tanh", "gelu"]},
    {"type": "dropout", "rate": [0.0, 0.1, 0.2, 0.3, 0.4]},
]


def write_manifest(path: Path, evaluator: str = "tests.evaluators:instant", max_trials: int = 6,
                   max_failed: int = 3, retries: int = 2, algorithm: str = "random", population: int = 4,
                   generations: int = 3, name: str = "proc", max_task_losses: int | None = None) -> Path:
    written = loopback.write_manifest(
        path, name=name, layers=PROCESS_LAYERS, evaluator=evaluator, timeout_seconds=60,
        optimizer={"algorithm": algorithm, "populationSize": population, "generations": generations, "seed": 7},
        max_trials=max_trials, max_failed=min(max_failed, max_trials), retries=retries)
    if max_task_losses is not None:  # spec.faultTolerance.maxTaskLosses (default 5)
        doc = yaml.safe_load(written.read_text())
        doc["spec"].setdefault("faultTolerance", {})["maxTaskLosses"] = max_task_losses
        written.write_text(yaml.safe_dump(doc, sort_keys=False))
    return written


class Procs:
    """Starts processes in their own groups and kills them all at the end."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.started: list[subprocess.Popen] = []
        self.token_file = tmp / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                        PYTHONUNBUFFERED="1")

    def spawn(self, args: list[str], log_name: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp / log_name, "ab")
        proc = subprocess.Popen([sys.executable, "-m", "morphml.cli", *args], cwd=REPO, env={**self.env, **(env or {})},
                                stdout=log, stderr=log, start_new_session=True)
        proc.log_path = self.tmp / log_name
        log.close()
        self.started.append(proc)
        return proc

    def master(self, manifest: Path, port: int, journal: Path | None = None, extra: list[str] | None = None,
               log_name: str = "master.log") -> subprocess.Popen:
        journal = journal or self.tmp / "journal.db"
        proc = self.spawn(["master", str(manifest), "--port", str(port), "--host", "127.0.0.1", "--journal",
                           str(journal), "--token-file", str(self.token_file), *(extra or [])], log_name)
        wait_for(lambda: health_ok(f"127.0.0.1:{port}") or proc.poll() is not None, 30, "master to serve")
        assert proc.poll() is None, proc.log_path.read_text()
        return proc

    def worker(self, port: int, name: str, extra: list[str] | None = None, env: dict | None = None,
               token_file: Path | None = None) -> subprocess.Popen:
        return self.spawn(["worker", "--master", f"127.0.0.1:{port}",
                           "--token-file", str(token_file or self.token_file),
                           "--name", name, *(extra or [])], f"worker-{name}.log", env)

    def kill_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGCONT)
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def health_ok(addr: str, service: str = "") -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(addr) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def status(port: int, token: str = TOKEN) -> pb.ExperimentStatus | None:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            return pb_grpc.MasterStub(ch).GetStatus(pb.StatusRequest(include_dead_workers=True),
                                                    metadata=token_metadata(token), timeout=2)
    except grpc.RpcError:
        return None


def running_worker(port: int) -> tuple[str, str, int] | None:
    """(worker name, task id, attempt) of some live worker holding a lease, None if none does."""
    st = status(port)
    for w in st.workers if st else []:
        if w.state != "dead" and w.running:
            return w.worker_name, w.running[0].task_id, w.running[0].attempt
    return None


def finished(st) -> bool:
    return st is not None and st.phase in ("Succeeded", "Failed")


def journal_rows(path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Raw SQL on a journal: kept only for test_worker_liveness.py and test_search_runs.py until
    they move to the readers below (issue 10: SQL only inside Journal). Don't add callers."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


@contextlib.contextmanager
def reading(path: Path) -> Iterator[Journal]:
    """The journal at `path`, opened read-only (the master may be writing it), closed after."""
    journal = Journal.open_read_only(path)
    try:
        yield journal
    finally:
        journal.close()


def journal_tasks(path: Path, states: tuple[str, ...] | None = None) -> list[Task]:
    """Every task (or those in `states`, e.g. ("failed",)) in proposal order."""
    with reading(path) as journal:
        return journal.load_tasks(tuple(TaskState(s) for s in states) if states else None)


def journal_task(path: Path, task_id: str) -> Task:
    """The one task `task_id` (fails the test when the journal has no such task)."""
    found = [t for t in journal_tasks(path) if t.task_id == task_id]
    assert len(found) == 1, f"journal {path}: {len(found)} tasks {task_id}"
    return found[0]


def journal_attempts(path: Path, task_id: str | None = None) -> list[Attempt]:
    """Every attempt (or one task's), ordered by task and attempt number."""
    with reading(path) as journal:
        return sorted(journal.load_attempts(task_id), key=lambda a: (a.task_id, a.attempt))


def journal_results(path: Path, disposition: str | None = None) -> list[dict]:
    """Every result received (or those with one disposition), in arrival order."""
    with reading(path) as journal:
        return journal.results(disposition)


def journal_events(path: Path, kind: str) -> list[dict]:
    """The journal's events of one kind, oldest first (read through Journal, read-only)."""
    with reading(path) as journal:
        return journal.events(kind)


def assert_each_trial_once(journal: Path, budget: int) -> None:
    """Exactly `budget` finished trials, each counted by exactly one accepted result."""
    with reading(journal) as reader:
        done = [t for t in reader.load_tasks() if t.state.value in ("succeeded", "failed")]
        counted = Counter(e["task_id"] for e in reader.events("succeeded") + reader.events("failed"))
    assert len(done) == budget, f"{len(done)} finished trials, budget {budget}"
    assert len(counted) == budget and all(n == 1 for n in counted.values()), counted
    hashes = [t.arch_hash for t in done]
    assert len(set(hashes)) == len(hashes), f"an architecture was evaluated twice: {len(set(hashes))} of {len(hashes)}"


def pids_with_torch(pid: int) -> list[int]:
    """The process and its descendants that have torch loaded (from /proc maps)."""
    out = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            maps = Path(f"/proc/{p}/maps").read_text()
        except OSError:
            continue
        if "libtorch" in maps or "/torch/" in maps:
            out.append(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            children = []
        todo += [int(c) for c in children]
    return out
