"""User evaluators for the worker liveness tests (no torch), used through the real
`spec.evaluation.evaluator: "tests.liveness_evaluators:<name>"` feature.

- `busy_holding_the_gil`: one C call that holds the GIL for about MORPHML_TEST_GIL_SECONDS
  (default 18) while burning CPU, so the runner's beat thread cannot beat meanwhile: a busy
  runner that the worker must not take for a wedged one (its CPU time grows).
"""

from __future__ import annotations

import os
import time


def busy_holding_the_gil(arch_json: dict, evaluation_spec: dict, device: str | None) -> dict:
    target = float(os.environ.get("MORPHML_TEST_GIL_SECONDS", "18"))
    # The fastest of a few short runs: the long call then lasts at least `target` even if the
    # host gets less busy meanwhile (a slower host only makes it longer).
    calibration, per_item = 1_000_000, float("inf")
    for _ in range(5):
        started = time.perf_counter()
        sum(range(calibration))
        per_item = min(per_item, (time.perf_counter() - started) / calibration)
    started = time.monotonic()
    # The builtin sum over a range runs in C from start to end: no bytecode runs, so the
    # interpreter never hands the GIL to another thread until it returns.
    sum(range(int(target / per_item)))
    return {"val_accuracy": 0.5, "gil_held_seconds": time.monotonic() - started}
