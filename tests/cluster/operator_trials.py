"""Support for the operator's pod-loss and chaos tests (tests/cluster/test_operator_*.py).

- `sleep_epochs`: a user evaluator (`spec.evaluation.evaluator: "tests.cluster.operator_trials:sleep_epochs"`)
  that "trains" for `spec.evaluation.epochs` seconds and returns a fake accuracy derived from the
  architecture: trials of a known length, no torch, so "mid-trial" is real and CPU stays free.
  The worker processes of the process node import it because the test modules put the repository
  root on PYTHONPATH before the node agent starts (`repo_on_pythonpath`).
- `journal_file` / `read_journal`: the master's SQLite journal, read from the hostPath volume the
  process node bound the experiment's journal claim to, summarised for assertions: every lease,
  every re-lease with the path that fired (stream / heartbeat / pod_gone) and its timestamps, and
  every result with its disposition.

Imports: the standard library only (workers import this module).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EVALUATOR = "tests.cluster.operator_trials:sleep_epochs"


def repo_on_pythonpath() -> None:
    """Make `tests.*` importable by every process the node agent starts (it inherits our env)."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *parts])


def sleep_epochs(arch_json: dict, evaluation_spec: dict, device: str | None) -> dict:
    """Sleeps evaluation_spec["epochs"] seconds, then returns a deterministic fake accuracy."""
    seconds = float(evaluation_spec.get("epochs", 1))
    time.sleep(seconds)
    digest = hashlib.sha256(json.dumps(arch_json, sort_keys=True).encode()).digest()
    return {"val_accuracy": 0.5 + digest[0] / 255.0 * 0.49, "train_seconds": seconds, "device": device or "cpu"}


def journal_file(kube, namespace: str, experiment: str) -> Path:
    """Where the process node keeps NAME-journal's volume (a hostPath PersistentVolume)."""
    claim = kube.kubectl_json("get", "pvc", f"{experiment}-journal", "-n", namespace)
    volume = kube.kubectl_json("get", "pv", claim["spec"]["volumeName"])
    return Path(volume["spec"]["hostPath"]["path"]) / "journal.db"


def read_journal(path: Path) -> dict:
    """The journal's tasks, attempts, results and re-leases as plain lists of dicts."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        tasks = [dict(zip(("task_id", "state", "attempt", "finished_attempt"), row)) for row in
                 db.execute("SELECT task_id, state, attempt, finished_attempt FROM tasks ORDER BY seq")]
        attempts = [dict(zip(("task_id", "attempt", "worker_name", "leased_at", "state", "ended_at", "outcome"), row))
                    for row in db.execute("SELECT task_id, attempt, worker_name, leased_at, state, ended_at, outcome "
                                          "FROM attempts ORDER BY leased_at")]
        results = [dict(zip(("task_id", "attempt", "worker_name", "disposition", "ok", "received_at"), row))
                   for row in db.execute("SELECT task_id, attempt, worker_name, disposition, ok, received_at "
                                         "FROM results ORDER BY id")]
        requeues = []
        for ts, task_id, attempt, worker_name, detail in db.execute(
                "SELECT ts, task_id, attempt, worker_name, detail FROM events WHERE kind = 'requeued' ORDER BY seq"):
            info = json.loads(detail) if detail else {}
            requeues.append({"ts": ts, "task_id": task_id, "attempt": attempt, "worker_name": worker_name,
                             "detected_by": info.get("detected_by"), "detected_at": info.get("detected_at", ts)})
        phase = db.execute("SELECT value FROM meta WHERE key = 'phase'").fetchone()
    finally:
        db.close()
    return {"tasks": tasks, "attempts": attempts, "results": results, "requeues": requeues,
            "phase": json.loads(phase[0]) if phase else None}


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

