"""Process-tier helpers: real `morphml master` / `morphml worker` processes on loopback.

Every process is started in its own process group (so its trial runner children die with it)
and the `procs` fixture (tests/process/conftest.py) kills every group it started when the test
ends, pass or fail.
Evaluators come from tests/evaluators.py through the real `spec.evaluation.evaluator` feature.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import yaml

from morphml.distributed.auth import token_metadata
from morphml.distributed.journal import Journal
from morphml.distributed.proto import worker_pb2 as pb
from morphml.distributed.proto import worker_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
TOKEN = "process-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_manifest(path: Path, evaluator: str = "tests.evaluators:instant", max_trials: int = 6,
                   max_failed: int = 3, retries: int = 2, algorithm: str = "random", population: int = 4,
                   generations: int = 3, name: str = "proc") -> Path:
    doc = {
        "apiVersion": "morphml.io/v1alpha1", "kind": "NASExperiment", "metadata": {"name": name},
        "spec": {
            "searchSpace": {"layers": [
                {"type": "conv2d", "filters": [8, 16, 24, 32, 48, 64], "kernelSize": [3, 5],
                 "activation": ["relu", "gelu", "silu", "tanh"]},
                {"type": "batchnorm", "optional": True},
                {"type": "maxpool", "poolSize": [2]},
                {"type": "flatten"},
                {"type": "dense", "units": [16, 32, 64, 96, 128, 256], "activation": ["relu", "tanh", "gelu"]},
                {"type": "dropout", "rate": [0.0, 0.1, 0.2, 0.3, 0.4]},
            ]},
            "optimizer": {"algorithm": algorithm, "populationSize": population, "generations": generations,
                          "seed": 7},
            "evaluation": {"dataset": {"name": "digits"}, "evaluator": evaluator, "timeoutSeconds": 60},
            "budget": {"maxTrials": max_trials, "maxFailedTrials": min(max_failed, max_trials)},
            "faultTolerance": {"maxTaskRetries": retries},
        },
    }
    path.write_text(yaml.safe_dump(doc))
    return path


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


def finished(st) -> bool:
    return st is not None and st.phase in ("Succeeded", "Failed")


def journal_rows(path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def journal_events(path: Path, kind: str) -> list[dict]:
    """The journal's events of one kind, oldest first (read through Journal, read-only)."""
    journal = Journal.open_read_only(path)
    try:
        return journal.events(kind)
    finally:
        journal.close()


def assert_each_trial_once(journal: Path, budget: int) -> None:
    """Exactly `budget` finished trials, each counted by exactly one accepted result."""
    reader = Journal.open_read_only(journal)
    try:
        done = [t for t in reader.load_tasks() if t.state.value in ("succeeded", "failed")]
        counted = Counter(e["task_id"] for e in reader.events("succeeded") + reader.events("failed"))
    finally:
        reader.close()
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
