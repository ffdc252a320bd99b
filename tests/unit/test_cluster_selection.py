"""Which selected tests start the cluster tier (tests/cluster/conftest.py `_needs_cluster`): only
tests under tests/cluster/ that ask for its fixtures. A unit test with a fake of its own named
like one of them (tests/unit/test_operator_oom_events.py's `kube`) used to make a unit-only run
(`pytest -m unit`) build the Kubernetes binaries, take the host's node lock and start a node."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.cluster import conftest as cluster_conftest

pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parents[1]


def item(path: Path, *fixtures: str) -> SimpleNamespace:
    return SimpleNamespace(path=path, fixturenames=list(fixtures))


def test_a_unit_test_with_its_own_kube_fixture_needs_no_cluster():
    assert not cluster_conftest._needs_cluster(item(TESTS / "unit" / "test_operator_oom_events.py", "kube"))


def test_a_cluster_test_asking_for_the_cluster_fixtures_needs_it():
    assert cluster_conftest._needs_cluster(item(TESTS / "cluster" / "test_operator_e2e.py", "request", "kube"))
    assert not cluster_conftest._needs_cluster(item(TESTS / "cluster" / "test_controlplane.py", "tmp_path"))
