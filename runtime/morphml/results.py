"""Results of a finished (or running) experiment, read from its journal.

`write_results(journal_path, out_dir, metric, goal)` writes `trials.csv` (one row per finished
trial: trial id, attempt, worker, status (succeeded, stopped by early stopping, or failed), epochs
(trained: the result's `epochs`, else the last step of its journaled learning curve), metrics,
architecture hash, ...), `best.json` (architecture JSON + metrics of the best trial) and
`convergence.png` (`convergence_figure`: each trial's metric by trial number with integer ticks,
stopped-early and failed trials drawn apart, the best so far, and the legend outside the axes so
it hides no point; matplotlib's Agg backend). For a search with several objectives (the
`objectives` of the optimizer state in the journal, or `objectives=` given) it also writes
`pareto.csv` (the succeeded trials no other succeeded trial dominates: mutually non-dominated, and
each other trial is dominated by or equal to one of them; `knee` marks the one closest to the
ideal point) and `pareto.png` (every trial on the first two objectives, the front highlighted).
`best.json` stays the best trial by the first objective.

Imports: csv, io, json, os, morphml.pareto, morphml.graph, morphml.distributed.journal (all SQL lives there),
morphml.distributed.checkpoints (write_atomic)
and states; matplotlib lazily.
No torch.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from morphml.distributed.checkpoints import write_atomic
from morphml.distributed.journal import Journal
from morphml.distributed.states import TaskState
from morphml.graph import ArchitectureGraph, GraphError
from morphml.pareto import knee_point, orient, pareto_front

if TYPE_CHECKING:  # typing only: matplotlib is imported when a chart is drawn
    from matplotlib.figure import Figure

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
        # The master's own choice (coordinator._update_best): with asha/hyperband a stopped trial
        # is the best while none trained the full budget, so best.json agrees with status and best/.
        chosen = (journal.get_meta("best") or {}).get("trial_id")
    finally:
        journal.close()
    keys = sorted({k for t in trials for k in t["metrics"]} - {metric, "epochs"})
    metric_columns = [metric] + keys
    # Every file through a temporary one and a rename: the master serves trials.csv (DownloadArtifact)
    # and a reader may look the moment it appears; it must never see half a file.
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(FIXED_COLUMNS + metric_columns + TAIL_COLUMNS)
    for t in trials:
        writer.writerow([t[c] for c in FIXED_COLUMNS] + [t["metrics"].get(k, "") for k in metric_columns]
                        + [t[c] for c in TAIL_COLUMNS])
    write_atomic(out / "trials.csv", text.getvalue().encode())
    best = None
    for t in trials:
        value = t["metrics"].get(metric)
        if not isinstance(value, (int, float)):
            continue
        if t["trial_id"] == chosen:
            best = (t, value)
            break
        if t["status"] == "succeeded" and _better(value, best and best[1], goal):
            best = (t, value)
    summary = {"trials": len(trials), "succeeded": sum(t["status"] == "succeeded" for t in trials),
               "failed": sum(t["status"] == "failed" for t in trials),
               "stopped": sum(t["status"] == "stopped" for t in trials), "metric": metric, "goal": goal, "best": None}
    if best is not None:
        t, value = best
        doc = {"trial_id": t["trial_id"], "metric": metric, "value": value, "metrics": t["metrics"],
               "summary": t["summary"], "arch_hash": t["arch_hash"], "attempt": t["attempt"], "worker": t["worker"],
               "architecture": json.loads(t["arch_json"])}
        write_atomic(out / "best.json", (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
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
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "pareto.csv", text.getvalue().encode())
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
    _save_png(fig, path)
    plt.close(fig)


# Marker styles of convergence.png, one per trial outcome (the legend names each with its count).
OUTCOME_STYLES: dict[str, dict[str, Any]] = {
    "succeeded": {"marker": "o", "s": 18, "color": "C0", "alpha": 0.7, "label": "succeeded"},
    "stopped": {"marker": "o", "s": 22, "facecolors": "none", "edgecolors": "C2", "linewidths": 1.2,
                "label": "stopped early (last reported value)"},
    "failed": {"marker": "x", "s": 26, "color": "C3", "label": "failed (no value)"},
}


def convergence_points(trials: list[dict], metric: str, goal: str) -> dict:
    """What convergence.png draws, trial numbers 1..N in finish order: {"succeeded": [(x, y)],
    "stopped": [(x, y)], "failed": [x], "no_value": [x], "best": [(x, y)]}.

    A stopped trial is drawn at its last reported value (the value the optimizer was told) but is
    never the best (best.json takes succeeded trials only). Failed trials, and finished ones whose
    result lacks the metric, have no value: they are drawn on the bottom edge. The best-so-far line
    starts at the first succeeded trial with a value."""
    points: dict = {"succeeded": [], "stopped": [], "failed": [], "no_value": [], "best": []}
    best = None
    for number, t in enumerate(trials, 1):
        value = t["metrics"].get(metric)
        valued = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        if t["status"] == "failed":
            points["failed"].append(number)
        elif not valued:
            points["no_value"].append(number)
        else:
            points["stopped" if t["status"] == "stopped" else "succeeded"].append((number, value))
            if t["status"] == "succeeded" and _better(value, best, goal):
                best = value
        if best is not None:
            points["best"].append((number, best))
    return points


def convergence_figure(trials: list[dict], metric: str, goal: str) -> Figure:
    """The convergence chart as a matplotlib Figure (Agg): trial number on x with integer ticks,
    every trial's value (succeeded filled, stopped early hollow, failed as an x on the bottom edge),
    the best-so-far step line, and the legend outside the axes (constrained layout makes room for
    it), so it can never cover a point however the values fall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    points = convergence_points(trials, metric, goal)
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=100, layout="constrained")
    for outcome in ("succeeded", "stopped"):
        if points[outcome]:
            style = dict(OUTCOME_STYLES[outcome])
            label = f"{style.pop('label')} ({len(points[outcome])})"
            ax.scatter([x for x, _ in points[outcome]], [y for _, y in points[outcome]], label=label, zorder=3,
                       **style)
    # Trials without a value sit on the bottom edge: x in data, y in axes coordinates.
    edge = ax.get_xaxis_transform()
    if points["failed"]:
        style = dict(OUTCOME_STYLES["failed"])
        label = f"{style.pop('label')} ({len(points['failed'])})"
        ax.scatter(points["failed"], [0.03] * len(points["failed"]), transform=edge, label=label, zorder=3,
                   clip_on=False, **style)
    if points["no_value"]:
        ax.scatter(points["no_value"], [0.03] * len(points["no_value"]), transform=edge, marker="|", s=40,
                   color="0.4", label=f"finished without {metric} ({len(points['no_value'])})", zorder=3,
                   clip_on=False)
    if points["best"]:
        xs = [x for x, _ in points["best"]] + [len(trials)]
        ys = [y for _, y in points["best"]] + [points["best"][-1][1]]
        ax.step(xs, ys, where="post", color="C1", linewidth=1.8, label="best so far", zorder=2)
    count = max(len(trials), 1)
    ax.set_xlim(0.5, count + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("trial (in the order trials finished)")
    ax.set_ylabel(metric)
    ax.set_title(f"convergence: {goal} {metric}, {len(trials)} trials")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        fig.legend(loc="outside right upper", fontsize="small")
    return fig


def _save_png(fig: Any, path: Path) -> None:
    """fig as a PNG at `path`, through a temporary file and a rename (like write_atomic)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def plot_convergence(trials: list[dict], metric: str, goal: str, path: Path) -> None:
    """Writes convergence.png (see convergence_figure)."""
    fig = convergence_figure(trials, metric, goal)  # selects the Agg backend before pyplot is imported
    import matplotlib.pyplot as plt

    _save_png(fig, path)
    plt.close(fig)
