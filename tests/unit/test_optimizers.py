"""Optimizers: ask/tell semantics, determinism, dedup with result reuse, JSON state round trips,
and settings errors that name the field."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import yaml

from morphml.graph import ArchitectureGraph
from morphml.optimizers import (
    Candidate,
    GeneticAlgorithm,
    OptimizerError,
    RandomSearch,
    RegularizedEvolution,
    build_optimizer,
)
from morphml.space import Block, Layer, SearchSpace, SearchSpaceError

pytestmark = pytest.mark.unit

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.yaml"


def space() -> SearchSpace:
    return (
        SearchSpace("opt")
        .add_layers(
            Layer.conv2d(filters=[8, 16, 32], kernel_size=[3, 5], activation=["relu", "gelu"]),
            Layer.batchnorm(optional=True),
            Block([Layer.conv2d(filters=[8, 16, 32])], repeat=(0, 2), skip=["none", "add", "concat"]),
            Layer.maxpool(pool_size=[2]),
            Layer.flatten(),
            Layer.dense(units=[16, 32, 64]),
            Layer.dropout(rate=[0.0, 0.2]),
        )
        .bind([1, 8, 8], 10)
    )


def score(graph: ArchitectureGraph) -> dict:
    """A deterministic landscape: best near 20k parameters, a little hash-derived noise."""
    noise = int(graph.arch_hash[:6], 16) / 16**6 * 0.01
    return {
        "val_accuracy": 1.0 - abs(math.log(graph.param_count() / 20000)) / 10 + noise,
        "params": graph.param_count(),
    }


def drive(optimizer, batch: int = 3, save_at=None) -> list[str]:
    """Ask in batches, tell in ask order; return the asked hashes in order."""
    asked = []
    while not optimizer.is_finished():
        candidates = optimizer.ask(batch)
        assert candidates, "a synchronous driver never has to wait"
        for candidate in candidates:
            asked.append(candidate.arch_hash)
            optimizer.tell(candidate.id, score(candidate.graph))
    return asked


# -- determinism ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: GeneticAlgorithm(space(), population_size=6, num_generations=4, seed=seed),
        lambda seed: RegularizedEvolution(space(), population_size=5, sample_size=3, max_trials=20, seed=seed),
        lambda seed: RandomSearch(space(), seed=seed, max_trials=12),
    ],
    ids=["genetic", "regularized-evolution", "random"],
)
def test_same_seed_proposes_the_same_architectures_in_the_same_order(make) -> None:
    first, second, other = drive(make(11)), drive(make(11)), drive(make(12))
    assert first == second
    assert len(first) >= 12
    assert first != other


def test_candidate_ids_are_deterministic_and_unique() -> None:
    def ids(seed: int) -> list[str]:
        optimizer = GeneticAlgorithm(space(), population_size=4, num_generations=3, elitism=1, seed=seed)
        optimizer.optimize(score)
        return [c.id for c, _, _ in optimizer.history()]

    first = ids(5)
    assert first == ids(5)
    assert len(set(first)) == len(first)
    assert first[:4] == ["g0-c0", "g0-c1", "g0-c2", "g0-c3"]
    assert first[4].startswith("g1-c0")


# -- generational GA semantics --------------------------------------------------------------------


def test_genetic_breeds_the_next_generation_only_when_the_current_is_fully_told() -> None:
    optimizer = GeneticAlgorithm(space(), population_size=5, num_generations=2, elitism=1, seed=0)
    generation0 = optimizer.ask(100)
    assert [c.id for c in generation0] == [f"g0-c{i}" for i in range(5)]
    assert optimizer.ask(1) == []  # wait
    for candidate in generation0[:-1]:
        optimizer.tell(candidate.id, score(candidate.graph))
    assert optimizer.ask(3) == []  # still one outstanding
    optimizer.tell(generation0[-1].id, None)  # a failed trial completes the generation too
    generation1 = optimizer.ask(100)
    assert generation1 and all(c.generation == 1 for c in generation1)
    assert len(generation1) <= 4  # the elite is carried over, not re-asked
    for candidate in generation1:
        optimizer.tell(candidate, score(candidate.graph))
    assert optimizer.is_finished()
    assert optimizer.ask(5) == []


def test_duplicates_in_a_generation_reuse_one_result_instead_of_retraining() -> None:
    tiny = SearchSpace("tiny").add_layers(Layer.dense(units=[4, 8])).bind([5], 2)
    optimizer = GeneticAlgorithm(tiny, population_size=4, num_generations=3, elitism=1, seed=1)
    generation0 = optimizer.ask(10)
    assert len(generation0) == 2  # only two architectures can be sampled; 4 members share them
    assert optimizer.state_dict()["members"].count(generation0[0].arch_hash) >= 1
    assert len(optimizer.state_dict()["members"]) == 4
    _tell_all(optimizer, generation0)
    generation1 = optimizer.ask(10)
    assert 0 < len(generation1) <= 3  # the elite is carried over with its result
    assert optimizer.state_dict()["members"][0] in {c.arch_hash for c in generation0}


def test_no_architecture_is_asked_twice_in_a_long_search() -> None:
    for optimizer in (
        GeneticAlgorithm(space(), population_size=10, num_generations=6, mutation_rate=0.1, seed=2),
        RegularizedEvolution(space(), population_size=8, sample_size=4, max_trials=60, seed=2),
    ):
        asked = drive(optimizer, batch=4)
        assert len(asked) == len(set(asked))


def test_random_search_stops_when_the_space_is_exhausted() -> None:
    tiny = SearchSpace("tiny").add_layers(Layer.dense(units=[4, 8, 16])).bind([5], 2)
    optimizer = RandomSearch(tiny, seed=0)
    optimizer.optimize(score)
    assert optimizer.is_finished()
    assert optimizer.num_asked == 3


# -- regularized evolution semantics ----------------------------------------------------------------


def test_regularized_evolution_ages_out_the_oldest_and_breeds_from_told_results() -> None:
    optimizer = RegularizedEvolution(space(), population_size=3, sample_size=2, max_trials=10, seed=4)
    initial = optimizer.ask(10)
    assert len(initial) == 3  # random phase only; children need a told parent
    assert optimizer.ask(1) == []
    optimizer.tell(initial[0], score(initial[0].graph))
    child = optimizer.ask(1)
    assert len(child) == 1 and child[0].parents == (initial[0].id,) and child[0].generation == 1
    for candidate in initial[1:] + child:
        optimizer.tell(candidate, score(candidate.graph))
    state = optimizer.state_dict()
    assert state["population"] == [initial[1].id, initial[2].id, child[0].id]  # the oldest left


# -- tell, best, failures ---------------------------------------------------------------------------


def test_failed_trials_have_the_worst_fitness_and_best_respects_the_goal() -> None:
    optimizer = RandomSearch(space(), seed=3, max_trials=4, objective="val_loss", goal="minimize")
    candidates = optimizer.ask(4)
    optimizer.tell(candidates[0], {"val_loss": 0.5})
    optimizer.tell(candidates[1], {"val_loss": 0.2})
    optimizer.tell(candidates[2], None)
    optimizer.tell(candidates[3], {"val_loss": float("nan")})
    best, metrics = optimizer.best()
    assert best.id == candidates[1].id and metrics == {"val_loss": 0.2}
    statuses = [status for _, status, _ in optimizer.history()]
    assert statuses == ["done", "done", "failed", "failed"]
    json.dumps(optimizer.state_dict(), allow_nan=False)


def test_tell_unknown_id_is_an_error_and_a_second_tell_is_ignored() -> None:
    optimizer = RandomSearch(space(), seed=0, max_trials=2)
    (candidate,) = optimizer.ask(1)
    with pytest.raises(OptimizerError, match="unknown candidate id 'nope'"):
        optimizer.tell("nope", {"val_accuracy": 1.0})
    optimizer.tell(candidate.id, {"val_accuracy": 0.5})
    optimizer.tell(candidate.id, {"val_accuracy": 0.9})
    assert optimizer.best()[1] == {"val_accuracy": 0.5}
    assert optimizer.result_for(candidate.arch_hash) == {"val_accuracy": 0.5}


def test_update_replaces_a_told_result_and_evolution_breeds_from_the_new_value() -> None:
    """Multi-fidelity: a promoted trial's value at a higher rung replaces its first-rung value
    (Optimizer.update), in best(), in the parent choice and in the snapshot (state_json caches
    finished records); nothing else is an update."""
    optimizer = RegularizedEvolution(space(), population_size=2, sample_size=2, max_trials=10, seed=4)
    first, second = optimizer.ask(2)
    pending = optimizer.ask(0)
    optimizer.tell(first, {"val_accuracy": 0.5, "epochs": 1})
    optimizer.tell(second, {"val_accuracy": 0.4, "epochs": 1})
    assert optimizer.best()[0].id == first.id
    before = optimizer.state_json()
    assert optimizer.update(second.id, {"val_accuracy": 0.9, "epochs": 3}) is True
    assert optimizer.best() == (second, {"val_accuracy": 0.9, "epochs": 3})
    assert optimizer.result_for(second.arch_hash) == {"val_accuracy": 0.9, "epochs": 3}
    (child,) = optimizer.ask(1)  # the fitter of the two is the parent now
    assert child.parents == (second.id,)
    assert optimizer.state_json() != before and json.loads(optimizer.state_json()) == optimizer.state_dict()
    # A failed later segment, a candidate not told yet, or one that failed: no update.
    assert optimizer.update(second.id, {"status": "failed"}) is False
    assert optimizer.update(second.id, None) is False
    assert optimizer.update(child.id, {"val_accuracy": 1.0}) is False
    optimizer.tell(child, None)
    assert optimizer.update(child.id, {"val_accuracy": 1.0}) is False
    assert optimizer.best()[1] == {"val_accuracy": 0.9, "epochs": 3} and pending == []
    reloaded = RegularizedEvolution(space(), population_size=2, sample_size=2, max_trials=10, seed=4)
    reloaded.load_state_dict(json.loads(optimizer.state_json()))
    assert reloaded.best()[0].id == second.id


def test_optimize_counts_an_evaluator_exception_as_a_failed_trial() -> None:
    calls = []

    def flaky(graph: ArchitectureGraph) -> dict:
        calls.append(graph.arch_hash)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return score(graph)

    optimizer = RandomSearch(space(), seed=1, max_trials=5)
    best, _ = optimizer.optimize(flaky)
    history = optimizer.history()
    assert len(history) == 5 and history[1][1] == "failed" and "out of memory" in history[1][2]["error"]
    assert best.id != history[1][0].id


def test_unbound_space_fails_at_ask_with_a_clear_error() -> None:
    optimizer = GeneticAlgorithm(SearchSpace.from_spec({"layers": [{"type": "relu"}]}), population_size=2, elitism=0)
    with pytest.raises(SearchSpaceError, match=r"space\.bind"):
        optimizer.ask(1)


# -- state ------------------------------------------------------------------------------------------


def _tell_all(optimizer, candidates) -> None:
    for candidate in candidates:
        optimizer.tell(candidate.id, score(candidate.graph))


def test_genetic_state_after_generation_2_reloads_and_proposes_exactly_the_same() -> None:
    original = GeneticAlgorithm(space(), population_size=6, num_generations=6, seed=21)
    for _ in range(2):  # generations 0 and 1 complete; generation 2 is bred
        _tell_all(original, original.ask(100))
    assert original.generation == 2
    saved = json.loads(json.dumps(original.state_dict(), allow_nan=False))
    restored = GeneticAlgorithm(space(), population_size=6, num_generations=6, seed=999)
    restored.load_state_dict(saved)
    assert restored.state_dict() == saved
    while not original.is_finished():
        expected, got = original.ask(4), restored.ask(4)
        assert [c.to_json() for c in got] == [c.to_json() for c in expected]
        _tell_all(original, expected)
        _tell_all(restored, got)
    assert restored.is_finished()
    assert restored.best()[0].id == original.best()[0].id


def test_state_with_outstanding_candidates_keeps_them() -> None:
    original = GeneticAlgorithm(space(), population_size=4, num_generations=3, seed=8)
    asked = original.ask(3)
    _tell_all(original, asked[:1])
    restored = GeneticAlgorithm(space(), population_size=4, num_generations=3)
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert [c.id for c in restored.outstanding()] == [c.id for c in asked[1:]]
    assert [c.id for c in restored.ask(5)] == [c.id for c in original.ask(5)]


def test_counts_and_outstanding_agree_with_the_statuses_through_asks_tells_and_a_reload() -> None:
    """num_asked / num_told / outstanding() are kept incrementally; they must equal a recount of
    the statuses at every step, and after load_state_dict."""

    def recount(opt):
        statuses = dict(opt._status)
        return (
            sum(1 for s in statuses.values() if s != "queued"),
            sum(1 for s in statuses.values() if s in ("done", "failed")),
            [i for i, s in statuses.items() if s == "pending"],
        )

    rng = random.Random(3)
    original = GeneticAlgorithm(space(), population_size=5, num_generations=4, seed=2)
    while not original.is_finished():
        asked = original.ask(rng.randint(1, 3))
        assert (original.num_asked, original.num_told, [c.id for c in original.outstanding()]) == recount(original)
        for candidate in asked[: rng.randint(0, len(asked))] or asked:
            original.tell(candidate.id, None if rng.random() < 0.2 else score(candidate.graph))
        for candidate in original.outstanding():
            original.tell(candidate.id, score(candidate.graph))
        assert (original.num_asked, original.num_told, [c.id for c in original.outstanding()]) == recount(original)
        if original.num_told >= 7:
            break
    pending = original.ask(2)
    restored = GeneticAlgorithm(space(), population_size=5, num_generations=4)
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert (restored.num_asked, restored.num_told, [c.id for c in restored.outstanding()]) == recount(original)
    assert [c.id for c in restored.outstanding()] == [c.id for c in pending]


@pytest.mark.parametrize(
    "make",
    [
        lambda: GeneticAlgorithm(space(), population_size=4, num_generations=3, seed=8),
        lambda: RegularizedEvolution(space(), population_size=4, sample_size=2, max_trials=16, seed=5),
        lambda: RandomSearch(space(), seed=3, max_trials=10),
    ],
    ids=["genetic", "regularized-evolution", "random"],
)
def test_state_json_is_the_state_dict_at_every_step_and_after_a_reload(make) -> None:
    """state_json reuses the text of finished candidates; it must still say what state_dict says."""
    opt = make()
    while not opt.is_finished():
        asked = opt.ask(2)
        assert json.loads(opt.state_json()) == json.loads(json.dumps(opt.state_dict()))
        for i, candidate in enumerate(asked):
            opt.tell(candidate.id, None if i == 1 else score(candidate.graph))
        assert json.loads(opt.state_json()) == json.loads(json.dumps(opt.state_dict()))
        if opt.num_told >= 6:
            break
    restored = make()
    restored.load_state_dict(json.loads(opt.state_json()))
    assert json.loads(restored.state_json()) == json.loads(opt.state_json())
    assert drive(restored) == drive(opt)


def test_regularized_evolution_state_round_trip_mid_search() -> None:
    original = RegularizedEvolution(space(), population_size=4, sample_size=2, max_trials=16, seed=5)
    _tell_all(original, original.ask(4))
    _tell_all(original, original.ask(3))
    restored = RegularizedEvolution(space(), population_size=4, sample_size=2, max_trials=16)
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert drive(restored) == drive(original)


def test_state_for_another_algorithm_or_space_is_refused() -> None:
    state = RandomSearch(space(), seed=0, max_trials=3).state_dict()
    with pytest.raises(OptimizerError, match="saved by algorithm 'random'"):
        GeneticAlgorithm(space()).load_state_dict(state)
    other = SearchSpace("other").add_layers(Layer.dense(units=[4])).bind([5], 2)
    with pytest.raises(OptimizerError, match="search space"):
        RandomSearch(other).load_state_dict(state)
    with pytest.raises(OptimizerError, match="malformed"):
        RandomSearch(space()).load_state_dict({**state, "rng": "garbage"})


def test_candidate_json_round_trip_and_tamper_check() -> None:
    candidate = RandomSearch(space(), seed=0).ask(1)[0]
    data = json.loads(json.dumps(candidate.to_json()))
    assert Candidate.from_json(data).to_json() == candidate.to_json()
    with pytest.raises(OptimizerError, match="does not match"):
        Candidate.from_json({**data, "arch_hash": "0" * 64})


# -- settings and build_optimizer -------------------------------------------------------------------


def digits() -> dict:
    return yaml.safe_load(DIGITS.read_text())["spec"]


def test_build_optimizer_from_the_digits_manifest() -> None:
    spec = digits()
    optimizer = build_optimizer(
        spec["optimizer"],
        SearchSpace.from_spec(spec["searchSpace"]),
        spec["objective"],
        input_shape=[1, 8, 8],
        num_classes=10,
    )
    assert isinstance(optimizer, GeneticAlgorithm)
    assert (optimizer.population_size, optimizer.num_generations, optimizer.elitism, optimizer.tournament_size) == (
        8,
        3,
        2,
        3,
    )
    assert (optimizer.mutation_rate, optimizer.crossover_rate, optimizer.seed) == (0.3, 0.5, 42)
    optimizer.optimize(score)
    assert optimizer.num_asked <= 24


@pytest.mark.parametrize(
    ("algorithm", "kind", "trials"),
    [("regularizedEvolution", RegularizedEvolution, 24), ("random", RandomSearch, 24)],
)
def test_build_optimizer_other_algorithms(algorithm: str, kind: type, trials: int) -> None:
    spec = digits()
    optimizer = build_optimizer(
        {**spec["optimizer"], "algorithm": algorithm, "sampleSize": 3},
        SearchSpace.from_spec(spec["searchSpace"]),
        {"metric": "val_loss", "goal": "minimize"},
        input_shape=[1, 8, 8],
        num_classes=10,
    )
    assert isinstance(optimizer, kind)
    assert optimizer.max_trials == trials and optimizer.goal == "minimize" and optimizer.objective == "val_loss"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"algorithm": "bayesian"}, "spec.optimizer.algorithm: 'bayesian' is not allowed"),
        ({"elitism": 8}, "spec.optimizer.elitism: 8 is not allowed; expected 0 <= elitism < population_size (8)"),
        ({"mutationRate": 1.5}, "spec.optimizer.mutationRate: 1.5 is not allowed"),
        ({"populationSize": 0}, "spec.optimizer.populationSize: 0 is not allowed"),
        ({"generations": "3"}, "spec.optimizer.generations: '3' is not allowed"),
        ({"tournamentSize": 0}, "spec.optimizer.tournamentSize: 0 is not allowed"),
        ({"seed": 1.5}, "spec.optimizer.seed: 1.5 is not allowed"),
        ({"population": 8}, "spec.optimizer.population: unknown field"),
    ],
)
def test_bad_optimizer_settings_name_the_manifest_field(changes: dict, message: str) -> None:
    spec = digits()
    with pytest.raises(OptimizerError) as info:
        build_optimizer({**spec["optimizer"], **changes}, SearchSpace.from_spec(spec["searchSpace"]), spec["objective"])
    assert str(info.value).startswith(message), str(info.value)


def test_bad_objective_names_the_field() -> None:
    spec = digits()
    with pytest.raises(OptimizerError, match=r"^spec\.objective\.goal: 'up'"):
        build_optimizer(
            spec["optimizer"], SearchSpace.from_spec(spec["searchSpace"]), {"metric": "val_accuracy", "goal": "up"}
        )


def test_genetic_improves_on_its_first_generation_without_touching_the_global_rng() -> None:
    global_state = random.getstate()
    optimizer = GeneticAlgorithm(space(), population_size=10, num_generations=6, seed=7)
    optimizer.optimize(score)
    assert random.getstate() == global_state
    first = max(m["val_accuracy"] for c, s, m in optimizer.history() if c.generation == 0)
    assert optimizer.best()[1]["val_accuracy"] > first


def test_nas_core_imports_no_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, morphml.space, morphml.graph, morphml.optimizers\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
