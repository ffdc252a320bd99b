"""Several objectives: the objective list, what an optimizer learns from it, and a multi-objective
regularized evolution of our own.

What lives here:
- `check_objectives(objectives)`: the list form (``[{"metric": ..., "goal": ...}, ...]`` or
  ``[(metric, goal), ...]``) checked (at least one, goals maximize/minimize, no metric twice) and
  normalised to a list of ``{"metric", "goal"}`` dicts;
- `GRAPH_METRICS`: the metrics known from the graph before any training (``params``, ``flops``),
  filled in from the candidate's graph when a result lacks them (a custom evaluator may not report
  them);
- `MultiObjectiveMixin`: for an `Optimizer` subclass: ``objectives``, a result is a success only if
  EVERY objective has a finite value (else a failed trial, as for one objective), ``points()``
  (larger-is-better vectors of the told successes), ``pareto_front()`` (their non-dominated
  candidates, kept up to date result by result) and ``pareto_summary()`` (its size and the best
  value of each objective on it, for a status). ``objective`` / ``goal`` (what ``best()`` and the
  coordinator rank by) are the first objective's;
- `MultiObjectiveEvolution`: aging evolution whose parent is the best of the sample by
  non-dominated rank within the population, then by crowding distance (NSGA-II's order), then the
  oldest (as `RegularizedEvolution` breaks a tie); the population ages exactly as in `RegularizedEvolution`.

Imports: the standard library, `morphml.graph`, `morphml.space`, `morphml.pareto`, the optimizer
modules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from morphml.graph import ArchitectureGraph
from morphml.optimizers.base import GOALS, Optimizer, OptimizerError, morphml1_call_forms
from morphml.optimizers.evolution import RegularizedEvolution
from morphml.pareto import crowding_distance, dominates, non_dominated_sort, orient, pareto_front
from morphml.space import SearchSpace

GRAPH_METRICS = ("params", "flops")


def graph_metric(graph: ArchitectureGraph, metric: str) -> int:
    """A metric known from the graph alone: trainable parameters or forward FLOPs per example."""
    return graph.param_count() if metric == "params" else graph.flops()


def check_objectives(objectives: Any, path: str = "objectives") -> list[dict[str, str]]:
    """The objective list normalised to ``[{"metric", "goal"}, ...]``; OptimizerError names the entry."""
    if isinstance(objectives, (str, Mapping)) or not isinstance(objectives, Sequence) or not objectives:
        raise OptimizerError(f"{path}: {objectives!r} is not allowed; expected a non-empty list of {{metric, goal}}")
    out: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(objectives):
        where = f"{path}[{index}]"
        if isinstance(entry, Mapping):
            extra = sorted(set(entry) - {"metric", "goal"})
            if extra:
                raise OptimizerError(f"{where}.{extra[0]}: unknown field; allowed: metric, goal")
            metric, goal = entry.get("metric"), entry.get("goal", "maximize")
        elif isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 2:
            metric, goal = entry
        else:
            raise OptimizerError(f"{where}: {entry!r} is not allowed; expected {{metric, goal}}")
        if not isinstance(metric, str) or not metric:
            raise OptimizerError(f"{where}.metric: {metric!r} is not allowed; expected a metric name")
        if goal not in GOALS:
            raise OptimizerError(f"{where}.goal: {goal!r} is not allowed; expected one of {', '.join(GOALS)}")
        if metric in seen:
            raise OptimizerError(
                f"{where}.metric: {metric!r} is already objective {seen[metric]}; each metric may appear once"
            )
        seen[metric] = index
        out.append({"metric": metric, "goal": str(goal)})
    return out


if TYPE_CHECKING:
    _MixinBase = Optimizer
else:  # a plain mixin at run time: only concrete optimizers are Optimizer subclasses
    _MixinBase = object


class MultiObjectiveMixin(_MixinBase):
    """Objective-list bookkeeping for an `Optimizer` subclass (listed before it among the bases)."""

    objectives: list[dict[str, str]]

    def _set_objectives(self, objectives: Any, objective: str, goal: str) -> tuple[str, str]:
        """Checks and stores the list (None: the single ``objective``/``goal``); returns the first."""
        self.objectives = check_objectives([{"metric": objective, "goal": goal}] if objectives is None else objectives)
        self._front: dict[str, tuple[float, ...]] | None = {}  # the Pareto front, kept as results come in
        return self.objectives[0]["metric"], self.objectives[0]["goal"]

    @property
    def metrics_names(self) -> list[str]:
        return [o["metric"] for o in self.objectives]

    @property
    def goals(self) -> list[str]:
        return [o["goal"] for o in self.objectives]

    def _with_graph_metrics(self, key: str, metrics: Any) -> Any:
        """The metrics plus the graph metrics (params, flops) an objective needs and they lack."""
        if isinstance(metrics, (int, float)) and not isinstance(metrics, bool):
            metrics = {self.objective: float(metrics)}
        if isinstance(metrics, Mapping) and key in self._candidates:
            missing = [m for m in self.metrics_names if m in GRAPH_METRICS and m not in metrics]
            if missing and str(metrics.get("status", "ok")).lower() not in ("failed", "error"):
                graph = self._candidates[key].graph
                metrics = {**metrics, **{m: graph_metric(graph, m) for m in missing}}
        return metrics

    def update(self, candidate_id: str | Any, metrics: Mapping[str, Any] | None) -> bool:
        key = getattr(candidate_id, "id", candidate_id)
        updated = super().update(candidate_id, self._with_graph_metrics(key, metrics))
        if updated:
            self._front = None  # the point moved: recomputed from the results when next asked for
        return updated

    def tell(self, candidate_id: str | Any, metrics: Mapping[str, Any] | float | None) -> None:
        key = getattr(candidate_id, "id", candidate_id)
        metrics = self._with_graph_metrics(key, metrics)
        super().tell(candidate_id, metrics)
        if self._front is not None and key in self._candidates and self._status[key] == "done":
            values = self.values_of(self._metrics[key])
            if values is not None:
                point = orient(values, self.goals)
                # O(front) per result: the new point joins unless a member dominates it, and
                # evicts the members it dominates.
                if not any(dominates(other, point) for other in self._front.values()):
                    self._front = {cid: p for cid, p in self._front.items() if not dominates(point, p)}
                    self._front[key] = point

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._front = None  # recomputed from the restored results when first asked for

    def _fitness_of(self, metrics: Mapping[str, Any] | None) -> float | None:
        if self.values_of(metrics) is None:
            return None
        return super()._fitness_of(metrics)

    def values_of(self, metrics: Mapping[str, Any] | None) -> list[float] | None:
        """Every objective's raw value, or None when the trial failed or one is missing/non-finite."""
        if metrics is None or str(metrics.get("status", "ok")).lower() in ("failed", "error"):
            return None
        values = []
        for metric in self.metrics_names:
            value = metrics.get(metric)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return None
            values.append(float(value))
        return values

    def points(self) -> dict[str, tuple[float, ...]]:
        """candidate id -> larger-is-better point, for every told success, in ask order."""
        out = {}
        for candidate_id in self._candidates:
            if self._status[candidate_id] == "done":
                values = self.values_of(self._metrics[candidate_id])
                if values is not None:
                    out[candidate_id] = orient(values, self.goals)
        return out

    def pareto_front(self) -> list[str]:
        """Ids of the non-dominated told successes, in ask order."""
        if self._front is None:
            points = self.points()
            ids = list(points)
            self._front = {ids[i]: points[ids[i]] for i in pareto_front([points[i] for i in ids])}
        front = self._front
        return [cid for cid in self._candidates if cid in front]

    def pareto_summary(self) -> dict[str, Any]:
        """What a status shows: the front's size and, per objective, its best value on the front
        (the extreme trade-offs) with the candidate that has it."""
        front = self.pareto_front()
        points = self._front or {}
        best: dict[str, dict[str, Any]] = {}
        for m, objective in enumerate(self.objectives):
            if not front:
                break
            winner = max(front, key=lambda cid: points[cid][m])  # the earliest on a tie
            values = self.values_of(self._metrics[winner])
            assert values is not None  # front members are successes with every objective
            best[objective["metric"]] = {"candidate": winner, "value": values[m]}
        return {"size": len(front), "best": best}


class MultiObjectiveEvolution(MultiObjectiveMixin, RegularizedEvolution):
    """Aging evolution over several objectives (algorithm ``regularizedEvolution`` with a list of
    objectives): parents by non-dominated rank, then crowding distance, within the population."""

    algorithm = "multiObjectiveEvolution"
    setting_names: tuple[str, ...] = ("population_size", "sample_size", "max_trials", "seed", "objectives")

    @morphml1_call_forms
    def __init__(
        self,
        space: SearchSpace,
        population_size: int = 50,
        sample_size: int = 10,
        max_trials: int | None = None,
        seed: int | None = None,
        objectives: Sequence[Mapping[str, str] | tuple[str, str]] | None = None,
        *,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
    ) -> None:
        metric, goal = self._set_objectives(objectives, "val_accuracy", "maximize")
        super().__init__(
            space,
            population_size,
            sample_size,
            max_trials,
            seed,
            metric,
            goal,
            input_shape=input_shape,
            num_classes=num_classes,
        )

    def _load_settings(self, settings: dict[str, Any]) -> None:
        super()._load_settings(settings)
        self.objective, self.goal = self.objectives[0]["metric"], self.objectives[0]["goal"]

    def _select_parent(self, contenders: Sequence[int]) -> str:
        """Of the sampled population positions, the one of lowest rank, then largest crowding
        distance, then the oldest (failed members rank after every success)."""
        population = self._population
        points = self.points()
        ranked = [i for i, cid in enumerate(population) if cid in points]
        rank: dict[int, float] = {}
        crowding: dict[int, float] = {}
        fronts = non_dominated_sort([points[population[i]] for i in ranked])
        for level, front in enumerate(fronts):
            members = [ranked[k] for k in front]
            distances = crowding_distance([points[population[i]] for i in ranked], front)
            for k, i in zip(front, members, strict=True):
                rank[i] = level
                crowding[i] = distances[k]
        best = min(contenders, key=lambda i: (rank.get(i, math.inf), -crowding.get(i, -math.inf), i))
        return population[best]
