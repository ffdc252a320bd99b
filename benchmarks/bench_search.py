"""Benchmark: search methods on one task where they separate (digits-hard), same space, same
trainer, same budget of trained trials, several seeds.

One objective (val_accuracy): random search, regularized evolution, the generational GA, TPE
through our optimizer (`TPESearch`, spec.optimizer.algorithm tpe) and, as a peer, plain Optuna
TPE (`optuna.create_study(sampler=TPESampler(seed=...))` + `study.optimize`, define-by-run over
the same choices through `program_from_trial`, Optuna's defaults otherwise). Figures: the best
val_accuracy after each checkpoint (16/32/64 trained trials), median and min-max over the seeds.

Two objectives (val_accuracy max, params min): our NSGA-II (`NSGA2Search`), our
multi-objective regularized evolution and plain Optuna's NSGAIISampler (same population size as
ours); figure: the hypervolume of each front at each checkpoint (error = 1 - val_accuracy and
log10(params), reference point (1, 6): error 1 and a million parameters).

How trials run: in this process's pool of `--jobs` worker processes, one (method, seed) search
per task, each trial a direct call of the built-in trainer (`evaluate_architecture` with
EVALUATION below, seed 0, CPU, no master: the coordinator adds no search decisions, and the
issue's figures are about the search). The trainer is deterministic for a given architecture,
so results are memoised by architecture hash in `--cache` (JSON lines; the same architecture
proposed by two methods or seeds is trained once, the way tabular NAS benchmarks work; a line
counts only in the trainer context it was written in: `trainer_context`, the settings, the
dataset's arrays, torch's and numpy's versions); a trial
that comes from the cache still counts as a trial of the method that proposed it. Trained
trials are what the budget counts: a draw that is no valid architecture is not trained and not
counted (ours redraws it itself; the plain Optuna objective raises TrialPruned), an
architecture plain Optuna proposes twice is counted twice (that is its loop: it would train it
again), one that our optimizers know already is not proposed again. The GA's elites are carried
over without training and are not counted.

Run: nice -n 19 python benchmarks/bench_search.py [--seeds 5] [--trials 16 32 64] [--jobs 2]
     [--part single multi] [--cache /tmp/morphml-bench-search.jsonl]

Imports: the standard library, optuna, morphml (space, graph, optimizers, pareto, evaluation);
torch only in the worker processes, through the trainer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "runtime") not in sys.path:
    sys.path.insert(0, str(REPO / "runtime"))

from morphml.graph import ArchitectureGraph, GraphError, build_graph_from_choices  # noqa: E402
from morphml.pareto import pareto_front  # noqa: E402
from morphml.space import SearchSpace  # noqa: E402

# Larger than examples/digits.yaml (~9 million architectures for 16x16 inputs against ~200); the
# first pool keeps every later convolution at 8x8 or less, so a trial stays cheap on a CPU.
SPACE: dict[str, Any] = {
    "name": "digits-hard-bench",
    "layers": [
        {"type": "conv2d", "filters": [4, 8, 16], "kernelSize": [3, 5], "activation": ["relu", "gelu", "tanh"]},
        {"type": "batchnorm", "optional": True},
        {"type": "maxpool", "poolSize": [2]},
        {"block": {"repeat": {"min": 0, "max": 2}, "skip": ["none", "add"], "layers": [
            {"type": "conv2d", "filters": [8, 16, 32], "kernelSize": [3, 5], "activation": ["relu", "gelu", "tanh"]},
            {"type": "batchnorm", "optional": True},
        ]}},
        {"type": "maxpool", "poolSize": [2], "optional": True},
        {"type": "flatten"},
        {"type": "dense", "units": [16, 32, 64, 128], "activation": ["relu", "tanh"]},
        {"type": "dropout", "rate": [0.0, 0.25, 0.5]},
    ],
}
EVALUATION: dict[str, Any] = {
    "dataset": {"name": "digits-hard"},
    "epochs": 4,
    "batchSize": 128,
    "learningRate": 0.005,
    "optimizer": "adam",
    "timeoutSeconds": 3600,
}
INPUT_SHAPE, NUM_CLASSES = (1, 16, 16), 10
OBJECTIVES = [("val_accuracy", "maximize"), ("params", "minimize")]
HV_REFERENCE = (1.0, 6.0)  # (error, log10 params): error 1, a million parameters

# Search settings, the same whatever the budget: startup / population sizes fit 64 trials.
TPE_STARTUP = 10  # plain Optuna TPE's default n_startup_trials; ours gets the same
EVOLUTION_POPULATION, EVOLUTION_SAMPLE = 16, 4
GA_POPULATION, GA_ELITISM = 8, 1
NSGA2_POPULATION = 8

SINGLE_METHODS = ("random", "evolution", "genetic", "tpe", "optuna-tpe")
MULTI_METHODS = ("nsga2", "mo-evolution", "optuna-nsga2")


def space() -> SearchSpace:
    return SearchSpace.from_spec(SPACE).bind(INPUT_SHAPE, NUM_CLASSES)


# -- the trainer, memoised ---------------------------------------------------------------------

def trainer_context() -> str:
    """What a cached result depends on besides the architecture: the trainer settings and the
    versions of the libraries that train it (a cache line of another context is not used)."""
    from importlib.metadata import version

    from morphml.evaluation.datasets import load_dataset

    data = load_dataset(EVALUATION["dataset"])
    digest = hashlib.sha256()
    for array in (data.x_train, data.y_train, data.x_val, data.y_val):
        digest.update(array.tobytes())
    text = json.dumps({"evaluation": EVALUATION, "data": digest.hexdigest(), "torch": version("torch"),
                       "numpy": version("numpy")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Trainer:
    """evaluate_architecture on EVALUATION, memoised by architecture hash in a JSON-lines file
    shared by the pool's processes (each line one architecture's metrics and the trainer context
    they were trained in; re-read before a miss is trained, so a result another process just
    wrote is used; lines of another context, or written before contexts were, are not)."""

    def __init__(self, cache: Path, context: str | None = None) -> None:
        self.cache = cache
        self.context = context if context is not None else trainer_context()
        self.known: dict[str, dict[str, Any]] = {}
        self._offset = 0
        self.trained = 0  # architectures this process trained (not from the cache)

    def _reload(self) -> None:
        if not self.cache.exists():
            return
        with self.cache.open() as f:
            f.seek(self._offset)
            for line in f:
                if not line.endswith("\n"):
                    break  # a line being written by another process: read it next time
                self._offset += len(line.encode())
                row = json.loads(line)
                if row.get("context") != self.context:
                    continue  # trained with other settings or library versions
                self.known[row["arch_hash"]] = row["metrics"]

    def __call__(self, graph: ArchitectureGraph) -> dict[str, Any]:
        key = graph.arch_hash
        if key not in self.known:
            self._reload()
        if key not in self.known:
            from morphml.evaluation import TrialFailure, evaluate_architecture

            try:
                metrics = evaluate_architecture(graph.to_json(), EVALUATION, device="cpu", seed=0)
            except TrialFailure as exc:
                metrics = {"status": "failed", "error": str(exc), "params": graph.param_count(),
                           "train_seconds": 0.0}
            metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
            self.trained += 1
            with self.cache.open("a") as f:  # one write per line: O_APPEND keeps lines whole
                f.write(json.dumps({"arch_hash": key, "context": self.context, "metrics": metrics}) + "\n")
            self.known[key] = metrics
        return dict(self.known[key])


Scorer = Callable[[ArchitectureGraph], dict[str, Any]]  # a Trainer, or a cheap score in the unit test


def accuracy(metrics: dict[str, Any]) -> float | None:
    value = metrics.get("val_accuracy")
    if metrics.get("status") == "failed" or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# -- one search --------------------------------------------------------------------------------

def run_ours(method: str, seed: int, budget: int, trainer: Scorer) -> list[dict[str, Any]]:
    """Our optimizer's ask/tell loop, one trial at a time: the metrics of each trained trial."""
    from morphml.optimizers import (
        GeneticAlgorithm,
        MultiObjectiveEvolution,
        NSGA2Search,
        RandomSearch,
        RegularizedEvolution,
        TPESearch,
    )

    sp = space()
    optimizer: Any
    if method == "random":
        optimizer = RandomSearch(sp, seed=seed, max_trials=budget)
    elif method == "evolution":
        optimizer = RegularizedEvolution(sp, population_size=EVOLUTION_POPULATION, sample_size=EVOLUTION_SAMPLE,
                                         max_trials=budget, seed=seed)
    elif method == "genetic":
        generations = 1 + math.ceil(max(budget - GA_POPULATION, 0) / (GA_POPULATION - GA_ELITISM))
        optimizer = GeneticAlgorithm(sp, population_size=GA_POPULATION, num_generations=generations,
                                     elitism=GA_ELITISM, seed=seed)
    elif method == "tpe":
        optimizer = TPESearch(sp, population_size=TPE_STARTUP, max_trials=budget, seed=seed)
    elif method == "nsga2":
        optimizer = NSGA2Search(sp, population_size=NSGA2_POPULATION, max_trials=budget, seed=seed,
                                objectives=OBJECTIVES)
    elif method == "mo-evolution":
        optimizer = MultiObjectiveEvolution(sp, population_size=EVOLUTION_POPULATION, sample_size=EVOLUTION_SAMPLE,
                                            max_trials=budget, seed=seed, objectives=OBJECTIVES)
    else:
        raise ValueError(f"unknown method {method!r}")
    trials: list[dict[str, Any]] = []
    while len(trials) < budget and not optimizer.is_finished():
        batch = optimizer.ask(1)
        if not batch:
            break
        metrics = trainer(batch[0].graph)
        optimizer.tell(batch[0].id, metrics)
        trials.append(metrics)
    return trials


def run_optuna(method: str, seed: int, budget: int, trainer: Scorer) -> list[dict[str, Any]]:
    """Plain Optuna's loop (`study.optimize`) over the same choices, stopped after `budget`
    trained trials; an invalid draw is pruned (not trained, not counted)."""
    import optuna

    from morphml.optimizers.optuna_samplers import program_from_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sp = space()
    trials: list[dict[str, Any]] = []
    multi = method == "optuna-nsga2"

    def objective(trial: optuna.Trial) -> Any:
        try:
            graph = build_graph_from_choices(program_from_trial(sp, trial), INPUT_SHAPE, NUM_CLASSES)
        except GraphError:
            raise optuna.TrialPruned from None
        metrics = trainer(graph)
        trials.append(metrics)
        acc = accuracy(metrics)
        if acc is None:
            raise optuna.TrialPruned  # a failed training: Optuna leaves it out, as FAIL would
        return (acc, float(metrics["params"])) if multi else acc

    def stop(study: optuna.Study, _: Any) -> None:
        if len(trials) >= budget:
            study.stop()

    sampler: Any
    if multi:
        sampler = optuna.samplers.NSGAIISampler(population_size=NSGA2_POPULATION, seed=seed)
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed)
        study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(objective, n_trials=budget * 20, callbacks=[stop])
    return trials[:budget]


def one_search(task: tuple[str, int, int, str]) -> tuple[str, int, list[dict[str, Any]], float, int]:
    method, seed, budget, cache = task
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process: the pool is the parallelism
    trainer = Trainer(Path(cache))
    started = time.monotonic()
    run = run_optuna if method.startswith("optuna-") else run_ours
    trials = run(method, seed, budget, trainer)
    return method, seed, trials, time.monotonic() - started, trainer.trained


# -- figures -----------------------------------------------------------------------------------

def best_after(trials: list[dict[str, Any]], k: int) -> float:
    values = [a for a in (accuracy(m) for m in trials[:k]) if a is not None]
    return max(values) if values else float("nan")


def hypervolume(trials: list[dict[str, Any]], k: int, reference: tuple[float, float] = HV_REFERENCE) -> float:
    """Area dominated by the front of the first k trials in (error, log10 params), both
    minimised, up to the reference point; points beyond it add nothing."""
    points = []
    for m in trials[:k]:
        acc = accuracy(m)
        if acc is None or not m.get("params"):
            continue
        error, size = 1.0 - acc, math.log10(float(m["params"]))
        if error < reference[0] and size < reference[1]:
            points.append((-error, -size))  # larger is better for morphml.pareto
    front = sorted({(-points[i][0], -points[i][1]) for i in pareto_front(points)})  # error ascending
    area, previous_size = 0.0, reference[1]
    for error, size in front:  # error ascending, so size descending along a front
        area += (reference[0] - error) * (previous_size - size)
        previous_size = size
    return area


def spread(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "nan"
    return f"{statistics.median(finite):.4f} ({min(finite):.4f}-{max(finite):.4f})"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def report(results: dict[str, dict[int, list[dict[str, Any]]]], methods: tuple[str, ...], checkpoints: list[int],
           figure: Callable[[list[dict[str, Any]], int], float], label: str) -> str:
    rows = []
    for method in methods:
        if method not in results:
            continue
        runs = results[method]
        row: list[Any] = [method, len(runs)]
        for k in checkpoints:
            row.append(spread([figure(trials, k) for trials in runs.values()]))
        rows.append(row)
    headers = ["method", "seeds"] + [f"{label} after {k} (median, min-max)" for k in checkpoints]
    return table(headers, rows)


def per_seed(results: dict[str, dict[int, list[dict[str, Any]]]], methods: tuple[str, ...], checkpoints: list[int],
             figure: Callable[[list[dict[str, Any]], int], float]) -> str:
    """One line per method and checkpoint: the figure of each seed, seeds in order."""
    lines = []
    for method in methods:
        runs = results.get(method, {})
        for k in checkpoints:
            values = " / ".join(f"{figure(runs[seed], k):.4f}" for seed in sorted(runs))
            lines.append(f"  {method} after {k} (seeds {', '.join(map(str, sorted(runs)))}): {values}")
    return "\n".join(line for line in lines if not line.endswith("(seeds ): "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, nargs="+", default=[16, 32, 64],
                        help="checkpoints; the largest is the budget")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one search each at a time)")
    parser.add_argument("--part", nargs="+", choices=["single", "multi"], default=["single", "multi"])
    parser.add_argument("--methods", nargs="+", choices=SINGLE_METHODS + MULTI_METHODS,
                        help="only these methods (default: all of each part)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/morphml-bench-search.jsonl"))
    parser.add_argument("--json", type=Path, help="write every trial's metrics here")
    args = parser.parse_args(argv)
    checkpoints = sorted(set(args.trials))
    budget = checkpoints[-1]
    methods = [m for part in args.part for m in (SINGLE_METHODS if part == "single" else MULTI_METHODS)]
    if args.methods:
        methods = [m for m in methods if m in args.methods]
    # Seeds outermost, so a run stopped early still has every method on its first seeds.
    tasks = [(m, seed, budget, str(args.cache)) for seed in range(args.seeds) for m in methods]
    results: dict[str, dict[int, list[dict[str, Any]]]] = {}
    started = time.monotonic()
    context = multiprocessing.get_context("spawn")  # no torch or Optuna state shared with the parent
    with context.Pool(args.jobs) as pool:
        for method, seed, trials, seconds, trained in pool.imap_unordered(one_search, tasks):
            results.setdefault(method, {})[seed] = trials
            print(f"  {method} seed {seed}: {len(trials)} trials ({trained} trained, rest cached) in {seconds:.0f} s, "
                  f"best {best_after(trials, budget):.4f}", flush=True)
    print(f"all searches: {time.monotonic() - started:.0f} s wall, jobs {args.jobs}")
    if args.json:
        args.json.write_text(json.dumps({m: {str(s): t for s, t in r.items()} for m, r in results.items()}))
    if "single" in args.part:
        print("\nbest val_accuracy (one objective)")
        print(report(results, SINGLE_METHODS, checkpoints, best_after, "best val_accuracy"))
        print(per_seed(results, SINGLE_METHODS, checkpoints, best_after))
    if "multi" in args.part:
        print(f"\nhypervolume (val_accuracy max, params min; error and log10 params up to {HV_REFERENCE})")
        print(report(results, MULTI_METHODS, checkpoints, hypervolume, "hypervolume"))
        print(per_seed(results, MULTI_METHODS, checkpoints, hypervolume))
    return 0


if __name__ == "__main__":
    sys.exit(main())
