"""Optuna's samplers as ask/tell optimizers over our search space: TPE and NSGA-II.

    optimizer = TPESearch(space, population_size=10, max_trials=50, seed=1)      # or NSGA2Search
    optimizer = NSGA2Search(space, objectives=[("val_accuracy", "maximize"), ("params", "minimize")])

How the space maps to Optuna (define-by-run, through `study.ask()` / `study.tell()`): the layer
program is drawn exactly as `SearchSpace._draw` draws it, but every choice is a parameter of the
Optuna trial, named by its position in the space:

- ``layers[i].<param>``: a layer parameter with more than one value (categorical over the values);
- ``layers[i].present``: an optional layer kept or dropped (categorical true/false);
- ``layers[i].repeat``: a block's repeat count (integer min..max, ordinal);
- ``layers[i].r<k>.skip``: the skip kind closing repetition k (categorical);
- inside a block, ``layers[i].r<k>.layers[j]...``: repetition k's own choices (so repetitions
  are searched independently, and a parameter exists only when its layer does: a conditional space).

Fixed values (one choice) are no parameters. A drawn program that is no valid architecture (too
many pools for the input) is told to Optuna as a failed trial and drawn again.

The journal stays the one source of truth: the state (`state_dict()`) holds every Optuna trial
this optimizer made (params, distributions, state, values, system attributes) next to the
candidates, and `load_state_dict()` rebuilds a fresh in-memory study with `study.add_trial` of
each, in order, so a restarted master continues the same search. TPE keeps one sampler for the
whole search, as a plain Optuna study does (seeded with the optimizer's seed, so ours and
`optuna.create_study(sampler=TPESampler(seed=s))` ask the same architectures), and the state holds
its random states (numpy MT19937, the sampler's and its startup random sampler's); NSGA-II makes
a new sampler at every ask, seeded from the optimizer's own RNG (also in the state). Either way
the same trials and the same random states give the same asks, before or after a restart; the
coordinator's replay relies on that.

Dedup and failures, as for our own optimizers: an architecture already asked (by `arch_hash`) is
never asked again. When Optuna draws one, the draw is told to Optuna as that architecture's result
when it is known (the same architecture scores the same) or as failed while it is in flight,
and Optuna draws again (20 times with its sampler, then 20 with Optuna's random sampler), after
which the optimizer waits for outstanding tells or, with none, declares the space exhausted. A
failed trial (no result, status failed, or an objective without a finite value) is an Optuna
FAIL: TPE and NSGA-II ignore it.

Optuna is a dependency of the master only (extra ``search``); constructing one of these without
it is an `OptimizerError` naming spec.optimizer.algorithm and the extra.

Imports: the standard library, `morphml.graph`, `morphml.space`, the optimizer modules, and optuna
(lazily, in the constructor).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from morphml.graph import ArchitectureGraph, GraphError, build_graph_from_choices
from morphml.optimizers.base import (
    NOVELTY_ATTEMPTS,
    Candidate,
    Optimizer,
    OptimizerError,
    check_setting,
    morphml1_call_forms,
)
from morphml.optimizers.multiobjective import MultiObjectiveMixin
from morphml.space import Block, Layer, SearchSpace

OPTUNA_EXTRA = "pip install 'morphml[search]' (optuna>=4.0)"


def import_optuna(algorithm: str) -> Any:
    """The optuna module, or an OptimizerError naming the algorithm and the extra to install."""
    try:
        import optuna
    except ImportError:
        raise OptimizerError(
            f"spec.optimizer.algorithm: {algorithm!r} needs Optuna on the master, which is not installed; "
            f"{OPTUNA_EXTRA}, or choose genetic, regularizedEvolution or random"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def program_from_trial(space: SearchSpace, trial: Any) -> list[tuple]:
    """The layer program (see `SearchSpace._draw`) with every choice asked of the Optuna trial."""
    program: list[tuple] = []

    def walk(items: Sequence[Layer | Block], prefix: str) -> None:
        for index, item in enumerate(items):
            path = f"{prefix}layers[{index}]"
            if isinstance(item, Block):
                low, high = item.repeat
                repeats = trial.suggest_int(f"{path}.repeat", low, high) if low < high else low
                for k in range(repeats):
                    program.append(("begin",))
                    walk(item.layers, f"{path}.r{k}.")
                    skips = item.skip
                    skip = trial.suggest_categorical(f"{path}.r{k}.skip", skips) if len(skips) > 1 else skips[0]
                    program.append(("end", skip))
                continue
            if item.op in ("input", "output"):
                continue
            if item.optional and not trial.suggest_categorical(f"{path}.present", [True, False]):
                continue
            params = {
                name: trial.suggest_categorical(f"{path}.{name}", values) if len(values) > 1 else values[0]
                for name, values in item.choices.items()
            }
            program.append(("layer", item.op, params))

    walk(space.items, "")
    return program


def _numpy_rng(state: Any) -> Any:
    """The numpy RandomState behind an Optuna sampler's `_rng` (a LazyRandomState, or the
    RandomState itself in older Optuna)."""
    return state.rng if hasattr(state, "rng") else state


def _numpy_state_to_json(rng: Any) -> list[Any]:
    name, keys, pos, has_gauss, cached = rng.get_state()
    return [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]


def _numpy_state_from_json(state: Sequence[Any]) -> tuple[Any, ...]:
    import numpy  # optuna's own dependency

    name, keys, pos, has_gauss, cached = state
    return (str(name), numpy.array(keys, dtype=numpy.uint32), int(pos), int(has_gauss), float(cached))


class TPESearch(MultiObjectiveMixin, Optimizer):
    """Optuna's tree-structured Parzen estimator as Optuna 5 sets it up by default: for one
    objective multivariate (one joint density over the parameters every trial has, the others
    sampled independently), for several independent; not grouped; the constant liar for trials
    in flight. The first `population_size` trials are random (TPE's startup). Subclasses change
    `_sampler`. Spelled out rather than left to Optuna's defaults, which differ in Optuna 4.

    Not grouped: on the conditional NAS space of benchmarks/bench_search.py, the multivariate
    TPE grouped by the conditional structure (`group=True`) found worse architectures after 64
    trials than the ungrouped one in each seed compared (docs/benchmarks.md (d))."""

    algorithm = "tpe"
    # One sampler for the search (True), or a new one at each draw seeded from self.rng (False).
    # A new TPE sampler per draw started a new random stream each time and, at 64 trials on the
    # benchmark space, found worse architectures than a plain Optuna study with one sampler
    # (docs/benchmarks.md (d)); NSGA-II keeps the per-draw samplers its benchmark was run with.
    persistent_sampler = True
    setting_names: tuple[str, ...] = ("population_size", "max_trials", "seed", "objectives")
    _constraints_aware = False

    @morphml1_call_forms
    def __init__(
        self,
        space: SearchSpace,
        population_size: int = 20,
        max_trials: int | None = None,
        seed: int | None = None,
        objectives: Sequence[Mapping[str, str] | tuple[str, str]] | None = None,
        objective: str = "val_accuracy",
        goal: str = "maximize",
        *,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
    ) -> None:
        self._optuna = import_optuna(self.algorithm)
        metric, first_goal = self._set_objectives(objectives, objective, goal)
        super().__init__(
            space, seed=seed, objective=metric, goal=first_goal, input_shape=input_shape, num_classes=num_classes
        )
        self.population_size = check_setting("population_size", population_size, "int", 2)
        self.max_trials = None if max_trials is None else check_setting("max_trials", max_trials, "int", 1)
        # Every Optuna trial made, in order (index = trial number): params, distributions (JSON),
        # state, values, system_attrs, candidate (its id, or None for a duplicate/invalid draw).
        self._trials: list[dict[str, Any]] = []
        self._trial_of: dict[str, int] = {}  # candidate id -> trial number
        self.study = self._new_study()
        self._model: Any = None  # the one sampler (persistent_sampler); None: a new one per draw
        if self.persistent_sampler:
            self._model = self._sampler(self.seed if self.seed is not None else self.rng.getrandbits(31))

    @property
    def constraints_aware(self) -> bool:
        """Set by ConstrainedOptimizer: infeasible results reach Optuna as constraint violations
        (the samplers get `constraints_func`)."""
        return self._constraints_aware

    @constraints_aware.setter
    def constraints_aware(self, value: bool) -> None:
        self._constraints_aware = bool(value)
        if getattr(self, "_model", None) is not None:  # the same random states, now constrained
            self._set_model_rng_state(self._model_rng_state())

    # -- Optuna plumbing ---------------------------------------------------------------------

    def _sampler(self, seed: int) -> Any:
        with warnings.catch_warnings():
            # constant_liar is marked experimental; Optuna 5 deprecates warn_independent_sampling,
            # which Optuna 4 needs (else it warns at every conditional parameter).
            warnings.simplefilter("ignore")
            return self._optuna.samplers.TPESampler(
                n_startup_trials=self.population_size,
                multivariate=len(self.goals) == 1,
                group=False,
                constant_liar=True,
                warn_independent_sampling=False,
                seed=seed,
                constraints_func=self._constraints if self.constraints_aware else None,
            )

    def _model_rng_state(self) -> dict[str, list[Any]]:
        """The persistent sampler's random states as JSON: {"sampler": .., "startup": ..}."""
        return {
            "sampler": _numpy_state_to_json(_numpy_rng(self._model._rng)),
            "startup": _numpy_state_to_json(_numpy_rng(self._model._random_sampler._rng)),
        }

    def _set_model_rng_state(self, state: Mapping[str, Any]) -> None:
        """A new persistent sampler (its search-space cache belongs to one study) with `state`."""
        self._model = self._sampler(0)
        _numpy_rng(self._model._rng).set_state(_numpy_state_from_json(state["sampler"]))
        _numpy_rng(self._model._random_sampler._rng).set_state(_numpy_state_from_json(state["startup"]))

    def _new_study(self) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self._optuna.create_study(directions=self.goals, sampler=self._optuna.samplers.RandomSampler(0))

    def _frozen(self, number: int) -> Any:
        return self.study.get_trials(deepcopy=False)[number]

    def _refresh(self, number: int) -> None:
        """Copies what Optuna knows of trial `number` into its record (system attrs change on tell)."""
        frozen = self._frozen(number)
        record = self._trials[number]
        record["state"] = frozen.state.name
        record["values"] = list(frozen.values) if frozen.values is not None else None
        record["system_attrs"] = json.loads(json.dumps(frozen.system_attrs))

    def _constraints(self, frozen: Any) -> tuple[float]:
        """Optuna's constraints_func: the trial's violation (> 0 infeasible, 0 feasible)."""
        return (float(self._trials[frozen.number].get("violation", 0.0)),)

    def _optuna_result(self, metrics: Mapping[str, Any] | None) -> tuple[list[float] | None, float]:
        """(values to tell Optuna or None for FAIL, constraint violation) of one result.

        With constraints (``constraints_aware``) an infeasible result is a COMPLETE trial with a
        positive violation, so TPE and NSGA-II learn where the budget lies (their constrained
        variants rank every infeasible trial below every feasible one, whatever its values): its
        measured values when it has them (maxLatencyMs), else the worst feasible values so far."""
        violation = 0.0
        if self.constraints_aware and metrics is not None and metrics.get("infeasible"):
            given = metrics.get("violation")
            number = float(given) if isinstance(given, (int, float)) and not isinstance(given, bool) else math.nan
            violation = number if math.isfinite(number) and number > 0 else 1.0
        if violation == 0.0:
            return self.values_of(metrics), 0.0
        measured = self.values_of({**(metrics or {}), "status": "ok"})
        return (measured if measured is not None else self._worst_feasible()), violation

    def _worst_feasible(self) -> list[float]:
        worst: list[float] = []
        for m, goal in enumerate(self.goals):
            seen = [
                r["values"][m]
                for r in self._trials
                if r["state"] == "COMPLETE" and not r.get("violation") and r["values"] is not None
            ]
            worst.append((min(seen) if goal == "maximize" else max(seen)) if seen else 0.0)
        return worst

    def _optuna_tell(self, number: int, values: list[float] | None, violation: float = 0.0) -> None:
        state = self._optuna.trial.TrialState
        self._trials[number]["violation"] = violation
        if self.constraints_aware:
            # Optuna records a trial's constraints in the sampler's after_trial, which runs on the
            # study's current sampler: make it one with constraints_func (after_trial draws nothing).
            self.study.sampler = self._model if self._model is not None else self._sampler(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if values is None:
                self.study.tell(number, state=state.FAIL)
            else:
                self.study.tell(number, values)
        self._refresh(number)

    def _draw(self, sampler: Any) -> tuple[ArchitectureGraph | None, int]:
        """One Optuna trial drawn with `sampler`: (its graph or None when invalid, its number)."""
        self.study.sampler = sampler
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = self.study.ask()
        try:
            graph: ArchitectureGraph | None = build_graph_from_choices(
                program_from_trial(self.space, trial), self.space.input_shape or (), self.space.num_classes or 0
            )
        except GraphError:
            graph = None
        frozen = self._frozen(trial.number)
        self._trials.append(
            {
                "params": dict(frozen.params),
                "distributions": {
                    name: self._optuna.distributions.distribution_to_json(d) for name, d in frozen.distributions.items()
                },
                "state": "RUNNING",
                "values": None,
                "system_attrs": {},
                "candidate": None,
            }
        )
        self._refresh(trial.number)
        return graph, trial.number

    def _novel(self) -> tuple[ArchitectureGraph, int] | None:
        """A new architecture and its trial number, or None after 2 x NOVELTY_ATTEMPTS draws."""
        if self.space.input_shape is None or self.space.num_classes is None:
            self.space.sample(self.rng)  # raises the SearchSpaceError that says how to bind it
        for attempt in range(2 * NOVELTY_ATTEMPTS):
            if attempt < NOVELTY_ATTEMPTS:
                sampler = self._model if self._model is not None else self._sampler(self.rng.getrandbits(31))
            else:  # the model keeps proposing known architectures: explore at random instead
                sampler = self._optuna.samplers.RandomSampler(seed=self.rng.getrandbits(31))
            graph, number = self._draw(sampler)
            if graph is None:
                self._optuna_tell(number, None)
                continue
            known = self._known(graph)
            if known is None:
                return graph, number
            # A duplicate draw: Optuna learns the known result of that architecture (if any).
            self._optuna_tell(number, *self._optuna_result(self._metrics.get(known)))
        return None

    # -- Optimizer hooks ---------------------------------------------------------------------

    def _finished(self) -> bool:
        return self.max_trials is not None and self.num_asked >= self.max_trials and not self.outstanding()

    def _propose(self, n: int) -> list[Candidate]:
        proposed: list[Candidate] = []
        while len(proposed) < n and (self.max_trials is None or self.num_asked < self.max_trials):
            found = self._novel()
            if found is None:
                if not self.outstanding() and not proposed:
                    self._exhausted = True
                break
            graph, number = found
            candidate = Candidate(f"c{self.num_asked}", graph, 0)
            self._trials[number]["candidate"] = candidate.id
            self._trial_of[candidate.id] = number
            proposed.append(self._register(candidate))
        return proposed

    def _on_result(self, candidate_id: str) -> None:
        self._optuna_tell(self._trial_of[candidate_id], *self._optuna_result(self._metrics[candidate_id]))

    def _on_update(self, candidate_id: str) -> None:
        """A finished Optuna trial cannot be told again, so its record takes the new values and
        the study is rebuilt from the records, as after a restart (`add_trial` of each)."""
        values, violation = self._optuna_result(self._metrics[candidate_id])
        if values is None:
            return
        record = self._trials[self._trial_of[candidate_id]]
        record["values"], record["violation"] = list(values), violation
        if self.constraints_aware:
            # Optuna keeps a trial's constraint values in its system attrs (set by after_trial).
            key = self._optuna.samplers._base._CONSTRAINTS_KEY
            if key in record["system_attrs"]:
                record["system_attrs"][key] = [violation]
        self._load_extra_state(self._extra_state())

    def _extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"trials": self._trials, "study_attrs": self._study_attrs()}
        if self._model is not None:
            state["sampler_rng"] = self._model_rng_state()
        return state

    def _study_attr_prefixes(self) -> tuple[str, ...]:
        """Key prefixes of the study-level state the sampler keeps in the study (NSGA-II: its parents)."""
        return ()

    def _study_attrs(self) -> dict[str, list[int]]:
        """The study's system attributes under `_study_attr_prefixes()`, each a list of trial ids,
        journaled as trial numbers (ids are the storage's; numbers are the study's order)."""
        prefixes = self._study_attr_prefixes()
        if not prefixes:
            return {}
        number_of = {t._trial_id: t.number for t in self.study.get_trials(deepcopy=False)}
        attrs = self.study._storage.get_study_system_attrs(self.study._study_id)
        return {
            key: [number_of[i] for i in value]
            for key, value in sorted(attrs.items())
            if key.startswith(prefixes)
        }

    def _load_settings(self, settings: dict[str, Any]) -> None:
        super()._load_settings(settings)
        self.objective, self.goal = self.objectives[0]["metric"], self.objectives[0]["goal"]

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Rebuilds the study from the journaled trials: `add_trial` of each, in order."""
        optuna = self._optuna
        self.study = self._new_study()
        self._trials, self._trial_of = [], {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for record in state["trials"]:
                trial_state = optuna.trial.TrialState[record["state"]]
                self.study.add_trial(
                    optuna.trial.create_trial(
                        state=trial_state,
                        values=record["values"] if trial_state == optuna.trial.TrialState.COMPLETE else None,
                        params=record["params"],
                        distributions={
                            name: optuna.distributions.json_to_distribution(text)
                            for name, text in record["distributions"].items()
                        },
                        system_attrs=record["system_attrs"],
                    )
                )
                if record["candidate"] is not None:
                    self._trial_of[record["candidate"]] = len(self._trials)
                self._trials.append(dict(record))
        # NSGA-II's parent population of each generation is chosen once, when the generation's
        # first trial is asked, from the trials complete then, and kept in the study: a trial of
        # the previous generation that completes later (one in flight) does not change it. Chosen
        # again here from all journaled trials it would differ, so it is journaled and restored.
        trials = self.study.get_trials(deepcopy=False)
        for key, numbers in state.get("study_attrs", {}).items():
            self.study._storage.set_study_system_attr(self.study._study_id, key, [trials[n]._trial_id for n in numbers])
        if self.persistent_sampler and "sampler_rng" in state:
            self._set_model_rng_state(state["sampler_rng"])
        else:
            # NSGA-II, or a TPE state saved before TPE kept one sampler: a new sampler per draw,
            # as that search was run, so its journal replays to the same asks.
            self._model = None

    @property
    def num_sampler_trials(self) -> int:
        """Trials in the Optuna study (candidates plus duplicate and invalid draws)."""
        return len(self.study.get_trials(deepcopy=False))


class NSGA2Search(TPESearch):
    """Optuna's NSGA-II (non-dominated sorting genetic algorithm II) with `population_size` per
    generation; crossover and mutation over the trial parameters."""

    algorithm = "nsga2"
    persistent_sampler = False

    def _study_attr_prefixes(self) -> tuple[str, ...]:
        return (self._optuna.samplers.NSGAIISampler._get_parent_cache_key_prefix(),)

    def _sampler(self, seed: int) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self._optuna.samplers.NSGAIISampler(
                population_size=self.population_size,
                seed=seed,
                constraints_func=self._constraints if self.constraints_aware else None,
            )
