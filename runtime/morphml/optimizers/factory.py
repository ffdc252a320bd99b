"""`build_optimizer`: an optimizer from the manifest's `spec.optimizer` (camelCase) and objective.

Mapping (manifest -> constructor keyword):
algorithm genetic -> GeneticAlgorithm, regularizedEvolution -> RegularizedEvolution,
random -> RandomSearch, tpe -> TPESearch, nsga2 -> NSGA2Search (Optuna, optimizers/optuna_samplers.py);
with two or more `spec.objectives`, regularizedEvolution -> MultiObjectiveEvolution (genetic ranks by
one objective and refuses several); `spec.constraints` (maxParams, maxFlops, maxLatencyMs) wrap the
optimizer in a ConstrainedOptimizer, whose inner optimizer then has no max_trials of its own (refused
candidates would use it up; the budget's finished trials end the search).
populationSize -> population_size, generations -> num_generations (GA) or, for the others,
max_trials = populationSize * generations; mutationRate ->
mutation_rate, crossoverRate -> crossover_rate, elitism, tournamentSize -> tournament_size,
sampleSize -> sample_size, seed. Settings an algorithm does not use are accepted and ignored
(the manifest has one optimizer section for all algorithms). Defaults are the CRD's (populationSize
20, generations 10, mutationRate 0.2, crossoverRate 0.5, elitism 1, tournamentSize 2, sampleSize a
quarter of populationSize but at least 2; tpe: populationSize random startup trials; nsga2:
populationSize per generation), so a dict without CRD defaults applied means the same.

Imports: the standard library, `morphml.space`, the optimizer modules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from morphml.optimizers.base import Optimizer, OptimizerError
from morphml.optimizers.constraints import LIMITS, ConstrainedOptimizer
from morphml.optimizers.evolution import RegularizedEvolution
from morphml.optimizers.genetic import GeneticAlgorithm
from morphml.optimizers.multiobjective import MultiObjectiveEvolution, check_objectives
from morphml.optimizers.random_search import RandomSearch
from morphml.space import SearchSpace, snake_to_camel

ALGORITHMS = ("genetic", "regularizedEvolution", "random", "tpe", "nsga2")
CONSTRAINT_FIELDS = {field: name for name, (field, _) in LIMITS.items()}  # maxParams -> max_params
SPEC_FIELDS = (
    "algorithm",
    "populationSize",
    "generations",
    "mutationRate",
    "crossoverRate",
    "elitism",
    "tournamentSize",
    "sampleSize",
    "seed",
)
_CAMEL_OVERRIDES = {"num_generations": "generations", "max_trials": "generations"}


def _objective(objective_spec: Mapping[str, Any] | str | None, path: str) -> tuple[str, str]:
    if objective_spec is None:
        return "val_accuracy", "maximize"
    if isinstance(objective_spec, str):
        return objective_spec, "maximize"
    if not isinstance(objective_spec, Mapping):
        raise OptimizerError(f"{path}: expected {{metric, goal}}, got {objective_spec!r}")
    extra = sorted(set(objective_spec) - {"metric", "goal"})
    if extra:
        raise OptimizerError(f"{path}.{extra[0]}: unknown field; allowed: metric, goal")
    return objective_spec.get("metric", "val_accuracy"), objective_spec.get("goal", "maximize")


def build_optimizer(
    spec: Mapping[str, Any],
    space: SearchSpace,
    objective_spec: Mapping[str, Any] | str | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    max_trials: int | None = None,
    path: str = "spec.optimizer",
    objectives: Sequence[Mapping[str, Any]] | None = None,
    constraints: Mapping[str, Any] | None = None,
) -> Optimizer:
    """Build the optimizer a manifest asks for. Errors name ``spec.optimizer.<field>``,
    ``spec.objectives[i].<field>`` or ``spec.constraints.<field>``.

    ``objectives``: `spec.objectives` (None or [] = the one ``objective_spec``); ``constraints``:
    `spec.constraints` (camelCase; None or {} = none)."""
    limits: dict[str, Any] = {}
    for key, value in (constraints or {}).items():
        if key not in CONSTRAINT_FIELDS:
            raise OptimizerError(f"spec.constraints.{key}: unknown field; allowed: {', '.join(CONSTRAINT_FIELDS)}")
        if value is not None:
            limits[CONSTRAINT_FIELDS[key]] = value
    if limits:
        try:
            inner = _build(
                spec,
                space,
                objective_spec,
                input_shape=input_shape,
                num_classes=num_classes,
                max_trials=None,
                path=path,
                objectives=objectives,
                unbounded=True,
            )
            return ConstrainedOptimizer(inner, **limits)  # type: ignore[return-value]
        except OptimizerError as exc:
            name, sep, rest = str(exc).partition(":")
            if sep and name in limits:
                raise OptimizerError(f"spec.constraints.{LIMITS[name][0]}:{rest}") from None
            raise
    return _build(
        spec,
        space,
        objective_spec,
        input_shape=input_shape,
        num_classes=num_classes,
        max_trials=max_trials,
        path=path,
        objectives=objectives,
    )


def _build(
    spec: Mapping[str, Any],
    space: SearchSpace,
    objective_spec: Mapping[str, Any] | str | None,
    *,
    input_shape: Sequence[int] | None,
    num_classes: int | None,
    max_trials: int | None,
    path: str,
    objectives: Sequence[Mapping[str, Any]] | None,
    unbounded: bool = False,
) -> Optimizer:
    if not isinstance(spec, Mapping):
        raise OptimizerError(f"{path}: expected a mapping, got {spec!r}")
    unknown = [key for key in spec if key not in SPEC_FIELDS]
    if unknown:
        raise OptimizerError(f"{path}.{unknown[0]}: unknown field; allowed: {', '.join(SPEC_FIELDS)}")
    algorithm = spec.get("algorithm", "genetic")
    if algorithm not in ALGORITHMS:
        raise OptimizerError(f"{path}.algorithm: {algorithm!r} is not allowed; expected one of {', '.join(ALGORITHMS)}")
    metric, goal = _objective(objective_spec, "spec.objective")
    if goal not in ("maximize", "minimize"):
        raise OptimizerError(f"spec.objective.goal: {goal!r} is not allowed; expected maximize or minimize")
    listed = check_objectives(objectives, "spec.objectives") if objectives else None
    if listed is not None:
        metric, goal = listed[0]["metric"], listed[0]["goal"]
        if len(listed) > 1 and algorithm == "genetic":
            raise OptimizerError(
                f"spec.objectives: {len(listed)} objectives, but genetic ranks candidates by one; choose nsga2, tpe, "
                "regularizedEvolution or random, or keep one objective"
            )
    common: dict[str, Any] = {
        "seed": spec.get("seed"),
        "objective": metric,
        "goal": goal,
        "input_shape": input_shape,
        "num_classes": num_classes,
    }
    population = spec.get("populationSize", 20)
    generations = spec.get("generations", 10)
    try:
        if algorithm == "genetic":
            return GeneticAlgorithm(
                space,
                population_size=population,
                num_generations=generations,
                mutation_rate=spec.get("mutationRate", 0.2),
                crossover_rate=spec.get("crossoverRate", 0.5),
                elitism=spec.get("elitism", 1),
                tournament_size=spec.get("tournamentSize", 2),
                **common,
            )
        trials = max_trials
        if trials is None and not unbounded and isinstance(population, int) and isinstance(generations, int):
            trials = population * generations
        if algorithm in ("tpe", "nsga2"):
            from morphml.optimizers.optuna_samplers import NSGA2Search, TPESearch

            optuna_class = TPESearch if algorithm == "tpe" else NSGA2Search
            return optuna_class(
                space,
                population_size=population,
                max_trials=trials,
                seed=common["seed"],
                objectives=listed or [{"metric": metric, "goal": goal}],
                input_shape=input_shape,
                num_classes=num_classes,
            )
        if algorithm == "regularizedEvolution" and listed is not None and len(listed) > 1:
            sample_size_mo: Any = spec.get("sampleSize")
            if sample_size_mo is None and isinstance(population, int):
                sample_size_mo = min(population, max(2, population // 4))
            return MultiObjectiveEvolution(
                space,
                population_size=population,
                sample_size=sample_size_mo,
                max_trials=trials,
                seed=common["seed"],
                objectives=listed,
                input_shape=input_shape,
                num_classes=num_classes,
            )
        if algorithm == "regularizedEvolution":
            sample_size: Any = spec.get("sampleSize")
            if sample_size is None and isinstance(population, int):
                sample_size = min(population, max(2, population // 4))
            return RegularizedEvolution(
                space, population_size=population, sample_size=sample_size, max_trials=trials, **common
            )
        return RandomSearch(space, max_trials=trials, **common)
    except OptimizerError as exc:
        message = str(exc)
        name, sep, rest = message.partition(":")
        if sep and name.isidentifier():
            field = _CAMEL_OVERRIDES.get(name, snake_to_camel(name))
            if name in ("objective", "goal"):
                raise OptimizerError(f"spec.objective.{'metric' if name == 'objective' else 'goal'}:{rest}") from None
            raise OptimizerError(f"{path}.{field}:{rest}") from None
        raise
