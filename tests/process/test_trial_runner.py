"""The per-slot trial runner child: signals belong to its worker, and it never outlives it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.process, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
ARCH = {"input_shape": [4], "num_classes": 2,
        "nodes": [{"id": "i", "op": "input", "params": {}}, {"id": "o", "op": "output", "params": {"units": 2}}],
        "edges": [["i", "o"]]}


def _request(task_id: str, evaluator: str = "tests.evaluators:instant") -> bytes:
    return (json.dumps({"task_id": task_id, "attempt": 1, "arch": ARCH, "seed": 0,
                        "evaluation": {"evaluator": evaluator}}) + "\n").encode()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); read its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_runner_outlives_sigterm_to_its_process_group_and_keeps_serving():
    runner = subprocess.Popen([sys.executable, "-m", "morphml.distributed.trial_runner"], env=ENV,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    try:
        runner.stdin.write(_request("t1"))
        runner.stdin.flush()
        assert json.loads(runner.stdout.readline())["ok"] is True  # up, signal handling in place
        os.killpg(runner.pid, signal.SIGTERM)  # what a pod deletion sends to the container's group
        os.killpg(runner.pid, signal.SIGINT)
        time.sleep(0.5)
        assert runner.poll() is None, "the runner died of SIGTERM/SIGINT meant for its worker"
        runner.stdin.write(_request("t2"))
        runner.stdin.flush()
        reply = json.loads(runner.stdout.readline())
        assert reply["ok"] is True and 0.5 <= reply["metrics"]["val_accuracy"] < 1.0
    finally:
        runner.kill()
        runner.wait()


def test_runner_dies_when_its_worker_is_killed_mid_trial():
    # A stand-in worker: starts a runner on a hanging trial, prints the runner's pid, then waits.
    parent_code = textwrap.dedent("""
        import subprocess, sys, time
        runner = subprocess.Popen([sys.executable, "-m", "morphml.distributed.trial_runner"],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        runner.stdin.write(sys.argv[1].encode()); runner.stdin.flush()
        print(runner.pid, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code, _request("t1", "tests.evaluators:hangs").decode()],
                              env=ENV, stdout=subprocess.PIPE, start_new_session=True)
    runner_pid = None
    try:
        runner_pid = int(parent.stdout.readline())
        time.sleep(1.0)  # the runner is inside the hanging trial
        assert _alive(runner_pid)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while _alive(runner_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(runner_pid), "the trial runner kept training after its worker was SIGKILLed"
    finally:
        parent.kill()
        parent.wait()
        if runner_pid is not None and _alive(runner_pid):
            os.kill(runner_pid, signal.SIGKILL)
