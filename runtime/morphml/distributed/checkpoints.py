"""Checkpoint references, artifact settings and the artifact store (issue 12).

What lives here:

- `CheckpointRef`: what the journal and a lease say about one stored checkpoint (task, epoch,
  store key, sha256, size, the architecture it belongs to).
- `checkpoint_key(task_id, epoch)`: the one naming rule, "checkpoints/<task_id>/epoch-<NNNN>.pt".
- `ArtifactSettings`: spec.artifacts (checkpointIntervalEpochs, keep, s3), validated by
  `from_spec` with errors naming the field.
- `ArtifactStore`: the protocol every store implements (`LocalStore` here, beside the journal on
  the master's volume; `S3Store` in `morphml.distributed.s3store`), and `make_store`.
- `validate_key`: keys are store-relative paths of `[A-Za-z0-9._/-]`, never absolute, never `..`.
- `write_best`: the finished experiment's best/ folder (architecture.json, metrics.json, model.pt)
  beside the journal.

The file format of a checkpoint (torch tensors) is not known here: the worker side writes and
reads it (`morphml.evaluation.checkpoint_file`); the master only stores bytes, checks their
sha256 and size, and journals the reference.

Imports: the standard library only (no grpc, no torch; `s3store` is imported lazily by
`make_store` when spec.artifacts.s3 is set).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

ARTIFACTS_FIELD = "spec.artifacts"
KEEP_CHOICES = ("best", "all")
CHECKPOINTS_PREFIX = "checkpoints"
_KEY_RE = re.compile(r"^[A-Za-z0-9._/-]+$")


@dataclass(frozen=True)
class CheckpointRef:
    """One stored checkpoint of a trial, as journaled (`checkpoint_saved`) and leased."""

    task_id: str
    epoch: int
    key: str  # store-relative: "checkpoints/<task_id>/epoch-<NNNN>.pt"
    sha256: str  # hex of the file's bytes
    size: int  # bytes
    arch_hash: str  # the task's arch_hash: a checkpoint of another architecture is refused


def validate_key(key: str) -> str:
    """Return `key` if it is a safe store-relative path, else ValueError naming it.

    Allowed: `[A-Za-z0-9._/-]`, not absolute, no empty, `.` or `..` segment. A key is joined to
    the store root (a directory, an S3 prefix), so this is what keeps it inside."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"artifact key {key!r}: must be a non-empty string")
    if not _KEY_RE.match(key):
        raise ValueError(f"artifact key {key!r}: only letters, digits and . _ / - are allowed")
    if key.startswith("/"):
        raise ValueError(f"artifact key {key!r}: must be relative (no leading /)")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"artifact key {key!r}: empty, '.' and '..' segments are not allowed")
    return key


def checkpoint_key(task_id: str, epoch: int, attempt: int = 0) -> str:
    """The store key of task `task_id`'s checkpoint after `epoch` epochs:
    "checkpoints/<task_id>/epoch-<NNNN>.pt", or with `attempt` (what the master stores uploads
    under) "checkpoints/<task_id>/epoch-<NNNN>.a<attempt>.pt": two attempts of a trial can save
    the same epoch (a fallback to epoch 0, a zombie worker), and a journaled file must never be
    overwritten by another one."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"checkpoint epoch {epoch!r}: must be an integer >= 0")
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
        raise ValueError(f"checkpoint attempt {attempt!r}: must be an integer >= 0")
    suffix = f".a{attempt}" if attempt else ""
    return validate_key(f"{CHECKPOINTS_PREFIX}/{task_id}/epoch-{epoch:04d}{suffix}.pt")


@dataclass(frozen=True)
class ArtifactSettings:
    """spec.artifacts, validated."""

    # spec.artifacts.checkpointIntervalEpochs: with scheduler none/median, save every N epochs
    # (and always after the last); 0 = no checkpoints. ASHA/Hyperband save at every rung anyway.
    checkpoint_interval: int = 1
    # spec.artifacts.keep: "best" (the best trial's final + each live trial's latest) | "all".
    keep: str = "best"
    # spec.artifacts.s3 (a morphml.distributed.s3store.S3Settings); None = the master's volume.
    s3: Any = None

    @classmethod
    def from_spec(cls, spec: Any) -> ArtifactSettings:
        """From the manifest's spec.artifacts (absent/None: the defaults). Raises ValueError
        naming spec.artifacts.<field> and what is allowed."""
        if spec is None:
            return cls()
        if not isinstance(spec, Mapping):
            raise ValueError(f"{ARTIFACTS_FIELD}: must be an object, got {type(spec).__name__}")
        allowed = ("checkpointIntervalEpochs", "keep", "s3")
        unknown = sorted(set(spec) - set(allowed))
        if unknown:
            raise ValueError(f"{ARTIFACTS_FIELD}: unknown field(s) {', '.join(unknown)}; "
                             f"allowed {', '.join(allowed)}")
        interval = spec.get("checkpointIntervalEpochs", cls.checkpoint_interval)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
            raise ValueError(f"{ARTIFACTS_FIELD}.checkpointIntervalEpochs={interval!r}: "
                             f"must be an integer >= 0 (0 = no checkpoints)")
        keep = spec.get("keep", cls.keep)
        if keep not in KEEP_CHOICES:
            raise ValueError(f"{ARTIFACTS_FIELD}.keep={keep!r}: allowed {', '.join(KEEP_CHOICES)}")
        s3 = None
        if spec.get("s3") is not None:
            # Imported when used: boto3 is needed only by an experiment that asks for S3.
            s3 = importlib.import_module("morphml.distributed.s3store").S3Settings.from_spec(spec["s3"])
        return cls(checkpoint_interval=interval, keep=keep, s3=s3)


class ArtifactStore(Protocol):
    """Where checkpoints and the best model's files live. Keys are `validate_key`-checked."""

    def put_file(self, key: str, path: Path) -> None:
        """Store `path`'s bytes under `key`; durable when it returns."""

    def open_chunks(self, key: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The bytes under `key`, in chunks of at most `chunk`; KeyError if missing."""

    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is fine."""

    def exists(self, key: str) -> bool: ...

    def describe(self) -> str:
        """For status and logs: "local <dir>" or "s3://bucket/prefix"."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    """Files under `root` (the journal's directory on the master's volume).

    `put_file` copies to a temporary file in the target's directory, fsyncs it, renames it over
    the key and fsyncs the directory: after it returns the file is whole and survives a crash,
    and a reader never sees a half-written file under the key."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def put_file(self, key: str, path: Path) -> None:
        target = self.path(key)
        created: list[Path] = []
        parent = target.parent
        while not parent.exists():
            created.append(parent)
            parent = parent.parent
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                while True:
                    block = src.read(1 << 20)
                    if not block:
                        break
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        _fsync_dir(target.parent)
        # New directories must be durable in their parents too.
        for made in reversed(created):
            _fsync_dir(made.parent)

    def open_chunks(self, key: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        target = self.path(key)
        try:
            # Opened here, not in the generator, so a missing key is a KeyError at the call;
            # the generator closes it.
            handle = open(target, "rb")  # noqa: SIM115
        except FileNotFoundError:
            raise KeyError(key) from None
        return _chunks(handle, chunk)

    def delete(self, key: str) -> None:
        target = self.path(key)
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
            _fsync_dir(target.parent)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def describe(self) -> str:
        return f"local {self.root}"


def _chunks(handle: Any, chunk: int) -> Iterator[bytes]:
    with handle:
        while True:
            block = handle.read(chunk)
            if not block:
                return
            yield block


def make_store(settings: ArtifactSettings, root: Path | str) -> ArtifactStore:
    """The store spec.artifacts asks for: S3 when `settings.s3` is set, else files under `root`
    (the journal's directory)."""
    if settings.s3 is not None:
        store: ArtifactStore = importlib.import_module("morphml.distributed.s3store").S3Store(settings.s3)
        return store
    return LocalStore(root)


# --------------------------------------------------------------------------- the best model out

BEST_DIR = "best"


def write_atomic(path: Path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file beside it (fsynced, then renamed over
    `path`): a reader sees the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def write_best(out_dir: Path | str, best: Mapping[str, Any] | None, store: ArtifactStore | None,
               metric: str = "val_accuracy") -> list[str]:
    """Writes the finished experiment's best trial into `out_dir`/best/ (beside the journal):
    architecture.json (the canonical architecture), metrics.json ({"trial_id", "metric", "value",
    "checkpoint", "metrics"}) and, when the trial has a final checkpoint in `store`, model.pt: that
    checkpoint file as stored (a torch file of tensors whose "model" entry is the state dict;
    `morphml.evaluation.load_model` reads it). `best` is `status()["best"]` (None: nothing is
    written). Each file is written whole or not at all. Returns the keys written ("best/...")."""
    if not best:
        return []
    folder = Path(out_dir) / BEST_DIR
    folder.mkdir(parents=True, exist_ok=True)
    arch = best.get("arch_json") or "{}"
    arch_doc = json.loads(arch) if isinstance(arch, str) else arch
    written = []
    key = str(best.get("checkpoint") or "")
    if key and store is not None:
        try:
            chunks = store.open_chunks(validate_key(key))
        except (KeyError, ValueError):
            chunks = None
        if chunks is not None:
            tmp = folder / ".model.pt.tmp"
            with open(tmp, "wb") as out:
                for block in chunks:
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, folder / "model.pt")
            written.append(f"{BEST_DIR}/model.pt")
    stale = folder / "model.pt"
    if f"{BEST_DIR}/model.pt" not in written and stale.exists():
        stale.unlink()  # a model of an earlier best would not match architecture.json
    write_atomic(folder / "architecture.json", (json.dumps(arch_doc, indent=2, sort_keys=True) + "\n").encode())
    doc = {"trial_id": best.get("trial_id"), "metric": metric, "value": best.get("metric"),
           "checkpoint": key or None, "metrics": best.get("metrics") or {}}
    write_atomic(folder / "metrics.json", (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    written += [f"{BEST_DIR}/architecture.json", f"{BEST_DIR}/metrics.json"]
    _fsync_dir(folder)
    return written
