"""Every example in examples/ runs, so none rots (issue 11, acceptance 4).

Each manifest is run as a user would (`morphml run examples/FILE --workers 2`, from a scratch
directory, after the preparation its header names), shortened only by the documented override
(`--set spec.budget.maxTrials=2 --set spec.budget.maxFailedTrials=0 --set spec.evaluation.epochs=1`,
docs/cli.md), never by a separate copy of the file. An example that needs a GPU or a download is
listed here as such and checked by a server-side dry run instead
(tests/cluster/test_examples_dry_run.py). A new example that is in neither list fails
`test_every_example_is_run_or_dry_run`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SHORTEN = ["--set", "spec.budget.maxTrials=2", "--set", "spec.budget.maxFailedTrials=0",
           "--set", "spec.evaluation.epochs=1"]


@dataclasses.dataclass(frozen=True)
class LocalRun:
    """How the example's header says to run it here."""

    prepare: tuple[tuple[str, ...], ...] = ()  # commands run first in the scratch directory
    pythonpath_examples: bool = False  # PYTHONPATH=examples (a module:function evaluator)
    extra: tuple[str, ...] = ()  # more --set after SHORTEN (e.g. epochs an early-stopping rule can judge)
    statuses: frozenset[str] = frozenset({"succeeded"})


LOCAL = {
    "digits.yaml": LocalRun(),
    "digits-early-stopping.yaml": LocalRun(extra=("--set", "spec.evaluation.epochs=3"),
                                           statuses=frozenset({"succeeded", "stopped"})),
    "custom-evaluator.yaml": LocalRun(pythonpath_examples=True, extra=("--set", "spec.evaluation.epochs=2"),
                                      statuses=frozenset({"succeeded", "stopped"})),
    "npz-dataset.yaml": LocalRun(prepare=((sys.executable, str(EXAMPLES / "make_digits_npz.py")),)),
    "digits-asha.yaml": LocalRun(extra=("--set", "spec.evaluation.epochs=3"),  # rungs at 1 and 3 epochs
                                 statuses=frozenset({"succeeded", "stopped"})),
}
# Need a GPU node and a download: checked by `kubectl apply --dry-run=server` in the cluster tier.
DRY_RUN_ONLY = {"cifar10-gpu.yaml"}
# Files the manifests use (each must be named by a manifest or run by a preparation above).
SUPPORT_FILES = {"digits_evaluator.py", "make_digits_npz.py", "Dockerfile.worker-torchvision"}


def example_files() -> set[str]:
    return {p.name for p in EXAMPLES.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml")}


@pytest.mark.timeout(30)
def test_every_example_is_run_or_dry_run():
    manifests = example_files()
    assert manifests == set(LOCAL) | DRY_RUN_ONLY, (
        f"examples not covered: {sorted(manifests - set(LOCAL) - DRY_RUN_ONLY)}; "
        f"listed but missing: {sorted((set(LOCAL) | DRY_RUN_ONLY) - manifests)}")
    others = {p.name for p in EXAMPLES.iterdir() if p.is_file()} - manifests
    assert others == SUPPORT_FILES, f"files in examples/ no example uses: {sorted(others - SUPPORT_FILES)}"
    texts = "\n".join((EXAMPLES / name).read_text() for name in manifests)
    for name in SUPPORT_FILES:
        assert f"examples/{name}" in texts, f"examples/{name} is named by no example manifest"


def epochs_asked(how: LocalRun) -> int:
    """spec.evaluation.epochs after SHORTEN and the example's extra overrides (the last one wins)."""
    args = SHORTEN + list(how.extra)
    return int([a for a in args if a.startswith("spec.evaluation.epochs=")][-1].split("=")[1])


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.timeout(420)
@pytest.mark.parametrize("name", sorted(LOCAL))
def test_example_runs_shortened(name, tmp_path):
    how = LOCAL[name]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if how.pythonpath_examples:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLES), env.get("PYTHONPATH")]))
    for command in how.prepare:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    out = tmp_path / "out"
    command = [sys.executable, "-m", "morphml.cli", "run", str(EXAMPLES / name), "--workers", "2",
               "--output", str(out), *SHORTEN, *how.extra]
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        rc = proc.wait(timeout=360)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = log_path.read_text()
    worker_logs = "\n".join(p.read_text()[-2000:] for p in sorted((out / "logs").glob("worker-*.log")))
    assert rc == 0, f"morphml run {name} exited {rc}:\n{log}\n{worker_logs}"
    assert "Succeeded:" in log, log
    rows = read_rows(out / "trials.csv")
    assert len(rows) == 2 and len({r["trial_id"] for r in rows}) == 2, rows
    assert {r["status"] for r in rows} <= how.statuses, rows
    assert all(0.0 <= float(r["val_accuracy"]) <= 1.0 for r in rows), rows
    assert all(1 <= int(r["epochs"]) <= epochs_asked(how) for r in rows), rows
    succeeded = {r["trial_id"] for r in rows if r["status"] == "succeeded"}
    if succeeded:  # best.json is the best succeeded trial (an early-stopped one never is)
        best = json.loads((out / "best.json").read_text())
        assert best["trial_id"] in succeeded and best["architecture"]["nodes"]
    else:
        assert how.statuses != {"succeeded"}, rows
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
