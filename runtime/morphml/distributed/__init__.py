"""Distributed runtime: the gRPC master and workers of one NAS experiment.

Lives here: the protocol (proto/), explicit task/worker state machines (states), an injectable
clock (clock), the lease table and worker registry (leases, registry), the SQLite journal
(journal), the experiment coordinator that drives an optimizer through ask/tell (coordinator),
the gRPC master and worker processes (master, worker) and the child process that runs trials
(trial_runner).

May import: morphml.space/graph/optimizers/evaluation/experiment (evaluation only lazily, in
the trial runner), grpc, protobuf, sqlite3. Never torch at import time: a worker process that
runs only user evaluators must not load torch.
"""

from __future__ import annotations

__all__ = ["MasterNode", "WorkerNode"]


def __getattr__(name: str) -> type:
    # Lazy so `import morphml.distributed` (e.g. for states) does not load grpc.
    if name == "MasterNode":
        from .master import MasterNode

        return MasterNode
    if name == "WorkerNode":
        from .worker import WorkerNode

        return WorkerNode
    raise AttributeError(name)
