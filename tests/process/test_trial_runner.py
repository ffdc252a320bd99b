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


def _lines_for(stream, seconds: float) -> list[dict]:
    """Every line the runner writes within `seconds` (non-blocking reads on its reply pipe)."""
    import select

    fd, out, buffer = stream.fileno(), [], b""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            out += [json.loads(line) for line in lines if line.strip()]
    return out


def test_runner_beats_while_a_trial_trains_and_falls_silent_when_stopped():
    runner = subprocess.Popen([sys.executable, "-m", "morphml.distributed.trial_runner", "--beat-seconds", "0.2"],
                              env=dict(ENV, MORPHML_TEST_SLEEP="3"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              start_new_session=True)
    try:
        runner.stdin.write(_request("t1", "tests.evaluators:sleepy"))
        runner.stdin.flush()
        lines = _lines_for(runner.stdout, 1.5)  # mid-trial: only beats, numbered 1, 2, 3, ...
        beats = [line["beat"] for line in lines]
        assert len(beats) >= 3 and beats == list(range(beats[0], beats[0] + len(beats))), lines
        os.kill(runner.pid, signal.SIGSTOP)  # every thread frozen: the beats stop
        try:
            time.sleep(0.3)  # a beat already in flight may still arrive
            _lines_for(runner.stdout, 0.1)
            assert _lines_for(runner.stdout, 1.0) == []
        finally:
            os.kill(runner.pid, signal.SIGCONT)
        # Resumed: beats again, and the trial's reply arrives whole between them.
        lines = _lines_for(runner.stdout, 5.0)
        replies = [line for line in lines if "beat" not in line]
        assert len(replies) == 1 and replies[0]["ok"] is True, lines
        assert any("beat" in line for line in lines)
    finally:
        runner.kill()
        runner.wait()


def test_runner_without_beat_seconds_writes_only_replies():
    runner = subprocess.Popen([sys.executable, "-m", "morphml.distributed.trial_runner"], env=ENV,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    try:
        runner.stdin.write(_request("t1"))
        runner.stdin.flush()
        assert json.loads(runner.stdout.readline())["ok"] is True
        assert _lines_for(runner.stdout, 1.5) == []
    finally:
        runner.kill()
        runner.wait()
