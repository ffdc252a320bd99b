"""The dashboard's data: an experiment's journal read into JSON rows, each with a revision number.

`DashboardData(journal_path)` reads the journal with `Journal.open_read_only` (a connection
opened for one refresh and closed after it: the master may be writing the file; nothing here
ever writes it) and keeps four resources of rows: `trials` (one per task), `curves` (the
learning curve of a trial: [step, value] of the objective metric), `attempts` (one per lease:
the workers timeline) and `losses` (one per worker loss). Every row carries the revision at
which it last changed; `changed(resource, since, offset, limit)` returns the rows changed after
revision `since`, a page at a time, so a page that polls sends only what changed and 10,000
trials never travel in one response.

Refreshing costs a read of every task, so it happens only when the journal's files changed
(size or mtime of the file and its WAL), at most once per `min_interval` seconds and at most a
fifth of the time; between refreshes requests are answered from memory (at most that stale).
A task's row and attempts are rebuilt only when the task changed; curves are re-read only for
trials that changed or are running. An architecture is parsed once per trial (it never changes).

Imports: the standard library, morphml.distributed.journal/states, morphml.graph, morphml.pareto.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from morphml.distributed.journal import Journal
from morphml.distributed.states import TaskState
from morphml.graph import ArchitectureGraph, GraphError
from morphml.pareto import orient, pareto_front

P = ParamSpec("P")
R = TypeVar("R")
RESOURCES = ("trials", "curves", "attempts", "losses")
MAX_PAGE = 5000
DEFAULT_PAGE = 2000
GRAPH_METRICS = ("params", "flops")  # known from the architecture when a result lacks them
FINISHED = (TaskState.SUCCEEDED, TaskState.STOPPED, TaskState.FAILED)
# A leased task is "running" on the page (the word a user expects; the journal says leased).
STATUS_NAMES = {TaskState.PENDING: "pending", TaskState.LEASED: "running", TaskState.SUCCEEDED: "succeeded",
                TaskState.STOPPED: "stopped", TaskState.FAILED: "failed"}


def architecture_view(arch_json: str) -> dict[str, Any]:
    """What the page shows of an architecture: nodes (id, op, params), edges, and its flat
    choices ({"conv2d.filters": 32, "dense#2.units": 64, "layers": 5, ...}: the parallel
    coordinates' axes; the k-th layer of one op is `op#k`) and the parsed JSON (for graph_costs)."""
    try:
        data = json.loads(arch_json)
    except ValueError:
        return {"nodes": [], "edges": [], "choices": {}}
    nodes: list[dict[str, Any]] = [{"id": str(n.get("id")), "op": str(n.get("op")), "params": n.get("params") or {}}
                                   for n in data.get("nodes") or [] if isinstance(n, dict)]
    edges = [[str(a), str(b)] for a, b in data.get("edges") or []]
    choices: dict[str, Any] = {"layers": sum(n["op"] not in ("input", "output") for n in nodes)}
    seen: dict[str, int] = {}
    for node in nodes:
        if node["op"] in ("input", "output"):
            continue
        seen[node["op"]] = seen.get(node["op"], 0) + 1
        name = node["op"] if seen[node["op"]] == 1 else f"{node['op']}#{seen[node['op']]}"
        for key, value in sorted(node["params"].items()):
            if isinstance(value, (int, float, str, bool)):
                choices[f"{name}.{key}"] = value
    return {"nodes": nodes, "edges": edges, "choices": choices, "json": data}


def graph_costs(arch: dict[str, Any]) -> dict[str, Any]:
    """{"params": ..., "flops": ...} of a parsed architecture (None each when it is no valid
    graph), computed once and kept in `arch`: parsing a graph costs ~0.1 ms, too much to do for
    10,000 trials on every first read when nobody looks at them."""
    if "params" not in arch:
        try:
            graph = ArchitectureGraph.from_json(arch["json"])
            arch["params"], arch["flops"] = graph.param_count(), graph.flops()
        except (GraphError, ValueError, TypeError, KeyError):
            arch["params"] = arch["flops"] = None
    return {"params": arch["params"], "flops": arch["flops"]}


def finite(value: Any) -> Any:
    """JSON-safe: NaN and infinities (a diverged trial's metrics) become None, in nested dicts too."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def file_signature(path: str) -> tuple:
    """Changes whenever the journal does: size and mtime of the database file and of its WAL."""
    out: list = []
    for name in (path, path + "-wal"):
        try:
            st = os.stat(name)
            out.append((st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def _locked(method: Callable[Concatenate[DashboardData, P], R]) -> Callable[Concatenate[DashboardData, P], R]:
    """Runs the method under the DashboardData's lock (the one refresh() takes)."""
    def run(self: DashboardData, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._lock:
            return method(self, *args, **kwargs)

    run.__doc__ = method.__doc__
    return run


class Resource:
    """Rows by key, each with the revision it last changed at, in first-seen order."""

    def __init__(self) -> None:
        self.rows: dict[Any, tuple[int, dict]] = {}

    def update(self, key: Any, row: dict, revision: int) -> bool:
        old = self.rows.get(key)
        if old is not None and old[1] == row:
            return False
        self.rows[key] = (revision, row)
        return True

    def changed(self, since: int) -> list[dict]:
        return [row for rev, row in self.rows.values() if rev > since]


class DashboardData:
    """One experiment's journal as the dashboard's JSON (see the module docstring).

    metric, goal, budget and objectives come from the caller when it knows them (the master
    does), else from the journaled optimizer state (its settings), else val_accuracy/maximize.
    """

    def __init__(self, journal_path: str | Path, metric: str | None = None, goal: str | None = None,
                 budget: int | None = None, objectives: list[dict] | None = None, min_interval: float = 0.5,
                 clock: Callable[[], float] = time.monotonic):
        self.path = str(journal_path)
        self._given: dict[str, Any] = {"metric": metric, "goal": goal, "budget": budget, "objectives": objectives}
        self.metric, self.goal, self.budget = metric or "val_accuracy", goal or "maximize", budget
        self.objectives: list[dict] = objectives or []
        self.min_interval = min_interval
        self.clock = clock
        self.revision = 0
        self.resources = {name: Resource() for name in RESOURCES}
        self._archs: dict[str, dict] = {}  # task id -> architecture_view (immutable per task)
        self._versions: dict[str, tuple] = {}  # task id -> the fields its row was last built from
        self._meta: dict[str, Any] = {}
        self._pareto: list[str] = []
        self._signature: tuple | None = None
        self._refreshed_at: float | None = None
        self._settings_read = False
        # Requests run on the server's threads: a read of the rows must not see a refresh half-done.
        self._lock = threading.RLock()
        self.refresh_seconds = 0.0  # how long the last read took (benchmarks/bench_dashboard.py)
        self._reread_seconds = 0.0  # how long the last read after the first took

    # --- reading the journal ---------------------------------------------------------------------
    def refresh(self, force: bool = False) -> bool:
        """Re-reads the journal when its files changed (and min_interval has passed); returns
        whether anything was read. Raises JournalError when the file cannot be read."""
        with self._lock:
            now = self.clock()
            # At most one read per min_interval, and never more than a fifth of the time: a read of
            # 10,000 tasks takes a good part of a second on a busy machine, and the master's RPCs
            # share the process with it.
            interval = max(self.min_interval, 4 * self._reread_seconds)
            if not force and self._refreshed_at is not None and now - self._refreshed_at < interval:
                return False
            signature = file_signature(self.path)
            if not force and signature == self._signature:
                self._refreshed_at = now
                return False
            started = time.perf_counter()
            journal = Journal.open_read_only(self.path)
            try:
                self._read(journal)
            finally:
                journal.close()
            first = self._signature is None
            self._signature, self._refreshed_at = signature, now
            self.refresh_seconds = time.perf_counter() - started
            if not first:  # the first read parses every architecture once: not what later reads cost
                self._reread_seconds = self.refresh_seconds
            return True

    def _read_settings(self, journal: Journal) -> None:
        """metric/goal/budget/objectives the caller did not give, from the optimizer's settings
        (read until a snapshot exists: a new journal has none yet)."""
        state, _ = journal.load_optimizer()
        if state is None:
            return
        settings = state.get("settings") or {}
        given = self._given
        self.metric = given["metric"] or settings.get("objective") or self.metric
        self.goal = given["goal"] or settings.get("goal") or self.goal
        if given["budget"] is None and isinstance(settings.get("max_trials"), int):
            self.budget = settings["max_trials"]
        objectives = settings.get("objectives")
        if not given["objectives"] and isinstance(objectives, list) and len(objectives) > 1:
            self.objectives = [dict(o) for o in objectives]
        self._settings_read = True

    def _read(self, journal: Journal) -> None:
        # Tens of thousands of small objects are made here: the cyclic GC's passes over them
        # (none of them is garbage yet) cost more than the reading itself.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._read_journal(journal)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _read_journal(self, journal: Journal) -> None:
        if not self._settings_read:
            self._read_settings(journal)
        revision = self.revision + 1
        changed = False
        first = not self._versions
        tasks = journal.load_tasks()
        # A task's row (and its attempts: an attempt never changes without its task changing state
        # or attempt number) is rebuilt only when this version of it changed.
        dirty = []
        for task in tasks:
            version = (task.state, task.attempt, task.retries_used, task.finished_attempt, task.error_kind)
            if self._versions.get(task.task_id) != version:
                self._versions[task.task_id] = version
                dirty.append(task)
        per_task: dict[str, list] = {}
        if first:  # one query for all of them
            for att in journal.load_attempts():
                per_task.setdefault(att.task_id, []).append(att)
        else:
            per_task = {task.task_id: journal.load_attempts(task.task_id) for task in dirty}
        trials = self.resources["trials"]
        attempts = self.resources["attempts"]
        for task in dirty:
            task_attempts = per_task.get(task.task_id, [])
            changed |= trials.update(task.task_id, self._trial_row(task, task_attempts), revision)
            for att in task_attempts:
                row = {"task_id": att.task_id, "attempt": att.attempt, "worker": att.worker_name,
                       "leased_at": att.leased_at, "ended_at": att.ended_at, "state": att.state.value,
                       "outcome": att.outcome}
                changed |= attempts.update(f"{att.task_id}/{att.attempt}", row, revision)
        # curves grow while a trial runs, and get their last points when it ends
        touched = {task.task_id for task in dirty} | {t.task_id for t in tasks if t.state is TaskState.LEASED}
        changed |= self._read_curves(journal, sorted(touched), revision, first)
        losses = self.resources["losses"]
        after = max((row["seq"] for _, row in losses.rows.values()), default=0)
        while True:
            page = journal.losses(after_seq=after, limit=500)
            for loss in page:
                row = {"seq": loss["seq"], "worker": loss["worker_name"], "detected_by": loss["detected_by"],
                       "detected_at": loss["detected_at"], "requeued": [list(r) for r in loss["requeued"]]}
                changed |= losses.update(loss["seq"], row, revision)
            if len(page) < 500:
                break
            after = page[-1]["seq"]
        meta = {"experiment": journal.get_meta("name", ""), "phase": journal.get_meta("phase", "Pending"),
                "message": journal.get_meta("message", "")}
        if meta != self._meta:
            self._meta, changed = meta, True
        if self.objectives and changed:
            scored = [(row["id"], row["objectives"]) for _, row in trials.rows.values() if row.get("objectives")]
            goals = [o["goal"] for o in self.objectives]
            front = pareto_front([orient(v, goals) for _, v in scored])
            self._pareto = [scored[i][0] for i in front]
        if changed:
            self.revision = revision

    def _trial_row(self, task: Any, attempts: list) -> dict:
        arch = self._archs.get(task.task_id)
        if arch is None:
            arch = self._archs[task.task_id] = architecture_view(task.arch_json)
            arch["arch_hash"] = task.arch_hash
        metrics = finite(task.metrics or {})
        value = metrics.get(self.metric)
        worker = task.finished_by or (attempts[-1].worker_name if attempts else "")
        failed = task.state is TaskState.FAILED
        row = {"id": task.task_id, "status": STATUS_NAMES[task.state], "generation": task.generation,
               "summary": task.summary, "value": value if isinstance(value, (int, float)) else None,
               "metrics": metrics, "worker": worker, "attempts": len(attempts), "retries": task.retries_used,
               "duration": task.duration_seconds or None,
               "finished_at": task.finished_at, "epochs": metrics.get("epochs"),
               "nodes": len(arch["nodes"]), "choices": arch["choices"],
               "error_kind": task.error_kind if failed else "",
               "error": task.error_message.splitlines()[0] if failed and task.error_message else ""}
        if self.objectives:
            row["objectives"] = self._objective_values(task.state, metrics, arch)
        return row

    def _objective_values(self, state: TaskState, metrics: dict, arch: dict) -> list[float] | None:
        if state is not TaskState.SUCCEEDED:
            return None
        values = []
        for objective in self.objectives:
            value = metrics.get(objective["metric"])
            if value is None and objective["metric"] in GRAPH_METRICS:
                value = graph_costs(arch)[objective["metric"]]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                return None
            values.append(float(value))
        return values

    def _read_curves(self, journal: Journal, task_ids: list[str], revision: int, everything: bool) -> bool:
        curves = self.resources["curves"]
        if everything:  # the first read: one query
            points: dict[str, list[dict]] = {}
            for point in journal.curves():
                points.setdefault(point["task_id"], []).append(point)
        else:
            points = {task_id: journal.curves(task_id) for task_id in task_ids}
        changed = False
        for task_id, rows in points.items():
            if not rows:
                continue
            last = rows[-1]["attempt"]  # the live attempt's curve (a re-lease starts again); rows are in order
            metric = self.metric if self.metric in rows[-1]["metrics"] else next(
                (k for k, v in rows[-1]["metrics"].items() if isinstance(v, (int, float)) and k != "epoch"), None)
            line = [[p["step"], finite(p["metrics"].get(metric))] for p in rows if p["attempt"] == last]
            changed |= curves.update(task_id, {"id": task_id, "metric": metric, "attempt": last, "points": line},
                                     revision)
        return changed

    # --- answers ---------------------------------------------------------------------------------
    @_locked
    def summary(self) -> dict:
        trials = [row for _, row in self.resources["trials"].rows.values()]
        counts = dict.fromkeys(STATUS_NAMES.values(), 0)
        best: dict | None = None
        for row in trials:
            counts[row["status"]] += 1
            if row["status"] == "succeeded" and row["value"] is not None and (
                    best is None or (row["value"] > best["value"] if self.goal == "maximize"
                                     else row["value"] < best["value"])):
                best = row
        return {"experiment": self._meta.get("experiment", ""), "phase": self._meta.get("phase", "Pending"),
                "message": self._meta.get("message", ""), "metric": self.metric, "goal": self.goal,
                "budget": self.budget, "objectives": self.objectives, "pareto": self._pareto,
                "revision": self.revision, "trials": len(trials), "counts": counts,
                "best": {k: best[k] for k in ("id", "value", "summary")} if best else None,
                "losses": len(self.resources["losses"].rows), "read_at": time.time()}

    @_locked
    def changed(self, resource: str, since: int = 0, offset: int = 0, limit: int = DEFAULT_PAGE) -> dict:
        """Rows of `resource` changed after revision `since`, from `offset`, at most `limit`.

        The set only grows while a client pages through it (revisions only increase), in a fixed
        order, so paging never skips a row (a row that changes meanwhile may come twice: keyed
        rows, the client keeps the last). The client then asks again with since = the revision
        of its first page."""
        if resource not in self.resources:
            raise KeyError(f"resource {resource!r}: allowed {', '.join(RESOURCES)}")
        limit = max(1, min(limit, MAX_PAGE))
        rows = self.resources[resource].changed(since)
        page = rows[offset:offset + limit]
        more = offset + len(page) < len(rows)
        return {"revision": self.revision, "since": since, "total": len(rows), "offset": offset, "items": page,
                "next_offset": offset + len(page) if more else None}

    @_locked
    def trial(self, task_id: str) -> dict | None:
        """One trial with its architecture (nodes and edges), attempts and curve."""
        entry = self.resources["trials"].rows.get(task_id)
        if entry is None:
            return None
        arch = self._archs[task_id]
        curve = self.resources["curves"].rows.get(task_id)
        attempts = [row for key, (_, row) in self.resources["attempts"].rows.items() if row["task_id"] == task_id]
        return {**entry[1], "architecture": {"nodes": arch["nodes"], "edges": arch["edges"]}, **graph_costs(arch),
                "arch_hash": arch["arch_hash"],
                "attempt_rows": attempts, "curve": curve[1] if curve else None}

    @_locked
    def everything(self) -> dict:
        """The whole dashboard at once (report.html): summary, every resource, every trial's
        architecture."""
        return {"summary": self.summary(),
                **{name: self.resources[name].changed(0) for name in RESOURCES},
                "architectures": {task_id: {"nodes": a["nodes"], "edges": a["edges"], **graph_costs(a)}
                                  for task_id, a in self._archs.items()}}
