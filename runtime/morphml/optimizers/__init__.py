"""Ask/tell architecture optimizers: genetic algorithm, regularized (aging) evolution, random search,
multi-objective evolution, Optuna's TPE and NSGA-II (`morphml[search]`), and hardware constraints.

    optimizer = GeneticAlgorithm(space, population_size=8, num_generations=3, seed=42)
    while not optimizer.is_finished():
        for candidate in optimizer.ask(4):       # [] = wait for outstanding tells
            optimizer.tell(candidate.id, evaluate(candidate.graph))
    candidate, metrics = optimizer.best()

or `best = optimizer.optimize(evaluate)` (`evaluate(graph)` returns a metrics dict or a fitness
number; `best.graph`, `best.fitness`, or `candidate, metrics = best`). Every optimizer also takes
MorphML 1.0's `search_space=` / `config={...}` forms (docs/optimizers.md). State round-trips
through JSON with `state_dict()` / `load_state_dict()`; `build_optimizer(spec, space, objective)`
reads the manifest's form.

Imports: the standard library, `morphml.ops`, `morphml.graph`, `morphml.space`, `morphml.mutation`,
`morphml.pareto`; optuna lazily (only `TPESearch` / `NSGA2Search` construct it). No torch.
"""

from morphml.optimizers.base import BestResult, Candidate, Optimizer, OptimizerError
from morphml.optimizers.constraints import ConstrainedOptimizer
from morphml.optimizers.evolution import RegularizedEvolution
from morphml.optimizers.factory import ALGORITHMS, build_optimizer
from morphml.optimizers.genetic import GeneticAlgorithm
from morphml.optimizers.multiobjective import MultiObjectiveEvolution
from morphml.optimizers.optuna_samplers import NSGA2Search, TPESearch
from morphml.optimizers.random_search import RandomSearch

__all__ = [
    "ALGORITHMS",
    "BestResult",
    "Candidate",
    "ConstrainedOptimizer",
    "GeneticAlgorithm",
    "MultiObjectiveEvolution",
    "NSGA2Search",
    "Optimizer",
    "OptimizerError",
    "RandomSearch",
    "RegularizedEvolution",
    "TPESearch",
    "build_optimizer",
]
