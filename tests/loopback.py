"""What the process tests (tests/process/proc_helpers.py) and the benchmarks (benchmarks/harness.py)
both need to run a master on loopback: a free port and a NASExperiment manifest file.

Each caller keeps its own search space and defaults (the benchmarks' space is large enough that
random search never runs out of new architectures); the document's layout is written once, here.
Imported as `tests.loopback` (the repository root on sys.path). Imports: the standard library
and PyYAML only.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import yaml


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_manifest(path: Path, *, name: str, layers: list[dict[str, Any]], optimizer: dict[str, Any],
                   evaluator: str, max_trials: int, max_failed: int, timeout_seconds: float | None = None,
                   retries: int | None = None) -> Path:
    """Writes a NASExperiment for the digits dataset with `evaluator`; `timeout_seconds` and
    `retries` (spec.faultTolerance.maxTaskRetries) are left to the defaults when None."""
    evaluation: dict[str, Any] = {"dataset": {"name": "digits"}, "evaluator": evaluator}
    if timeout_seconds is not None:
        evaluation["timeoutSeconds"] = timeout_seconds
    spec: dict[str, Any] = {
        "searchSpace": {"layers": layers},
        "optimizer": optimizer,
        "evaluation": evaluation,
        "budget": {"maxTrials": max_trials, "maxFailedTrials": max_failed},
    }
    if retries is not None:
        spec["faultTolerance"] = {"maxTaskRetries": retries}
    doc = {"apiVersion": "morphml.io/v1alpha1", "kind": "NASExperiment", "metadata": {"name": name}, "spec": spec}
    path.write_text(yaml.safe_dump(doc))
    return path
