"""Replay trained curves (mf_curves.py) through schedulers.Asha with the coordinator's epoch-budget
rules (leases count against the budget when taken; promotions first, the end game included),
against independent random full-fidelity runs: the chance that ASHA lands within WITHIN (0.005) of the
full run, per rung setting and rung metric (docs/benchmarks.md (e)).

Run: python benchmarks/mf_replay.py POOL.jsonl [...] [--repeats 1000] [--below N] [--configs KIND,MIN,ETA,METRIC ...]
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_multifidelity import WITHIN
from bench_search import EVALUATION
from morphml.distributed.schedulers import Asha, EarlyStoppingSettings

Curve = list[dict[str, float]]
RUNG: dict[str, Callable[[Curve, int], float]] = {
    "acc": lambda c, e: c[e - 1]["val_accuracy"],
    "negloss": lambda c, e: -c[e - 1]["val_loss"],
    "bestacc": lambda c, e: max(x["val_accuracy"] for x in c[:e]),
}


def load(paths: list[Path], below: int | None = None) -> tuple[list[Curve], int]:
    """The curves and their epochs (a full trial's); curves of another length or another dataset
    (mf_curves.py's --copies, --validation-copies) are refused, naming the file and line; with
    `below`, only the architectures of index < below (pools trained with other settings pair by index)."""
    pool: list[Curve] = []
    dataset: object = None
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            record = json.loads(line)
            if below is not None and record["index"] >= below:
                continue
            curve, this = record["curve"], record.get("dataset", EVALUATION["dataset"])
            if pool and len(curve) != len(pool[0]):
                raise SystemExit(f"{path}:{number}: a curve of {len(curve)} epochs in a pool of {len(pool[0])}")
            if pool and this != dataset:
                raise SystemExit(f"{path}:{number}: a curve on {this} in a pool on {dataset}")
            pool.append(curve)
            dataset = this
    if not pool:
        raise SystemExit(f"no curves in {', '.join(map(str, paths))}")
    return pool, len(pool[0])


def asha_run(pool: list[Curve], full: int, rng: random.Random, budget: int, workers: int, kind: str,
             min_resource: int, eta: int, metric: str) -> tuple[float, int]:
    """One ASHA run over curves drawn at random (one epoch = one time unit): (best, epochs)."""
    settings = EarlyStoppingSettings.from_spec({"type": kind, "minResource": min_resource, "reductionFactor": eta},
                                               full)
    asha = Asha(settings, "maximize", full)
    order = rng.sample(range(len(pool)), len(pool))
    rank = RUNG[metric]
    state = {"leased": 0, "new": 0, "seq": 0, "now": 0}
    running: list[tuple[int, int, str, int, int]] = []  # (finish, seq, trial, from, to)
    curve_of: dict[str, Curve] = {}
    paused: set[str] = set()
    reported: list[float] = []

    def lease(trial: str, start: int, stop: int) -> None:
        state["leased"] += stop - start
        state["seq"] += 1
        heapq.heappush(running, (state["now"] + stop - start, state["seq"], trial, start, stop))

    def start_one() -> bool:
        left = budget - state["leased"]
        for p in asha.promotions(left):
            if p.trial_id in paused and p.to_epoch - p.from_epoch <= left:
                asha.promote(p)
                paused.discard(p.trial_id)
                lease(p.trial_id, p.from_epoch, p.to_epoch)
                return True
        if asha.next_first_epochs() <= left and state["new"] < len(order):
            trial = f"t{state['new']}"
            curve_of[trial] = pool[order[state["new"]]]
            state["new"] += 1
            lease(trial, 0, asha.assign(trial))
            return True
        return False

    for _ in range(workers):
        start_one()
    while running:
        state["now"], _, trial, start, stop = heapq.heappop(running)
        curve = curve_of[trial]
        reported += [x["val_accuracy"] for x in curve[start:stop]]
        if not asha.record(trial, stop, rank(curve, stop)):
            paused.add(trial)
        while len(running) < workers and start_one():
            pass
    return max(reported), len(reported)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--repeats", type=int, default=1000)
    parser.add_argument("--below", type=int, help="only architectures of index < this (to pair pools)")
    parser.add_argument("--full-trials", type=int, default=18)
    parser.add_argument("--fraction", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=[
        "asha,1,3,acc", "asha,1,3,negloss", "asha,1,3,bestacc", "asha,3,3,acc", "asha,3,3,negloss",
        "asha,1,2,acc", "hyperband,1,3,acc"])
    args = parser.parse_args()
    pool, full = load(args.paths, args.below)
    best = [max(x["val_accuracy"] for x in c) for c in pool]
    print(f"{len(pool)} curves of {full} epochs")
    for e in (e for e in (1, 2, 3, 9) if e <= full):
        by_acc = spearmanr([c[e - 1]["val_accuracy"] for c in pool], best).statistic
        by_loss = spearmanr([-c[e - 1]["val_loss"] for c in pool], best).statistic
        print(f"Spearman with the best of {full}: after epoch {e}: val_accuracy {by_acc:.3f}, -val_loss {by_loss:.3f}")
    budget = args.full_trials * full // args.fraction
    rng = random.Random(0)
    fulls = [max(best[i] for i in rng.sample(range(len(pool)), args.full_trials)) for _ in range(args.repeats)]
    print(f"full run ({args.full_trials} trials): mean best {statistics.mean(fulls):.4f}; "
          f"multi-fidelity budget {budget}")
    for config in args.configs:
        kind, min_resource, eta, metric = config.split(",")
        rng = random.Random(1)
        runs = [asha_run(pool, full, rng, budget, args.workers, kind, int(min_resource), int(eta), metric)
                for _ in range(args.repeats)]
        hit = sum(b >= f - WITHIN for (b, _), f in zip(runs, fulls, strict=True)) / args.repeats
        print(f"{config:20s} P(within {WITHIN:g} of the full run) {hit:.3f}; mean best "
              f"{statistics.mean(b for b, _ in runs):.4f}; epochs {statistics.median(n for _, n in runs):g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
