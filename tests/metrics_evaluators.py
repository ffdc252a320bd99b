"""Evaluators for the metrics tests: a mix of succeeded and failed trials, decided by the architecture.

- `sleepy_sometimes_fails`: sleeps MORPHML_TEST_SLEEP seconds (default 0.3), then fails when the
  architecture's hash starts with 0-4 (about a third of them), else returns a metric; the same
  architecture always gives the same outcome, so a retry fails again and the trial counts failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time


def sleepy_sometimes_fails(arch_json: dict, evaluation_spec: dict, device: str | None) -> dict:
    time.sleep(float(os.environ.get("MORPHML_TEST_SLEEP", "0.3")))
    digest = hashlib.sha256(json.dumps(arch_json, sort_keys=True).encode()).hexdigest()
    if digest[0] in "01234":
        raise RuntimeError(f"architecture {digest[:12]} fails on purpose")
    return {"val_accuracy": int(digest[1:5], 16) / 65535.0}
