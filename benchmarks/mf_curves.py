"""Train random architectures of bench_search.SPACE on digits-hard for E epochs: one JSON line per
architecture with every epoch's metrics (the pool mf_replay.py replays; docs/benchmarks.md (e)).

Run: nice -n 19 python benchmarks/mf_curves.py OUT.jsonl START STOP [EPOCHS] [--copies N] [--validation-copies M]
(indexes START..STOP-1; EPOCHS default 27; the copies are digits-hard's, default as is; each line
records its dataset. A file that exists is resumed: indexes already in it are skipped, and a
file of another dataset or epochs is refused)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")
from bench_multifidelity import dataset_of, evaluation
from bench_search import EVALUATION, space
from morphml.evaluation import evaluate_architecture

METRICS = ("val_accuracy", "val_loss", "train_loss", "seconds")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("start", type=int)
    parser.add_argument("stop", type=int)
    parser.add_argument("epochs", type=int, nargs="?", default=27)
    parser.add_argument("--copies", type=int)
    parser.add_argument("--validation-copies", type=int)
    args = parser.parse_args()
    out, epochs = args.out, args.epochs
    dataset = dataset_of(args.copies, args.validation_copies)
    sp = space()
    done = set()
    lines = out.read_text().splitlines() if out.exists() else []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a run killed while writing: dropped, that curve is trained again
                out.write_text("".join(f"{kept}\n" for kept in lines[:-1]))
                break
            raise SystemExit(f"{out}:{number}: not JSON") from None
        if record.get("dataset", EVALUATION["dataset"]) != dataset or len(record["curve"]) != epochs:
            raise SystemExit(f"{out}:{number}: a curve of {record.get('dataset')} x {len(record['curve'])} epochs, "
                             f"not {dataset} x {epochs}")
        done.add(record["index"])
    for i in range(args.start, args.stop):
        if i in done:
            continue
        arch = sp.sample(random.Random(10_000 + i)).to_json()
        curve: list[dict[str, float]] = []

        def progress(step: int, metrics: dict[str, Any], curve: list[dict[str, float]] = curve) -> bool:
            curve.append({k: float(metrics[k]) for k in METRICS if k in metrics})
            return False

        t0 = time.monotonic()
        evaluate_architecture(arch, evaluation(epochs, dataset), device="cpu", seed=i, progress=progress)
        with out.open("a") as f:
            f.write(json.dumps({"index": i, "arch": arch, "dataset": dataset, "curve": curve,
                                "wall": time.monotonic() - t0}) + "\n")
        print(i, round(max(c["val_accuracy"] for c in curve), 4), round(time.monotonic() - t0, 1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
