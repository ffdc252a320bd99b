"""A journal of many trials written quickly through the Journal API, for the dashboard's tests
and benchmarks/bench_dashboard.py (no master, no workers: rows as a finished or running search
would leave them).

`write_journal(path, trials, ...)` writes `trials` tasks (valid digits-sized architectures with
seeded random choices), one attempt each (every `relaunch_every`-th trial has a first attempt
lost to a worker loss and a second one), a learning curve of `epochs` points per finished trial,
failures every `fail_every`-th trial, the last `running` trials leased and unfinished, the
optimizer's settings (objective, goal, max_trials, objectives) and the experiment's meta.
`finish_running_task(path, task_id)` journals what the master does when a leased trial succeeds
(task, attempt, a curve point), for tests and benchmarks of what changes between two reads.
Imported as `tests.dashboard_journal`. Imports: morphml.distributed.journal/leases/states.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from morphml.distributed.journal import Journal
from morphml.distributed.leases import Attempt, Task
from morphml.distributed.states import AttemptState, TaskState

T0 = 1_700_000_000.0


def architecture(rng: random.Random) -> dict:
    """A valid [1, 8, 8] -> 10 classes chain: conv, optional batchnorm, maxpool, flatten, dense, dropout."""
    layers = [("conv2d", {"filters": rng.choice([8, 16, 32, 64]), "kernel_size": rng.choice([3, 5]), "stride": 1,
                          "activation": rng.choice(["relu", "gelu", "tanh"])})]
    if rng.random() < 0.5:
        layers.append(("batchnorm", {}))
    layers += [("maxpool", {"pool_size": 2, "stride": 2}), ("flatten", {}),
               ("dense", {"units": rng.choice([16, 32, 64, 128]), "activation": rng.choice(["relu", "tanh"])}),
               ("dropout", {"rate": rng.choice([0.0, 0.1, 0.2, 0.3])})]
    nodes = [{"id": "n0", "op": "input", "params": {}}]
    nodes += [{"id": f"n{i}", "op": op, "params": params} for i, (op, params) in enumerate(layers, 1)]
    nodes.append({"id": f"n{len(nodes)}", "op": "output", "params": {"units": 10}})
    edges = [[nodes[i]["id"], nodes[i + 1]["id"]] for i in range(len(nodes) - 1)]
    return {"input_shape": [1, 8, 8], "num_classes": 10, "nodes": nodes, "edges": edges}


def write_journal(path: Path, trials: int, *, epochs: int = 5, fail_every: int = 0, relaunch_every: int = 0,
                  running: int = 0, workers: int = 4, seed: int = 1, objectives: list[dict] | None = None,
                  phase: str | None = None) -> Path:
    rng = random.Random(seed)
    journal = Journal(path, synchronous="NORMAL")
    try:
        settings: dict = {"objective": "val_accuracy", "goal": "maximize", "max_trials": trials, "seed": seed}
        if objectives:
            settings["objectives"] = objectives
        loss_seq = 0
        for start in range(0, trials, 1000):
            with journal.transaction():
                for i in range(start, min(trials, start + 1000)):
                    loss_seq = _write_trial(journal, rng, i, trials, epochs, fail_every, relaunch_every, running,
                                            workers, loss_seq)
        journal.save_optimizer({"algorithm": "random", "settings": settings}, T0, 0)
        journal.set_meta("name", "bench")
        done = phase or ("Running" if running else "Succeeded")
        journal.set_meta("phase", done)
        journal.set_meta("message", f"{trials} trials" if done == "Succeeded" else "")
    finally:
        journal.close()
    return path


def _write_trial(journal: Journal, rng: random.Random, i: int, trials: int, epochs: int, fail_every: int,
                 relaunch_every: int, running: int, workers: int, loss_seq: int) -> int:
    arch = architecture(rng)
    arch_json = json.dumps(arch, sort_keys=True)
    task_id = f"t{i + 1:06d}"
    at = T0 + i * 2.0
    worker = f"w{i % workers}"
    task = Task(task_id=task_id, candidate_id=f"c{i + 1}", arch_json=arch_json,
                arch_hash=hashlib.sha256(arch_json.encode()).hexdigest(),
                summary="-".join(n["op"] for n in arch["nodes"][1:-1]), generation=i // 50, seed=i, proposed_at=at)
    attempt = 1
    if relaunch_every and i % relaunch_every == relaunch_every - 1:  # a first attempt lost with its worker
        loss_seq += 1
        journal.save_attempt(Attempt(task_id, 1, f"{worker}/1", worker, at, AttemptState.STALE, at + 0.5, "heartbeat"))
        journal.add_loss(loss_seq, f"{worker}/1", worker, "heartbeat", at + 0.5, [(task_id, 1)])
        attempt, worker = 2, f"w{(i + 1) % workers}"
    task.attempt = attempt
    leased = Attempt(task_id, attempt, f"{worker}/1", worker, at + 0.6)
    if i >= trials - running:
        task.state = TaskState.LEASED
        journal.save_attempt(leased)
        journal.save_task(task, i + 1)
        return loss_seq
    end = at + 1.8
    leased.ended_at = end
    if fail_every and i % fail_every == fail_every - 1:
        task.state, task.error_kind, task.error_message = TaskState.FAILED, "exception", "RuntimeError: synthetic"
        leased.state, leased.outcome = AttemptState.FAILED, "exception"
    else:
        accuracy = 0.5 + 0.49 * rng.random()
        for step in range(1, epochs + 1):
            journal.add_curve_point(task_id, attempt, step, at + step * 0.2,
                                    {"epoch": step, "val_accuracy": accuracy * step / epochs})
        task.state, task.metrics = TaskState.SUCCEEDED, {"val_accuracy": accuracy, "epochs": epochs,
                                                         "latency_ms": rng.uniform(0.1, 5.0)}
        leased.state, leased.outcome = AttemptState.SUCCEEDED, "ok"
    task.finished_by, task.finished_attempt, task.finished_at, task.duration_seconds = worker, attempt, end, 1.2
    journal.save_attempt(leased)
    journal.save_task(task, i + 1)
    return loss_seq


def finish_running_task(path: Path, task_id: str | None = None) -> str:
    """Finishes `task_id` (default: the first leased task) as succeeded; returns its id."""
    journal = Journal(path)
    try:
        leased = [t for t in journal.load_tasks((TaskState.LEASED,)) if task_id in (None, t.task_id)]
        if not leased:
            raise ValueError(f"journal {path}: no leased task {task_id or ''} to finish")
        task = leased[0]
        attempt = journal.load_attempts(task.task_id)[-1]
        with journal.transaction():
            journal.add_curve_point(task.task_id, attempt.attempt, 1, 1.0, {"epoch": 1, "val_accuracy": 0.7})
            task.state, task.metrics = TaskState.SUCCEEDED, {"val_accuracy": 0.99}
            task.finished_by, task.finished_attempt, task.finished_at = attempt.worker_name, attempt.attempt, 2e9
            journal.save_task(task, int(task.task_id[1:]))
            journal.save_attempt(Attempt(task.task_id, attempt.attempt, attempt.worker_id, attempt.worker_name,
                                         attempt.leased_at, AttemptState.SUCCEEDED, 2e9, "ok"))
        return task.task_id
    finally:
        journal.close()
