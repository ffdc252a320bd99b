"""benchmarks/bench_search.py's code paths with a cheap score instead of the trainer: every
method (ours and plain Optuna's loop) runs its budget of trials over the benchmark's space, and
the figures (best after k trials, hypervolume of a front) are computed as documented."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_search

pytestmark = pytest.mark.unit


def landscape(graph):
    """A deterministic score of the architecture alone (more parameters score higher, up to a point)."""
    params = graph.param_count()
    return {"val_accuracy": 1.0 - abs(math.log10(params) - 4.3) / 3, "params": params}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", bench_search.SINGLE_METHODS + bench_search.MULTI_METHODS)
def test_every_method_runs_its_budget_of_trials_on_the_benchmark_space(method):
    run = bench_search.run_optuna if method.startswith("optuna-") else bench_search.run_ours
    trials = run(method, 0, 12, landscape)
    assert len(trials) == 12
    assert all(0.0 <= t["val_accuracy"] <= 1.0 and t["params"] > 0 for t in trials)
    again = run(method, 0, 12, landscape)
    assert [t["params"] for t in again] == [t["params"] for t in trials]  # seeded: the same search again


def test_best_after_k_counts_the_first_k_trials_and_skips_failed_ones():
    trials = [{"val_accuracy": 0.5}, {"status": "failed", "val_accuracy": 0.99}, {"val_accuracy": 0.7},
              {"val_accuracy": 0.6}]
    assert bench_search.best_after(trials, 2) == 0.5
    assert bench_search.best_after(trials, 4) == 0.7
    assert math.isnan(bench_search.best_after([{"status": "failed"}], 1))


def test_hypervolume_is_the_area_the_front_dominates_up_to_the_reference():
    # error 0.2 at 10^3 params and error 0.1 at 10^4: in (error, log10 params) up to (1, 6) that is
    # (1 - 0.2) * (6 - 3) + (1 - 0.1) * (6 - 4) - overlap (1 - 0.2) * (6 - 4) = 2.4 + 1.8 - 1.6
    front = [{"val_accuracy": 0.8, "params": 1000}, {"val_accuracy": 0.9, "params": 10000}]
    dominated = [{"val_accuracy": 0.7, "params": 5000}]
    assert bench_search.hypervolume(front, 2) == pytest.approx(2.6)
    assert bench_search.hypervolume(front + dominated, 3) == pytest.approx(2.6)
    assert bench_search.hypervolume(front[:1], 1) == pytest.approx(0.8 * 3)
    beyond = [{"val_accuracy": 0.95, "params": 2_000_000}]  # over the reference's million parameters
    assert bench_search.hypervolume(beyond, 1) == 0.0


def test_per_seed_lists_each_seed_of_each_method_in_seed_order_and_skips_methods_not_run():
    results = {"tpe": {1: [{"val_accuracy": 0.6}, {"val_accuracy": 0.8}], 0: [{"val_accuracy": 0.7}]}}
    text = bench_search.per_seed(results, bench_search.SINGLE_METHODS, [1, 2], bench_search.best_after)
    assert text.splitlines() == ["  tpe after 1 (seeds 0, 1): 0.7000 / 0.6000",
                                 "  tpe after 2 (seeds 0, 1): 0.7000 / 0.8000"]


def test_the_trainer_cache_uses_only_lines_of_its_own_context(tmp_path):
    """A cache written with other trainer settings or library versions (or before contexts were
    recorded) must not hand its values to this run."""
    cache = tmp_path / "cache.jsonl"
    lines = [{"arch_hash": "a", "context": "mine", "metrics": {"val_accuracy": 0.5}},
             {"arch_hash": "b", "context": "older-torch", "metrics": {"val_accuracy": 0.9}},
             {"arch_hash": "c", "metrics": {"val_accuracy": 0.7}}]
    cache.write_text("".join(json.dumps(line) + "\n" for line in lines))
    trainer = bench_search.Trainer(cache, context="mine")
    trainer._reload()
    assert trainer.known == {"a": {"val_accuracy": 0.5}}


def test_the_trainer_context_changes_with_the_dataset(monkeypatch):
    here = bench_search.trainer_context()
    assert here == bench_search.trainer_context()
    monkeypatch.setitem(bench_search.EVALUATION, "dataset", {"name": "digits-hard", "validationCopies": 3})
    assert bench_search.trainer_context() != here
