"""Command line for the test control plane: ``python -m tests.cluster build|up|down|status|pin``.

- ``build``: build (or find cached) binaries; prints their directory.
- ``up``: start etcd, kube-apiserver, controllers, scheduler and the real node
  (tests/cluster/node.py: kubelet, containerd, kube-proxy, CoreDNS, kube-router; root only) in
  the background; prints the admin kubeconfig path (``export KUBECONFIG=$(python -m tests.cluster up)``).
  ``up --no-node``: the control plane only (one real node per host: this runs beside a test session's).
  ``--real-node`` is accepted for the old spelling.
- ``down``: stop what ``up`` started (and, for a real node, undo its changes to the host).
- ``clean-node``: remove what a killed real node left on the host; prints what is still left.
- ``pin``: regenerate kubebin/go.mod from kubebin/versions.env.

State of ``up`` lives in ``$MORPHML_KUBE_STATE`` (default /tmp/morphml-kube-up).
Imports: the standard library and this package's build / controlplane modules.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import build
from .controlplane import ControlPlane


def _state_dir() -> Path:
    return Path(os.environ.get("MORPHML_KUBE_STATE", "/tmp/morphml-kube-up"))


def _serve(state: Path, with_node: bool) -> None:
    """Run the control plane in this process until SIGTERM (the body of ``up``)."""
    import shutil

    from .node import NODE_NAME, RealNode

    shutil.rmtree(state / "cluster", ignore_errors=True)  # a fresh etcd every time, like the fixture
    if with_node:
        from .hostdeps import NODE_TOOLS, ensure

        ensure(NODE_TOOLS)  # before the control plane: it needs `ip` to find the address it advertises
    plane = ControlPlane(workdir=state / "cluster", node_name=NODE_NAME)
    node = None
    stopping = []
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    try:
        plane.start()
        if with_node:
            node = RealNode(plane, state_dir=state / "cluster" / "realnode")
            node.start()
        (state / "kubeconfig").write_text(str(plane.kubeconfig))
        (state / "ready").write_text(f"{plane.timings}\n")
        while not stopping:
            time.sleep(0.5)
            plane.check_alive()
            if node is not None:
                node.check_alive()
    except BaseException as err:
        (state / "failed").write_text(f"{err}\n")
        raise
    finally:
        if node is not None:
            node.stop()
        plane.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["build", "up", "down", "status", "pin", "serve", "clean-node"])
    parser.add_argument("--no-node", action="store_true", help="up: the control plane only, no node")
    parser.add_argument("--real-node", action="store_true", help="up: the real node (the default; old spelling)")
    args = parser.parse_args(argv)
    state = _state_dir()
    if args.command == "build":
        print(build.ensure_built())
    elif args.command == "pin":
        print(build.pin_go_mod())
    elif args.command == "serve":
        _serve(state, not args.no_node)
    elif args.command == "clean-node":
        from .node import teardown_host

        left = teardown_host()
        print(left or "clean")
        return 1 if left else 0
    elif args.command == "up":
        if (state / "pid").exists():
            print(f"already up (state in {state}); run 'down' first", file=sys.stderr)
            return 1
        build.ensure_built()
        state.mkdir(parents=True, exist_ok=True)
        for name in ("ready", "failed", "kubeconfig"):
            (state / name).unlink(missing_ok=True)
        log = open(state / "serve.log", "ab")
        serve = ["serve", "--no-node"] if args.no_node else ["serve"]
        proc = subprocess.Popen([sys.executable, "-m", "tests.cluster", *serve], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=Path(__file__).resolve().parents[2])
        (state / "pid").write_text(str(proc.pid))
        while not (state / "ready").exists():
            if proc.poll() is not None or (state / "failed").exists():
                (state / "pid").unlink(missing_ok=True)
                print(f"control plane failed to start; see {state / 'serve.log'}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print((state / "kubeconfig").read_text())
    elif args.command == "down":
        pid_file = state / "pid"
        if not pid_file.exists():
            print("not up", file=sys.stderr)
            return 0
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
            for _ in range(600):  # a real node's teardown takes a few seconds
                os.kill(pid, 0)
                time.sleep(0.1)
        except ProcessLookupError:
            pass
        pid_file.unlink(missing_ok=True)
    elif args.command == "status":
        print("up" if (state / "ready").exists() and (state / "pid").exists() else "down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
