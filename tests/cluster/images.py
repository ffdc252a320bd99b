"""The container images of the real-node cluster tier: a stand-in base, the two MorphML images, their cache.

What lives here: building ``Dockerfile.master`` and ``Dockerfile.worker`` with ``buildah bud
--isolation chroot`` (no daemon), the stand-in for the base image they name (published images
cannot be pulled on the test machines), a cache keyed by a hash of the build inputs, and the
export of each image to an OCI archive that the node imports with ``ctr -n k8s.io images import``.

Interface (for ``tests.cluster.node`` and ``tests/cluster/test_images.py``):

- ``ensure_images(roles=("master", "worker"), root=ROOT, log=None) -> dict[str, BuiltImage]``:
  builds what is missing or stale and returns one ``BuiltImage`` per role. An unchanged tree is a
  cache hit: no buildah call at all, well under a second. A file lock serialises parallel callers.
- ``ensure_image(role, root=ROOT, log=None) -> BuiltImage``: the same for one role; ``image_tag(role)``:
  the tag it would give the tree now (computed, nothing built).
- ``ensure_test_image(master) -> BuiltImage``: ``morphml-testworker``, the master image plus the
  cluster tier's test evaluators (``TEST_IMAGE_FILES``) on its PYTHONPATH (see there).
- ``BuiltImage`` (frozen dataclass):
    - ``role``: ``"master"`` or ``"worker"``;
    - ``repository``: ``"morphml-master"`` / ``"morphml-worker"`` (the chart's ``image.repository`` /
      ``workerImage.repository`` defaults, and the operator settings' default image names);
    - ``tag``: ``"<project version>-<first 12 hex digits of key>"``, e.g. ``"0.1.0-3f2a9c0d1e7b"``;
      give it to the chart as ``--set image.tag=<master tag> --set workerImage.tag=<worker tag>``;
    - ``ref``: ``"docker.io/library/<repository>:<tag>"``, the name inside the archive
      (``org.opencontainers.image.ref.name``), which ``ctr images import`` keeps as it is and which
      is what the kubelet/CRI resolves ``<repository>:<tag>`` to, so no pull is attempted;
    - ``archive``: ``Path`` of the OCI archive (zstd-compressed layers);
    - ``key``: sha256 (hex) of the inputs; ``size_bytes``: the archive's size;
    - ``build_seconds``: the buildah build time when it was built (kept in the cache record);
    - ``cached``: True when this call found it in the cache.
- ``run_in_image(ref, argv, user="1000:1000", timeout=300, env=None) -> subprocess.CompletedProcess``
  (text): runs ``argv`` in a throwaway container of the image (``buildah run --isolation chroot``)
  as ``user``; the container is removed afterwards.
- ``image_config(ref) -> dict``: the image's OCI config (``{"User": ..., "Entrypoint": ...}``).
- ``input_key(role, root=ROOT) -> str`` and ``input_files(root=ROOT) -> list[Path]``: the cache key
  and the files it covers (pure; no build). Builds run on a copy of those files
  (``snapshot_inputs``) keyed by the copy, so an edit to the tree during a build cannot mislabel it.
- ``forget(image)``: delete one image's record, archive and buildah image; ``clean()``: the whole cache.
- ``python3 -m tests.cluster.images [build|status|clean]`` does the same by hand.

Cache: ``~/.cache/morphml-images`` (override with ``MORPHML_IMAGES_CACHE``):

- ``storage/root``, ``storage/run``: buildah's private storage (``--root``/``--runroot``), so nothing
  goes to ``/var/lib/containers/storage``; ``tmp/``: buildah's ``TMPDIR`` (layer temp files);
- ``archives/<repository>-<tag>.oci.tar`` and ``archives/<repository>-<tag>.json`` (the record:
  ref, key, size, build time). An image is a cache hit when both exist for its key; the next build
  deletes records not used for a day and, per repository, all but the three most recently used
  (``prunable``), with their archive and buildah image, and any working container a killed build left;
- ``logs/<what>.log``: the last mmdebstrap / build / push output of each.

The key of an image covers its Dockerfile, ``pyproject.toml``, ``README.md``, every file under
``runtime/`` and ``operator/`` (without ``__pycache__``, ``*.pyc``, ``*.egg-info``: what
``.dockerignore`` leaves out), the stand-in base's recipe, and this module's ``FORMAT`` number.

The stand-in base: ``docker.io/library/python:3.11-slim-bookworm`` in buildah's private storage,
made by ``mmdebstrap`` (Debian bookworm, ``--variant=apt`` plus python3, python3-pip,
python-is-python3, ca-certificates, netbase, tzdata), with Debian's ``EXTERNALLY-MANAGED`` marker
removed so the Dockerfiles' ``pip install`` runs unchanged. The Debian mirror and apt options come
from this machine's apt configuration at run time (``/etc/apt/sources.list``,
``/etc/apt/sources.list.d/*``); nothing names a host here. docs/testing.md lists how it differs from
the published image. Builds run with ``--pull=never`` (the base is never pulled) and the host's CA
bundle mounted over the image's, so ``pip`` reaches the package index through the machine's TLS
proxy; a host pip index setting (``pip config``/``PIP_INDEX_URL`` ...) goes into the stand-in's
``/etc/pip.conf``.

Needs root (chroot isolation, mmdebstrap's root mode) and the Debian packages buildah and
mmdebstrap (installed through ``tests.cluster.hostdeps`` when missing).

Imports: the standard library and ``tests.cluster.hostdeps``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from . import hostdeps

ROOT = Path(__file__).resolve().parents[2]
#: Bump when the build procedure changes in a way the inputs do not show (every image rebuilds).
FORMAT = 2
#: The same for the stand-in base's recipe (a new base invalidates every cached layer: torch again).
BASE_FORMAT = 2
ROLES = ("master", "worker")
REPOSITORIES = {"master": "morphml-master", "worker": "morphml-worker"}
DOCKERFILES = {"master": "Dockerfile.master", "worker": "Dockerfile.worker"}
#: What the Dockerfiles copy; .dockerignore leaves out the same names as EXCLUDED_NAMES.
INPUT_FILES = ("pyproject.toml", "README.md")
INPUT_DIRS = ("runtime", "operator")
EXCLUDED_NAMES = ("__pycache__",)
EXCLUDED_SUFFIXES = (".pyc", ".egg-info")
BASE_REF = "docker.io/library/python:3.11-slim-bookworm"
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("ca-certificates", "netbase", "tzdata", "python3", "python3-pip", "python-is-python3")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
RECIPE_LABEL = "io.morphml.stand-in-recipe"
KEY_LABEL = "io.morphml.inputs-sha256"
#: Host apt options worth carrying into mmdebstrap's apt (a snapshot mirror's old Release dates, proxies).
APT_OPTIONS = ("Acquire::Check-Valid-Until", "Acquire::Check-Date", "Acquire::http::Proxy", "Acquire::https::Proxy")
#: Host pip settings carried into the stand-in's /etc/pip.conf (where the package index is).
PIP_SETTINGS = ("index-url", "extra-index-url", "trusted-host", "timeout", "default-timeout")
STALE_SECONDS = 24 * 3600
#: Cache records kept per image repository besides the ones in use (each tree that was tested builds one).
KEEP_PER_REPOSITORY = 3
BUILD_TIMEOUT = 3600


class ImageBuildError(RuntimeError):
    """A build step failed; the message names the step, its log file and the log's last lines."""


@dataclass(frozen=True)
class BuiltImage:
    role: str
    repository: str
    tag: str
    ref: str
    archive: Path
    key: str
    size_bytes: int
    build_seconds: float
    cached: bool


Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("MORPHML_IMAGES_CACHE") or Path.home() / ".cache" / "morphml-images")


# ---------------------------------------------------------------------------------------------------------
# Inputs and keys (pure)


def _excluded(path: Path) -> bool:
    return any(part in EXCLUDED_NAMES or part.endswith(EXCLUDED_SUFFIXES) for part in path.parts)


def input_files(root: Path = ROOT) -> list[Path]:
    """The files the Dockerfiles copy, relative to ``root``, sorted."""
    files = [Path(name) for name in INPUT_FILES]
    for top in INPUT_DIRS:
        for dirpath, dirnames, filenames in os.walk(root / top):
            rel_dir = Path(dirpath).relative_to(root)
            dirnames[:] = sorted(d for d in dirnames if not _excluded(rel_dir / d))
            files.extend(rel_dir / f for f in filenames if not _excluded(rel_dir / f))
    return sorted(files)


def _hash_files(digest: hashlib._Hash, root: Path, files: Iterable[Path]) -> None:
    for rel in files:
        path = root / rel
        mode = path.stat().st_mode
        # Path, executable bit and content: what COPY carries into the image.
        digest.update(f"{rel.as_posix()}\0{mode & 0o111:o}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())


def input_key(role: str, root: Path = ROOT, recipe_key: str | None = None) -> str:
    """sha256 of the Dockerfile, the copied files, the base's recipe and ``FORMAT``."""
    if role not in ROLES:
        raise ValueError(f"role={role!r}: expected one of {', '.join(ROLES)}")
    digest = hashlib.sha256(f"morphml-image\0{FORMAT}\0{role}\0".encode())
    digest.update((recipe_key if recipe_key is not None else str(base_recipe()["key"])).encode())
    _hash_files(digest, root, [Path(DOCKERFILES[role]), *input_files(root)])
    return digest.hexdigest()


def project_version(root: Path = ROOT) -> str:
    with open(root / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


# ---------------------------------------------------------------------------------------------------------
# The host's apt and pip configuration, read at run time


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, last = {}, ""
            continue
        if line[0].isspace() and last:  # a continuation line
            current[last] += "\n" + line.strip()
            continue
        key, _, value = line.partition(":")
        last = key.strip().lower()
        current[last] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def _one_line_entries(text: str) -> list[dict[str, str]]:
    entries = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        words = line.split()[1:]
        options = ""
        if words and words[0].startswith("["):  # deb [signed-by=... arch=...] URI suite components
            end = next(i for i, w in enumerate(words) if w.endswith("]"))
            options = " ".join(words[: end + 1])[1:-1]
            words = words[end + 1:]
        if len(words) < 3:
            continue
        entry = {"types": "deb", "uris": words[0], "suites": words[1], "components": " ".join(words[2:])}
        for option in options.split():
            name, _, value = option.partition("=")
            if name == "signed-by":
                entry["signed-by"] = value
        entries.append(entry)
    return entries


def debian_sources(apt_dir: Path = Path("/etc/apt")) -> str:
    """deb822 sources for the stand-in base: the host's enabled ``deb`` entries for bookworm's suites.

    Raises ``ImageBuildError`` naming the files read when there is none.
    """
    files = [apt_dir / "sources.list"] if (apt_dir / "sources.list").is_file() else []
    files += sorted(p for p in (apt_dir / "sources.list.d").glob("*") if p.suffix in (".list", ".sources"))
    entries: list[dict[str, str]] = []
    for path in files:
        text = path.read_text(errors="replace")
        found = _deb822_stanzas(text) if path.suffix == ".sources" else _one_line_entries(text)
        entries += [e for e in found if e.get("enabled", "yes").lower() != "no"]
    out = []
    for entry in entries:
        suites = [s for s in entry.get("suites", "").split() if s == BASE_SUITE or s.startswith(BASE_SUITE + "-")]
        components = entry.get("components", "").split()
        if "deb" not in entry.get("types", "").split() or not suites or "main" not in components:
            continue
        stanza = f"Types: deb\nURIs: {entry['uris']}\nSuites: {' '.join(suites)}\nComponents: main\n"
        if entry.get("signed-by", "").startswith("/"):
            stanza += f"Signed-By: {entry['signed-by']}\n"
        out.append(stanza)
    if not out:
        raise ImageBuildError(
            f"no Debian {BASE_SUITE} 'deb ... main' source in {', '.join(map(str, files)) or apt_dir}: the stand-in "
            f"base image is built from the mirror this machine's apt uses; add one (e.g. deb822 "
            f"'Types: deb / URIs: <mirror> / Suites: {BASE_SUITE} / Components: main')")
    return "\n".join(out)


def host_apt_options() -> list[str]:
    """``Name "value"`` lines of the host's apt settings named in ``APT_OPTIONS`` (from ``apt-config dump``)."""
    try:
        dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    wanted = {name.lower() for name in APT_OPTIONS}
    lines = []
    for line in dump.splitlines():
        match = re.match(r'^(\S+) "(.*)";$', line)
        if match and match.group(1).lower() in wanted:
            lines.append(f'{match.group(1)} "{match.group(2)}"')
    return sorted(lines)


def host_pip_settings() -> dict[str, str]:
    """The host's pip settings named in ``PIP_SETTINGS`` (``pip config list``: files and ``PIP_*`` env)."""
    try:
        listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        listed = ""
    settings: dict[str, str] = {}
    for line in listed.splitlines():
        name, _, value = line.partition("=")
        key = name.rsplit(".", 1)[-1]
        if key in PIP_SETTINGS:
            settings[key] = value.strip().strip("'\"")
    return dict(sorted(settings.items()))


def _pip_conf(settings: dict[str, str]) -> str:
    # Debian's pip already uses the system bundle; `cert` makes any pip use it (the build mounts the
    # host's bundle there).
    lines = ["# Written by the MorphML test suite's stand-in base (tests/cluster/images.py): the host's",
             "# package index settings and the system CA bundle, which builds mount from the host.",
             "[global]", f"cert = {CA_BUNDLE}"]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def base_recipe() -> dict[str, object]:
    """Everything the stand-in base is made from, and its key (sha256 of the rest)."""
    recipe: dict[str, object] = {
        "format": BASE_FORMAT,
        "ref": BASE_REF,
        "suite": BASE_SUITE,
        "variant": "apt",
        "packages": list(BASE_PACKAGES),
        "sources": debian_sources(),
        "apt_options": host_apt_options(),
        "pip_conf": _pip_conf(host_pip_settings()),
        "customize": ["rm /usr/lib/python3*/EXTERNALLY-MANAGED", "rm /etc/apt/apt.conf.d/99mmdebstrap",
                      "write /etc/pip.conf", "drop /dev nodes"],
        "config": {"env": ["LANG=C.UTF-8"], "cmd": ["python3"]},
    }
    recipe["key"] = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    return recipe


# ---------------------------------------------------------------------------------------------------------
# buildah


def _storage_args(cache: Path) -> list[str]:
    return ["--root", str(cache / "storage" / "root"), "--runroot", str(cache / "storage" / "run"),
            "--storage-driver", "overlay"]


def _env(cache: Path) -> dict[str, str]:
    tmp = cache / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    # TMPDIR: buildah stages layers and cache mounts there (default /var/tmp).
    return dict(os.environ, TMPDIR=str(tmp), BUILDAH_ISOLATION="chroot")


@contextlib.contextmanager
def _no_system_leftovers() -> Iterator[None]:
    """buildah 1.28 (containers/image) opens a blob-info cache in /var/lib/containers/cache whatever
    --root says; remove that directory again when it was not there before."""
    system = Path("/var/lib/containers")
    existed = system.exists()
    try:
        yield
    finally:
        if not existed and system.exists():
            left = [p for p in system.rglob("*") if p.is_file() and p.name != "blob-info-cache-v1.boltdb"]
            if not left:
                shutil.rmtree(system, ignore_errors=True)


def _run(argv: Sequence[str], cache: Path, log_name: str | None = None, timeout: float = BUILD_TIMEOUT,
         what: str = "") -> subprocess.CompletedProcess[str]:
    """Run a build command; its output goes to logs/<log_name>.log (or is captured). Raises ImageBuildError."""
    argv = [str(a) for a in argv]
    if log_name is None:
        try:
            done = subprocess.run(argv, env=_env(cache), capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ImageBuildError(f"{what or argv[0]}: no result after {timeout:.0f} s: {' '.join(argv)}") from exc
        if done.returncode != 0:
            raise ImageBuildError(f"{what or argv[0]} exited {done.returncode}: {' '.join(argv)}\n"
                                  f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        return done
    logs = cache / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{log_name}.log"
    with open(log_path, "w") as out:
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        try:
            rc = subprocess.run(argv, env=_env(cache), stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                stdin=subprocess.DEVNULL, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise ImageBuildError(f"{what or argv[0]} {'timed out' if rc == -1 else f'exited {rc}'} "
                              f"(log {log_path}):\n{tail}")
    return subprocess.CompletedProcess(argv, 0, "", "")


def _buildah(cache: Path, *args: str, log_name: str | None = None, timeout: float = BUILD_TIMEOUT,
             what: str = "") -> subprocess.CompletedProcess[str]:
    return _run(["buildah", *_storage_args(cache), *args], cache, log_name, timeout, what or f"buildah {args[0]}")


def _image_labels(cache: Path, ref: str) -> dict[str, str] | None:
    """The image's labels, or None when the storage has no image of that name."""
    done = subprocess.run(["buildah", *_storage_args(cache), "inspect", "--type", "image", ref], env=_env(cache),
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        return None
    config = json.loads(done.stdout).get("OCIv1", {}).get("config", {})
    return dict(config.get("Labels") or {})


def _ensure_tools(log: Log) -> None:
    if os.geteuid() != 0:
        raise ImageBuildError("building the images needs root (buildah --isolation chroot, mmdebstrap --mode=root)")
    hostdeps.ensure(["buildah", "mmdebstrap"], log=log)


def ensure_base(cache: Path, recipe: dict[str, object], log: Log) -> bool:
    """Make the stand-in base in buildah's storage unless it is there for this recipe; True when built."""
    labels = _image_labels(cache, BASE_REF)
    if labels is not None and labels.get(RECIPE_LABEL) == recipe["key"]:
        return False
    log(f"morphml: building the stand-in base {BASE_REF} with mmdebstrap (about 2 min)")
    work = Path(tempfile.mkdtemp(prefix="base-", dir=cache / "tmp"))
    started = time.monotonic()
    try:
        sources = work / "bookworm.sources"
        sources.write_text(str(recipe["sources"]))
        rootfs = work / "rootfs.tar"
        argv: list[str] = ["mmdebstrap", "--mode=root", "--variant=apt", "--format=tar",
                           "--aptopt=APT::Install-Recommends \"false\"",
                           f"--include={','.join(BASE_PACKAGES)}"]
        options = list(recipe["apt_options"])  # type: ignore[call-overload]
        if "https://" in str(recipe["sources"]):  # the machine's TLS proxy: trust the host's bundle
            options.append(f'Acquire::https::CaInfo "{CA_BUNDLE}"')
        argv += [f"--aptopt={option}" for option in options]
        pip_conf = work / "pip.conf"
        pip_conf.write_text(str(recipe["pip_conf"]))
        # The published image's Python is not Debian's, so it has no EXTERNALLY-MANAGED marker; the
        # apt options above were for fetching here only.
        argv += ['--customize-hook=rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED "$1"/etc/apt/apt.conf.d/99mmdebstrap',
                 f'--customize-hook=install -m 0644 {pip_conf} "$1"/etc/pip.conf',
                 BASE_SUITE, str(rootfs), str(sources)]
        _run(argv, cache, "mmdebstrap", what="mmdebstrap (the stand-in base)")
        mmdebstrap_seconds = time.monotonic() - started
        container = f"morphml-base-{uuid.uuid4().hex[:8]}"
        _buildah(cache, "from", "--name", container, "scratch")
        try:
            mount = _buildah(cache, "mount", container).stdout.strip()
            try:
                # Like Debian's published images: an empty /dev (the runtime provides one).
                _run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", str(rootfs), "-C", mount,
                      "--exclude=./dev/*"], cache, what="unpacking the stand-in base")
            finally:
                _buildah(cache, "umount", container)
            _buildah(cache, "config", "--env", "LANG=C.UTF-8", "--cmd", "python3",
                     "--label", f"{RECIPE_LABEL}={recipe['key']}", container)
            _buildah(cache, "commit", "--rm", "--quiet", container, BASE_REF)
        except BaseException:
            subprocess.run(["buildah", *_storage_args(cache), "rm", container], env=_env(cache),
                           capture_output=True, timeout=120, check=False)
            raise
        log(f"morphml: stand-in base built in {time.monotonic() - started:.0f} s "
            f"(mmdebstrap {mmdebstrap_seconds:.0f} s)")
        return True
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Images and the cache


def _record_path(cache: Path, repository: str, tag: str) -> Path:
    return cache / "archives" / f"{repository}-{tag}.json"


def _read_record(path: Path) -> dict[str, object] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def prunable(records: Iterable[tuple[Path, float, str]], keep: set[Path], now: float,
             per_repository: int = KEEP_PER_REPOSITORY, stale_seconds: float = STALE_SECONDS) -> list[Path]:
    """Which of ``records`` (path, last used, repository) to delete: every one unused for ``stale_seconds``,
    and in each repository all but the ``per_repository`` most recently used (a day of edits builds an
    image per tree: 1-6 GB each, the disk fills well before any is a day old). ``keep`` is never deleted."""
    records = list(records)
    doomed: list[Path] = []
    by_repository: dict[str, list[tuple[float, Path]]] = {}
    kept = Counter(repository for path, _, repository in records if path in keep)
    for path, used, repository in records:
        if path in keep:
            continue
        if now - used >= stale_seconds:
            doomed.append(path)
        else:
            by_repository.setdefault(repository, []).append((used, path))
    for repository, entries in by_repository.items():
        entries.sort(reverse=True)  # most recently used first
        doomed.extend(path for _, path in entries[max(0, per_repository - kept[repository]):])
    return doomed


def _prune(cache: Path, keep: set[Path], log: Log) -> None:
    """Delete the cache records `prunable` picks, with their archive and buildah image, and any working
    container a killed build left (we hold the cache lock: no build of ours is running)."""
    records = {path: _read_record(path) or {} for path in (cache / "archives").glob("*.json")}
    entries = [(path, path.stat().st_mtime, str(record.get("repository", ""))) for path, record in records.items()]
    for record_path in prunable(entries, keep, time.time()):
        record = records[record_path]
        (cache / "archives" / str(record.get("archive", record_path.with_suffix(".oci.tar").name))).unlink(
            missing_ok=True)
        if record.get("ref"):
            subprocess.run(["buildah", *_storage_args(cache), "rmi", str(record["ref"])], env=_env(cache),
                           capture_output=True, timeout=300, check=False)
        record_path.unlink(missing_ok=True)
        log(f"morphml: pruned unused image {record.get('ref', record_path.name)}")
    subprocess.run(["buildah", *_storage_args(cache), "rm", "--all"], env=_env(cache), capture_output=True,
                   timeout=300, check=False)


def _build(role: str, root: Path, cache: Path, key: str, repository: str, tag: str, ref: str, log: Log
           ) -> BuiltImage:
    archives = cache / "archives"
    archives.mkdir(parents=True, exist_ok=True)
    log(f"morphml: building {ref} from {DOCKERFILES[role]}"
        + (" (torch and its CUDA libraries: GBs, several minutes)" if role == "worker" else ""))
    started = time.monotonic()
    # The host's CA bundle over the image's: RUN steps reach the package index through the machine's
    # TLS proxy. Mounted, so it never enters a layer. --layers keeps the dependency layer for reuse.
    # --force-rm: a failed step's working container goes too (each holds a GB-sized layer in progress).
    _buildah(cache, "bud", "--isolation", "chroot", "--pull=never", "--layers", "--force-rm",
             "--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro",
             "--label", f"{KEY_LABEL}={key}",
             "-f", str(root / DOCKERFILES[role]), "-t", ref, str(root),
             log_name=f"build-{role}", what=f"buildah bud {DOCKERFILES[role]}")
    build_seconds = time.monotonic() - started
    archive = archives / f"{repository}-{tag}.oci.tar"
    partial = archive.with_name(archive.name + ".partial")
    partial.unlink(missing_ok=True)
    pushed = time.monotonic()
    # zstd: faster to write and unpack than gzip (buildah 1.28 compresses oci-archive layers either way),
    # and containerd 1.5+ unpacks it.
    _buildah(cache, "push", "--compression-format", "zstd", "--quiet", ref, f"oci-archive:{partial}:{ref}",
             log_name=f"push-{role}", what=f"buildah push {ref}")
    partial.rename(archive)
    push_seconds = time.monotonic() - pushed
    size = archive.stat().st_size
    record = {"role": role, "repository": repository, "tag": tag, "ref": ref, "archive": archive.name, "key": key,
              "size_bytes": size, "build_seconds": round(build_seconds, 1), "push_seconds": round(push_seconds, 1),
              "built_at": time.time()}
    record_path = _record_path(cache, repository, tag)
    record_path.with_suffix(".tmp").write_text(json.dumps(record, indent=2) + "\n")
    record_path.with_suffix(".tmp").rename(record_path)
    log(f"morphml: {ref} built in {build_seconds:.0f} s, exported in {push_seconds:.0f} s "
        f"({size / 1e6:.0f} MB, {archive})")
    return BuiltImage(role, repository, tag, ref, archive, key, size, build_seconds, cached=False)


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_images(roles: Iterable[str] = ROLES, root: Path = ROOT, log: Log | None = None) -> dict[str, BuiltImage]:
    """Build (or find in the cache) the images of ``roles``; see the module docstring."""
    log = log or _stderr
    roles = list(roles)
    for role in roles:
        if role not in ROLES:
            raise ValueError(f"role={role!r}: expected one of {', '.join(ROLES)}")
    root = Path(root).resolve()
    cache = cache_dir()
    recipe = base_recipe()
    version = project_version(root)
    out: dict[str, BuiltImage] = {}
    with _locked(cache):
        missing = [role for role in roles if not _cached(role, root, cache, recipe, version, out)]
        if missing:
            _ensure_tools(log)
            # Build from a snapshot of the inputs, keyed by the snapshot: the tree may be edited while
            # a build runs, and the image must match its key.
            (cache / "tmp").mkdir(parents=True, exist_ok=True)  # a fresh machine has no cache yet
            context = Path(tempfile.mkdtemp(prefix="context-", dir=cache / "tmp"))
            try:
                snapshot_inputs(root, context)
                with _no_system_leftovers():
                    ensure_base(cache, recipe, log)
                    for role in missing:
                        if not _cached(role, context, cache, recipe, version, out):
                            key, repository, tag, ref = _names(role, context, recipe, version)
                            out[role] = _build(role, context, cache, key, repository, tag, ref, log)
                    keep = {_record_path(cache, image.repository, image.tag) for image in out.values()}
                    _prune(cache, keep, log)
            finally:
                shutil.rmtree(context, ignore_errors=True)
    return {role: out[role] for role in roles}


def snapshot_inputs(root: Path, dest: Path) -> None:
    """Copy what the builds read (Dockerfiles, .dockerignore, the input files) from ``root`` to ``dest``."""
    for rel in [Path(name) for name in (*DOCKERFILES.values(), ".dockerignore")] + input_files(root):
        if not (root / rel).exists() and rel.name == ".dockerignore":
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest / rel)


def _names(role: str, root: Path, recipe: dict[str, object], version: str) -> tuple[str, str, str, str]:
    key = input_key(role, root, str(recipe["key"]))
    repository = REPOSITORIES[role]
    tag = f"{version}-{key[:12]}"
    return key, repository, tag, f"docker.io/library/{repository}:{tag}"


def _cached(role: str, root: Path, cache: Path, recipe: dict[str, object], version: str,
            out: dict[str, BuiltImage]) -> bool:
    """Put the cached image of ``role`` for the tree at ``root`` into ``out``; False when there is none."""
    key, repository, tag, ref = _names(role, root, recipe, version)
    record_path = _record_path(cache, repository, tag)
    record = _read_record(record_path)
    archive = cache / "archives" / f"{repository}-{tag}.oci.tar"
    if not (record and record.get("key") == key and archive.is_file()):
        return False
    os.utime(record_path)  # used now: keeps it from being pruned
    seconds = record.get("build_seconds", 0.0)
    out[role] = BuiltImage(role, repository, tag, ref, archive, key, archive.stat().st_size,
                           float(seconds) if isinstance(seconds, (int, float)) else 0.0, cached=True)
    return True


def image_tag(role: str, root: Path = ROOT) -> str:
    """The tag ``ensure_image(role)`` gives the tree at ``root`` now (computed; nothing is built)."""
    return _names(role, Path(root).resolve(), base_recipe(), project_version(root))[2]


def ensure_image(role: str, root: Path = ROOT, log: Log | None = None) -> BuiltImage:
    return ensure_images([role], root, log)[role]


# ---------------------------------------------------------------------------------------------------------
# The cluster tier's test image: the master image plus the test evaluators


#: What the test image adds to the master image, under ``TEST_DIR`` (on its PYTHONPATH).
TEST_IMAGE_FILES = ("tests/cluster/__init__.py", "tests/cluster/operator_trials.py",
                    "tests/cluster/testdata/grpc_health_server.py")
TEST_REPOSITORY = "morphml-testworker"
TEST_DIR = "/opt/morphml-tests"


def ensure_test_image(master: BuiltImage, root: Path = ROOT, log: Log | None = None) -> BuiltImage:
    """``morphml-testworker``: the master image (``morphml`` without torch) with ``TEST_IMAGE_FILES``
    under ``TEST_DIR`` and ``PYTHONPATH=TEST_DIR``, so worker pods can run the tests' evaluators
    (``tests.cluster.operator_trials:sleep_epochs``: trials of a known length, no torch) and test
    pods a Python with the tests' helper scripts. Not built from a Dockerfile: ``buildah from`` the
    master's archive, ``copy``, ``config``, ``commit`` (seconds; the archive is the master's size,
    ~130 MB, so it imports in seconds where the worker image takes minutes). Cached like the others,
    keyed by the master's key and the added files."""
    log = log or _stderr
    root = Path(root).resolve()
    cache = cache_dir()
    digest = hashlib.sha256(f"morphml-test-image\0{FORMAT}\0{master.key}\0{TEST_DIR}\0".encode())
    _hash_files(digest, root, [Path(f) for f in TEST_IMAGE_FILES])
    key = digest.hexdigest()
    tag = f"{project_version(root)}-{key[:12]}"
    ref = f"docker.io/library/{TEST_REPOSITORY}:{tag}"
    archive = cache / "archives" / f"{TEST_REPOSITORY}-{tag}.oci.tar"
    record_path = _record_path(cache, TEST_REPOSITORY, tag)
    with _locked(cache):
        record = _read_record(record_path)
        if record and record.get("key") == key and archive.is_file():
            os.utime(record_path)
            return BuiltImage("testworker", TEST_REPOSITORY, tag, ref, archive, key, archive.stat().st_size,
                              0.0, cached=True)
        _ensure_tools(log)
        started = time.monotonic()
        with _no_system_leftovers():
            name = f"morphml-test-{uuid.uuid4().hex[:8]}"
            _buildah(cache, "from", "--pull=never", "--name", name, f"oci-archive:{master.archive}",
                     what=f"buildah from {master.archive}")
            try:
                for rel in TEST_IMAGE_FILES:
                    _buildah(cache, "copy", "--chown", "0:0", name, str(root / rel), f"{TEST_DIR}/{rel}")
                _buildah(cache, "config", "--env", f"PYTHONPATH={TEST_DIR}", "--label", f"{KEY_LABEL}={key}", name)
                _buildah(cache, "commit", "--quiet", name, ref, timeout=600)
            finally:
                subprocess.run(["buildah", *_storage_args(cache), "rm", name], env=_env(cache), capture_output=True,
                               timeout=300, check=False)
            partial = archive.with_name(archive.name + ".partial")
            partial.unlink(missing_ok=True)
            _buildah(cache, "push", "--compression-format", "zstd", "--quiet", ref, f"oci-archive:{partial}:{ref}",
                     what=f"buildah push {ref}")
            partial.rename(archive)
        seconds = time.monotonic() - started
        size = archive.stat().st_size
        record = {"role": "testworker", "repository": TEST_REPOSITORY, "tag": tag, "ref": ref, "archive": archive.name,
                  "key": key, "size_bytes": size, "build_seconds": round(seconds, 1), "built_at": time.time()}
        record_path.with_suffix(".tmp").write_text(json.dumps(record, indent=2) + "\n")
        record_path.with_suffix(".tmp").rename(record_path)
        log(f"morphml: {ref} built and exported in {seconds:.0f} s ({size / 1e6:.0f} MB)")
        return BuiltImage("testworker", TEST_REPOSITORY, tag, ref, archive, key, size, seconds, cached=False)


# ---------------------------------------------------------------------------------------------------------
# Looking inside a built image


def image_config(ref: str) -> dict[str, object]:
    """The OCI image config (``config`` object: User, Entrypoint, Cmd, Env, WorkingDir, Labels ...)."""
    cache = cache_dir()
    done = _buildah(cache, "inspect", "--type", "image", ref, timeout=120)
    return dict(json.loads(done.stdout)["OCIv1"]["config"])


def run_in_image(ref: str, argv: Sequence[str], user: str = "1000:1000", timeout: float = 300,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a throwaway container of ``ref`` as ``user`` (chroot isolation); never raises on exit code."""
    cache = cache_dir()
    name = f"morphml-run-{uuid.uuid4().hex[:8]}"
    with _no_system_leftovers():
        _buildah(cache, "from", "--pull=never", "--quiet", "--name", name, ref, timeout=300)
        try:
            args = ["buildah", *_storage_args(cache), "run", "--isolation", "chroot", "--user", user]
            for key, value in (env or {}).items():
                args += ["--env", f"{key}={value}"]
            return subprocess.run([*args, name, "--", *argv], env=_env(cache), capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        finally:
            subprocess.run(["buildah", *_storage_args(cache), "rm", name], env=_env(cache), capture_output=True,
                           timeout=120, check=False)


def forget(image: BuiltImage) -> None:
    """Delete one image from the cache: its record, its archive and its buildah image."""
    cache = cache_dir()
    with _locked(cache):
        _record_path(cache, image.repository, image.tag).unlink(missing_ok=True)
        image.archive.unlink(missing_ok=True)
        with _no_system_leftovers():
            subprocess.run(["buildah", *_storage_args(cache), "rmi", image.ref], env=_env(cache), capture_output=True,
                           timeout=300, check=False)


def clean(log: Log | None = None) -> None:
    """Delete the whole cache (buildah storage included); mounts under it are released first."""
    log = log or _stderr
    cache = cache_dir()
    if not cache.exists():
        return
    with _locked(cache):
        subprocess.run(["buildah", *_storage_args(cache), "rm", "--all"], env=_env(cache), capture_output=True,
                       timeout=300, check=False)
        # overlay mounts of the storage driver itself
        subprocess.run(["buildah", *_storage_args(cache), "umount", "--all"], env=_env(cache), capture_output=True,
                       timeout=300, check=False)
        for line in Path("/proc/self/mounts").read_text().splitlines():
            target = line.split()[1]
            if target.startswith(str(cache) + "/"):
                subprocess.run(["umount", "-l", target], capture_output=True, timeout=60, check=False)
    shutil.rmtree(cache, ignore_errors=True)
    log(f"morphml: removed {cache}")


def _main(argv: list[str]) -> int:
    command = argv[0] if argv else "build"
    if command == "build":
        for image in ensure_images(argv[1:] or ROLES).values():
            print(json.dumps({**asdict(image), "archive": str(image.archive)}))
        return 0
    if command == "status":
        for path in sorted((cache_dir() / "archives").glob("*.json")):
            print(path.read_text().strip())
        return 0
    if command == "clean":
        clean()
        return 0
    print("usage: python3 -m tests.cluster.images [build [master|worker ...]|status|clean]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
