"""Fixtures for tests that need the real node (tests/cluster/test_real_node*.py).

- ``real_kube`` (session): a ``tests.cluster.kube.Kube`` on a control plane of its own (no process
  node) with the real node (``tests.cluster.node.RealNode``) as its only node; ``real_kube.node`` is
  the ``RealNode`` (``.images["testbox"]``, ``.ctr(...)``, ``.ip``, ``.logs``, ``.timings``).
- ``real_namespace`` (function): a fresh namespace on it, deleted afterwards.
- ``real_node_stop`` (function): the function that stops the session's node and returns what it left
  on the host (for the teardown tests).

Started right after collection, and only when a selected test uses one of these fixtures, like
the process-node cluster (so test timeouts never include the build or the start); stopped, with the
host cleaned (``node.teardown_host``), at the end of the session, also after Ctrl-C or SIGTERM.
Tests marked ``real_node_teardown`` run last: they stop the session's node themselves.

Imports: pytest, this package's modules (relative imports).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from . import build, hostdeps
from .controlplane import ControlPlane
from .kube import Kube
from .node import NODE_NAME, RealNode

REAL_FIXTURES = {"real_kube", "real_namespace", "real_node_stop"}
_state: dict[str, Any] = {}


def _needs(item: pytest.Item) -> bool:
    return bool(REAL_FIXTURES & set(getattr(item, "fixturenames", ())))


def configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_node: needs the real node (kubelet + containerd), root only")
    config.addinivalue_line("markers", "real_node_teardown: stops the session's real node; runs last")


def collection_modifyitems(items: list[pytest.Item]) -> None:
    """Teardown tests last: they take the session's node down."""
    last = [i for i in items if i.get_closest_marker("real_node_teardown")]
    if last:
        items[:] = [i for i in items if i not in last] + last


def collection_finish(session: pytest.Session) -> None:
    if any(_needs(item) for item in session.items) and "plane" not in _state and "error" not in _state:
        _start(session.config)


def _start(config: pytest.Config) -> None:
    try:
        bin_dir = build.ensure_built()
        # Before the control plane: it needs `ip` (iproute2) to find the address it advertises.
        hostdeps.ensure(hostdeps.NODE_TOOLS)
        workdir = Path(tempfile.mkdtemp(prefix="morphml-real-"))
        plane = ControlPlane(workdir=workdir / "cp", bin_dir=bin_dir, node_name=NODE_NAME, process_node=False)
        config.add_cleanup(stop)
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # a CI timeout unwinds like Ctrl-C
            signal.signal(signal.SIGTERM, _interrupt)
        _state["plane"] = plane
        plane.start()
        node = RealNode(plane, state_dir=workdir / "node")
        _state["node"] = node
        node.start()
        print(f"\nmorphml: real node ready in {node.timings.get('start_seconds', 0):.1f} s "
              f"({', '.join(f'{k} {v:.1f} s' for k, v in node.timings.items())})", file=sys.stderr, flush=True)
    except Exception as exc:  # reported by every test that needs the node, not swallowed
        _state["error"] = exc


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt("SIGTERM")


def stop() -> dict[str, Any]:
    """Stop the session's node and its control plane; returns the host leftovers (empty: clean)."""
    left: dict[str, Any] = {}
    node, plane = _state.pop("node", None), _state.pop("plane", None)
    if node is not None:
        left = node.stop()
        if left:
            print(f"\nmorphml: the real node left {left}", file=sys.stderr)
    if plane is not None:
        plane.stop()
        session_failed = bool(getattr(_state.get("session"), "testsfailed", 0))
        if not session_failed and not left and not os.environ.get("MORPHML_KEEP_CLUSTER_STATE"):
            shutil.rmtree(plane.workdir.parent, ignore_errors=True)
        else:
            print(f"\nmorphml: real node logs kept in {plane.workdir.parent}", file=sys.stderr)
    _state["stopped"] = True
    return left


def session_started(session: pytest.Session) -> None:
    _state["session"] = session


@pytest.fixture(scope="session")
def real_kube() -> Kube:
    if "error" in _state:
        raise _state["error"]
    if "node" not in _state:
        raise RuntimeError("the real node was stopped (a real_node_teardown test ran before this one)")
    node: RealNode = _state["node"]
    node.check_alive()
    kube = Kube(_state["plane"])
    kube.node = node  # type: ignore[attr-defined]
    return kube


@pytest.fixture
def real_node_stop(real_kube: Kube) -> Any:
    """``stop()`` of the session's node, for the teardown tests (this module's own state: the test
    module may import this package under another name than the conftest did)."""
    return stop


@pytest.fixture
def real_namespace(real_kube: Kube, request: pytest.FixtureRequest) -> Any:
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base}-{os.urandom(4).hex()}"
    real_kube.kubectl("create", "namespace", name)
    real_kube.wait_for(lambda: real_kube.kubectl("get", "serviceaccount", "default", "-n", name,
                                                 check=False).returncode == 0, 30, 0.1, f"ServiceAccount in {name}")
    request.node.kube_namespace = name
    yield name
    real_kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


def failure_sections(item: pytest.Item) -> list[tuple[str, str]]:
    """Log tails attached to a failed real-node test's report."""
    if not _needs(item) or "node" not in _state:
        return []
    node: RealNode = _state["node"]
    sections = [("real node logs (tails)", node.log_tails(25) + "\n" + _state["plane"].log_tails(10))]
    namespace = getattr(item, "kube_namespace", None)
    if namespace:
        logs = Kube(_state["plane"]).namespace_logs(namespace)
        if logs:
            sections.append((f"pod logs in {namespace}", logs))
    return sections
