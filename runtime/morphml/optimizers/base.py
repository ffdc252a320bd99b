"""The ask/tell machinery every optimizer shares: candidates, results, dedup, best, state.

What lives here: `Candidate` (an architecture proposed for evaluation, with a deterministic id),
`Optimizer` (the base class: `ask`/`tell`/`is_finished`/`best`/`optimize`/`state_dict`/
`load_state_dict`, dedup of architectures by `arch_hash` with result reuse, the fitness rule),
`BestResult` (what `best()` and `optimize()` return), `OptimizerError`, and
`morphml1_call_forms` (the constructor decorator that also takes MorphML 1.0's `search_space=`
and `config={...}`).

MorphML 1.0 compatibility: `GeneticAlgorithm(search_space=space, population_size=...)`,
`best = optimizer.optimize(evaluator=f)` with `f(graph)` returning a number, and `best.graph` /
`best.fitness`. A number told as a result is the value of the optimizer's objective metric.

Determinism: every random decision goes through the optimizer's own seeded `random.Random`
(`self.rng`), never the global `random` module, and nothing iterates over a set or a dict keyed
by str hashes in an order that could vary between processes. Same seed + same tells in the same
order -> same asks. The RNG state is stored as JSON lists in `state_dict()`.

Imports: the standard library, `morphml.space`, `morphml.graph`. No torch.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

from morphml.graph import ArchitectureGraph, GraphError
from morphml.space import SearchSpace

logger = logging.getLogger(__name__)

STATE_VERSION = 1
GOALS = ("maximize", "minimize")
# How many draws an optimizer makes to find an architecture it has not seen before it accepts a
# duplicate (whose result is then reused) or, with nothing left to wait for, declares the space
# exhausted.
NOVELTY_ATTEMPTS = 20


class _StatusTable(dict):
    """candidate id -> status, keeping a count per status and the pending ids in the order they
    became pending, so `num_asked`, `num_told` and `outstanding()` cost O(1) / O(pending) instead
    of a walk over every candidate ever asked (a walk per ask made a long search quadratic)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        self.pending: dict[str, None] = {}  # an insertion-ordered set

    def __setitem__(self, key: str, value: str) -> None:
        old = self.get(key)
        if old is not None:
            self.counts[old] -= 1
        super().__setitem__(key, value)
        self.counts[value] = self.counts.get(value, 0) + 1
        if value == "pending":
            self.pending[key] = None
        else:
            self.pending.pop(key, None)

    def count(self, *statuses: str) -> int:
        return sum(self.counts.get(s, 0) for s in statuses)


class OptimizerError(ValueError):
    """Bad optimizer settings, an unknown candidate id, or state that does not fit this optimizer."""


_Init = TypeVar("_Init", bound=Callable[..., None])


def morphml1_call_forms(init: _Init) -> _Init:
    """Let an optimizer constructor also take MorphML 1.0's call forms.

    - ``search_space=space`` in place of the first argument (``space``);
    - ``config={"population_size": 50, ...}``: constructor keywords as a dict (the form of the 1.0
      README). A key the constructor does not take, or one also given as an argument, is an
      `OptimizerError` naming it.
    """
    signature = inspect.signature(init)
    settings = [name for name in signature.parameters if name not in ("self", "space")]

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, search_space: Any = None, config: Mapping[str, Any] | None = None,
                **kwargs: Any) -> None:
        cls = type(self).__name__
        if search_space is not None:
            if args or "space" in kwargs:
                raise OptimizerError(
                    f"{cls}: the search space is given twice (first argument and search_space=); pass one"
                )
            kwargs["space"] = search_space
        elif not args and "space" not in kwargs:
            raise OptimizerError(f"{cls}: no search space; pass it first or as search_space=")
        if config is not None:
            if not isinstance(config, Mapping):
                raise OptimizerError(f"config: expected a dict of {cls} settings, got {type(config).__name__}")
            given = signature.bind_partial(self, *args, **kwargs).arguments
            for key, value in config.items():
                if key not in settings:
                    raise OptimizerError(f"config.{key}: unknown setting for {cls}; allowed: {', '.join(settings)}")
                if key in given:
                    raise OptimizerError(f"config.{key}: also given as an argument; pass it once")
                kwargs[key] = value
        init(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass
class Candidate:
    """An architecture proposed for evaluation.

    ``id`` is unique and deterministic within one search (e.g. "g1-c3": generation 1, 4th new
    candidate of that generation). ``parents`` are the ids of the candidates it was bred from.
    """

    id: str
    graph: ArchitectureGraph
    generation: int = 0
    parents: tuple[str, ...] = field(default_factory=tuple)

    @property
    def arch_hash(self) -> str:
        return self.graph.arch_hash

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "generation": self.generation,
            "parents": list(self.parents),
            "arch_hash": self.graph.arch_hash,
            "graph": self.graph.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Candidate:
        if not isinstance(data, Mapping) or "id" not in data or "graph" not in data:
            raise OptimizerError(f"candidate: expected an object with id and graph, got {data!r}")
        graph = ArchitectureGraph.from_json(data["graph"])
        expected = data.get("arch_hash")
        if expected is not None and expected != graph.arch_hash:
            raise OptimizerError(
                f"candidate {data['id']}: arch_hash {expected} does not match its graph ({graph.arch_hash})"
            )
        return cls(str(data["id"]), graph, int(data.get("generation", 0)), tuple(data.get("parents", ())))


class BestResult(tuple[Candidate, dict[str, Any]]):
    """The best candidate and its metrics, as `best()` and `optimize()` return them.

    Unpacks as ``candidate, metrics = result`` (the ask/tell API's form) and has MorphML 1.0's
    attributes: ``.graph`` (the `ArchitectureGraph`), ``.fitness`` (larger is better: the
    objective's value, negated when the goal is minimize), ``.candidate``, ``.metrics``, ``.id``.
    """

    fitness: float

    def __new__(cls, candidate: Candidate, metrics: dict[str, Any], fitness: float) -> Self:
        result = super().__new__(cls, (candidate, metrics))
        result.fitness = fitness
        return result

    def __getnewargs__(self) -> tuple[Candidate, dict[str, Any], float]:
        return self[0], self[1], self.fitness

    @property
    def candidate(self) -> Candidate:
        return self[0]

    @property
    def metrics(self) -> dict[str, Any]:
        return self[1]

    @property
    def graph(self) -> ArchitectureGraph:
        return self.candidate.graph

    @property
    def id(self) -> str:
        return self.candidate.id

    def __repr__(self) -> str:
        return f"BestResult(id={self.id!r}, fitness={self.fitness!r}, metrics={self.metrics!r})"


def _rng_state_to_json(rng: random.Random) -> list[Any]:
    version, internal, gauss_next = rng.getstate()
    return [version, list(internal), gauss_next]


def _rng_state_from_json(state: Sequence[Any]) -> tuple:
    version, internal, gauss_next = state
    return (version, tuple(internal), gauss_next)


def _json_safe(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Metrics as stored: non-finite floats become None so the state stays strict JSON."""
    if metrics is None:
        return None
    safe: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        safe[str(key)] = value
    return safe


def check_setting(name: str, value: Any, kind: str, low: float | None = None, high: float | None = None) -> Any:
    """Validate one constructor setting; OptimizerError names it, the value and what is allowed."""
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        what = "an integer"
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        what = "a number"
    if ok and low is not None and value < low:
        ok = False
    if ok and high is not None and value > high:
        ok = False
    if not ok:
        bounds = f" in [{low}, {high}]" if high is not None else (f" >= {low}" if low is not None else "")
        raise OptimizerError(f"{name}: {value!r} is not allowed; expected {what}{bounds}")
    return value


class Optimizer:
    """Base class of the ask/tell optimizers.

    Subclasses implement `_propose(n)` (new candidates, registered with `_register`),
    `_on_result(candidate_id)` (called after a tell), `_finished()`, and `_extra_state()` /
    `_load_extra_state()` for their own fields.
    """

    algorithm = "base"

    def __init__(
        self,
        space: SearchSpace,
        *,
        seed: int | None = None,
        objective: str = "val_accuracy",
        goal: str = "maximize",
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
    ) -> None:
        if not isinstance(space, SearchSpace):
            raise OptimizerError(f"space: expected a morphml.space.SearchSpace, got {type(space).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise OptimizerError(f"seed: {seed!r} is not allowed; expected an integer or None")
        if not isinstance(objective, str) or not objective:
            raise OptimizerError(
                f"objective: {objective!r} is not allowed; expected a metric name such as val_accuracy"
            )
        if goal not in GOALS:
            raise OptimizerError(f"goal: {goal!r} is not allowed; expected one of {', '.join(GOALS)}")
        if input_shape is not None or num_classes is not None:
            space.bind(input_shape, num_classes)
        self.space = space
        self.seed = seed
        self.objective = objective
        self.goal = goal
        self.rng = random.Random(seed)
        # Every candidate ever asked, in ask order, and what became of it.
        self._candidates: dict[str, Candidate] = {}
        # "queued" (bred, not yet handed out by ask) | "pending" (asked) | "done" | "failed"
        self._status = _StatusTable()
        self._record_text: dict[str, str] = {}  # see state_json
        self._metrics: dict[str, dict[str, Any] | None] = {}
        self._fitness: dict[str, float | None] = {}
        self._by_hash: dict[str, str] = {}  # arch_hash -> id of the candidate that carries its result
        self._exhausted = False

    # -- public API -------------------------------------------------------------------------

    def ask(self, n: int = 1) -> list[Candidate]:
        """Up to ``n`` new candidates; [] means wait for outstanding tells, or finished."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise OptimizerError(f"ask: n={n!r} is not allowed; expected a non-negative integer")
        if n == 0 or self.is_finished():
            return []
        return self._propose(n)

    def tell(self, candidate_id: str | Candidate, metrics: Mapping[str, Any] | float | None) -> None:
        """Report a result: a metrics dict, a number (the objective metric's value, MorphML 1.0's
        fitness float), or None. None, metrics with status failed/error, or no finite objective
        value, is a failed trial (worst fitness). Telling a candidate twice is ignored."""
        if isinstance(candidate_id, Candidate):
            candidate_id = candidate_id.id
        if candidate_id not in self._candidates:
            raise OptimizerError(f"tell: unknown candidate id {candidate_id!r}; it was never asked by this optimizer")
        if self._status[candidate_id] == "queued":
            raise OptimizerError(f"tell: candidate {candidate_id!r} has not been handed out by ask() yet")
        if self._status[candidate_id] != "pending":
            logger.info("ignoring a second result for candidate %s", candidate_id)
            return
        if isinstance(metrics, (int, float)) and not isinstance(metrics, bool):
            metrics = {self.objective: float(metrics)}
        if metrics is not None and not isinstance(metrics, Mapping):
            raise OptimizerError(
                f"tell: the result for {candidate_id} must be a metrics dict, a number (the {self.objective} value) "
                f"or None, got {type(metrics).__name__}"
            )
        fitness = self._fitness_of(metrics)
        self._status[candidate_id] = "failed" if fitness is None else "done"
        self._metrics[candidate_id] = _json_safe(metrics)
        self._fitness[candidate_id] = fitness
        self._on_result(candidate_id)

    def update(self, candidate_id: str | Candidate, metrics: Mapping[str, Any] | None) -> bool:
        """A better-informed result of a candidate already told: multi-fidelity search (asha,
        hyperband) tells a trial at its first rung and updates it each time a promotion takes it
        to a higher rung, so the optimizer learns from the longest training a trial got rather
        than from its first epochs (docs/early-stopping.md). The new metrics and fitness replace
        the told ones. Returns False and changes nothing for a candidate not told yet or told as
        failed, or for metrics that are themselves a failure (a failed later segment does not
        undo what the trial showed before)."""
        if isinstance(candidate_id, Candidate):
            candidate_id = candidate_id.id
        if self._status.get(candidate_id) != "done" or not isinstance(metrics, Mapping):
            return False
        fitness = self._fitness_of(metrics)
        if fitness is None:
            return False
        self._metrics[candidate_id] = _json_safe(metrics)
        self._fitness[candidate_id] = fitness
        self._record_text.pop(candidate_id, None)  # its snapshot record changed
        self._on_update(candidate_id)
        return True

    def is_finished(self) -> bool:
        return self._exhausted or self._finished()

    def best(self) -> BestResult | None:
        """The best told candidate and its metrics (earliest wins a tie), or None if none succeeded."""
        best_id: str | None = None
        for candidate_id in self._candidates:
            fitness = self._fitness.get(candidate_id)
            if fitness is None:
                continue
            if best_id is None or fitness > self._fitness[best_id]:  # type: ignore[operator]
                best_id = candidate_id
        if best_id is None:
            return None
        fitness = self._fitness[best_id]
        assert fitness is not None  # only told successes carry a fitness
        return BestResult(self._candidates[best_id], dict(self._metrics[best_id] or {}), fitness)

    def outstanding(self) -> list[Candidate]:
        """Candidates asked but not yet told, in ask order."""
        return [self._candidates[i] for i in self._status.pending]

    def history(self) -> list[tuple[Candidate, str, dict[str, Any] | None]]:
        """(candidate, status, metrics) for every asked candidate, in ask order."""
        return [
            (self._candidates[i], self._status[i], self._metrics.get(i))
            for i in self._candidates
            if self._status[i] != "queued"
        ]

    def result_for(self, arch_hash: str) -> dict[str, Any] | None:
        """Metrics already known for an architecture (dedup reuse), or None."""
        candidate_id = self._by_hash.get(arch_hash)
        if candidate_id is None or self._status[candidate_id] in ("queued", "pending"):
            return None
        return self._metrics[candidate_id]

    @property
    def num_asked(self) -> int:
        return len(self._status) - self._status.count("queued")

    @property
    def num_told(self) -> int:
        return self._status.count("done", "failed")

    def optimize(
        self,
        evaluator: Callable[[ArchitectureGraph], Mapping[str, Any] | float | None] | None = None,
        max_trials: int | None = None,
        batch_size: int = 1,
    ) -> BestResult | None:
        """Run ask -> evaluate -> tell in this process until finished (or ``max_trials``).

        ``evaluator(graph)`` returns a metrics dict or a number (MorphML 1.0's fitness: the value
        of the objective metric). An evaluator exception is a failed trial (logged with its
        message), not a crash. Returns `best()`: ``best.graph``, ``best.fitness``, or
        ``candidate, metrics = best``; None when no trial succeeded.
        """
        if evaluator is None or not callable(evaluator):
            raise OptimizerError(
                f"optimize: evaluator={evaluator!r} is not allowed; pass evaluator=f where f(graph) returns a "
                "fitness number or a metrics dict (to train on a dataset, use morphml.evaluation.evaluate_architecture "
                "in f, or run a manifest with `morphml run`)"
            )
        trials = 0
        while not self.is_finished() and (max_trials is None or trials < max_trials):
            room = batch_size if max_trials is None else min(batch_size, max_trials - trials)
            candidates = self.ask(room)
            if not candidates:
                if self.outstanding():
                    raise OptimizerError("optimize: the optimizer waits for candidates asked outside this loop")
                break
            for candidate in candidates:
                try:
                    metrics: Mapping[str, Any] | float | None = evaluator(candidate.graph)
                except Exception as exc:
                    logger.warning("candidate %s failed: %s: %s", candidate.id, type(exc).__name__, exc)
                    metrics = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                self.tell(candidate.id, metrics)
                trials += 1
        return self.best()

    # -- state ------------------------------------------------------------------------------

    # Constructor settings kept in the state (attribute names = constructor keyword names).
    setting_names: tuple[str, ...] = ("seed", "objective", "goal")

    def settings(self) -> dict[str, Any]:
        """The constructor settings (snake_case), as stored in the state."""
        return {name: getattr(self, name) for name in self.setting_names}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same search, as plain JSON-serialisable data."""
        return {**self._state_head(), "candidates": [self._record(i) for i in self._candidates]}

    def state_json(self) -> str:
        """`json.dumps(state_dict())`, for snapshots: the record of a done or failed candidate
        changes only through `update` (which drops its text), so its JSON text is made once and
        reused (a snapshot then costs the new candidates, not the whole history, in Python work)."""
        texts = []
        for i in self._candidates:
            text = self._record_text.get(i)
            if text is None:
                text = json.dumps(self._record(i))
                if self._status[i] in ("done", "failed"):
                    self._record_text[i] = text
            texts.append(text)
        head = json.dumps(self._state_head())
        return head[:-1] + ', "candidates": [' + ", ".join(texts) + "]}"

    def _state_head(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "version": STATE_VERSION,
            "space_fingerprint": self.space.fingerprint(),
            "settings": self.settings(),
            "rng": _rng_state_to_json(self.rng),
            "exhausted": self._exhausted,
            "by_hash": dict(self._by_hash),
            **self._extra_state(),
        }

    def _record(self, candidate_id: str) -> dict[str, Any]:
        return {
            "candidate": self._candidates[candidate_id].to_json(),
            "status": self._status[candidate_id],
            "metrics": self._metrics.get(candidate_id),
            "fitness": self._fitness.get(candidate_id),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()`; the optimizer then proposes exactly what the saved one would."""
        if not isinstance(state, Mapping):
            raise OptimizerError(f"state: expected a dict from state_dict(), got {type(state).__name__}")
        if state.get("algorithm") != self.algorithm:
            raise OptimizerError(
                f"state: saved by algorithm {state.get('algorithm')!r}, this optimizer is {self.algorithm!r}"
            )
        if state.get("version") != STATE_VERSION:
            raise OptimizerError(f"state: version {state.get('version')!r} is not supported; expected {STATE_VERSION}")
        fingerprint = self.space.fingerprint()
        if state.get("space_fingerprint") != fingerprint:
            raise OptimizerError(
                f"state: saved for search space {state.get('space_fingerprint')}, this space is {fingerprint} "
                "(different layers or input shape/classes)"
            )
        try:
            self._load_settings(dict(state["settings"]))
            self.rng.setstate(_rng_state_from_json(state["rng"]))
            self._candidates, self._status, self._metrics, self._fitness = {}, _StatusTable(), {}, {}
            self._record_text = {}
            for record in state["candidates"]:
                candidate = Candidate.from_json(record["candidate"])
                self._candidates[candidate.id] = candidate
                self._status[candidate.id] = record["status"]
                self._metrics[candidate.id] = record["metrics"]
                self._fitness[candidate.id] = record["fitness"]
            self._by_hash = dict(state["by_hash"])
            self._exhausted = bool(state["exhausted"])
            self._load_extra_state(state)
        except (KeyError, TypeError, ValueError, GraphError) as exc:
            if isinstance(exc, OptimizerError):
                raise
            raise OptimizerError(f"state: malformed optimizer state ({type(exc).__name__}: {exc})") from None

    # -- helpers for subclasses -------------------------------------------------------------

    def _fitness_of(self, metrics: Mapping[str, Any] | None) -> float | None:
        """Larger is better; None is a failed trial."""
        if metrics is None or str(metrics.get("status", "ok")).lower() in ("failed", "error"):
            return None
        value = metrics.get(self.objective)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value) if self.goal == "maximize" else -float(value)

    def _sort_key(self, candidate_id: str) -> float:
        fitness = self._fitness.get(candidate_id)
        return -math.inf if fitness is None else fitness

    def _known(self, graph: ArchitectureGraph) -> str | None:
        """Id of the candidate carrying this architecture's result (told or in flight), or None."""
        return self._by_hash.get(graph.arch_hash)

    def _register(self, candidate: Candidate, *, queued: bool = False) -> Candidate:
        """Record a new candidate: handed out now ("pending") or kept for a later ask ("queued")."""
        self._candidates[candidate.id] = candidate
        self._status[candidate.id] = "queued" if queued else "pending"
        self._by_hash[candidate.arch_hash] = candidate.id
        return candidate

    def _sample_novel(self, avoid: Sequence[str] = ()) -> ArchitectureGraph | None:
        """A random architecture not seen yet (and not in ``avoid``), or None after many tries."""
        for _ in range(NOVELTY_ATTEMPTS):
            graph = self.space.sample(self.rng)
            if self._known(graph) is None and graph.arch_hash not in avoid:
                return graph
        return None

    def _load_settings(self, settings: dict[str, Any]) -> None:
        for name in self.setting_names:
            setattr(self, name, settings[name])

    # -- subclass hooks ---------------------------------------------------------------------

    def _propose(self, n: int) -> list[Candidate]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _on_result(self, candidate_id: str) -> None:
        return None

    def _on_update(self, candidate_id: str) -> None:
        """After `update` replaced a told candidate's metrics and fitness (which every ranking
        here reads, so most optimizers need nothing more)."""

    def _finished(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        return None
