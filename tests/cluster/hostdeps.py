"""Install the Debian packages the real-node cluster tier needs, when they are missing.

What lives here: ``TOOLS`` (a tool name -> the Debian package providing it and a path that
shows it is installed), ``missing(...)`` and ``ensure(...)``: ``apt-get update`` at most once
per machine boot (a marker under /run, so parallel pytest processes and the image and node
builds do not each refresh the lists), then one ``apt-get install -y --no-install-recommends``
for everything missing. A file lock serialises callers; dpkg's own lock is waited for too.

Used by ``tests.cluster.node`` (containerd, runc, CNI plugins, iptables, ipset, conntrack, nfacct,
buildah for its small images) and
``tests.cluster.images`` (buildah, mmdebstrap), and the dashboard's browser tests (chromium,
chromedriver: ``BROWSER_TOOLS``). On a machine that is not Debian-like, or not
root, ``ensure`` raises ``HostDepsError`` naming the packages and the command to run.

Imports: the standard library only (it runs before anything else is installed).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

#: tool -> (Debian package, a path or command name whose presence means the package is installed).
#: A value starting with "/" is a file path; anything else is looked up on PATH.
TOOLS: dict[str, tuple[str, str]] = {
    "containerd": ("containerd", "containerd"),
    "ctr": ("containerd", "ctr"),
    "runc": ("runc", "runc"),
    "cni-plugins": ("containernetworking-plugins", "/usr/lib/cni/bridge"),
    "iptables": ("iptables", "iptables"),
    "ipset": ("ipset", "ipset"),
    "conntrack": ("conntrack", "conntrack"),
    # kube-proxy makes nfacct counters; the node's teardown deletes them with this tool.
    "nfacct": ("nfacct", "nfacct"),
    "ip": ("iproute2", "ip"),
    "nsenter": ("util-linux", "nsenter"),
    "mount": ("mount", "mount"),
    "buildah": ("buildah", "buildah"),
    "mmdebstrap": ("mmdebstrap", "mmdebstrap"),
    # kube-proxy and the kubelet look these up on PATH for some code paths.
    "ethtool": ("ethtool", "ethtool"),
    "socat": ("socat", "socat"),
    # The metrics test's real Prometheus server (tests/cluster/test_metrics_prometheus.py).
    "prometheus": ("prometheus", "prometheus"),
    # The dashboard's browser tests (tests/process/test_dashboard_browser.py, benchmarks/bench_dashboard.py).
    "chromium": ("chromium", "chromium"),
    "chromedriver": ("chromium-driver", "chromedriver"),
}

#: A headless browser and its WebDriver, for the dashboard's browser tests.
BROWSER_TOOLS = ("chromium", "chromedriver")

#: Everything the real node needs on the host.
NODE_TOOLS = ("containerd", "ctr", "runc", "cni-plugins", "iptables", "ipset", "conntrack", "nfacct", "ip",
              "nsenter", "mount", "ethtool", "socat", "buildah")

LOCK_PATH = Path("/tmp/morphml-hostdeps.lock")
#: /run is a tmpfs: the marker goes away with a reboot, after which the lists may be stale.
UPDATED_MARKER = Path("/run/morphml-hostdeps-apt-updated")


class HostDepsError(RuntimeError):
    """Packages are missing and cannot be installed here; the message names them and the command."""


def _present(probe: str) -> bool:
    if probe.startswith("/"):
        return os.path.exists(probe)
    return shutil.which(probe) is not None


def missing(tools: Iterable[str]) -> list[str]:
    """The Debian packages (sorted, unique) providing those of ``tools`` that are not installed."""
    packages: set[str] = set()
    for tool in tools:
        if tool not in TOOLS:
            raise HostDepsError(f"unknown tool {tool!r}; known: {', '.join(sorted(TOOLS))}")
        package, probe = TOOLS[tool]
        if not _present(probe):
            packages.add(package)
    return sorted(packages)


def _apt(args: list[str], log: Callable[[str], None]) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", NEEDRESTART_MODE="a")
    # Wait for dpkg's lock rather than failing when another apt runs (an image build, a person).
    argv = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-q", *args]
    started = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise HostDepsError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                            f"{done.stderr[-3000:]}")
    log(f"morphml: {' '.join(args[:1])} done in {time.monotonic() - started:.0f} s")


def ensure(tools: Iterable[str], log: Callable[[str], None] | None = None) -> list[str]:
    """Install the packages for the missing ``tools``; returns the packages installed (empty if none).

    Raises ``HostDepsError`` when something is missing and this process cannot install it.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    tools = list(tools)
    need = missing(tools)
    if not need:
        return []
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise HostDepsError(f"the real-node cluster tier needs the Debian packages {' '.join(need)}; "
                            f"install them with: apt-get update && apt-get install -y "
                            f"--no-install-recommends {' '.join(need)}")
    with open(LOCK_PATH, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        need = missing(tools)  # another process may have installed them while we waited
        if not need:
            return []
        log(f"morphml: installing Debian packages {' '.join(need)}")
        if not UPDATED_MARKER.exists():
            _apt(["update"], log)
            UPDATED_MARKER.write_text(f"{time.time()}\n")
        _apt(["install", "-y", "--no-install-recommends", *need], log)
        still = missing(tools)
        if still:
            raise HostDepsError(f"apt-get installed {' '.join(need)} but {' '.join(still)} still look missing "
                                f"(probes: {', '.join(TOOLS[t][1] for t in tools if TOOLS[t][0] in still)})")
        return need


if __name__ == "__main__":  # python -m tests.cluster.hostdeps [tool ...]
    print(" ".join(ensure(sys.argv[1:] or NODE_TOOLS)) or "all present")
