"""Build and cache the test control plane binaries.

What lives here: the cache location (``MORPHML_KUBE_CACHE``, default
``~/.cache/morphml-kube``), the cache key (a hash of everything that decides the
binaries: ``kubebin/versions.env``, ``go.mod``, ``go.sum``, ``build.sh`` and the
``cmd/`` wrappers), a file lock so parallel pytest processes build once, and
the build itself (``kubebin/build.sh``: one ``go build`` of the small Go module
in ``kubebin/`` that wraps the upstream commands).

Imports: standard library only (it must run before anything else is installed).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

KUBEBIN_DIR = Path(__file__).resolve().parent / "kubebin"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "etcd", "helm",
            # the real node (tests/cluster/node.py): its Kubernetes parts, the sandbox's pause
            # process and the test pods' multi-tool, all from the same module and `go build`
            "kubelet", "kube-proxy", "pause", "testbox")
#: The real node's add-ons, built by kubebin/addons.sh into their own cache directory
#: (``addons-<hash>``), so the control plane's binaries do not rebuild when an add-on changes.
ADDON_BINARIES = ("kube-router", "coredns")


class BuildError(RuntimeError):
    """The control plane binaries could not be built; the message says why and where the log is."""


def read_versions(path: Path = KUBEBIN_DIR / "versions.env") -> dict[str, str]:
    """Parse ``versions.env`` (``KEY=VALUE`` lines, ``#`` comments)."""
    versions: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise BuildError(f"{path}:{lineno}: expected KEY=VALUE, got {line!r}")
        versions[key.strip()] = value.strip()
    for key in ("KUBERNETES_VERSION", "ETCD_VERSION", "HELM_VERSION"):
        if key not in versions:
            raise BuildError(f"{path}: {key} is missing")
    return versions


def _inputs() -> list[Path]:
    files = [KUBEBIN_DIR / n for n in ("versions.env", "go.mod", "go.sum", "build.sh")]
    files += sorted((KUBEBIN_DIR / "cmd").rglob("*.go"))
    return files


def cache_key() -> str:
    """Hex digest naming the cache directory; changes whenever a pinned version or a wrapper changes."""
    digest = hashlib.sha256()
    for path in _inputs():
        digest.update(str(path.relative_to(KUBEBIN_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("MORPHML_KUBE_CACHE") or Path.home() / ".cache" / "morphml-kube")


def bin_dir() -> Path:
    """Directory holding the binaries for the pinned versions (may not exist yet)."""
    versions = read_versions()
    return cache_root() / f"k8s-{versions['KUBERNETES_VERSION']}-{cache_key()}"


def _complete(directory: Path, binaries: tuple[str, ...]) -> bool:
    return (directory / ".complete").exists() and all((directory / b).exists() for b in binaries)


def cached_bin_dir() -> Path | None:
    """The binaries' directory if a complete build is already cached, else None."""
    directory = bin_dir()
    return directory if _complete(directory, BINARIES) else None


def _addon_inputs() -> list[Path]:
    coredns = KUBEBIN_DIR / "coredns"
    return [KUBEBIN_DIR / "addons.env", KUBEBIN_DIR / "addons.sh", coredns / "go.mod", coredns / "go.sum",
            *sorted(coredns.glob("*.go"))]


def addons_dir() -> Path:
    """Directory holding kube-router and coredns for the pinned add-on versions (may not exist yet)."""
    digest = hashlib.sha256()
    for path in _addon_inputs():
        digest.update(str(path.relative_to(KUBEBIN_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    return cache_root() / f"addons-{digest.hexdigest()[:16]}"


def _find_go() -> str:
    """The go command: on PATH, or where the official tarball installs it (a non-login shell,
    such as CI's, may not have sourced the profile that puts it on PATH)."""
    for candidate in (shutil.which("go"), "/usr/local/go/bin/go", str(Path.home() / "go" / "bin" / "go")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BuildError("the Go toolchain ('go', 1.26 or newer) is not on PATH nor in /usr/local/go/bin; "
                     "it is needed to build the test control plane")


def ensure_built(log=None) -> Path:
    """Return the directory with all binaries, building them first if the cache lacks them.

    Safe to call from several processes at once: a lock file serialises the build and
    the others reuse its result. The build log is kept next to the binaries.
    """
    return _ensure(bin_dir(), BINARIES, KUBEBIN_DIR / "build.sh", "Kubernetes control plane and node binaries",
                   "tens of minutes on 2 cores", log)


def ensure_addons_built(log=None) -> Path:
    """Like ``ensure_built`` for the real node's add-ons (kube-router, coredns: ``kubebin/addons.sh``)."""
    return _ensure(addons_dir(), ADDON_BINARIES, KUBEBIN_DIR / "addons.sh", "node add-ons (kube-router, CoreDNS)",
                   "several minutes on 2 cores", log)


def ensure_all_built(log=None) -> tuple[Path, Path]:
    """``ensure_built()`` and ``ensure_addons_built()`` at once: on a fresh machine the two go builds'
    module downloads (network) and compiles overlap instead of running one after the other."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        addons = pool.submit(ensure_addons_built, log)
        bins = ensure_built(log)
        return bins, addons.result()


def _ensure(target: Path, binaries: tuple[str, ...], script: Path, what: str, how_long: str, log=None) -> Path:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if _complete(target, binaries):
        (target / ".last-used").touch()
        return target
    go = _find_go()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    # One lock per script (kubebin/build.sh, kubebin/addons.sh, s3bin/build.sh): the kinds build in
    # parallel, each once.
    lock_path = root / f".build-{script.parent.name}-{script.stem}.lock"
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"morphml: another process is building in {root}; waiting for {lock_path}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(target, binaries):
            return target
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build_log = tmp / "build.log"
        log(f"morphml: building {what} into {target} (first run only; {how_long}; log: {target / 'build.log'})")
        started = time.monotonic()
        with open(build_log, "wb") as out:
            env = dict(os.environ, PATH=f"{Path(go).parent}{os.pathsep}{os.environ.get('PATH', '')}")
            proc = _run_in_own_group(["bash", str(script), str(tmp)], env=env, stdout=out, hold=lock)
        if proc.returncode != 0:
            tail = build_log.read_text(errors="replace")[-4000:]
            failed = root / f"failed-{target.name}.log"
            shutil.copy(build_log, failed)
            raise BuildError(f"go build of the {what} failed (exit {proc.returncode}); "
                             f"full log {failed}; last lines:\n{tail}")
        missing = [b for b in binaries if not (tmp / b).exists()]
        if missing:
            raise BuildError(f"build finished but {missing} are missing in {tmp}")
        seconds = time.monotonic() - started
        (tmp / ".complete").write_text(f"built in {seconds:.0f} s\n")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        log(f"morphml: {what} built in {seconds:.0f} s")
        _prune(root, keep=target)
        return target


_BUILD_GROUPS: set[int] = set()  # process groups of the builds running now


@atexit.register
def _kill_running_builds() -> None:
    """A session that ends while a build runs in one of its daemon threads (a prebuild it never
    waited for, as a `pytest -m unit` run on an empty cache left) takes the build with it instead of
    leaving it orphaned."""
    for group in list(_BUILD_GROUPS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


def _run_in_own_group(argv: list[str], env: dict[str, str], stdout: Any,
                      hold: Any = None) -> subprocess.CompletedProcess:
    """Run a build script in a process group of its own, and kill the whole group if this process is
    interrupted (a test timeout, Ctrl-C) or exits: a killed bash leaves its `go build` running otherwise,
    orphaned, holding a core and writing into the next build's directory. `hold`: the build's lock
    file, passed to the script so that its flock stays held while any process of the build lives,
    even one that outlives this process (SIGKILL of this process skips the cleanup above)."""
    proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, pass_fds=(hold.fileno(),) if hold is not None else ())
    _BUILD_GROUPS.add(proc.pid)
    try:
        returncode = proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        _BUILD_GROUPS.discard(proc.pid)
    return subprocess.CompletedProcess(argv, returncode)


PRUNE_AFTER_SECONDS = 24 * 3600


def _prune(root: Path, keep: Path) -> None:
    """Drop builds of other versions unused for a day (each is about 450 MB).

    Not at once: another test session may still be running from an older build.
    """
    prefix = keep.name.split("-", 1)[0] + "-"  # "k8s-" or "addons-": each kind prunes its own
    for old in root.glob(prefix + "*"):
        if old == keep or not old.is_dir() or old.name.endswith(".partial"):
            continue
        marker = old / ".last-used"
        last = (marker if marker.exists() else old).stat().st_mtime
        if time.time() - last > PRUNE_AFTER_SECONDS:
            shutil.rmtree(old, ignore_errors=True)


def pin_go_mod() -> Path:
    """Rewrite ``kubebin/go.mod`` from ``versions.env`` and tidy it (``python -m tests.cluster pin``).

    The replace block pins every ``k8s.io/*`` staging module that the chosen
    ``k8s.io/kubernetes`` release replaces with a local path to the matching
    published ``v0.<minor>.<patch>``, which is what makes that module buildable
    as a dependency.
    """
    import json
    import re

    versions = read_versions()
    kube = versions["KUBERNETES_VERSION"]
    staging_version = "v0." + kube.lstrip("v").split(".", 1)[1]
    go = _find_go()
    info = json.loads(subprocess.run([go, "mod", "download", "-json", f"k8s.io/kubernetes@{kube}"],
                                     check=True, capture_output=True, text=True, cwd=KUBEBIN_DIR).stdout)
    upstream = Path(info["GoMod"]).read_text()
    staging = re.findall(r"^\s*(k8s\.io/[\w.-]+) => \./staging/", upstream, re.M)
    go_version = versions.get("GO_VERSION") or re.search(r"^go (\S+)", upstream, re.M).group(1)
    lines = ["module morphml.test/kubebin", "", f"go {go_version}", "", "require (",
             f"\tk8s.io/kubernetes {kube}",
             f"\tgo.etcd.io/etcd/server/v3 {versions['ETCD_VERSION']}",
             f"\thelm.sh/helm/v4 {versions['HELM_VERSION']}", ")", "", "replace ("]
    lines += [f"\t{module} => {module} {staging_version}" for module in staging]
    lines += [")", ""]
    go_mod = KUBEBIN_DIR / "go.mod"
    go_mod.write_text("\n".join(lines))
    subprocess.run([go, "mod", "tidy"], check=True, cwd=KUBEBIN_DIR)
    return go_mod
