"""Quick user evaluators for the process tests and benchmarks (no torch).

Used through the real `spec.evaluation.evaluator: "tests.evaluators:<name>"` feature, so the
workers that run them never import torch. Behaviour is steered by fields of spec.evaluation
that the evaluators read from the `evaluation_spec` dict they are given... but the CRD schema
refuses unknown fields, so instead they read environment variables set on the worker processes:

- MORPHML_TEST_SLEEP: seconds `sleepy` sleeps (default 0.5)
- MORPHML_TEST_FAIL_DIR: directory where `fail_once_per_trial` marks trials it failed
- MORPHML_TEST_POISON_DIR: directory where `kills_its_worker` marks the architecture that kills
  every worker it runs on

Each returns a deterministic fake accuracy derived from the architecture, so runs are
reproducible.
"""

from __future__ import annotations

import hashlib
import json
import os
import time


def _fake_accuracy(arch_json: dict) -> float:
    digest = hashlib.sha256(json.dumps(arch_json, sort_keys=True).encode()).digest()
    return 0.5 + (digest[0] / 255.0) * 0.49


def instant(arch_json: dict, evaluation_spec: dict, device: str | None) -> dict:
    """Returns at once: measures pure coordination overhead."""
    return {"val_accuracy": _fake_accuracy(arch_json), "device": device or "cpu"}


def noop(arch_json: dict, evaluation_spec: dict, device: str | None) -> dict:
    """The no-op trial of the overhead benchmark (the same function Dask runs)."""
    return {"val_accuracy": 0.5}


def sleepy(arch_json: dict, evaluation_spec: dict, device: str | None) -> dict:
    """Sleeps MORPHML_TEST_SLEEP seconds (default 0.5), then returns."""
    time.sleep(float(os.environ.get("MORPHML_TEST_SLEEP", "0.5")))
    return {"val_accuracy": _fake_accuracy(arch_json),
            "train_seconds": float(os.environ.get("MORPHML_TEST_SLEEP", "0.5"))}


def always_raises(arch_json: dict, evaluation_spec: dict, device: str | None) -> dict:
    """Every trial fails with a recognisable message."""
    raise RuntimeError("synthetic evaluator failure: loss exploded at step 3")


def raises_after_sleep(arch_json: dict, evaluation_spec: dict, device: str | None) -> dict:
    """Sleeps MORPHML_TEST_SLEEP seconds, then fails (gives every worker time to register)."""
    time.sleep(float(os.environ.get("MORPHML_TEST_SLEEP", "0.5")))
    always_raises(arch_json, evaluation_spec, device)


def returns_nan(arch_json: dict, evaluation_spec: dict, device: str | None) -> dict:
    return {"val_accuracy": float("nan")}


def hangs(arch_json: dict, evaluation_spec: dict, device: str | None) -> dict:
    """Never returns (until the trial timeout kills it)."""
    while True:
        time.sleep(1)


def fail_once_per_trial(arch_json: dict, evaluation_spec: dict, device: str | None) -> dict:
    """Fails the first attempt of every architecture, succeeds on the retry."""
    marker_dir = os.environ["MORPHML_TEST_FAIL_DIR"]
    key = hashlib.sha256(json.dumps(arch_json, sort_keys=True).encode()).hexdigest()[:16]
    marker = os.path.join(marker_dir, key)
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError(f"first attempt of {key} fails on purpose")
    return instant(arch_json, evaluation_spec, device)


def kills_its_worker(arch_json: dict, evaluation_spec: dict, device: str | None) -> dict:
    """The first architecture this sees (marked in MORPHML_TEST_POISON_DIR) SIGKILLs the worker
    process that runs it, every time (as an OOM kill of the whole container would); every other
    architecture returns at once."""
    import signal

    key = hashlib.sha256(json.dumps(arch_json, sort_keys=True).encode()).hexdigest()[:16]
    marker = os.path.join(os.environ["MORPHML_TEST_POISON_DIR"], "poison")
    try:
        with open(marker, "x") as fh:  # the first trial anywhere claims the mark
            fh.write(key)
    except FileExistsError:
        pass
    with open(marker) as fh:
        if fh.read() == key:
            os.kill(os.getppid(), signal.SIGKILL)  # the trial runner's parent: the worker
            time.sleep(30)  # the worker is gone; its runner goes with it
    return instant(arch_json, evaluation_spec, device)
