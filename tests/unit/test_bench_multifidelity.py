"""benchmarks/bench_multifidelity.py's figures: epochs read from journal curve points (seconds
per segment), best, epochs trained, worker-seconds and epochs until within 0.005 of the best."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_multifidelity

pytestmark = pytest.mark.unit


def point(task, attempt, step, acc, seconds):
    return {"task_id": task, "attempt": attempt, "step": step, "metrics": {"val_accuracy": acc, "seconds": seconds}}


def test_epochs_from_curves_count_each_epoch_once_with_seconds_per_segment():
    # t1 trains epoch 1 (pause), t2 epoch 1, then t1 is promoted: attempt 2 trains epochs 2-3,
    # its seconds counting again from the start of that segment
    points = [point("t1", 1, 1, 0.5, 2.0), point("t2", 1, 1, 0.4, 1.5), point("t1", 2, 2, 0.6, 1.0),
              point("t1", 2, 3, 0.7, 2.5)]
    epochs = bench_multifidelity.epochs_of(points)
    assert [v for v, _, _ in epochs] == [0.5, 0.4, 0.6, 0.7]
    assert [s for _, _, s in epochs] == [2.0, 1.5, 1.0, 1.5]


def test_figures_best_epochs_seconds_and_epochs_to_within_half_a_percent():
    epochs = [(0.5, 1, 1.0), (0.795, 1, 1.0), (0.7, 1, 2.0), (0.801, 1, 1.0)]
    best, count, seconds, reached = bench_multifidelity.figures(epochs, overall=0.8)
    assert (best, count, seconds, reached) == (0.801, 4, 5.0, 2)
    assert bench_multifidelity.figures(epochs[:1], overall=0.8)[3] is None  # never within 0.005
