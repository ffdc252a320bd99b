"""Results of a finished (or running) experiment, read from its journal.

`write_results(journal_path, out_dir, metric, goal)` writes `trials.csv` (one row per finished
trial: trial id, attempt, worker, status, metrics, architecture hash, ...), `best.json`
(architecture JSON + metrics of the best trial) and `convergence.png` (each trial's metric and
the best so far, drawn with matplotlib's Agg backend).

Imports: csv, json, morphml.distributed.journal (all SQL lives there) and states; matplotlib lazily.
No torch.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from morphml.distributed.journal import Journal
from morphml.distributed.states import TaskState

FIXED_COLUMNS = ["trial_id", "attempt", "worker", "status", "generation", "arch_hash"]
TAIL_COLUMNS = ["duration_seconds", "retries", "error_kind", "error", "summary"]


def finished_trials(journal: Journal) -> list[dict]:
    """Finished trials (succeeded or failed for good) in the order they finished."""
    tasks = journal.load_tasks((TaskState.SUCCEEDED, TaskState.FAILED))  # in proposal order: ties keep it
    tasks.sort(key=lambda t: t.finished_at if t.finished_at is not None else float("-inf"))
    out = []
    for t in tasks:
        failed = t.state is TaskState.FAILED
        out.append({"trial_id": t.task_id, "attempt": t.finished_attempt, "worker": t.finished_by,
                    "status": t.state.value, "generation": t.generation, "arch_hash": t.arch_hash,
                    "metrics": t.metrics or {}, "duration_seconds": t.duration_seconds, "retries": t.retries_used,
                    "error_kind": t.error_kind if failed else "",
                    "error": t.error_message.splitlines()[0] if failed and t.error_message else "",
                    "summary": t.summary, "arch_json": t.arch_json, "finished_at": t.finished_at})
    return out


def _better(a: float, b: float | None, goal: str) -> bool:
    return b is None or (a > b if goal == "maximize" else a < b)


def write_results(journal_path: str | Path, out_dir: str | Path, metric: str = "val_accuracy",
                  goal: str = "maximize") -> dict:
    """Writes trials.csv, best.json, convergence.png; returns a summary dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(journal_path)
    try:
        trials = finished_trials(journal)
    finally:
        journal.close()
    keys = sorted({k for t in trials for k in t["metrics"]} - {metric})
    metric_columns = [metric] + keys
    with open(out / "trials.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(FIXED_COLUMNS + metric_columns + TAIL_COLUMNS)
        for t in trials:
            writer.writerow([t[c] for c in FIXED_COLUMNS] + [t["metrics"].get(k, "") for k in metric_columns]
                            + [t[c] for c in TAIL_COLUMNS])
    best = None
    for t in trials:
        value = t["metrics"].get(metric)
        if t["status"] == "succeeded" and isinstance(value, (int, float)) and _better(value, best and best[1], goal):
            best = (t, value)
    summary = {"trials": len(trials), "succeeded": sum(t["status"] == "succeeded" for t in trials),
               "failed": sum(t["status"] == "failed" for t in trials), "metric": metric, "goal": goal, "best": None}
    if best is not None:
        t, value = best
        doc = {"trial_id": t["trial_id"], "metric": metric, "value": value, "metrics": t["metrics"],
               "summary": t["summary"], "arch_hash": t["arch_hash"], "attempt": t["attempt"], "worker": t["worker"],
               "architecture": json.loads(t["arch_json"])}
        (out / "best.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        summary["best"] = {k: doc[k] for k in ("trial_id", "value", "summary", "arch_hash")}
    try:
        plot_convergence(trials, metric, goal, out / "convergence.png")
    except ImportError:  # matplotlib comes with the `worker` extra
        summary["plot_skipped"] = ("convergence.png not written: matplotlib is not installed "
                                   "(pip install 'morphml[worker]')")
    return summary


def plot_convergence(trials: list[dict], metric: str, goal: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys, best_line, best = [], [], [], None
    for i, t in enumerate(trials, 1):
        value = t["metrics"].get(metric) if t["status"] == "succeeded" else None
        if isinstance(value, (int, float)):
            xs.append(i)
            ys.append(value)
            if _better(value, best, goal):
                best = value
        best_line.append(best)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.scatter(xs, ys, s=14, alpha=0.6, label=f"trial {metric}")
    ax.step(range(1, len(trials) + 1), [b if b is not None else float("nan") for b in best_line], where="post",
            color="C1", label="best so far")
    ax.set_xlabel("finished trials")
    ax.set_ylabel(metric)
    ax.set_title(f"convergence ({goal} {metric})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right" if goal == "maximize" else "upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
