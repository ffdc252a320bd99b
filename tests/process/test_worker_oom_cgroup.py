"""Process tests: a trial runner killed by SIGKILL is reported as what it was (issue 14, item 5).

- Out of memory: a worker process in a memory cgroup of its own (cgroup v1's memory hierarchy, as
  on this machine kind, or cgroup v2 with the memory controller) with a 300 MiB limit runs the
  `oom_killed_once` evaluator, whose first trial raises its oom_score_adj to 1000 and allocates
  until the kernel's OOM killer ends it. The worker reads its cgroup's OOM kill count and reports
  the attempt failed, kind "oom", with a message that says out of memory and names the limit; the
  master retries it and the retry succeeds. The same path a worker container takes on the real
  node (tests/cluster/test_worker_oom.py), here in seconds and without the node.
- From outside: a runner SIGKILLed by hand is not called out of memory (the count did not move).

The cgroup (a child of the test process's own) is made for the test and removed after it (root
only: skipped where this process may not make one). Imports: pytest, the standard library,
proc_helpers, morphml.distributed.worker_memory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from morphml.distributed.worker_memory import ContainerMemory
from proc_helpers import (
    REPO,
    assert_each_trial_once,
    finished,
    free_port,
    journal_events,
    status,
    wait_for,
    write_manifest,
)

pytestmark = pytest.mark.process

LIMIT_MIB = 300
EVALUATOR = "tests.cluster.operator_trials:oom_killed_once"


def _own_cgroup(controller: str) -> str:
    """This process's cgroup path in the v1 hierarchy of `controller` ("" for v2), from /proc/self/cgroup."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (controller and controller in controllers.split(",")) or (not controller and controllers == ""):
            return path.lstrip("/")
    return ""


def _make_cgroup(name: str) -> Path:
    """A child of this process's own memory cgroup (so the test stays inside whatever limits the
    machine puts on it) with a LIMIT_MIB memory limit, v1 or v2; returns its directory."""
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "memory.limit_in_bytes").exists():
        group = v1 / _own_cgroup("memory") / name
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(f"{LIMIT_MIB << 20}\n")
        return group
    parent = Path("/sys/fs/cgroup") / _own_cgroup("")
    if "memory" in (parent / "cgroup.subtree_control").read_text().split():
        group = parent / name
        group.mkdir()
        (group / "memory.max").write_text(f"{LIMIT_MIB << 20}\n")
        (group / "memory.swap.max").write_text("0\n")
        return group
    raise OSError(f"no memory controller for the children of {parent}")


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    """A fresh memory cgroup (its cgroup.procs), removed afterwards once its processes are gone."""
    try:
        group = _make_cgroup(f"morphml-oom-test-{os.getpid()}")
    except OSError as error:
        pytest.skip(f"cannot make a memory cgroup here (root and a cgroup filesystem needed): {error}")
    try:
        yield group / "cgroup.procs"
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                group.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def _worker_in(procs, cgroup_procs: Path, port: int, name: str, env: dict) -> subprocess.Popen:
    """A worker that moves itself into the cgroup before it starts (its runner is born inside)."""
    command = (f'echo $$ > "{cgroup_procs}" && exec "{sys.executable}" -m morphml.cli worker '
               f'--master 127.0.0.1:{port} --token-file "{procs.token_file}" --name {name}')
    log = open(procs.tmp / f"worker-{name}.log", "ab")
    proc = subprocess.Popen(["sh", "-c", command], cwd=REPO, env={**procs.env, **env}, stdout=log, stderr=log,
                            start_new_session=True)
    log.close()
    proc.log_path = procs.tmp / f"worker-{name}.log"  # type: ignore[attr-defined]
    procs.started.append(proc)
    return proc


@pytest.mark.timeout(120)
def test_a_runner_oom_killed_in_its_cgroup_is_reported_out_of_memory_and_retried(procs, tmp_path, memory_cgroup):
    manifest = write_manifest(tmp_path / "m.yaml", evaluator=EVALUATOR, max_trials=2, max_failed=1, retries=1)
    port = free_port()
    procs.master(manifest, port)
    worker = _worker_in(procs, memory_cgroup, port, "boxed", {"MORPHML_TEST_OOM_MARKER": str(tmp_path / "oom-marker")})
    st = wait_for(lambda: finished(status(port)) and status(port), 90, "the experiment to finish")
    journal = tmp_path / "journal.db"
    [retry] = journal_events(journal, "retry")
    message = retry["detail"]["message"]
    assert retry["detail"]["failure_kind"] == "oom", retry
    assert message.startswith("out of memory: the kernel's OOM killer ended the trial process"), message
    assert f"memory limit of {LIMIT_MIB} MiB of the worker's cgroup" in message and "0 -> 1" in message, message
    assert (tmp_path / "oom-marker").read_text().endswith("oom_score_adj=1000\n")
    assert st.phase == "Succeeded" and st.succeeded == 2 and st.failed == 0, st
    assert_each_trial_once(journal, 2)
    assert worker.poll() is None  # the runner died, not the worker
    log = worker.log_path.read_text()  # type: ignore[attr-defined]
    assert f"trial {retry['task_id']}/{retry['attempt']} failed (oom): out of memory" in log, log[-2000:]


@pytest.mark.timeout(90)
def test_a_runner_killed_from_outside_is_not_called_out_of_memory(procs, tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:sleepy", max_trials=1, max_failed=1,
                              retries=1)
    port = free_port()
    procs.master(manifest, port)
    worker = procs.worker(port, "plain", env={"MORPHML_TEST_SLEEP": "60"})

    def runner_pid() -> int | None:
        children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children")
        pids = [int(p) for p in children.read_text().split()] if children.exists() else []
        busy = status(port)
        running = busy is not None and any(w.running for w in busy.workers)
        return pids[0] if pids and running else None

    pid = wait_for(runner_pid, 30, "the worker's runner to be running a trial")
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    [retry] = wait_for(lambda: journal_events(tmp_path / "journal.db", "retry"), 30, "the killed trial's retry")
    message = retry["detail"]["message"]
    if ContainerMemory().oom_kills() is None:  # no count here: the worker cannot tell, and says so
        assert retry["detail"]["failure_kind"] == "oom" and "no cgroup OOM count" in message, retry
    else:
        assert retry["detail"]["failure_kind"] == "exception", retry
        assert "from outside the worker" in message and "not the OOM killer" in message, message
