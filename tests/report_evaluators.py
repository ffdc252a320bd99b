"""User evaluators that call report() (the early-stopping process tests; no torch).

Each trial's learning curve is `quality * step / STEPS` for steps 1..STEPS, where `quality` is a
deterministic number from the architecture, so which trials a median rule stops follows from
the search space and the seed. A trial told "stop" returns the value it has at that step.
"""

from __future__ import annotations

import hashlib
import json
import time

STEPS = 6


def _quality(arch_json: dict) -> float:
    digest = hashlib.sha256(json.dumps(arch_json, sort_keys=True).encode()).digest()
    return 0.5 + (digest[0] / 255.0) * 0.49


def curve(arch_json: dict, evaluation_spec: dict, device: str | None, report) -> dict:
    """Reports STEPS steps (a short sleep each, like an epoch), stops when told to."""
    quality = _quality(arch_json)
    value = 0.0
    for step in range(1, STEPS + 1):
        time.sleep(0.02)
        value = quality * step / STEPS
        if report(step, {"val_accuracy": value, "epoch": step}) == "stop":
            return {"val_accuracy": value, "epochs": step}
    return {"val_accuracy": value, "epochs": STEPS}
