"""worker_memory: a trial runner killed by SIGKILL told apart as out of memory (the container's
cgroup counted an OOM kill), a kill from outside (it did not), or not knowable (no count).

Fake cgroup trees in tmp_path: a cgroup v1 container (runc binds its own memory cgroup at
/sys/fs/cgroup/memory), a cgroup v2 container (a cgroup namespace: its cgroup is the root), a
process on a v1 host (the path /proc/self/cgroup names), and nothing at all.
Imports: pytest, morphml.distributed.worker_memory.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from morphml.distributed.worker_memory import ContainerMemory, OomLedger, describe_runner_kill

pytestmark = pytest.mark.unit

V1_OOM_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill {n}\n"
V2_EVENTS = "low 0\nhigh 0\nmax 12\noom 1\noom_kill {n}\noom_group_kill 0\n"


def v1_container(tmp_path: Path, kills: int = 0, limit: int = 512 << 20) -> ContainerMemory:
    memory = tmp_path / "cg" / "memory"
    memory.mkdir(parents=True)
    (memory / "memory.oom_control").write_text(V1_OOM_CONTROL.format(n=kills))
    (memory / "memory.limit_in_bytes").write_text(f"{limit}\n")
    proc = tmp_path / "cgroup"
    proc.write_text("12:memory:/kubepods/burstable/pod1/abc\n1:cpu:/kubepods/burstable/pod1/abc\n0::/\n")
    return ContainerMemory(tmp_path / "cg", proc)


def set_v1_kills(memory: ContainerMemory, kills: int) -> None:
    (memory.root / "memory" / "memory.oom_control").write_text(V1_OOM_CONTROL.format(n=kills))


def test_v1_container_reads_its_own_cgroup_at_the_mount_root(tmp_path):
    memory = v1_container(tmp_path, kills=3)
    assert memory.oom_kills() == 3 and memory.limit_bytes() == 512 << 20


def test_v2_container_with_a_cgroup_namespace(tmp_path):
    root = tmp_path / "cg"
    root.mkdir()
    (root / "memory.events").write_text(V2_EVENTS.format(n=2))
    (root / "memory.max").write_text("268435456\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/\n")
    memory = ContainerMemory(root, proc)
    assert memory.oom_kills() == 2 and memory.limit_bytes() == 256 << 20


def test_a_host_process_reads_the_cgroup_its_proc_file_names_not_the_root(tmp_path):
    root = tmp_path / "cg"
    (root / "memory" / "jobs" / "one").mkdir(parents=True)
    (root / "memory" / "memory.oom_control").write_text(V1_OOM_CONTROL.format(n=40))  # the host's root
    (root / "memory" / "jobs" / "one" / "memory.oom_control").write_text(V1_OOM_CONTROL.format(n=1))
    (root / "memory" / "jobs" / "one" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/jobs/one\n0::/\n")
    memory = ContainerMemory(root, proc)
    assert memory.oom_kills() == 1
    assert memory.limit_bytes() is None  # v1's "no limit"


def test_no_cgroup_files_means_no_count(tmp_path):
    memory = ContainerMemory(tmp_path / "nothing", tmp_path / "no-proc-file")
    assert memory.oom_kills() is None and memory.limit_bytes() is None


def test_a_sigkill_with_a_new_oom_kill_is_out_of_memory_naming_the_limit(tmp_path):
    memory = v1_container(tmp_path, kills=0)
    set_v1_kills(memory, 1)
    kind, message = describe_runner_kill(-signal.SIGKILL, 0, memory, sleep=lambda s: None)
    assert kind == "oom"
    assert message.startswith("out of memory: the kernel's OOM killer ended the trial process")
    assert "memory limit of 512 MiB of the worker's cgroup" in message and "0 -> 1" in message
    assert "spec.workers.resources.limits.memory" in message


def test_the_count_is_looked_at_again_while_it_settles(tmp_path):
    memory = v1_container(tmp_path, kills=5)
    looks = []

    def sleep(seconds: float) -> None:
        looks.append(seconds)
        if len(looks) == 3:
            set_v1_kills(memory, 6)

    kind, _ = describe_runner_kill(-signal.SIGKILL, 5, memory, sleep=sleep)
    assert kind == "oom" and len(looks) == 3


def test_a_sigkill_without_an_oom_kill_came_from_outside(tmp_path):
    memory = v1_container(tmp_path, kills=2)
    looks = []
    kind, message = describe_runner_kill(-signal.SIGKILL, 2, memory, sleep=looks.append)
    assert kind == "exception" and "not the OOM killer" in message and "out of memory" not in message
    assert sum(looks) == pytest.approx(0.5)  # waited for the count to settle, then gave up


def test_a_sigkill_where_no_count_is_readable_is_most_likely_out_of_memory(tmp_path):
    memory = ContainerMemory(tmp_path / "nothing", tmp_path / "no-proc-file")
    kind, message = describe_runner_kill(-signal.SIGKILL, None, memory, sleep=lambda s: None)
    assert kind == "oom" and "most likely out of memory" in message and "no cgroup OOM count" in message


def test_one_oom_kill_explains_one_runner_of_a_worker_with_several_slots(tmp_path):
    """Two runners in one cgroup, both started at count 0: the OOM killer ends the first (0 -> 1);
    later the second is killed with kill -9 from outside. The count still says 1 > 0, but that
    kill is the first runner's: the second was killed from outside."""
    memory = v1_container(tmp_path, kills=0)
    ledger = OomLedger()
    set_v1_kills(memory, 1)
    assert describe_runner_kill(-signal.SIGKILL, 0, memory, sleep=lambda s: None, ledger=ledger)[0] == "oom"
    kind, message = describe_runner_kill(-signal.SIGKILL, 0, memory, sleep=lambda s: None, ledger=ledger)
    assert kind == "exception" and "not the OOM killer" in message
    assert "counts 1 OOM kills, 0 when it started, and each kill since ended another trial process" in message
    # Without the shared ledger (each runner on its own) the second would have been called an OOM kill.
    assert describe_runner_kill(-signal.SIGKILL, 0, memory, sleep=lambda s: None)[0] == "oom"


def test_two_oom_kills_explain_two_runners_whatever_order_they_are_looked_at(tmp_path):
    memory = v1_container(tmp_path, kills=3)
    ledger = OomLedger()
    set_v1_kills(memory, 5)
    # the runner started at 4 is looked at first and takes kill 5; the one started at 3 takes kill 4
    assert describe_runner_kill(-signal.SIGKILL, 4, memory, sleep=lambda s: None, ledger=ledger)[0] == "oom"
    assert describe_runner_kill(-signal.SIGKILL, 3, memory, sleep=lambda s: None, ledger=ledger)[0] == "oom"
    assert describe_runner_kill(-signal.SIGKILL, 3, memory, sleep=lambda s: None, ledger=ledger)[0] == "exception"
    assert ledger.claim(3, 5) is None and ledger.claim(5, 6) == 6


@pytest.mark.parametrize("code", [1, -signal.SIGSEGV, 137])
def test_other_exit_codes_are_exceptions_naming_the_code(tmp_path, code):
    memory = v1_container(tmp_path, kills=0)
    set_v1_kills(memory, 1)  # an OOM kill of another process does not make a crash an OOM
    assert describe_runner_kill(code, 0, memory) == (
        "exception", f"trial process exited with code {code} before reporting a result")
