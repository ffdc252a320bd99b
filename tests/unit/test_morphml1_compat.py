"""MorphML 1.0 scripts run as their users wrote them: `from morphml import SearchSpace, Layer`,
`space.add_layer(...)`, `GeneticAlgorithm(search_space=space, population_size=..., num_generations=...)`,
`best = optimizer.optimize(evaluator=f)` with `f(graph)` returning a float, `best.graph` /
`best.fitness`; and the dict-returning evaluators and ask/tell forms keep working beside them."""

from __future__ import annotations

import math

import pytest

from morphml import Layer, SearchSpace
from morphml.graph import ArchitectureGraph
from morphml.optimizers import GeneticAlgorithm, Optimizer, OptimizerError, RandomSearch, RegularizedEvolution

pytestmark = pytest.mark.unit


def morphml1_space() -> SearchSpace:
    # The MorphML 1.0 README / search_space docstring form, on an 8x8 one-channel input.
    space = SearchSpace(name="cifar10_cnn")
    space.add_layer(Layer.input(shape=(1, 8, 8)))
    space.add_layer(Layer.conv2d(filters=[8, 16, 32], kernel_size=[3, 5]))
    space.add_layer(Layer.relu())
    space.add_layer(Layer.maxpool(pool_size=[2, 3]))
    space.add_layer(Layer.dense(units=[16, 32, 64]))
    space.add_layer(Layer.output(units=10))
    return space


def small_model_fitness(graph: ArchitectureGraph) -> float:
    """A fitness float, as a 1.0 evaluator returns: best near 3000 parameters (pure Python, fast)."""
    return 1.0 / (1.0 + abs(graph.param_count() - 3000) / 1000.0)


def test_the_morphml1_snippet_runs_end_to_end():
    space = morphml1_space()
    optimizer = GeneticAlgorithm(
        search_space=space,
        population_size=6,
        num_generations=4,
        mutation_rate=0.3,
        crossover_rate=0.8,
        elitism=1,
        seed=3,
    )
    evaluated: list[tuple[str, float]] = []

    def evaluate(graph: ArchitectureGraph) -> float:
        fitness = small_model_fitness(graph)
        evaluated.append((graph.arch_hash, fitness))
        return fitness

    best = optimizer.optimize(evaluator=evaluate)

    assert optimizer.is_finished()
    assert isinstance(best.graph, ArchitectureGraph)
    assert isinstance(best.fitness, float)
    assert best.fitness == max(f for _, f in evaluated)
    assert best.fitness == small_model_fitness(best.graph)
    assert (best.graph.arch_hash, best.fitness) in evaluated
    # It searched: four generations, each new architecture evaluated once.
    assert len({h for h, _ in evaluated}) == len(evaluated) > 6
    assert optimizer.generation == 3
    print(f"Best architecture found with fitness: {best.fitness:.4f}")  # the 1.0 README's last line


def test_the_1_0_readme_config_dict_sets_the_constructor_keywords():
    optimizer = GeneticAlgorithm(
        search_space=morphml1_space(),
        config={"population_size": 5, "num_generations": 2, "mutation_rate": 0.1, "crossover_rate": 0.8},
    )
    assert (optimizer.population_size, optimizer.num_generations) == (5, 2)
    assert (optimizer.mutation_rate, optimizer.crossover_rate) == (0.1, 0.8)
    with pytest.raises(
        OptimizerError, match=r"config\.selection_method: unknown setting for GeneticAlgorithm; allowed: "
    ):
        GeneticAlgorithm(search_space=morphml1_space(), config={"selection_method": "roulette"})
    with pytest.raises(OptimizerError, match=r"config\.population_size: also given as an argument"):
        GeneticAlgorithm(search_space=morphml1_space(), population_size=4, config={"population_size": 5})


@pytest.mark.parametrize("cls", sorted(Optimizer.__subclasses__(), key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_every_optimizer_takes_the_space_by_keyword_or_first(cls):
    by_keyword = cls(search_space=morphml1_space(), seed=11)
    positional = cls(morphml1_space(), seed=11)
    assert [c.graph.arch_hash for c in by_keyword.ask(3)] == [c.graph.arch_hash for c in positional.ask(3)]
    with pytest.raises(OptimizerError, match="given twice"):
        cls(morphml1_space(), search_space=morphml1_space())
    with pytest.raises(OptimizerError, match="no search space; pass it first or as search_space="):
        cls(seed=1)


def test_every_algorithm_is_covered_by_the_keyword_test():
    assert {GeneticAlgorithm, RegularizedEvolution, RandomSearch} <= set(Optimizer.__subclasses__())


def test_a_float_is_the_objective_metric_so_dict_and_float_evaluators_search_alike():
    def as_dict(graph: ArchitectureGraph) -> dict[str, float]:
        return {"val_accuracy": small_model_fitness(graph)}

    with_floats = GeneticAlgorithm(search_space=morphml1_space(), population_size=5, num_generations=3, seed=5)
    with_dicts = GeneticAlgorithm(morphml1_space(), population_size=5, num_generations=3, seed=5)
    best_float = with_floats.optimize(evaluator=small_model_fitness)
    best_dict = with_dicts.optimize(as_dict)
    assert best_float.id == best_dict.id and best_float.fitness == best_dict.fitness
    # The float is recorded under the objective's name; the ask/tell form still unpacks.
    candidate, metrics = best_float
    assert metrics == {"val_accuracy": best_float.fitness} and candidate.graph == best_float.graph
    assert [m for _, _, m in with_floats.history()] == [m for _, _, m in with_dicts.history()]


def test_a_float_for_a_minimized_objective_is_minimized():
    optimizer = RandomSearch(search_space=morphml1_space(), max_trials=8, seed=2, objective="val_loss", goal="minimize")
    losses: list[float] = []

    def loss(graph: ArchitectureGraph) -> float:
        losses.append(graph.param_count() / 1000.0)
        return losses[-1]

    best = optimizer.optimize(evaluator=loss)
    assert best.metrics == {"val_loss": min(losses)}
    assert best.fitness == -min(losses)  # fitness: larger is better


def test_failed_float_results_and_missing_evaluators_are_named():
    optimizer = RandomSearch(search_space=morphml1_space(), max_trials=3, seed=1)
    assert optimizer.optimize(evaluator=lambda graph: math.nan) is None  # non-finite: failed trials
    assert [status for _, status, _ in optimizer.history()] == ["failed"] * 3
    with pytest.raises(OptimizerError, match="optimize: evaluator=None is not allowed; pass evaluator=f"):
        RandomSearch(search_space=morphml1_space(), max_trials=3).optimize()
    asked = RandomSearch(search_space=morphml1_space(), max_trials=3, seed=1)
    (candidate,) = asked.ask(1)
    with pytest.raises(OptimizerError, match=r"a metrics dict, a number .* or None, got bool"):
        asked.tell(candidate.id, True)
