"""`build_optimizer`: an optimizer from the manifest's `spec.optimizer` (camelCase) and objective.

Mapping (manifest -> constructor keyword):
algorithm genetic -> GeneticAlgorithm, regularizedEvolution -> RegularizedEvolution,
random -> RandomSearch; populationSize -> population_size, generations -> num_generations
(GA) or, for the other two, max_trials = populationSize * generations; mutationRate ->
mutation_rate, crossoverRate -> crossover_rate, elitism, tournamentSize -> tournament_size,
sampleSize -> sample_size, seed. Settings an algorithm does not use are accepted and ignored
(the manifest has one optimizer section for all algorithms). Defaults are the CRD's (populationSize
20, generations 10, mutationRate 0.2, crossoverRate 0.5, elitism 1, tournamentSize 2, sampleSize a
quarter of populationSize but at least 2), so a dict without CRD defaults applied means the same.

Imports: the standard library, `morphml.space`, the optimizer modules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from morphml.optimizers.base import Optimizer, OptimizerError
from morphml.optimizers.evolution import RegularizedEvolution
from morphml.optimizers.genetic import GeneticAlgorithm
from morphml.optimizers.random_search import RandomSearch
from morphml.space import SearchSpace, snake_to_camel

ALGORITHMS = ("genetic", "regularizedEvolution", "random")
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
) -> Optimizer:
    """Build the optimizer a manifest asks for. Errors name ``spec.optimizer.<field>``."""
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
        if trials is None and isinstance(population, int) and isinstance(generations, int):
            trials = population * generations
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
