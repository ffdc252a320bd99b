"""The real node leaves nothing on the host: after its session, after a run interrupted with SIGINT,
and (through the start-up cleanup) after a run that was killed outright.

These tests run last (marker ``real_node_teardown``): the first one stops the session's node. Each
later one starts a node in a child pytest and checks the host with ``node.host_leftovers`` (no
node process, mount, network namespace, bridge, iptables chain, ipset, nfacct counter, kubepods
cgroup or file outside the private dirs; the sysctls as before).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import node as node_mod

pytestmark = [pytest.mark.cluster, pytest.mark.real_node, pytest.mark.real_node_teardown]
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_stopping_the_session_node_leaves_the_host_clean(real_node_stop: Callable[[], dict[str, Any]]) -> None:
    before = node_mod.read_sysctls()
    record = node_mod.load_record()
    assert record is not None, "the node records the host before changing it"
    # The node really changed the host (so the clean state below is the teardown's doing).
    left_while_up = node_mod.host_leftovers(record)
    # (pod network namespaces are nsfs mounts under the private state dir, so among the mounts)
    for kind in ("processes", "iptables", "bridges", "cgroups", "mounts", "sysctls"):
        assert left_while_up.get(kind), (kind, left_while_up)
    assert any("/netns/" in m for m in left_while_up["mounts"]), left_while_up["mounts"]
    assert before != record["sysctls"]  # e.g. the kubelet's kernel.panic_on_oops=1
    left = real_node_stop()
    assert left == {}
    assert node_mod.host_leftovers(record) == {}
    assert node_mod.read_sysctls() == record["sysctls"]
    assert not node_mod.HOST_RECORD.exists()


def _child(select: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", select],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_node_up(child: subprocess.Popen[bytes], timeout: float) -> None:
    """Until the child's node runs kube-router (the last host process it starts) and a pod (CoreDNS)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert child.poll() is None, child.stdout.read().decode(errors="replace") if child.stdout else ""
        now = node_mod.host_leftovers()
        if any("kube-router" in p for p in now.get("processes", [])) and now.get("bridges"):
            return
        time.sleep(0.5)
    raise AssertionError("the child's node did not come up")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_run_interrupted_with_sigint_leaves_the_host_clean(real_kube_stopped) -> None:
    record_before = node_mod.read_sysctls()
    child = _child("tests/cluster/test_real_node.py::test_a_pod_runs_from_a_local_image_with_logs_and_exec")
    try:
        _wait_node_up(child, 300)
        time.sleep(2)
        os.killpg(child.pid, signal.SIGINT)
        out, _ = child.communicate(timeout=90)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert node_mod.host_leftovers() == {}, out.decode(errors="replace")[-3000:]
    assert node_mod.read_sysctls() == record_before


@pytest.mark.timeout(400)
def test_a_killed_run_is_cleaned_by_the_next_start(real_kube_stopped) -> None:
    record_before = node_mod.read_sysctls()
    child = _child("tests/cluster/test_real_node.py::test_a_pod_runs_from_a_local_image_with_logs_and_exec")
    try:
        _wait_node_up(child, 300)
        os.killpg(child.pid, signal.SIGKILL)  # no cleanup at all: everything stays behind
        child.wait(30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    record = node_mod.load_record()
    assert record is not None
    left = node_mod.host_leftovers()
    assert left.get("iptables") and left.get("bridges") and left.get("processes"), left  # the kill left things
    # What the next start runs first; the record keeps the values from before the killed run.
    assert node_mod.teardown_host() == {}
    _kill_control_plane_of(record)
    assert node_mod.host_leftovers() == {}
    assert node_mod.read_sysctls() == record_before
    # The killed child could not remove its work directory (200 MB of etcd, images and logs under
    # /tmp): with the host clean, this test removes what it made (a failure above keeps it to read).
    for root in {Path(d).parent for d in record["state_dirs"]}:
        assert root.name.startswith("morphml-real-"), root
        if root.exists():
            shutil.rmtree(root)


def _kill_control_plane_of(record: dict) -> None:
    """The killed child's control plane (etcd, API server...) outlived it too; it is not the node's."""
    roots = [str(Path(d).parent) for d in record["state_dirs"]]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if any(r + "/" in cmdline for r in roots):
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


@pytest.fixture
def real_kube_stopped(real_node_stop: Callable[[], dict[str, Any]]) -> Iterator[None]:
    """The session's node must be down before a child starts its own (one node per host)."""
    real_node_stop()
    assert node_mod.host_leftovers() == {}
    yield
    node_mod.teardown_host()
