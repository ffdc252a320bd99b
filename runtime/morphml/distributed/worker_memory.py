"""Was a trial runner killed by the kernel's OOM killer? The evidence the worker's container has.

A runner that ends by SIGKILL without a reply was killed by the worker (timeout, wedged, cancel:
the worker knows those) or by someone else; in a container with a memory limit that someone is
almost always the kernel's OOM killer. The container's memory cgroup counts its OOM kills
(cgroup v2: `oom_kill` in memory.events; cgroup v1: `oom_kill` in memory.oom_control, kernels
from 4.13), so the worker reads the count when it starts a runner and again when the runner
died, and says which it was:
- the count grew: out of memory, naming the container's memory limit (memory.max /
  memory.limit_in_bytes), kind "oom";
- the count is the same: a SIGKILL from outside the container (someone ran kill -9), kind
  "exception";
- no count readable (no cgroup filesystem in the container, another OS): most likely out of
  memory, kind "oom", and the message says it could not be told.

A worker with several slots runs several runners in one cgroup, so one count: each OOM kill is
put down to one runner only (`OomLedger`, one per worker), and a runner that dies by SIGKILL
after another runner's OOM kill, with no new kill of its own, was killed from outside.

Where the files are: first the path /proc/self/cgroup names under the mount (exact where the
whole hierarchy is mounted, as for a process on a host), then the mount's root (the container's
own cgroup with a cgroup namespace, or where the runtime binds only the container's cgroup, as
runc does on cgroup v1). cgroup v2 is tried first.

Imports: the standard library only.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Above this the cgroup has no memory limit (v1 shows "no limit" as a page-rounded 2**63 - 1).
UNLIMITED = 1 << 60
# The OOM killer counts its kill just after it sends SIGKILL; the worker reads the count once
# the runner has died, so it is there, but look a few more times before saying it is not.
SETTLE_SECONDS = 0.5
SETTLE_STEP = 0.05


def _own_cgroup_paths(root: Path, proc_self_cgroup: Path) -> tuple[list[Path], list[Path]]:
    """(cgroup v2 dirs, cgroup v1 memory dirs) that may be this process's, most likely first: the
    path /proc/self/cgroup names (exact where the whole hierarchy is mounted; absent in a
    container, whose own cgroup is the mount's root), then the mount's root."""
    v2: list[Path] = []
    v1: list[Path] = []
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3 or parts[2] in ("", "/"):
            continue
        relative = parts[2].lstrip("/")
        if parts[0] == "0" and parts[1] == "":
            v2.append(root / relative)
            v2.append(root / "unified" / relative)
        elif "memory" in parts[1].split(","):
            v1.append(root / "memory" / relative)
    return v2 + [root], v1 + [root / "memory"]


def _field(path: Path, name: str) -> int | None:
    """The integer after `name` in a flat-keyed cgroup file (memory.events, memory.oom_control)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _candidates(root: Path, proc_self_cgroup: Path) -> Iterator[tuple[Path, Path]]:
    """(file with the oom_kill count, file with the memory limit) pairs to try, in order."""
    v2, v1 = _own_cgroup_paths(root, proc_self_cgroup)
    for directory in v2:
        yield directory / "memory.events", directory / "memory.max"
    for directory in v1:
        yield directory / "memory.oom_control", directory / "memory.limit_in_bytes"


def _limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= UNLIMITED else value


class ContainerMemory:
    """Reads this container's memory cgroup: its OOM kill count and its memory limit.

    `root` and `proc_self_cgroup` are for tests (a fake cgroup tree)."""

    def __init__(self, root: Path = CGROUP_ROOT, proc_self_cgroup: Path = Path("/proc/self/cgroup")):
        self.root = root
        self.proc_self_cgroup = proc_self_cgroup

    def oom_kills(self) -> int | None:
        """The cgroup's OOM kill count, or None when no cgroup file has one."""
        for events, _ in _candidates(self.root, self.proc_self_cgroup):
            count = _field(events, "oom_kill")
            if count is not None:
                return count
        return None

    def limit_bytes(self) -> int | None:
        """The memory limit of the cgroup that counts the kills (None: none set or not readable)."""
        for events, limit in _candidates(self.root, self.proc_self_cgroup):
            if _field(events, "oom_kill") is not None:
                return _limit(limit)
        return None


class OomLedger:
    """The container's OOM kills already put down to a runner (kill k: the count went k-1 -> k).

    Shared by a worker's runners (their slot threads call `claim`), so that one kill explains one
    runner's death, not every SIGKILL that comes after it in the same cgroup."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claimed: set[int] = set()

    def claim(self, before: int, after: int) -> int | None:
        """Takes the first kill counted in (before, after] that no runner took yet: its number, or None."""
        with self._lock:
            for kill in range(before + 1, after + 1):
                if kill not in self._claimed:
                    self._claimed.add(kill)
                    return kill
        return None


def _mib(value: int) -> str:
    return f"{value / (1 << 20):.0f} MiB"


def describe_runner_kill(code: int, before: int | None, memory: ContainerMemory, settle: float = SETTLE_SECONDS,
                         sleep: Callable[[float], None] = time.sleep,
                         ledger: OomLedger | None = None) -> tuple[str, str]:
    """(failure kind, message) for a runner that exited with `code` before replying.

    `before`: the OOM kill count when the runner started (None: not readable then); `ledger`:
    the kills other runners of the same cgroup were already put down to (None: this runner is
    the only one). Only a SIGKILL (code -9) is looked into; any other code is an "exception"
    naming it."""
    if code != -signal.SIGKILL:
        return "exception", f"trial process exited with code {code} before reporting a result"
    ledger = ledger if ledger is not None else OomLedger()
    after = memory.oom_kills()
    kill = None if before is None or after is None else ledger.claim(before, after)
    for _ in range(round(settle / SETTLE_STEP)):
        if before is None or after is None or kill is not None:
            break
        sleep(SETTLE_STEP)
        after = memory.oom_kills()
        kill = None if after is None else ledger.claim(before, after)
    limit = memory.limit_bytes()
    limit_text = (f"the memory limit of {_mib(limit)} of the worker's cgroup" if limit is not None
                  else "the memory limit of the worker's cgroup")
    if kill is not None:
        return "oom", (f"out of memory: the kernel's OOM killer ended the trial process (SIGKILL) at {limit_text} "
                       f"(its OOM kills: {before} -> {after}); the trial needs more memory than that: raise the "
                       "limit (on Kubernetes spec.workers.resources.limits.memory) or make the model or batch smaller")
    if before is not None and after is not None:
        counted = "as before" if after <= before else (
            f"{before} when it started, and each kill since ended another trial process of this worker")
        return "exception", ("trial process killed by SIGKILL from outside the worker before reporting a result "
                             f"(not the OOM killer: the worker's cgroup counts {after} OOM kills, {counted})")
    return "oom", ("trial process killed by SIGKILL before reporting a result: most likely out of memory "
                   f"(the kernel's OOM killer at {limit_text}); no cgroup OOM count is readable here to tell")
