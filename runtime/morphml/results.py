"""Results of a finished (or running) experiment, read from its journal.

`write_results(journal_path, out_dir, metric, goal)` writes `trials.csv` (one row per finished
trial: trial id, attempt, worker, status (succeeded, stopped by early stopping, or failed), epochs
(trained: the result's `epochs`, else the last step of its journaled learning curve), metrics,
architecture hash, ...), `best.json`
(architecture JSON + metrics of the best trial) and `convergence.png` (each trial's metric and
the best so far, drawn with matplotlib's Agg backend). For a search with several objectives (the
`objectives` of the optimizer state in the journal, or `objectives=` given) it also writes
`pareto.csv` (the succeeded trials no other succeeded trial dominates: mutually non-dominated, and
each other trial is dominated by or equal to one of them; `knee` marks the one closest to the
ideal point) and `pareto.png` (every trial on the first two objectives, the front highlighted).
`best.json` stays the best trial by the first objective.

Imports: csv, json, morphml.pareto, morphml.graph, morphml.distributed.journal (all SQL lives there)
and states; matplotlib lazily.
No torch.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from morphml.distributed.journal import Journal
from morphml.distributed.states import TaskState
from morphml.graph import ArchitectureGraph, GraphError
from morphml.pareto import knee_point, orient, pareto_front

FIXED_COLUMNS = ["trial_id", "attempt", "worker", "status", "epochs", "generation", "arch_hash"]
TAIL_COLUMNS = ["duration_seconds", "retries", "error_kind", "error", "summary"]


def finished_trials(journal: Journal) -> list[dict]:
    """Finished trials (succeeded, stopped or failed for good) in the order they finished."""
    tasks = journal.load_tasks((TaskState.SUCCEEDED, TaskState.STOPPED, TaskState.FAILED))  # proposal order
    tasks.sort(key=lambda t: t.finished_at if t.finished_at is not None else float("-inf"))
    steps = journal.curve_steps()
    out = []
    for t in tasks:
        failed = t.state is TaskState.FAILED
        epochs = (t.metrics or {}).get("epochs", steps.get(t.task_id, ""))
        out.append({"trial_id": t.task_id, "attempt": t.finished_attempt, "worker": t.finished_by,
                    "status": t.state.value, "epochs": epochs, "generation": t.generation, "arch_hash": t.arch_hash,
                    "metrics": t.metrics or {}, "duration_seconds": t.duration_seconds, "retries": t.retries_used,
                    "error_kind": t.error_kind if failed else "",
                    "error": t.error_message.splitlines()[0] if failed and t.error_message else "",
                    "summary": t.summary, "arch_json": t.arch_json, "finished_at": t.finished_at})
    return out


def _better(a: float, b: float | None, goal: str) -> bool:
    return b is None or (a > b if goal == "maximize" else a < b)


def write_results(journal_path: str | Path, out_dir: str | Path, metric: str = "val_accuracy",
                  goal: str = "maximize", objectives: list[dict] | None = None) -> dict:
    """Writes trials.csv, best.json, convergence.png (and pareto.csv, pareto.png for several
    objectives); returns a summary dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(journal_path)
    try:
        trials = finished_trials(journal)
        if objectives is None:
            objectives = journaled_objectives(journal)
    finally:
        journal.close()
    keys = sorted({k for t in trials for k in t["metrics"]} - {metric, "epochs"})
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
               "failed": sum(t["status"] == "failed" for t in trials),
               "stopped": sum(t["status"] == "stopped" for t in trials), "metric": metric, "goal": goal, "best": None}
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
    if objectives and len(objectives) > 1:
        summary["pareto"] = write_pareto(trials, objectives, out)
    return summary


# --------------------------------------------------------------------------- several objectives

GRAPH_METRICS = ("params", "flops")  # known from the architecture when a result lacks them


def journaled_objectives(journal: Journal) -> list[dict] | None:
    """The optimizer's objective list from its last journaled state, or None (one objective)."""
    state, _ = journal.load_optimizer()
    objectives = ((state or {}).get("settings") or {}).get("objectives")
    return [dict(o) for o in objectives] if isinstance(objectives, list) and len(objectives) > 1 else None


def objective_values(trial: dict, objectives: list[dict]) -> list[float] | None:
    """The trial's value of every objective (params/flops from its graph if not reported), or None."""
    if trial["status"] != "succeeded":
        return None
    values = []
    for objective in objectives:
        value = trial["metrics"].get(objective["metric"])
        if value is None and objective["metric"] in GRAPH_METRICS:
            try:
                graph = ArchitectureGraph.from_json(json.loads(trial["arch_json"]))
            except (GraphError, ValueError, TypeError):
                return None
            value = graph.param_count() if objective["metric"] == "params" else graph.flops()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return None
        values.append(float(value))
    return values


def pareto_rows(trials: list[dict], objectives: list[dict]) -> tuple[list[dict], list[tuple[dict, list[float]]]]:
    """(front rows with a `knee` flag, every (trial, values) with all objectives measured)."""
    goals = [o["goal"] for o in objectives]
    scored = [(t, v) for t in trials if (v := objective_values(t, objectives)) is not None]
    points = [orient(v, goals) for _, v in scored]
    front = pareto_front(points)
    knee = knee_point(points, front)
    rows = []
    for i in front:
        t, values = scored[i]
        row = {"trial_id": t["trial_id"], "arch_hash": t["arch_hash"]}
        row.update({o["metric"]: v for o, v in zip(objectives, values, strict=True)})
        row.update({"knee": i == knee, "summary": t["summary"]})
        rows.append(row)
    return rows, scored


def write_pareto(trials: list[dict], objectives: list[dict], out: Path) -> dict:
    """Writes pareto.csv and pareto.png; returns {size, objectives, knee, plot_skipped?}."""
    rows, scored = pareto_rows(trials, objectives)
    columns = ["trial_id", "arch_hash"] + [o["metric"] for o in objectives] + ["knee", "summary"]
    with open(out / "pareto.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    info: dict = {"size": len(rows), "objectives": objectives,
                  "knee": next((r["trial_id"] for r in rows if r["knee"]), None)}
    try:
        plot_pareto(scored, rows, objectives, out / "pareto.png")
    except ImportError:
        info["plot_skipped"] = "pareto.png not written: matplotlib is not installed (pip install 'morphml[worker]')"
    return info


def plot_pareto(scored: list[tuple[dict, list[float]]], rows: list[dict], objectives: list[dict],
                path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_name, y_name = objectives[0]["metric"], objectives[1]["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.scatter([v[0] for _, v in scored], [v[1] for _, v in scored], s=14, alpha=0.4, color="C0",
               label=f"all trials ({len(scored)})")
    front = sorted(rows, key=lambda r: (r[x_name], r[y_name]))
    ax.plot([r[x_name] for r in front], [r[y_name] for r in front], "o-", color="C3", markersize=6,
            label=f"Pareto front ({len(rows)})")
    for r in rows:
        if r["knee"]:
            ax.scatter([r[x_name]], [r[y_name]], s=120, facecolors="none", edgecolors="k", label="knee")
    ax.set_xlabel(f"{x_name} ({objectives[0]['goal']})")
    ax.set_ylabel(f"{y_name} ({objectives[1]['goal']})")
    if len(objectives) > 2:
        ax.set_title(f"Pareto front over {', '.join(o['metric'] for o in objectives)} (first two shown)")
    else:
        ax.set_title("Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
