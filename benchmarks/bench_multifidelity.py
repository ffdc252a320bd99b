"""Benchmark: multi-fidelity search on digits-hard, MorphML's schedulers against Optuna's pruners,
same space, same per-epoch trainer, same sampler family (TPE), several seeds.

Methods (each with `--epochs` E epochs per full trial, rungs at r, 3r, 9r, ... epochs: minResource
r = `--min-resource`, default 1, reductionFactor 3):
- morphml-full: `morphml run` (real master and `--workers` worker processes on loopback),
  spec.optimizer.algorithm `--optimizer` (default tpe; random or regularizedEvolution for ASHA's
  own setting), no early stopping, `--full-trials` trials of E epochs;
- morphml-asha / morphml-hyperband: the same with spec.earlyStopping asha / hyperband and
  spec.budget.maxEpochs = the full run's epochs / `--fraction` (default 3): trials pause at a rung
  and are promoted from their checkpoint;
- optuna-hyperband / optuna-sha: a plain Optuna study (TPESampler, HyperbandPruner or
  SuccessiveHalvingPruner with min_resource r, reduction_factor 3, max_resource E), its objective
  training the same architecture (define-by-run over the same choices through
  `program_from_trial`) with the same trainer, `trial.report` + `should_prune` after each epoch,
  in this process, stopped when it has trained the same epoch budget as ASHA.

Figures per method, medians over the seeds: best val_accuracy (the best validation of any epoch
reported), total epochs trained, worker-seconds (training and validation seconds the trainer
reported, summed over every segment of every trial: the same measure on both sides, without
process start-up), and epochs until the best so far is within 0.5 % (absolute, 0.005) of the
overall best (the best any method reached with that seed; '-' when never). Targets (issue 12):
ASHA reaches full fidelity's best within 0.5 % with at most 1/3 of its epochs, and at equal
epochs its best is at least Optuna+Hyperband's.

Run: nice -n 19 python benchmarks/bench_multifidelity.py [--seeds 3] [--first-seed 0] [--epochs 9] [--min-resource 1]
     [--full-trials 27] [--fraction 3] [--workers 2] [--optimizer tpe] [--copies N] [--validation-copies M]
     [--methods ...] [--retrain 3] [--keep DIR] [--json FILE]
     python benchmarks/bench_multifidelity.py --from-json FILE [FILE ...] (the table of saved runs, seeds merged;
     the settings they ran with are read from the files; files older than that need the same --epochs,
     --full-trials and --fraction on the command line)

Imports: the standard library, yaml, optuna, morphml (space, graph, evaluation, the journal's
read-only reader), bench_search (the space and the trainer settings, so both benchmarks search
the same space).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import EVALUATION, INPUT_SHAPE, NUM_CLASSES, REPO, SPACE, space, table
from morphml.distributed.journal import Journal
from morphml.graph import GraphError, build_graph_from_choices

METHODS = ("morphml-full", "morphml-asha", "morphml-hyperband", "optuna-hyperband", "optuna-sha")
MIN_RESOURCE, ETA = 1, 3  # the defaults of --min-resource and the reduction factor (fixed)
TPE_STARTUP = 10
WITHIN = 0.005
# What a --json file records of the run's settings, so that --from-json reports them.
SETTINGS = ("epochs", "min_resource", "full_trials", "fraction", "workers", "copies", "validation_copies", "optimizer")


def evaluation(epochs: int, dataset: dict[str, Any] | None = None) -> dict[str, Any]:
    """The trainer settings of bench_search with `epochs`, on `dataset` (default: digits-hard as is)."""
    return {**EVALUATION, "epochs": epochs, **({"dataset": dataset} if dataset else {})}


def dataset_of(copies: int | None, validation_copies: int | None) -> dict[str, Any]:
    """digits-hard with its copies options (`--copies`, `--validation-copies`) when given."""
    dataset = dict(EVALUATION["dataset"])
    if copies is not None:
        dataset["copies"] = copies
    if validation_copies is not None:
        dataset["validationCopies"] = validation_copies
    return dataset


# -- MorphML: `morphml run` ---------------------------------------------------------------------

def manifest(name: str, seed: int, epochs: int, max_trials: int, max_epochs: int | None,
             scheduler: str | None, min_resource: int = MIN_RESOURCE,
             dataset: dict[str, Any] | None = None, algorithm: str = "tpe") -> dict[str, Any]:
    spec: dict[str, Any] = {
        "searchSpace": {"layers": SPACE["layers"]},
        "optimizer": {"algorithm": algorithm, "populationSize": TPE_STARTUP, "seed": seed},
        "evaluation": evaluation(epochs, dataset),
        "objective": {"metric": "val_accuracy", "goal": "maximize"},
        "budget": {"maxTrials": max_trials, "maxFailedTrials": max_trials},
    }
    if max_epochs is not None:
        spec["budget"]["maxEpochs"] = max_epochs
    if scheduler is not None:
        spec["earlyStopping"] = {"type": scheduler, "minResource": min_resource, "reductionFactor": ETA}
    return {"apiVersion": "morphml.io/v1alpha1", "kind": "NASExperiment", "metadata": {"name": name}, "spec": spec}


Epochs = list[tuple[float, int, float]]  # (val_accuracy, 1, seconds of that epoch) per epoch, as reported


def run_morphml(method: str, seed: int, args: argparse.Namespace, work: Path) -> tuple[Epochs, str]:
    """Runs `morphml run`; returns the epochs trained in the order they were reported:
    (val_accuracy, 1, seconds of that epoch) each, read from the journal's curves, and the
    architecture (JSON) of the trial with the best val_accuracy of any epoch."""
    full_epochs = args.full_trials * args.epochs
    dataset = dataset_of(args.copies, args.validation_copies)
    if method == "morphml-full":
        doc = manifest(f"full-{seed}", seed, args.epochs, args.full_trials, None, None, dataset=dataset,
                       algorithm=args.optimizer)
    else:
        scheduler = method.split("-", 1)[1]
        # maxTrials high enough that the epoch budget is what ends the search
        doc = manifest(f"{scheduler}-{seed}", seed, args.epochs, full_epochs, full_epochs // args.fraction, scheduler,
                       args.min_resource, dataset, args.optimizer)
    out = work / f"{method}-{seed}"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "runtime"), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    with (out / "run.log").open("w") as log:
        done = subprocess.run([sys.executable, "-m", "morphml.cli", "run", str(path), "--workers", str(args.workers),
                               "--output", str(out / "run")], stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"{method} seed {seed}: morphml run exited {done.returncode}; see {out / 'run.log'}")
    journal = Journal.open_read_only(out / "run" / "journal.db")
    try:
        points = journal.curves()
        arch_of = {task.task_id: task.arch_json for task in journal.load_tasks()}
    finally:
        journal.close()
    points.sort(key=lambda p: (p["reported_at"], p["task_id"], p["step"]))
    best = max(points, key=lambda p: float(p["metrics"]["val_accuracy"]))  # the first of equals
    return epochs_of(points), arch_of[best["task_id"]]


def epochs_of(points: list[dict[str, Any]]) -> list[tuple[float, int, float]]:
    """(val_accuracy, 1, seconds) per epoch, from curve points whose `seconds` count from the
    start of their segment (so an epoch's seconds are the difference to the previous point of the
    same trial and attempt)."""
    previous: dict[tuple[str, int], float] = {}
    out = []
    for p in points:
        key = (p["task_id"], p.get("attempt", 0))
        seconds = float(p["metrics"].get("seconds", 0.0))
        out.append((float(p["metrics"]["val_accuracy"]), 1, max(seconds - previous.get(key, 0.0), 0.0)))
        previous[key] = seconds
    return out


# -- Optuna: a study with a pruner over the same trainer ----------------------------------------

def run_optuna(method: str, seed: int, args: argparse.Namespace) -> tuple[Epochs, str]:
    import optuna

    from morphml.evaluation import TrialFailure, evaluate_architecture
    from morphml.optimizers.optuna_samplers import program_from_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    budget = args.full_trials * args.epochs // args.fraction
    dataset = dataset_of(args.copies, args.validation_copies)
    pruner: Any
    if method == "optuna-hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=args.min_resource, max_resource=args.epochs,
                                                reduction_factor=ETA)
    else:
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=args.min_resource, reduction_factor=ETA)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner)
    sp = space()
    epochs: Epochs = []
    best: dict[str, Any] = {"value": -math.inf, "arch": ""}  # the trial with the best epoch so far
    lock = threading.Lock()

    def objective(trial: optuna.Trial) -> float:
        try:
            graph = build_graph_from_choices(program_from_trial(sp, trial), INPUT_SHAPE, NUM_CLASSES)
        except GraphError:
            raise optuna.TrialPruned from None  # no architecture: nothing trained
        arch = json.dumps(graph.to_json(), sort_keys=True)
        state = {"last": 0.0, "pruned": False, "value": math.nan}

        def progress(step: int, metrics: dict[str, Any]) -> bool:
            with lock:
                out_of_budget = len(epochs) >= budget
                if out_of_budget:
                    state["pruned"] = True
                    return True  # the epoch budget is spent: this epoch is not counted, the search ends
                epochs.append((float(metrics["val_accuracy"]), 1, float(metrics["seconds"]) - state["last"]))
                if float(metrics["val_accuracy"]) > best["value"]:
                    best.update(value=float(metrics["val_accuracy"]), arch=arch)
            state["last"] = float(metrics["seconds"])
            state["value"] = float(metrics["val_accuracy"])
            trial.report(state["value"], step)
            if trial.should_prune():
                state["pruned"] = True
                return True
            return False

        try:
            evaluate_architecture(graph.to_json(), evaluation(args.epochs, dataset), device="cpu", seed=0,
                                  progress=progress)
        except TrialFailure:
            raise optuna.TrialPruned from None  # a failed training: left out of the model
        if state["pruned"] or not math.isfinite(state["value"]):
            raise optuna.TrialPruned
        return state["value"]

    def stop(study: optuna.Study, _: Any) -> None:
        if len(epochs) >= budget:
            study.stop()

    study.optimize(objective, n_trials=budget * 20, n_jobs=args.workers, callbacks=[stop])
    return epochs, str(best["arch"])


# -- the chosen architecture, retrained ----------------------------------------------------------

RETRAIN_SEED = 1000  # fresh training seeds 1000, 1001, ...: none a search trained with


def retrain(arch: str, epochs: int, count: int, cache: dict[str, float],
            dataset: dict[str, Any] | None = None) -> list[float]:
    """The final val_accuracy of `arch` trained `count` times for the full `epochs` with fresh
    torch seeds: what the architecture a search hands back scores, without the luck of the one
    run that made it the best (`cache`: by architecture and seed, shared by methods and seeds)."""
    from morphml.evaluation import evaluate_architecture

    out = []
    for k in range(count):
        key = f"{json.dumps(json.loads(arch), sort_keys=True)}@{RETRAIN_SEED + k}"
        if key not in cache:
            metrics = evaluate_architecture(arch, evaluation(epochs, dataset), device="cpu", seed=RETRAIN_SEED + k)
            cache[key] = float(metrics["val_accuracy"])
        out.append(cache[key])
    return out


# -- figures ------------------------------------------------------------------------------------

def figures(epochs: list[tuple[float, int, float]], overall: float) -> tuple[float, int, float, int | None]:
    best, reached = -math.inf, None
    for count, (value, _, _) in enumerate(epochs, start=1):
        best = max(best, value)
        if reached is None and best >= overall - WITHIN:
            reached = count
    return best, len(epochs), sum(s for _, _, s in epochs), reached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds first-seed .. first-seed + seeds - 1 (more seeds in a second run)")
    parser.add_argument("--epochs", type=int, default=9, help="epochs of a full trial (rungs 1, 3, 9, ...)")
    parser.add_argument("--min-resource", type=int, default=MIN_RESOURCE,
                        help="epochs of the first rung, for ours and Optuna's pruners alike (rungs r, 3r, 9r, ...)")
    parser.add_argument("--full-trials", type=int, default=27, help="trials of the full-fidelity run")
    parser.add_argument("--fraction", type=int, default=3,
                        help="the multi-fidelity runs get the full run's epochs / this (the target's 1/3)")
    parser.add_argument("--workers", type=int, default=2, help="morphml workers; Optuna's n_jobs")
    parser.add_argument("--copies", type=int, help="digits-hard's copies: variants of each training image (2)")
    parser.add_argument("--validation-copies", type=int,
                        help="digits-hard's validationCopies: variants of each validation image (default: --copies)")
    parser.add_argument("--optimizer", choices=("tpe", "random", "regularizedEvolution"), default="tpe",
                        help="spec.optimizer.algorithm of the morphml runs (Optuna's studies are TPE whatever this is)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--timeout", type=float, default=7200, help="seconds one morphml run may take")
    parser.add_argument("--keep", type=Path, help="keep each run's manifest, log and output here")
    parser.add_argument("--json", type=Path, help="write every run's epochs here")
    parser.add_argument("--from-json", type=Path, nargs="+",
                        help="train nothing: the figures of runs written by --json (several: their seeds merged)")
    parser.add_argument("--retrain", type=int, default=3,
                        help="retrain each run's best architecture this many times, full epochs, fresh seeds")
    args = parser.parse_args(argv)
    if args.from_json:
        saved, again, settings = merged(args.from_json)
        for name, value in settings.items():  # the settings the runs had, not this call's defaults
            setattr(args, name, value)
        return report(saved, sorted({seed for method in saved.values() for seed in method}),
                      [m for m in args.methods if m in saved], args, again)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = args.keep or Path(tempfile.mkdtemp(prefix="morphml-bench-mf-"))
    runs: dict[str, dict[int, Epochs]] = {}
    chosen: dict[str, dict[int, str]] = {}
    retrained: dict[str, dict[int, list[float]]] = {}
    cache: dict[str, float] = {}
    started = time.monotonic()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for seed in seeds:  # seeds outermost: a run stopped early has every method on its first seeds
        for method in args.methods:
            t0 = time.monotonic()
            epochs, arch = run_optuna(method, seed, args) if method.startswith("optuna-") else \
                run_morphml(method, seed, args, work)
            runs.setdefault(method, {})[seed] = epochs
            chosen.setdefault(method, {})[seed] = arch
            line = (f"  {method} seed {seed}: {len(epochs)} epochs, best {max(v for v, _, _ in epochs):.4f}, "
                    f"{time.monotonic() - t0:.0f} s wall")
            if args.retrain:
                values = retrain(arch, args.epochs, args.retrain, cache,
                                 dataset_of(args.copies, args.validation_copies))
                retrained.setdefault(method, {})[seed] = values
                line += f"; its architecture retrained: {statistics.median(values):.4f} (median of {len(values)})"
            print(line, flush=True)
            if args.json:  # after every run: a run stopped early keeps what it did
                args.json.write_text(json.dumps({**runs, "_chosen": chosen, "_retrained": retrained,
                                                 "_settings": {k: getattr(args, k) for k in SETTINGS}}))
    print(f"all runs: {time.monotonic() - started:.0f} s wall; outputs in {work}")
    return report(runs, list(seeds), args.methods, args, retrained)


def targets(best: dict[str, dict[int, float]], measure: str = "best val_accuracy") -> None:
    """Issue 12's two targets, seed by seed and by the medians (where both methods of a target ran)."""
    print(f"by {measure}:")
    for a, b, margin, what in (("morphml-asha", "morphml-full", WITHIN, f"ASHA within {WITHIN:g} of full fidelity"),
                               ("morphml-asha", "optuna-hyperband", 0.0, "ASHA >= Optuna+Hyperband")):
        common = sorted(set(best.get(a, {})) & set(best.get(b, {})))
        if not common:
            continue
        met = [seed for seed in common if best[a][seed] >= best[b][seed] - margin]
        gap = statistics.median(best[a][seed] - best[b][seed] for seed in common)
        medians = statistics.median(best[a][s] for s in common) - statistics.median(best[b][s] for s in common)
        print(f"  target {what}: met in {len(met)} of {len(common)} seeds; median of the per-seed differences "
              f"{gap:+.4f}; difference of the medians {medians:+.4f}")


def merged(paths: list[Path]) -> tuple[dict[str, dict[int, Epochs]], dict[str, dict[int, list[float]]],
                                       dict[str, int]]:
    """The runs of several --json files, their retrained values, by method and seed (a later
    file's seed replaces an earlier one's; files written before --retrain have none), and the
    settings they ran with (SETTINGS; files written before those were saved have none, and then
    the command line's apply). Files run with different settings are refused, naming the field."""
    runs: dict[str, dict[int, Epochs]] = {}
    retrained: dict[str, dict[int, list[float]]] = {}
    settings: dict[str, int] = {}
    first: dict[str, Path] = {}
    for path in paths:
        saved = json.loads(path.read_text())
        saved_settings = saved.get("_settings")
        if saved_settings is not None:  # files from before the copies options ran digits-hard as is
            saved_settings = {"copies": None, "validation_copies": None, "optimizer": "tpe", **saved_settings}
        for name, value in (saved_settings or {}).items():
            if name in settings and settings[name] != value:
                raise SystemExit(f"{path}: ran with --{name.replace('_', '-')} {value}, "
                                 f"{first[name]} with {settings[name]}: their seeds cannot be merged")
            settings[name], first[name] = value, path
        for method, by_seed in saved.items():
            if method.startswith("_"):
                continue
            for seed, epochs in by_seed.items():
                runs.setdefault(method, {})[int(seed)] = [(float(v), int(n), float(s)) for v, n, s in epochs]
                retrained.get(method, {}).pop(int(seed), None)
        for method, by_seed in saved.get("_retrained", {}).items():
            for seed, values in by_seed.items():
                retrained.setdefault(method, {})[int(seed)] = [float(v) for v in values]
    return runs, retrained, settings


def report(runs: dict[str, dict[int, Epochs]], seeds: list[int], methods: list[str], args: argparse.Namespace,
           retrained: dict[str, dict[int, list[float]]] | None = None) -> int:
    """Prints the per-seed bests, the targets and the table of medians."""
    overall = {seed: max(v for method in runs.values() for v, _, _ in method.get(seed, []))
               for seed in seeds}
    best = {m: {seed: max(v for v, _, _ in runs[m][seed]) for seed in runs[m]} for m in methods}
    for seed in seeds:
        print(f"seed {seed} best: " + ", ".join(f"{m} {best[m][seed]:.4f}" for m in methods if seed in best[m]))
    targets(best)
    rows = []
    for method in methods:
        per_seed = [figures(runs[method][seed], overall[seed]) for seed in sorted(runs[method])]
        reached = [r for _, _, _, r in per_seed if r is not None]
        rows.append([
            method, len(per_seed),
            (f"{statistics.median(b for b, _, _, _ in per_seed):.4f} "
             f"({min(b for b, _, _, _ in per_seed):.4f}-{max(b for b, _, _, _ in per_seed):.4f})"),
            f"{statistics.median(n for _, n, _, _ in per_seed):g}",
            f"{statistics.median(s for _, _, s, _ in per_seed):.0f}",
            f"{statistics.median(reached):g} ({len(reached)} of {len(per_seed)} seeds)" if reached else "-",
        ])
    print(f"\n{json.dumps(dataset_of(getattr(args, 'copies', None), getattr(args, 'validation_copies', None)))}, "
          f"morphml's optimizer {getattr(args, 'optimizer', 'tpe')}, "
          f"E={args.epochs} epochs per full trial, rungs at {args.min_resource} x {ETA}^k; "
          f"full run {args.full_trials} trials = {args.full_trials * args.epochs} epochs; multi-fidelity budget "
          f"{args.full_trials * args.epochs // args.fraction} epochs; overall best by seed "
          + ", ".join(f"{s}: {v:.4f}" for s, v in overall.items()))
    print(table(["method", "seeds", "best val_accuracy (median, min-max)", "epochs trained", "worker-seconds",
                 f"epochs to within {WITHIN:g} of the overall best (median)"], rows))
    again = {m: {seed: statistics.median(v) for seed, v in retrained[m].items() if v}
             for m in methods if retrained and retrained.get(m)}
    if again:
        print("\nThe best architecture of each run, retrained with fresh seeds for the full epochs "
              "(median over its retrains, then over seeds):")
        for seed in seeds:
            print(f"seed {seed} retrained: " + ", ".join(f"{m} {again[m][seed]:.4f}" for m in methods
                                                        if seed in again.get(m, {})))
        targets(again, "the retrained accuracy of the chosen architecture")
        print(table(["method", "seeds", "retrained val_accuracy of the chosen architecture (median, min-max)"],
                    [[m, len(v), f"{statistics.median(v.values()):.4f} ({min(v.values()):.4f}-{max(v.values()):.4f})"]
                     for m, v in again.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
