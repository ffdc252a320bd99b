"""Model-based and multi-objective optimizers: Optuna's TPE and NSGA-II over our space, the
multi-objective regularized evolution, hardware constraints, and their manifest errors."""

from __future__ import annotations

import copy
import json
import sys

import optuna
import pytest
import yaml

from morphml.experiment import ManifestError, load_manifest
from morphml.graph import build_graph_from_choices
from morphml.optimizers import (
    ConstrainedOptimizer,
    MultiObjectiveEvolution,
    NSGA2Search,
    OptimizerError,
    RandomSearch,
    RegularizedEvolution,
    TPESearch,
    build_optimizer,
)
from morphml.optimizers.optuna_samplers import program_from_trial
from morphml.pareto import dominates, pareto_front
from test_optimizers import DIGITS, score, space  # one test space and landscape for both

pytestmark = pytest.mark.unit

TWO = [{"metric": "val_accuracy", "goal": "maximize"}, {"metric": "params", "goal": "minimize"}]


def run(optimizer, batch: int = 3, stop_after: int | None = None) -> list[str]:
    """Ask/tell until finished (or `stop_after` asks); the asked hashes in order."""
    asked: list[str] = []
    while not optimizer.is_finished() and (stop_after is None or len(asked) < stop_after):
        candidates = optimizer.ask(batch if stop_after is None else min(batch, stop_after - len(asked)))
        assert candidates
        for candidate in candidates:
            asked.append(candidate.arch_hash)
            optimizer.tell(candidate.id, score(candidate.graph))
    return asked


# -- the space as Optuna parameters ------------------------------------------------------------


def test_every_choice_of_the_space_is_a_parameter_named_by_its_position():
    fixed = optuna.trial.FixedTrial(
        {
            "layers[0].filters": 16,
            "layers[0].kernel_size": 5,
            "layers[0].activation": "gelu",
            "layers[1].present": True,
            "layers[2].repeat": 2,
            "layers[2].r0.layers[0].filters": 8,
            "layers[2].r0.skip": "add",
            "layers[2].r1.layers[0].filters": 32,
            "layers[2].r1.skip": "concat",
            "layers[5].units": 64,
            "layers[6].rate": 0.2,
        }
    )
    program = program_from_trial(space(), fixed)
    ops = [step[1] if step[0] == "layer" else step[0] for step in program]
    assert ops == [
        "conv2d",
        "batchnorm",
        "begin",
        "conv2d",
        "end",
        "begin",
        "conv2d",
        "end",
        "maxpool",
        "flatten",
        "dense",
        "dropout",
    ]
    assert program[0][2]["filters"] == 16 and program[0][2]["kernel_size"] == 5
    assert [step[1] for step in program if step[0] == "end"] == ["add", "concat"]
    assert program[3][2]["filters"] == 8 and program[6][2]["filters"] == 32
    graph = build_graph_from_choices(program, (1, 8, 8), 10)
    assert [n.op for n in graph.nodes].count("add") == 1 and [n.op for n in graph.nodes].count("concat") == 1


def test_a_parameter_exists_only_when_its_layer_does_and_fixed_values_are_none():
    optimizer = TPESearch(space(), population_size=4, max_trials=12, seed=5)
    run(optimizer)
    names = set()
    for trial in optimizer.study.get_trials(deepcopy=False):
        names |= set(trial.params)
        repeats = trial.params.get("layers[2].repeat", 0)
        assert {n for n in trial.params if n.startswith("layers[2].r") and n != "layers[2].repeat"} == {
            f"layers[2].r{k}.{leaf}" for k in range(repeats) for leaf in ("layers[0].filters", "skip")
        }
    assert "layers[3].pool_size" not in names  # one value: no parameter
    assert {"layers[0].filters", "layers[1].present", "layers[2].repeat", "layers[5].units"} <= names


# -- ask/tell contract -------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [TPESearch, NSGA2Search])
def test_optuna_search_is_deterministic_never_repeats_an_architecture_and_learns(cls):
    first = run(cls(space(), population_size=4, max_trials=24, seed=3, objectives=TWO))
    second = run(cls(space(), population_size=4, max_trials=24, seed=3, objectives=TWO))
    other = run(cls(space(), population_size=4, max_trials=24, seed=4, objectives=TWO))
    assert first == second and first != other
    assert len(first) == len(set(first)) == 24


def test_a_failed_trial_is_an_optuna_fail_and_a_success_carries_every_objective():
    optimizer = NSGA2Search(space(), population_size=4, max_trials=4, seed=1, objectives=TWO)
    a, b, c = optimizer.ask(3)
    optimizer.tell(a.id, None)
    optimizer.tell(b.id, {"val_accuracy": 0.5})  # params missing: filled in from the graph
    optimizer.tell(c.id, {"val_accuracy": float("nan"), "params": 10})
    states = {t.number: t for t in optimizer.study.get_trials(deepcopy=False)}
    by_candidate = {r["candidate"]: states[i] for i, r in enumerate(optimizer._trials) if r["candidate"]}
    assert by_candidate[a.id].state.name == "FAIL" and by_candidate[c.id].state.name == "FAIL"
    assert by_candidate[b.id].values == [0.5, float(b.graph.param_count())]
    assert [s for _, s, _ in optimizer.history()] == ["failed", "done", "failed"]


@pytest.mark.parametrize("seed", [0, 2, 3])  # seeds whose plain study draws 15+ distinct first
def test_tpe_asks_what_a_plain_optuna_study_with_the_same_seed_asks(seed):
    """One sampler for the whole search, seeded with the optimizer's seed: until a plain study
    draws an architecture twice (ours draws again there), the two ask the same architectures.
    A new sampler per ask (what TPESearch did before) agrees only through the random startup."""
    sampler = optuna.samplers.TPESampler(n_startup_trials=4, multivariate=True, constant_liar=True, seed=seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    plain: list[str] = []
    for _ in range(30):
        trial = study.ask()
        graph = build_graph_from_choices(program_from_trial(space(), trial), (1, 8, 8), 10)
        if graph.arch_hash in plain:
            break
        plain.append(graph.arch_hash)
        study.tell(trial, score(graph)["val_accuracy"])
    assert len(plain) >= 12  # well past the 4 random startup trials
    ours = run(TPESearch(space(), population_size=4, max_trials=len(plain), seed=seed), batch=1)
    assert ours == plain


@pytest.mark.parametrize("cls", [TPESearch, NSGA2Search])
def test_restart_rebuilds_the_sampler_from_the_journaled_trials_and_continues_the_same_search(cls):
    def make() -> TPESearch:
        return cls(space(), population_size=4, max_trials=30, seed=9, objectives=TWO if cls is NSGA2Search else None)

    whole = run(make())
    before = make()
    head = run(before, stop_after=15)
    saved = json.loads(before.state_json())  # what the journal holds (strict JSON)
    restarted = make()
    restarted.load_state_dict(saved)
    # The rebuilt study holds every journaled trial, with the same params, states and values.
    rebuilt = restarted.study.get_trials(deepcopy=False)
    original = before.study.get_trials(deepcopy=False)
    assert len(rebuilt) == len(original) == len(saved["trials"]) >= 15
    assert [(t.params, t.state, t.values) for t in rebuilt] == [(t.params, t.state, t.values) for t in original]
    tail = run(restarted)
    assert head + tail == whole
    assert restarted.num_sampler_trials >= 30


def test_a_tpe_state_saved_before_tpe_kept_one_sampler_continues_with_a_sampler_per_ask():
    """A journal of the per-ask TPE (no sampler_rng in its state) resumes the way it was run:
    a new sampler per ask from the optimizer's RNG, so its replay gives its journaled asks."""
    live = TPESearch(space(), population_size=4, max_trials=30, seed=9)
    run(live, stop_after=12)
    saved = json.loads(live.state_json())
    assert len(saved["sampler_rng"]["sampler"][1]) == 624  # MT19937's state words
    del saved["sampler_rng"]
    first, second = TPESearch(space(), population_size=4, seed=9), TPESearch(space(), population_size=4, seed=9)
    first.load_state_dict(copy.deepcopy(saved))
    second.load_state_dict(copy.deepcopy(saved))
    assert first._model is None and "sampler_rng" not in json.loads(first.state_json())
    assert run(first, stop_after=9) == run(second, stop_after=9)


@pytest.mark.parametrize("cls", [TPESearch, NSGA2Search])
def test_update_gives_the_sampler_the_new_values_and_a_restart_the_same_search(cls):
    """Multi-fidelity: a promoted trial's value at a higher rung replaces its first one in the
    Optuna study (rebuilt, a finished trial cannot be told again), and a restart from the
    state after the update continues exactly as the live optimizer does."""

    def make() -> TPESearch:
        return cls(space(), population_size=4, max_trials=30, seed=3, objectives=TWO if cls is NSGA2Search else None)

    live = make()
    asked = live.ask(6)
    for candidate in asked:
        live.tell(candidate.id, {**score(candidate.graph), "val_accuracy": 0.1})
    assert live.update(asked[2].id, {"val_accuracy": 0.97, "params": 1234, "epochs": 9}) is True
    number = live._trial_of[asked[2].id]
    trial = live.study.get_trials(deepcopy=False)[number]
    assert trial.values[0] == 0.97 and trial.state.name == "COMPLETE"
    assert [t.values[0] for t in live.study.get_trials(deepcopy=False) if t.number != number] == [0.1] * 5
    assert live.update(asked[3].id, {"status": "failed"}) is False
    restarted = make()
    restarted.load_state_dict(json.loads(live.state_json()))
    assert [c.arch_hash for c in restarted.ask(5)] == [c.arch_hash for c in live.ask(5)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nsga2_replay_after_a_restart_keeps_the_parents_chosen_while_a_trial_was_in_flight(seed):
    """A generation's parents are chosen when its first trial is asked; a trial of the previous
    generation still in flight then, told later, must not change them after a restart either
    (the coordinator's replay checks that each replayed ask gives the journaled candidates)."""

    def make() -> NSGA2Search:
        return NSGA2Search(space(), population_size=4, max_trials=30, seed=seed, objectives=TWO)

    live = make()
    first = live.ask(5)  # all of generation 0: none is complete yet
    for candidate in first[:4]:
        live.tell(candidate.id, score(candidate.graph))
    live.ask(1)  # generation 1's first trial: its parents come from the 4 complete trials
    saved = json.loads(live.state_json())  # a journal snapshot here
    best = {"val_accuracy": 0.999, "params": 1}  # the late trial dominates every parent
    live.tell(first[4].id, best)
    restarted = make()
    restarted.load_state_dict(saved)
    restarted.tell(first[4].id, best)  # the journaled op after the snapshot
    assert [c.arch_hash for c in restarted.ask(3)] == [c.arch_hash for c in live.ask(3)]


def test_nsga2_under_the_coordinator_restarts_from_its_journal_with_trials_in_flight(tmp_path, monkeypatch):
    """Three trials in flight, results coming back out of order, a snapshot every 3 optimizer ops:
    generations straddle and snapshots fall inside them; every restart replays the journal."""
    import queue

    import morphml.distributed.coordinator as coordinator_module
    from morphml.distributed.clock import ManualClock
    from morphml.distributed.coordinator import ExperimentCoordinator, ExperimentSettings, LeaseMessage
    from morphml.distributed.journal import Journal

    monkeypatch.setattr(coordinator_module, "SNAPSHOT_EVERY", 3)

    def start(running: list[LeaseMessage]) -> tuple[ExperimentCoordinator, queue.Queue]:
        optimizer = NSGA2Search(space(), population_size=4, max_trials=24, seed=5, objectives=TWO)
        settings = ExperimentSettings(max_trials=24, heartbeat_interval=1.0, missed_heartbeats=3)
        coordinator = ExperimentCoordinator(optimizer, settings, Journal(tmp_path / "j.db"), ManualClock())
        worker_id, _ = coordinator.register("a", 0, 3, running=[(m.task_id, m.attempt) for m in running])
        return coordinator, coordinator.connect(worker_id)

    def receive() -> None:
        while not box.empty():
            item = box.get_nowait()
            if isinstance(item, LeaseMessage):
                in_flight.append(item)

    coordinator, box = start([])
    in_flight: list[LeaseMessage] = []
    restarts = 0
    while coordinator.phase == "Running":
        receive()
        assert in_flight, "the coordinator leased nothing while the search runs"
        lease = in_flight.pop(-1 if len(in_flight) % 2 else 0)  # newest or oldest first, in turn
        graph = coordinator.optimizer._candidates[coordinator.leases.tasks[lease.task_id].candidate_id].graph
        assert coordinator.report_result(lease.task_id, lease.attempt, True, score(graph)) == "accepted"
        if coordinator.succeeded % 5 == 0 and coordinator.phase == "Running":
            receive()
            coordinator.journal.close()
            coordinator, box = start(in_flight)  # raises if a replayed ask differs from the journaled one
            restarts += 1  # the worker comes back still running its trials and reports them later
    assert restarts >= 3 and coordinator.succeeded == 24
    coordinator.journal.close()


def test_state_from_another_algorithm_is_refused():
    tpe = TPESearch(space(), population_size=4, max_trials=6, seed=1)
    run(tpe)
    with pytest.raises(OptimizerError, match="saved by algorithm 'tpe'"):
        NSGA2Search(space(), population_size=4, max_trials=6, seed=1).load_state_dict(tpe.state_dict())


# -- multi-objective regularized evolution -------------------------------------------------------


def test_multi_objective_evolution_picks_parents_by_front_then_crowding():
    optimizer = MultiObjectiveEvolution(
        space(), population_size=6, sample_size=6, max_trials=40, seed=2, objectives=TWO
    )
    results = [(0.90, 30000), (0.80, 10000), (0.70, 40000), (0.95, 50000), (0.60, 5000), (0.85, 9000)]
    for candidate, (accuracy, params) in zip(optimizer.ask(6), results, strict=True):
        optimizer.tell(candidate.id, {"val_accuracy": accuracy, "params": params})
    front = set(optimizer.pareto_front())
    ids = optimizer._population
    # front: 0.95/50k, 0.90/30k, 0.85/9k, 0.60/5k (0.80/10k is dominated by 0.85/9k; 0.70/40k by 0.90/30k)
    assert front == {ids[0], ids[3], ids[4], ids[5]}
    # sampling the whole population: a front member with infinite crowding (a boundary) wins, the
    # oldest of those on a tie
    assert optimizer._select_parent(list(range(6))) == ids[3]
    # among dominated-only contenders the less dominated (rank 1) one wins
    assert optimizer._select_parent([1, 2]) in (ids[1], ids[2])
    assert optimizer._select_parent([1, 5]) == ids[5]
    hashes = run(optimizer)
    assert len(hashes) == len(set(hashes))


def test_multi_objective_evolution_state_round_trip():
    def make() -> MultiObjectiveEvolution:
        return MultiObjectiveEvolution(space(), population_size=5, sample_size=3, max_trials=25, seed=4, objectives=TWO)

    whole = run(make())
    before = make()
    head = run(before, stop_after=9)  # whole batches of 3, as in the uninterrupted run
    after = make()
    after.load_state_dict(json.loads(before.state_json()))
    assert head + run(after) == whole


# -- constraints ---------------------------------------------------------------------------------


def test_candidates_over_max_params_are_never_asked_and_the_optimizer_is_told_they_are_infeasible():
    inner = RandomSearch(space(), seed=3)
    optimizer = ConstrainedOptimizer(inner, max_params=3000)
    asked, refused = [], []
    while len(asked) < 12:
        batch = optimizer.ask(3)
        assert batch
        refused += optimizer.refused_in_last_ask
        for candidate in batch:
            asked.append(candidate)
            optimizer.tell(candidate.id, score(candidate.graph))
    assert all(c.graph.param_count() <= 3000 for c in asked)
    assert refused and all(r["params"] > 3000 and r["reason"].startswith("params ") for r in refused)
    assert refused == optimizer.refused
    told = {c.id: (status, metrics) for c, status, metrics in inner.history()}
    for record in refused:
        status, metrics = told[record["id"]]
        assert status == "failed" and metrics["infeasible"] is True and "maxParams 3000" in metrics["error"]
    # the state carries the refusals; a restart refuses exactly the same candidates again
    again = ConstrainedOptimizer(RandomSearch(space(), seed=3), max_params=3000)
    again.load_state_dict(json.loads(optimizer.state_json()))
    assert again.refused == optimizer.refused
    with pytest.raises(OptimizerError, match="constraints cannot change"):
        ConstrainedOptimizer(RandomSearch(space(), seed=3), max_params=4000).load_state_dict(optimizer.state_dict())


def test_constrained_tpe_replays_identically_after_a_restart():
    def make() -> ConstrainedOptimizer:
        return ConstrainedOptimizer(TPESearch(space(), population_size=4, seed=2), max_flops=450_000)

    whole, head = make(), make()
    full_candidates = _asks(whole, 8)
    full = [c.arch_hash for c in full_candidates]
    first = [c.arch_hash for c in _asks(head, 4)]
    restarted = make()
    restarted.load_state_dict(json.loads(head.state_json()))
    assert first + [c.arch_hash for c in _asks(restarted, 4)] == full
    assert all(c.graph.flops() <= 450_000 for c in full_candidates)
    assert whole.refused and all(r["flops"] > 450_000 for r in whole.refused)


@pytest.mark.parametrize("seed", [0, 1])
def test_optuna_samplers_learn_the_budget_from_the_violations_and_refuse_far_fewer_than_random(seed):
    def refusals(inner) -> int:
        optimizer = ConstrainedOptimizer(inner, max_flops=100_000)
        _asks(optimizer, 30)
        return len(optimizer.refused)

    tpe = ConstrainedOptimizer(TPESearch(space(), population_size=5, seed=seed), max_flops=100_000)
    _asks(tpe, 30)
    refused_ids = {r["id"] for r in tpe.refused}
    for record in tpe.inner._trials:  # refused candidates reach Optuna as COMPLETE trials violating the constraint
        if record["candidate"] in refused_ids:
            assert record["state"] == "COMPLETE" and record["violation"] > 0
            assert record["system_attrs"]["constraints"][0] == record["violation"]
    random_refusals = refusals(RandomSearch(space(), seed=seed))
    assert 2 * len(tpe.refused) < random_refusals
    assert 2 * refusals(NSGA2Search(space(), population_size=6, seed=seed, objectives=TWO)) < random_refusals


def _asks(optimizer, count: int) -> list:
    out: list = []
    while len(out) < count:
        batch = optimizer.ask(min(2, count - len(out)))
        assert batch
        for candidate in batch:
            out.append(candidate)
            optimizer.tell(candidate.id, score(candidate.graph))
    return out


def test_a_result_over_max_latency_is_infeasible_for_the_optimizer():
    optimizer = ConstrainedOptimizer(RandomSearch(space(), seed=1), max_latency_ms=5.0)
    fast, slow = optimizer.ask(2)
    optimizer.tell(fast.id, {"val_accuracy": 0.9, "latency_ms": 4.0})
    optimizer.tell(slow.id, {"val_accuracy": 0.99, "latency_ms": 6.5})
    assert optimizer.best().id == fast.id
    assert {c.id: s for c, s, _ in optimizer.history()} == {fast.id: "done", slow.id: "failed"}


def test_max_latency_without_a_reported_latency_is_infeasible():
    optimizer = ConstrainedOptimizer(RandomSearch(space(), seed=1), max_latency_ms=5.0)
    (candidate,) = optimizer.ask(1)
    optimizer.tell(candidate.id, {"val_accuracy": 0.9})  # e.g. a custom evaluator that does not measure it
    ((_, status, metrics),) = optimizer.history()
    assert status == "failed" and "latency_ms was not reported" in metrics["error"]


def test_measured_objectives_and_latency_constraints_are_accepted():
    three = [*TWO, {"metric": "latency_ms", "goal": "minimize"}]
    measured = load_manifest(
        manifest(objectives=three, optimizer={"algorithm": "nsga2"}, constraints={"maxLatencyMs": 2.5})
    )
    assert measured.objectives == three and measured.constraints == {"maxLatencyMs": 2.5}
    custom = [*TWO[:1], {"metric": "energy_mj", "goal": "minimize"}]
    evaluation = {"dataset": {"name": "digits"}, "evaluator": "tests.evaluators:instant"}
    assert load_manifest(manifest(objectives=custom, optimizer={"algorithm": "nsga2"}, evaluation=evaluation))


def test_no_feasible_architecture_finishes_the_search():
    optimizer = ConstrainedOptimizer(RandomSearch(space(), seed=1), max_params=1)
    assert optimizer.ask(2) == [] and optimizer.is_finished()


# -- from the manifest ---------------------------------------------------------------------------


def manifest(**spec) -> dict:
    doc = yaml.safe_load(DIGITS.read_text())
    doc = copy.deepcopy(doc)
    doc["spec"].update(spec)
    return doc


def test_manifest_builds_tpe_nsga2_multi_objective_evolution_and_constraints():
    tpe = load_manifest(manifest(optimizer={"algorithm": "tpe", "populationSize": 4, "seed": 1})).build_optimizer()
    assert isinstance(tpe, TPESearch) and tpe.objectives == [{"metric": "val_accuracy", "goal": "maximize"}]
    experiment = load_manifest(manifest(optimizer={"algorithm": "nsga2", "populationSize": 4}, objectives=TWO))
    nsga2 = experiment.build_optimizer()
    assert isinstance(nsga2, NSGA2Search) and nsga2.objectives == TWO and nsga2.population_size == 4
    assert (experiment.objective.metric, experiment.objective.goal) == ("val_accuracy", "maximize")
    evolution = load_manifest(
        manifest(optimizer={"algorithm": "regularizedEvolution"}, objectives=TWO)
    ).build_optimizer()
    assert isinstance(evolution, MultiObjectiveEvolution)
    single = load_manifest(manifest(optimizer={"algorithm": "regularizedEvolution"})).build_optimizer()
    assert type(single) is RegularizedEvolution
    constrained = load_manifest(
        manifest(optimizer={"algorithm": "random"}, constraints={"maxParams": 20000})
    ).build_optimizer()
    assert isinstance(constrained, ConstrainedOptimizer) and constrained.limits == {"max_params": 20000}
    assert constrained.inner.max_trials is None  # refusals must not use up the optimizer's own budget
    first = load_manifest(
        manifest(objectives=[{"metric": "params", "goal": "minimize"}], optimizer={"algorithm": "tpe"})
    )
    assert (first.objective.metric, first.objective.goal) == ("params", "minimize")


@pytest.mark.parametrize(
    ("spec", "field", "text"),
    [
        ({"optimizer": {"algorithm": "bayesian"}}, "spec.optimizer.algorithm", "supported values"),
        (
            {
                "objectives": [
                    {"metric": "val_accuracy", "goal": "maximize"},
                    {"metric": "val_accuracy", "goal": "maximize"},
                ],
                "optimizer": {"algorithm": "nsga2"},
            },
            "spec.objectives",
            "each metric may appear only once",
        ),
        (
            {
                "objectives": [
                    {"metric": "val_accuracy", "goal": "maximize"},
                    {"metric": "energy_mj", "goal": "minimize"},
                ],
                "optimizer": {"algorithm": "nsga2"},
            },
            "spec.objectives",
            "a metric the built-in trainer does not measure",
        ),
        ({"constraints": {"maxLatencyMs": 0}}, "spec.constraints.maxLatencyMs", "greater than 0"),
        (
            {"objectives": TWO, "optimizer": {"algorithm": "genetic"}},
            "spec.optimizer.algorithm",
            "genetic ranks candidates by one objective",
        ),
        (
            {
                "objectives": TWO,
                "objective": {"metric": "val_loss", "goal": "minimize"},
                "optimizer": {"algorithm": "nsga2"},
            },
            "spec.objective",
            "disagree",
        ),
        (
            {"objectives": [{"metric": "params", "goal": "maximize"}], "optimizer": {"algorithm": "tpe"}},
            "spec.objectives[0].goal",
            "minimized",
        ),
        ({"constraints": {"maxParams": 0}}, "spec.constraints.maxParams", "greater than or equal to 1"),
    ],
    ids=[
        "unknown-algorithm",
        "duplicate-metric",
        "objective-not-measured",
        "max-latency-zero",
        "genetic-multi",
        "objective-disagrees",
        "params-maximized",
        "max-params-zero",
    ],
)
def test_bad_search_settings_are_refused_naming_the_field(spec, field, text):
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest(**spec))
    assert field in caught.value.fields, caught.value
    assert text in str(caught.value)


def test_tpe_without_optuna_on_the_master_names_the_field_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError, as when not installed
    experiment = load_manifest(manifest(optimizer={"algorithm": "tpe"}))
    with pytest.raises(ManifestError) as caught:
        experiment.build_optimizer()
    assert caught.value.fields == ["spec.optimizer.algorithm"]
    assert "needs Optuna on the master" in str(caught.value) and "morphml[search]" in str(caught.value)


def test_the_factory_refuses_what_the_schema_cannot_see():
    with pytest.raises(OptimizerError, match=r"spec\.objectives\[1\]\.metric: 'params' is already objective 0"):
        build_optimizer({"algorithm": "nsga2"}, space(), objectives=[{"metric": "params", "goal": "minimize"}] * 2)
    with pytest.raises(OptimizerError, match=r"spec\.constraints\.maxWatts: unknown field"):
        build_optimizer({"algorithm": "random"}, space(), constraints={"maxWatts": 3})
    with pytest.raises(OptimizerError, match=r"spec\.objectives: 2 objectives, but genetic ranks"):
        build_optimizer({"algorithm": "genetic"}, space(), objectives=TWO)


def test_front_of_a_nsga2_search_is_mutually_non_dominated():
    optimizer = NSGA2Search(space(), population_size=4, max_trials=20, seed=6, objectives=TWO)
    run(optimizer)
    points = optimizer.points()
    front = optimizer.pareto_front()
    assert front
    for i in front:
        assert not any(dominates(points[j], points[i]) for j in points)


@pytest.mark.parametrize("cls", [NSGA2Search, MultiObjectiveEvolution])
def test_the_front_kept_result_by_result_is_the_front_of_all_results_and_survives_a_restart(cls):
    if cls is NSGA2Search:
        optimizer = NSGA2Search(space(), population_size=4, max_trials=18, seed=8, objectives=TWO)
    else:
        optimizer = MultiObjectiveEvolution(
            space(), population_size=4, sample_size=2, max_trials=18, seed=8, objectives=TWO
        )
    while not optimizer.is_finished():
        for candidate in optimizer.ask(3):
            optimizer.tell(candidate.id, score(candidate.graph))
            points = optimizer.points()
            ids = list(points)
            assert optimizer.pareto_front() == [ids[i] for i in pareto_front([points[i] for i in ids])]
    summary = optimizer.pareto_summary()
    front = optimizer.pareto_front()
    assert summary["size"] == len(front) > 0
    metrics = {c.id: m for c, _, m in optimizer.history()}
    assert summary["best"]["val_accuracy"]["value"] == max(metrics[c]["val_accuracy"] for c in front)
    assert summary["best"]["params"]["value"] == min(metrics[c]["params"] for c in front)
    restored = type(optimizer)(space(), population_size=4, max_trials=18, seed=8, objectives=TWO)
    restored.load_state_dict(json.loads(optimizer.state_json()))
    assert restored.pareto_front() == front and restored.pareto_summary() == summary
