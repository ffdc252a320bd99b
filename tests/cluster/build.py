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

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

KUBEBIN_DIR = Path(__file__).resolve().parent / "kubebin"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "etcd", "helm")


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


def cached_bin_dir() -> Path | None:
    """The binaries' directory if a complete build is already cached, else None."""
    directory = bin_dir()
    if (directory / ".complete").exists() and all((directory / b).exists() for b in BINARIES):
        return directory
    return None


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
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    found = cached_bin_dir()
    if found:
        (found / ".last-used").touch()
        return found
    go = _find_go()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = bin_dir()
    with open(root / ".build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"morphml: another process is building the control plane; waiting for {root / '.build.lock'}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        found = cached_bin_dir()
        if found:
            return found
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build_log = tmp / "build.log"
        log(f"morphml: building Kubernetes control plane binaries into {target} "
            f"(first run only; tens of minutes on 2 cores; log: {target / 'build.log'})")
        started = time.monotonic()
        with open(build_log, "wb") as out:
            env = dict(os.environ, PATH=f"{Path(go).parent}{os.pathsep}{os.environ.get('PATH', '')}")
            proc = subprocess.run(["bash", str(KUBEBIN_DIR / "build.sh"), str(tmp)], env=env,
                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            tail = build_log.read_text(errors="replace")[-4000:]
            failed = root / f"failed-{target.name}.log"
            shutil.copy(build_log, failed)
            raise BuildError(f"go build of the control plane failed (exit {proc.returncode}); "
                             f"full log {failed}; last lines:\n{tail}")
        missing = [b for b in BINARIES if not (tmp / b).exists()]
        if missing:
            raise BuildError(f"build finished but {missing} are missing in {tmp}")
        seconds = time.monotonic() - started
        (tmp / ".complete").write_text(f"built in {seconds:.0f} s\n")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        log(f"morphml: control plane binaries built in {seconds:.0f} s")
        _prune(root, keep=target)
        return target


PRUNE_AFTER_SECONDS = 24 * 3600


def _prune(root: Path, keep: Path) -> None:
    """Drop builds of other versions unused for a day (each is about 450 MB).

    Not at once: another test session may still be running from an older build.
    """
    for old in root.glob("k8s-*"):
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
