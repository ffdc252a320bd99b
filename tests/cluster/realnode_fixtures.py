"""The session's real node for the cluster tier's fixtures (tests/cluster/conftest.py uses this module).

- ``start(config)``: a control plane of its own (no process node) with the real node
  (``tests.cluster.node.RealNode``) as its only node, and the hostPath volume binder
  (``tests.cluster.provisioner.HostPathBinder``, volumes under ``<node state dir>/volumes``);
  ``plane()``, ``node()``, ``binder()`` return them (None before the start or after ``stop()``).
- ``stop()``: stops the node (the host cleaned, ``node.teardown_host``) and the control plane;
  returns what the node left on the host (for the teardown tests). Registered as a session
  cleanup, so it also runs after Ctrl-C or SIGTERM.
- Tests marked ``real_node_teardown`` run last: they stop the session's node themselves.

Imports: pytest, this package's modules (relative imports).
"""

from __future__ import annotations

import os
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
from .provisioner import HostPathBinder

_state: dict[str, Any] = {}


def configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_node: needs the real node (kubelet + containerd), root only")
    config.addinivalue_line("markers", "real_node_teardown: stops the session's real node; runs last")


def collection_modifyitems(items: list[pytest.Item]) -> None:
    """Teardown tests last: they take the session's node down."""
    last = [i for i in items if i.get_closest_marker("real_node_teardown")]
    if last:
        items[:] = [i for i in items if i not in last] + last


def start(config: pytest.Config) -> None:
    """Start the control plane, the node and the binder (raises what failed; ``stop()`` cleans up)."""
    bin_dir, _ = build.ensure_all_built()
    # Before the control plane: it needs `ip` (iproute2) to find the address it advertises.
    hostdeps.ensure(hostdeps.NODE_TOOLS)
    workdir = Path(tempfile.mkdtemp(prefix="morphml-real-"))
    plane_ = ControlPlane(workdir=workdir / "cp", bin_dir=bin_dir, node_name=NODE_NAME)
    config.add_cleanup(stop)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # a CI timeout unwinds like Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)
    _state["plane"] = plane_
    plane_.start()
    node_ = RealNode(plane_, state_dir=workdir / "node")
    _state["node"] = node_
    node_.start()
    _state["binder"] = HostPathBinder(Kube(plane_), node_.state_dir / "volumes").start()
    print(f"\nmorphml: real node ready in {node_.timings.get('start_seconds', 0):.1f} s "
          f"({', '.join(f'{k} {v:.1f} s' for k, v in node_.timings.items())})", file=sys.stderr, flush=True)


def plane() -> ControlPlane | None:
    return _state.get("plane")


def node() -> RealNode | None:
    return _state.get("node")


def binder() -> HostPathBinder | None:
    return _state.get("binder")


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt("SIGTERM")


def stop() -> dict[str, Any]:
    """Stop the session's node and its control plane; returns the host leftovers (empty: clean)."""
    left: dict[str, Any] = {}
    binder_ = _state.pop("binder", None)
    if binder_ is not None:
        binder_.stop()
    node_, plane_ = _state.pop("node", None), _state.pop("plane", None)
    if node_ is not None:
        left = node_.stop()
        if left:
            print(f"\nmorphml: the real node left {left}", file=sys.stderr)
    if plane_ is not None:
        plane_.stop()
        session_failed = bool(getattr(_state.get("session"), "testsfailed", 0))
        if not session_failed and not left and not os.environ.get("MORPHML_KEEP_CLUSTER_STATE"):
            shutil.rmtree(plane_.workdir.parent, ignore_errors=True)
        else:
            print(f"\nmorphml: real node logs kept in {plane_.workdir.parent}", file=sys.stderr)
    _state["stopped"] = True
    return left


def session_started(session: pytest.Session) -> None:
    _state["session"] = session


