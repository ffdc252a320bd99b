"""Shared pieces of the benchmarks: a manifest with a user evaluator from tests/evaluators.py,
a real `morphml master` process plus N `morphml worker` processes on loopback (each in its own
process group, all killed at the end), and timings read back from the master's journal (through
`Journal.open_read_only`: no SQL here).

Imports: the standard library, grpc, morphml.distributed (client side and the journal's readers),
tests.loopback (free_port and the manifest layout, shared with the process tests; the repository
root goes on sys.path for it). No torch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from morphml.distributed.auth import token_metadata
from morphml.distributed.journal import Journal
from morphml.distributed.leases import Task
from morphml.distributed.proto import worker_pb2 as pb
from morphml.distributed.proto import worker_pb2_grpc as pb_grpc
from morphml.distributed.states import TaskState

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.loopback; the benchmark's processes import tests.evaluators too
from tests import loopback  # noqa: E402 (needs REPO on sys.path)

free_port = loopback.free_port
TOKEN = "benchmark-token"


# A space with ~10^6 distinct architectures: random search never runs out of new ones.
BENCH_LAYERS = [
    {"type": "conv2d", "filters": [8, 12, 16, 24, 32, 48, 64, 96], "kernelSize": [1, 3, 5],
     "activation": ["relu", "gelu", "silu", "tanh"]},
    {"type": "batchnorm", "optional": True},
    {"type": "conv2d", "filters": [8, 12, 16, 24, 32, 48, 64, 96], "kernelSize": [1, 3, 5],
     "activation": ["relu", "gelu", "silu", "tanh"], "optional": True},
    {"type": "maxpool", "poolSize": [2]},
    {"type": "flatten"},
    {"type": "dense", "units": [16, 32, 48, 64, 96, 128, 192, 256], "activation": ["relu", "tanh", "gelu"]},
    {"type": "dropout", "rate": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]},
]


def write_manifest(path: Path, evaluator: str, max_trials: int) -> Path:
    return loopback.write_manifest(
        path, name="bench", layers=BENCH_LAYERS, evaluator=evaluator, max_trials=max_trials, max_failed=0,
        optimizer={"algorithm": "random", "populationSize": max_trials, "generations": 1, "seed": 11})


def status(port: int) -> pb.ExperimentStatus | None:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            return pb_grpc.MasterStub(ch).GetStatus(pb.StatusRequest(include_dead_workers=True),
                                                    metadata=token_metadata(TOKEN), timeout=5)
    except grpc.RpcError:
        return None


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


class Cluster:
    """A master process and worker processes; `with Cluster(...) as c:` kills them all on exit."""

    def __init__(self, evaluator: str, max_trials: int, workers: int, env: dict | None = None,
                 master_args: list[str] | None = None, min_workers: int | None = None):
        self.tmp = Path(tempfile.mkdtemp(prefix="morphml-bench-"))
        self.port = free_port()
        self.journal = self.tmp / "journal.db"
        self.env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                        MORPHML_TOKEN=TOKEN, **(env or {}))
        self.procs: list[subprocess.Popen] = []
        self.manifest = write_manifest(self.tmp / "m.yaml", evaluator, max_trials)
        self.master_args = master_args or []
        self.n_workers = workers
        self.min_workers = workers if min_workers is None else min_workers
        self._names = iter(range(100_000))

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        fh = open(self.tmp / log, "ab")
        proc = subprocess.Popen([sys.executable, "-m", "morphml.cli", *args], cwd=REPO, env=self.env, stdout=fh,
                                stderr=fh, start_new_session=True)
        fh.close()
        self.procs.append(proc)
        return proc

    def start_master(self) -> subprocess.Popen:
        self.master = self._spawn(["master", str(self.manifest), "--port", str(self.port), "--host", "127.0.0.1",
                                   "--journal", str(self.journal), "--journal-sync", "full", "--min-workers",
                                   str(self.min_workers), *self.master_args], "master.log")
        wait_for(lambda: status(self.port) is not None, 60, "the master")
        return self.master

    def add_worker(self) -> subprocess.Popen:
        return self._spawn(["worker", "--master", f"127.0.0.1:{self.port}", "--name", f"w{next(self._names)}",
                            "--give-up-after", "120"], "worker.log")

    def __enter__(self) -> Cluster:
        self.start_master()
        self.workers = [self.add_worker() for _ in range(self.n_workers)]
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def wait_done(self, timeout: float) -> pb.ExperimentStatus:
        return wait_for(lambda: (s := status(self.port)) and s.phase in ("Succeeded", "Failed") and s, timeout,
                        "the experiment to finish", interval=0.1)

    @contextlib.contextmanager
    def reading(self) -> Iterator[Journal]:
        """The master's journal, opened read-only (the master may be writing it), closed after."""
        journal = Journal.open_read_only(self.journal)
        try:
            yield journal
        finally:
            journal.close()

    def events(self, kind: str) -> list[dict]:
        """The journal's events of one kind, oldest first."""
        with self.reading() as journal:
            return journal.events(kind)

    def tasks(self, *states: str) -> list[Task]:
        """The journal's tasks (those in `states`, e.g. "succeeded", if given), in proposal order."""
        with self.reading() as journal:
            return journal.load_tasks(tuple(TaskState(s) for s in states) or None)

    def phase_times(self) -> tuple[float, float]:
        """(Running since, finished at) from the journal's phase events."""
        phases = self.events("phase")
        running = next(e["ts"] for e in phases if e["detail"]["phase"] == "Running")
        done = next(e["ts"] for e in phases if e["detail"]["phase"] in ("Succeeded", "Failed"))
        return running, done


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
