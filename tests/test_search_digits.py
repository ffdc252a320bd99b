"""Acceptance 1 of issue 2: an in-process genetic search on digits (population 8, 3 generations,
the example manifest's space and trainer settings) reaches best val_accuracy >= 0.93 on the CPU.

Real parts only: the search space read from examples/digits.yaml, the real GeneticAlgorithm and
real torch training of every candidate. Prints the best accuracy, its architecture and the wall
time (run with -s to see them)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")

from morphml.evaluation import TrialFailure, dataset_shape, evaluate_architecture  # noqa: E402
from morphml.optimizers import GeneticAlgorithm  # noqa: E402
from morphml.space import SearchSpace  # noqa: E402

pytestmark = [pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits.yaml"


@pytest.mark.timeout(900)
def test_genetic_search_on_digits_reaches_93_percent(record_property):
    torch.set_num_threads(1)
    spec = yaml.safe_load(EXAMPLE.read_text())["spec"]
    evaluation = spec["evaluation"]
    opt = spec["optimizer"]
    input_shape, num_classes = dataset_shape(evaluation["dataset"])
    space = SearchSpace.from_spec(spec["searchSpace"]).bind(list(input_shape), num_classes)
    search = GeneticAlgorithm(
        space,
        population_size=8,
        num_generations=3,
        mutation_rate=opt["mutationRate"],
        crossover_rate=opt["crossoverRate"],
        elitism=opt["elitism"],
        tournament_size=opt["tournamentSize"],
        seed=opt["seed"],
    )

    trained: list[dict] = []
    failures: list[str] = []

    def evaluate(graph):
        try:
            metrics = evaluate_architecture(graph.to_json(), evaluation, device="cpu", seed=0)
        except TrialFailure as failure:
            failures.append(str(failure))
            raise
        trained.append({"summary": graph.summary(), **metrics})
        return metrics

    started = time.monotonic()
    best = search.optimize(evaluate)
    wall_seconds = time.monotonic() - started

    assert best is not None
    candidate, metrics = best
    report = {
        "best_val_accuracy": metrics["val_accuracy"],
        "best_architecture": candidate.graph.summary(),
        "best_params": metrics["params"],
        "trials_trained": len(trained),
        "failed_trials": len(failures),
        "wall_seconds": round(wall_seconds, 1),
    }
    print("digits genetic search:", json.dumps(report))
    for key, value in report.items():
        record_property(key, value)
    assert not failures, failures
    assert search.is_finished()
    assert len(trained) >= 8  # the first generation alone trains 8 distinct architectures
    assert metrics["val_accuracy"] >= 0.93, report
