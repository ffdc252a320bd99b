"""Support for the cluster tests of issue 12's results fetch (acceptance 6, cluster half):
`morphml results` run as docs/kubernetes.md documents it, and the check that the fetched best
model scores what its trial recorded.

- `fetch_results_with_the_cli(kube, ns, name, out)`: `morphml results NAME -n NS --kubeconfig ...
  --out OUT` in a process of its own, through the API server with the suite's admin kubeconfig;
  asserts it exits 0 and leaves best/model.pt, best/architecture.json, best/metrics.json and
  trials.csv; returns its output.
- `assert_best_model_scores_its_recorded_accuracy(out, evaluation)`: `load_model(out/best)` is a
  module in eval mode whose validation accuracy, computed here as the trainer computes it, equals
  best/metrics.json's and the trial's row in trials.csv; returns metrics.json.

Imports: pytest, the standard library; morphml.evaluation (torch) inside the check.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULT_FILES = ("best/model.pt", "best/architecture.json", "best/metrics.json", "trials.csv")


def fetch_results_with_the_cli(kube: Any, ns: str, name: str, out: Path, timeout: float = 180) -> str:
    done = subprocess.run([sys.executable, "-m", "morphml.cli", "results", name, "-n", ns, "--kubeconfig",
                           str(kube.kubeconfig), "--out", str(out)], env=kube.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"morphml results exited {done.returncode}:\n{done.stdout}{done.stderr}"
    for key in RESULT_FILES:
        assert (out / key).is_file() and (out / key).stat().st_size > 0, f"{key} missing: {sorted(out.rglob('*'))}"
    return done.stdout + done.stderr


def trials_rows(out: Path) -> list[dict[str, str]]:
    with (out / "trials.csv").open() as table:
        return list(csv.DictReader(table))


def assert_best_model_scores_its_recorded_accuracy(out: Path, evaluation: dict[str, Any]) -> dict[str, Any]:
    from morphml.evaluation import load_model, validation_metrics

    doc: dict[str, Any] = json.loads((out / "best" / "metrics.json").read_text())
    rows = {r["trial_id"]: r for r in trials_rows(out)}
    recorded = doc["metrics"]["val_accuracy"]
    assert float(rows[doc["trial_id"]]["val_accuracy"]) == pytest.approx(recorded, abs=1e-12), (rows, doc)
    model = load_model(out / "best")
    assert not model.training
    scored = validation_metrics(model, evaluation)["val_accuracy"]
    assert scored == recorded, f"the fetched best model scores {scored}, its trial recorded {recorded}"
    return doc
