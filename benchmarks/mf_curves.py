"""Train random architectures of bench_search.SPACE on digits-hard for E epochs: one JSON line per
architecture with every epoch's metrics (the pool mf_replay.py replays; docs/benchmarks.md (e)).

Run: nice -n 19 python benchmarks/mf_curves.py OUT.jsonl START STOP [EPOCHS]   # indexes START..STOP-1
(a file that exists is resumed: indexes already in it are skipped)
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")
from bench_multifidelity import evaluation
from bench_search import space
from morphml.evaluation import evaluate_architecture

METRICS = ("val_accuracy", "val_loss", "train_loss", "seconds")


def main() -> int:
    out, start, stop = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    epochs = int(sys.argv[4]) if len(sys.argv) > 4 else 27
    sp = space()
    done = {json.loads(line)["index"] for line in out.read_text().splitlines()} if out.exists() else set()
    for i in range(start, stop):
        if i in done:
            continue
        arch = sp.sample(random.Random(10_000 + i)).to_json()
        curve: list[dict[str, float]] = []

        def progress(step: int, metrics: dict[str, Any], curve: list[dict[str, float]] = curve) -> bool:
            curve.append({k: float(metrics[k]) for k in METRICS if k in metrics})
            return False

        t0 = time.monotonic()
        evaluate_architecture(arch, evaluation(epochs), device="cpu", seed=i, progress=progress)
        with out.open("a") as f:
            f.write(json.dumps({"index": i, "arch": arch, "curve": curve, "wall": time.monotonic() - t0}) + "\n")
        print(i, round(max(c["val_accuracy"] for c in curve), 4), round(time.monotonic() - t0, 1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
