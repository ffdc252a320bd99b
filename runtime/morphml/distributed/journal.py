"""The master's journal: an SQLite file holding every state change that matters.

Tables: `tasks` (one row per trial, its state and outcome), `attempts` (one row per lease),
`results` (every result received, counted or stale), `events` (append-only audit log:
proposed, leased, adopted, succeeded, failed, retry, requeued with the detection path,
worker_registered, worker_dead, stale_result, stop_decided, phase; with asha/hyperband
rung_result, paused, promoted; with checkpoints resumed, checkpoint_saved, checkpoint_deleted,
checkpoint_fallback), `losses` (every worker loss, numbered 1, 2, 3, ... for good), `curves`
(each trial's learning curve: one row per progress report of
its live attempt, step and metrics), `optimizer_ops` (every ask and tell given to the optimizer, in order,
with its arguments), `optimizer` (a snapshot of the optimizer's state_dict and the last op it
includes), `meta` (schema version, experiment name, phase, best, lease secret).

The optimizer state after any tell is the last snapshot plus a replay of the ops after it:
the ask/tell contract makes optimizers deterministic (same state + same tells in the same order
-> same asks), and the replay checks that every replayed ask returns the journaled candidate
ids. Snapshots are taken every SNAPSHOT_EVERY ops instead of after each tell because a
state_dict grows with the history: writing it per trial made the master O(n^2).

Durability: WAL mode. `synchronous=FULL` (the default) fsyncs the WAL after every commit, so a
committed trial survives a power loss as well as a process kill. The journal does that fsync
itself (SQLite runs with synchronous=NORMAL underneath, which writes the WAL at commit and
fsyncs it before checkpoints): a `deferred_transaction()` lets the coordinator release its lock
before the fsync and acknowledge only after it, and one fsync covers every commit written
before it. `synchronous=NORMAL` skips
that fsync (commits survive a killed master process, the SIGKILL/pod-deletion failure model,
but the last commits may roll back on power loss: those trials then re-run, still counted
once); choose it with `Journal(path, synchronous="NORMAL")` / `morphml master --journal-sync normal`.
Each coordinator operation (or group of results, see the coordinator) is one transaction, so
the journal never holds half a change; its writes are buffered and written at commit.

Schema: `meta.schema_version` says which layout a file has (SCHEMA_VERSION now; a file without
it is version 1, the layout before versions existed). Opening a journal upgrades an older file
in place by running the MIGRATIONS after its version, in order, each in one transaction; a
newer version, a file that is not SQLite, and an SQLite file that is not a journal are refused
with a JournalError naming the file, before anything is written to it. All SQL lives in this
module: everyone else reads through Journal's methods (`Journal.open_read_only(path)` for a file
another process is writing).

Failures: a write that fails (disk full, I/O error, a failed fsync) is fatal to the journal:
the transaction is rolled back, the journal refuses every later transaction with the same
JournalError, and the coordinator that owns it stops (fail-stop, docs/architecture.md).

JSON only (no pickle). Imports: sqlite3, json, morphml.distributed.leases/states.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .leases import Attempt, Task
from .states import AttemptState, TaskState

log = logging.getLogger("morphml.journal")

# The layout of schema version 1 (every release before schema versions): frozen, used by the
# migration to version 2 (a v1 file may lack tables: v1 created them lazily) and by tests.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks(
  task_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, candidate_id TEXT NOT NULL, arch_json TEXT NOT NULL,
  arch_hash TEXT NOT NULL, summary TEXT NOT NULL, generation INTEGER NOT NULL, seed INTEGER NOT NULL,
  proposed_at REAL NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL, retries_used INTEGER NOT NULL,
  avoid_workers TEXT NOT NULL, metrics_json TEXT, error_kind TEXT, error_message TEXT,
  finished_by TEXT, finished_attempt INTEGER, finished_at REAL, duration_seconds REAL);
CREATE TABLE IF NOT EXISTS attempts(
  task_id TEXT NOT NULL, attempt INTEGER NOT NULL, worker_id TEXT NOT NULL, worker_name TEXT NOT NULL,
  leased_at REAL NOT NULL, state TEXT NOT NULL, ended_at REAL, outcome TEXT,
  PRIMARY KEY(task_id, attempt));
CREATE TABLE IF NOT EXISTS results(
  id INTEGER PRIMARY KEY AUTOINCREMENT, received_at REAL NOT NULL, task_id TEXT NOT NULL,
  attempt INTEGER NOT NULL, worker_name TEXT NOT NULL, disposition TEXT NOT NULL, ok INTEGER NOT NULL,
  metrics_json TEXT, failure_kind TEXT, failure_message TEXT, duration_seconds REAL);
CREATE TABLE IF NOT EXISTS events(
  seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL, task_id TEXT,
  attempt INTEGER, worker_id TEXT, worker_name TEXT, detail TEXT);
CREATE TABLE IF NOT EXISTS optimizer(id INTEGER PRIMARY KEY CHECK (id = 1), state_json TEXT NOT NULL,
  saved_at REAL NOT NULL, op_seq INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS optimizer_ops(seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL,
  arg_json TEXT NOT NULL);
"""

SCHEMA_VERSION = 3
V1_TABLES = frozenset({"meta", "tasks", "attempts", "results", "events", "optimizer", "optimizer_ops"})
TABLES = V1_TABLES | {"losses", "curves"}  # the tables of SCHEMA_VERSION
SQLITE_MAGIC = b"SQLite format 3\x00"

TASK_COLUMNS = ("task_id", "seq", "candidate_id", "arch_json", "arch_hash", "summary", "generation", "seed",
                "proposed_at", "state", "attempt", "retries_used", "avoid_workers", "metrics_json", "error_kind",
                "error_message", "finished_by", "finished_attempt", "finished_at", "duration_seconds")
ATTEMPT_COLUMNS = ("task_id", "attempt", "worker_id", "worker_name", "leased_at", "state", "ended_at", "outcome")
RESULT_COLUMNS = ("received_at", "task_id", "attempt", "worker_name", "disposition", "ok", "metrics_json",
                  "failure_kind", "failure_message", "duration_seconds")
EVENT_COLUMNS = ("ts", "kind", "task_id", "attempt", "worker_id", "worker_name", "detail")
LOSS_COLUMNS = ("seq", "worker_id", "worker_name", "detected_by", "detected_at", "requeued_json")
CURVE_COLUMNS = ("task_id", "attempt", "step", "reported_at", "metrics_json")


def _insert(table: str, columns: tuple[str, ...], verb: str = "INSERT") -> str:
    return f"{verb} INTO {table}({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


INSERT_TASK = _insert("tasks", TASK_COLUMNS, "INSERT OR REPLACE")
INSERT_ATTEMPT = _insert("attempts", ATTEMPT_COLUMNS, "INSERT OR REPLACE")
INSERT_RESULT = _insert("results", RESULT_COLUMNS)
INSERT_EVENT = _insert("events", EVENT_COLUMNS)
INSERT_LOSS = _insert("losses", LOSS_COLUMNS)
INSERT_CURVE = _insert("curves", CURVE_COLUMNS, "INSERT OR REPLACE")


class JournalError(RuntimeError):
    """The journal cannot be used: not a journal, an unknown schema version, or a failed write.
    The message names the file."""


def _migrate_1_to_2(db: sqlite3.Connection) -> None:
    """Version 2 numbers worker losses (the `losses` table). Losses a version-1 master saw are in
    its worker_dead events: they get numbers in the order they happened (a clean deregister
    that requeued nothing was never a loss)."""
    for statement in SCHEMA_V1.split(";"):  # executescript would commit the migration's transaction
        if statement.strip():
            db.execute(statement)
    db.execute("CREATE TABLE IF NOT EXISTS losses(seq INTEGER PRIMARY KEY, worker_id TEXT NOT NULL,"
               " worker_name TEXT NOT NULL, detected_by TEXT NOT NULL, detected_at REAL NOT NULL,"
               " requeued_json TEXT NOT NULL)")
    if db.execute("SELECT COUNT(*) FROM losses").fetchone()[0]:
        return
    rows = db.execute("SELECT ts, worker_id, worker_name, detail FROM events WHERE kind = 'worker_dead'"
                      " ORDER BY seq").fetchall()
    losses: list[tuple[int, str, str, str, float, str]] = []
    for ts, worker_id, worker_name, detail in rows:
        info = json.loads(detail) if detail else {}
        requeued = info.get("requeued") or []
        detected_by = info.get("detected_by") or ""
        if detected_by != "deregister" or requeued:
            losses.append((len(losses) + 1, worker_id or "", worker_name or "", detected_by, ts, json.dumps(requeued)))
    db.executemany(INSERT_LOSS, losses)


def _migrate_2_to_3(db: sqlite3.Connection) -> None:
    """Version 3 keeps learning curves (the `curves` table: one row per progress report of a
    trial's live attempt; a report repeated for the same step replaces the earlier one). A
    version-2 master received no progress reports, so there is nothing to back-fill."""
    db.execute("CREATE TABLE IF NOT EXISTS curves(task_id TEXT NOT NULL, attempt INTEGER NOT NULL,"
               " step INTEGER NOT NULL, reported_at REAL NOT NULL, metrics_json TEXT NOT NULL,"
               " PRIMARY KEY(task_id, attempt, step))")


# Migrations as code: MIGRATIONS[v] turns a version-v file into version v + 1, inside one
# transaction. Add one per schema change and bump SCHEMA_VERSION; never edit an old one.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _migrate_1_to_2, 2: _migrate_2_to_3}
assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION)), "one migration per schema version step"

SYNC_MODES = ("FULL", "NORMAL")


def loss_dict(seq: int, worker_id: str, worker_name: str, detected_by: str, detected_at: float,
              requeued_json: str) -> dict:
    """A worker loss as the coordinator's status shows it."""
    return {"seq": seq, "worker_id": worker_id, "worker_name": worker_name, "detected_by": detected_by,
            "detected_at": detected_at, "requeued": [(t, a) for t, a in json.loads(requeued_json)]}


class PendingCommit:
    """A commit from Journal.deferred_transaction(): written, durable only after finish()."""

    def __init__(self, journal: Journal):
        self.journal = journal
        self.commit = 0
        self.callbacks: list = []

    def finish(self) -> None:
        """fsync (shared with concurrent commits), then the transaction's after_commit callbacks."""
        self.journal.sync(self.commit)
        for callback in self.callbacks:
            callback()


class Journal:
    """One SQLite file; all writes go through transaction() (one commit per operation).

    Writes inside a transaction are buffered and written at its commit in one go: upserts of
    the same task, attempt or meta row keep only their last version, appends (results, events,
    optimizer ops) are written in order with one executemany per table. A master spends its
    CPU on this path once per trial, and each SQLite call releases and re-takes the GIL, which
    the master's many RPC threads make expensive. Reads made inside a transaction write the
    buffer first, so they see the transaction's own changes. Callbacks registered with
    after_commit() run once the commit is durable (dropped on rollback): the coordinator sends
    leases that way, so a worker never runs a lease the journal could lose.
    """

    def __init__(self, path: str | Path, synchronous: str = "FULL", read_only: bool = False):
        mode = synchronous.upper()
        if mode not in SYNC_MODES:
            raise ValueError(f"journal synchronous={synchronous!r}: allowed {', '.join(m.lower() for m in SYNC_MODES)}")
        self.path = str(path)
        self.read_only = read_only
        self._failure: JournalError | None = None  # set by the first failed write: fatal
        self._lock = threading.RLock()
        self._depth = 0
        self._begun = False
        self._wal_fd: int | None = None
        self._commits = 0  # commits so far; sync(n) makes the first n durable
        self._synced = 0
        self._sync_lock = threading.Lock()
        self._pending_commit: PendingCommit | None = None
        # Metrics hooks (morphml.distributed.metrics): seconds each outermost commit (buffer write +
        # COMMIT) and each WAL fsync took. Called under the journal's lock: cheap, never back into the journal.
        self.on_commit_seconds: Callable[[float], None] | None = None
        self.on_fsync_seconds: Callable[[float], None] | None = None
        self._next_op_seq = self._op_seq_at_begin = 1
        self._reset_buffer()
        if self.path != ":memory:" and not read_only:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = self._connect()
        try:
            version = self._schema_version()  # reads only: a refused file is left as it was
            if read_only:
                if version != SCHEMA_VERSION:
                    raise JournalError(f"journal {self.path}: schema version {version}, this MorphML reads "
                                       f"{SCHEMA_VERSION}; open it once read-write (e.g. restart the master) "
                                       f"to upgrade it")
                self._own_sync = False
            else:
                wal = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
                # FULL is kept by fsyncing the WAL ourselves after each commit (sync()): SQLite's own FULL
                # would fsync inside COMMIT, which a deferred_transaction() must be able to postpone.
                self._own_sync = mode == "FULL" and wal
                self._db.execute(f"PRAGMA synchronous={'NORMAL' if self._own_sync else mode}")
                self._migrate(version)
            self._next_op_seq = self._max_op_seq() + 1
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def open_read_only(cls, path: str | Path) -> Journal:
        """A journal another process may be writing, opened for reads only (tests, reports)."""
        return cls(path, read_only=True)

    def _connect(self) -> sqlite3.Connection:
        """The SQLite connection, after checking the file starts like an SQLite database."""
        if self.path != ":memory:":
            try:
                with open(self.path, "rb") as fh:
                    head = fh.read(len(SQLITE_MAGIC))
            except FileNotFoundError:
                if self.read_only:
                    raise JournalError(f"journal {self.path}: no such file") from None
                head = b""
            except OSError as exc:
                raise JournalError(f"journal {self.path}: cannot be read: {exc}") from None
            if head and head != SQLITE_MAGIC:
                raise JournalError(f"journal {self.path}: not an SQLite database (it starts with {head!r}); refusing "
                                   f"to open it, nothing was written: move it away or choose another journal path")
        target, uri = self.path, False
        if self.read_only:
            target, uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro", True
        try:
            return sqlite3.connect(target, isolation_level=None, check_same_thread=False, timeout=30, uri=uri)
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: cannot be opened: {exc}") from None

    def _schema_version(self) -> int:
        """The file's schema version (0: empty, a new journal); refuses what is not a journal we
        can read. Only reads."""
        try:
            tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            tables = {t for t in tables if not t.startswith("sqlite_")}
            if not tables:
                return 0
            if not {"meta", "tasks"} <= tables:
                raise JournalError(f"journal {self.path}: an SQLite database but not a MorphML journal (its tables: "
                                   f"{', '.join(sorted(tables))}); refusing to open it, nothing was written: move it "
                                   f"away or choose another journal path")
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"journal {self.path}: cannot be read as an SQLite database ({exc}); refusing to "
                               f"open it, nothing was written: move it away or choose another journal path") from None
        if row is None:
            version = 1  # the layout before schema versions existed
        else:
            try:
                version = int(json.loads(row[0]))
            except (TypeError, ValueError):
                raise JournalError(f"journal {self.path}: meta schema_version={row[0]!r} is not a number") from None
        if version > SCHEMA_VERSION:
            raise JournalError(f"journal {self.path}: schema version {version} is newer than this MorphML knows "
                               f"(it reads versions 1 to {SCHEMA_VERSION}); refusing to open it, nothing was written: "
                               f"use the MorphML release that wrote it, or another journal path")
        if version < 1:
            raise JournalError(f"journal {self.path}: meta schema_version={version}: allowed 1 to {SCHEMA_VERSION}")
        if not tables <= TABLES:
            raise JournalError(f"journal {self.path}: schema version {version} with tables this MorphML does not "
                               f"know ({', '.join(sorted(tables - TABLES))}); refusing to open it, nothing was written")
        return version

    def _migrate(self, version: int) -> None:
        """Brings a version-`version` file (0: empty) to SCHEMA_VERSION, one migration per step,
        each in its own transaction with the new version number."""
        for current in range(max(version, 1), SCHEMA_VERSION):
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                MIGRATIONS[current](db)
                db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                           (json.dumps(current + 1),))
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise JournalError(f"journal {self.path}: upgrading schema version {current} to {current + 1} "
                                   f"failed: {exc}") from None
            if version:
                log.info("journal %s: upgraded schema version %d to %d", self.path, current, current + 1)

    def _reset_buffer(self) -> None:
        self._tasks: dict[str, tuple] = {}
        self._attempts: dict[tuple[str, int], tuple] = {}
        self._meta: dict[str, tuple] = {}
        self._results: list[tuple] = []
        self._events: list[tuple] = []
        self._ops: list[tuple] = []
        self._losses: list[tuple] = []
        self._curves: list[tuple] = []
        self._snapshot: tuple | None = None
        self._after_commit: list = []

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None

    @property
    def failure(self) -> JournalError | None:
        """The error of the first failed write (None while the journal is healthy)."""
        return self._failure

    def _fail(self, what: str, exc: BaseException) -> JournalError:
        """Records a failed write: from now on every transaction is refused with this error.
        A failed fsync cannot be retried (the kernel may have dropped the dirty pages), and
        after a failed commit the caller's memory is ahead of the file: nothing more may be
        built on either."""
        if self._failure is None:
            self._failure = JournalError(f"journal {self.path}: {what} failed: {type(exc).__name__}: {exc}")
            log.critical("%s", self._failure)
        return self._failure

    def _refuse_if_failed(self) -> None:
        if self._failure is not None:
            raise JournalError(str(self._failure)) from self._failure
        if self.read_only:
            raise JournalError(f"journal {self.path}: opened read-only")

    def sync(self, commit: int) -> None:
        """Makes every commit up to number `commit` durable (FULL): one fsync of the WAL, which
        also covers every later commit written by then, so concurrent callers share it."""
        with self._sync_lock:
            self._refuse_if_failed()
            if not self._own_sync or self._synced >= commit:
                return
            target = self._commits  # all of these are written to the WAL already
            try:
                if self._wal_fd is None:
                    self._wal_fd = os.open(self.path + "-wal", os.O_RDONLY)
                    directory = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
                    try:  # the WAL file's own directory entry must survive a power loss too
                        os.fsync(directory)
                    finally:
                        os.close(directory)
                started = time.perf_counter()
                os.fsync(self._wal_fd)
                if self.on_fsync_seconds is not None:
                    self.on_fsync_seconds(time.perf_counter() - started)
            except OSError as exc:
                raise self._fail("fsync of the WAL", exc) from exc
            self._synced = target

    @contextlib.contextmanager
    def deferred_transaction(self) -> Iterator[PendingCommit]:
        """An outermost transaction whose commit is written but not yet durable: the caller runs
        `pending.finish()` (fsync, then the after_commit callbacks) once it has released its own
        locks, so the next transaction can be built while this one's fsync runs. Nothing of it
        may be acknowledged before finish() returns."""
        with self._lock:
            if self._depth:
                raise RuntimeError("deferred_transaction() must be the outermost transaction")
            pending = PendingCommit(self)
            self._pending_commit = pending
            try:
                with self.transaction():
                    yield pending
            finally:
                self._pending_commit = None

    def _rollback(self) -> None:
        self._next_op_seq = self._op_seq_at_begin
        if self._begun:
            self._begun = False
            if not self._db.in_transaction:  # SQLite rolled back itself (e.g. SQLITE_FULL at COMMIT)
                return
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.warning("journal %s: ROLLBACK: %s", self.path, exc)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Nested calls join the outer transaction; the outermost commits. Once a write failed,
        every transaction is refused (see _fail)."""
        with self._lock:
            if self._depth == 0:
                self._refuse_if_failed()
                self._op_seq_at_begin = self._next_op_seq  # a rollback gives its op numbers back
            self._depth += 1
            try:
                yield
            except BaseException as exc:
                self._depth -= 1
                if self._depth == 0:
                    self._reset_buffer()  # its after_commit callbacks are dropped with it
                    self._rollback()
                    if isinstance(exc, (sqlite3.Error, OSError)):  # a read's flush of the buffer failed
                        raise self._fail("a write", exc) from exc
                raise
            self._depth -= 1
            if self._depth == 0:
                callbacks = self._after_commit
                started = time.perf_counter()
                try:
                    self._write_buffer()
                    if self._begun:
                        self._db.execute("COMMIT")
                        self._begun = False
                        self._commits += 1
                        if self.on_commit_seconds is not None:
                            self.on_commit_seconds(time.perf_counter() - started)
                except (sqlite3.Error, OSError) as exc:
                    self._rollback()
                    raise self._fail("commit", exc) from exc
                finally:
                    self._begun = False
                    self._reset_buffer()
                pending = self._pending_commit
                if pending is not None:  # deferred: the caller syncs and runs the callbacks
                    pending.commit, pending.callbacks = self._commits, callbacks
                    return
                self.sync(self._commits)
                for callback in callbacks:
                    callback()

    def _joined(self) -> bool:
        """True when this thread is inside a transaction: a write then just adds to its buffer
        (the common case, and cheaper than entering transaction() once more per row)."""
        return self._depth > 0 and self._lock._is_owned()  # type: ignore[attr-defined]

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Runs callback() after the current transaction commits (at once outside one)."""
        with self._lock:
            if self._depth == 0:
                callback()
            else:
                self._after_commit.append(callback)

    def _write_buffer(self) -> None:
        """Writes the buffered changes into the open SQLite transaction (beginning it if needed)."""
        if not (self._tasks or self._attempts or self._meta or self._results or self._events or self._ops
                or self._losses or self._curves or self._snapshot):
            return
        db = self._db
        if not self._begun:
            db.execute("BEGIN IMMEDIATE")
            self._begun = True
        if self._tasks:
            db.executemany(INSERT_TASK, list(self._tasks.values()))
        if self._attempts:
            db.executemany(INSERT_ATTEMPT, list(self._attempts.values()))
        if self._meta:
            db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", list(self._meta.values()))
        if self._results:
            db.executemany(INSERT_RESULT, self._results)
        if self._events:
            db.executemany(INSERT_EVENT, self._events)
        if self._ops:
            db.executemany("INSERT INTO optimizer_ops(seq, op, arg_json) VALUES (?, ?, ?)", self._ops)
        if self._losses:
            db.executemany(INSERT_LOSS, self._losses)
        if self._curves:
            db.executemany(INSERT_CURVE, self._curves)
        if self._snapshot:
            db.execute("INSERT OR REPLACE INTO optimizer(id, state_json, saved_at, op_seq) VALUES (1, ?, ?, ?)",
                       self._snapshot)
        callbacks = self._after_commit
        self._reset_buffer()
        self._after_commit = callbacks

    # --- writes --------------------------------------------------------------------------------
    # The buffer is looked up by name once inside the transaction: a commit replaces it.
    def _upsert(self, table: str, key: Any, row: tuple) -> None:
        if self._joined():
            getattr(self, table)[key] = row
        else:
            with self.transaction():
                getattr(self, table)[key] = row

    def _append(self, table: str, row: tuple) -> None:
        if self._joined():
            getattr(self, table).append(row)
        else:
            with self.transaction():
                getattr(self, table).append(row)

    def set_meta(self, key: str, value: Any) -> None:
        with self.transaction():
            self._meta[key] = (key, json.dumps(value))

    def save_task(self, task: Task, seq: int) -> None:
        row = (task.task_id, seq, task.candidate_id, task.arch_json, task.arch_hash, task.summary,
               task.generation, task.seed, task.proposed_at, task.state.value, task.attempt,
               task.retries_used, json.dumps(sorted(task.avoid_workers)) if task.avoid_workers else "[]",
               json.dumps(task.metrics) if task.metrics is not None else None,
               task.error_kind, task.error_message, task.finished_by, task.finished_attempt,
               task.finished_at, task.duration_seconds)
        self._upsert("_tasks", task.task_id, row)

    def save_attempt(self, att: Attempt) -> None:
        row = (att.task_id, att.attempt, att.worker_id, att.worker_name, att.leased_at, att.state.value,
               att.ended_at, att.outcome)
        self._upsert("_attempts", (att.task_id, att.attempt), row)

    def add_result(self, received_at: float, task_id: str, attempt: int, worker_name: str, disposition: str,
                   ok: bool, metrics: dict | None, kind: str, message: str, duration: float) -> None:
        self._append("_results", (received_at, task_id, attempt, worker_name, disposition, int(ok),
                                  json.dumps(metrics) if metrics is not None else None, kind, message, duration))

    def event(self, ts: float, kind: str, task_id: str | None = None, attempt: int | None = None,
              worker_id: str | None = None, worker_name: str | None = None, **detail: Any) -> None:
        self._append("_events", (ts, kind, task_id, attempt, worker_id, worker_name,
                                 json.dumps(detail) if detail else None))

    def add_loss(self, seq: int, worker_id: str, worker_name: str, detected_by: str, detected_at: float,
                 requeued: list[tuple[str, int]]) -> None:
        """Journals worker loss number `seq` (1, 2, 3, ...: the caller numbers them, see last_loss_seq)."""
        self._append("_losses", (seq, worker_id, worker_name, detected_by, detected_at,
                                 json.dumps([list(r) for r in requeued])))

    def add_curve_point(self, task_id: str, attempt: int, step: int, reported_at: float, metrics: dict) -> None:
        """Journals one progress report of a trial's live attempt (the same step again replaces it)."""
        self._append("_curves", (task_id, attempt, step, reported_at, json.dumps(metrics)))

    def log_optimizer_op(self, op: str, arg: dict) -> int:
        """Appends one ask or tell to the optimizer's operation log; returns its sequence number."""
        with self.transaction():
            seq = self._next_op_seq
            self._next_op_seq += 1
            self._ops.append((seq, op, json.dumps(arg)))
            return seq

    def save_optimizer(self, state: dict | str, saved_at: float, op_seq: int) -> None:
        """Snapshot of the optimizer's state_dict (or its JSON text) including every logged op up
        to op_seq."""
        with self.transaction():
            self._snapshot = (state if isinstance(state, str) else json.dumps(state), saved_at, op_seq)

    # --- reads ---------------------------------------------------------------------------------
    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of one SELECT, seeing the current transaction's own buffered writes."""
        with self._lock:
            if self._depth:
                self._write_buffer()
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise JournalError(f"journal {self.path}: reading failed: {type(exc).__name__}: {exc}") from exc

    def schema_version(self) -> int:
        rows = self._read("SELECT value FROM meta WHERE key = 'schema_version'")
        return int(json.loads(rows[0][0])) if rows else 1

    def get_meta(self, key: str, default: Any = None) -> Any:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def load_optimizer(self) -> tuple[dict | None, int]:
        """(last snapshot or None, op_seq it includes)."""
        rows = self._read("SELECT state_json, op_seq FROM optimizer WHERE id = 1")
        return (json.loads(rows[0][0]), rows[0][1]) if rows else (None, 0)

    def optimizer_ops_after(self, seq: int) -> list[tuple[int, str, dict]]:
        rows = self._read("SELECT seq, op, arg_json FROM optimizer_ops WHERE seq > ? ORDER BY seq", (seq,))
        return [(r[0], r[1], json.loads(r[2])) for r in rows]

    def _max_op_seq(self) -> int:
        return int(self._read("SELECT COALESCE(MAX(seq), 0) FROM optimizer_ops")[0][0])

    def load_tasks(self, states: tuple[TaskState, ...] | None = None) -> list[Task]:
        """Every task (or those in `states`) in proposal order."""
        sql = f"SELECT {', '.join(TASK_COLUMNS)} FROM tasks"
        params: tuple = ()
        if states:
            sql += f" WHERE state IN ({', '.join('?' * len(states))})"
            params = tuple(s.value for s in states)
        tasks = []
        for r in self._read(sql + " ORDER BY seq", params):
            row = dict(zip(TASK_COLUMNS, r, strict=True))
            tasks.append(Task(
                task_id=row["task_id"], candidate_id=row["candidate_id"], arch_json=row["arch_json"],
                arch_hash=row["arch_hash"], summary=row["summary"], generation=row["generation"], seed=row["seed"],
                proposed_at=row["proposed_at"], state=TaskState(row["state"]), attempt=row["attempt"],
                retries_used=row["retries_used"], avoid_workers=set(json.loads(row["avoid_workers"])),
                metrics=json.loads(row["metrics_json"]) if row["metrics_json"] else None,
                error_kind=row["error_kind"] or "", error_message=row["error_message"] or "",
                finished_by=row["finished_by"] or "", finished_attempt=row["finished_attempt"] or 0,
                finished_at=row["finished_at"], duration_seconds=row["duration_seconds"] or 0.0))
        return tasks

    def load_attempts(self, task_id: str | None = None) -> list[Attempt]:
        """Every attempt (or one task's) in lease order."""
        sql = f"SELECT {', '.join(ATTEMPT_COLUMNS)} FROM attempts"
        params: tuple = ()
        if task_id is not None:
            sql, params = sql + " WHERE task_id = ?", (task_id,)
        out = []
        for r in self._read(sql + " ORDER BY leased_at, attempt", params):
            row = dict(zip(ATTEMPT_COLUMNS, r, strict=True))
            out.append(Attempt(task_id=row["task_id"], attempt=row["attempt"], worker_id=row["worker_id"],
                               worker_name=row["worker_name"], leased_at=row["leased_at"],
                               state=AttemptState(row["state"]), ended_at=row["ended_at"],
                               outcome=row["outcome"] or ""))
        return out

    def results(self, disposition: str | None = None) -> list[dict]:
        """Every result received (or those with one disposition), in arrival order."""
        sql = f"SELECT id, {', '.join(RESULT_COLUMNS)} FROM results"
        params: tuple = ()
        if disposition is not None:
            sql, params = sql + " WHERE disposition = ?", (disposition,)
        out = []
        for r in self._read(sql + " ORDER BY id", params):
            row = dict(zip(("id",) + RESULT_COLUMNS, r, strict=True))
            row["ok"] = bool(row["ok"])
            row["metrics"] = json.loads(row.pop("metrics_json")) if row["metrics_json"] else None
            out.append(row)
        return out

    def count_results(self, disposition: str) -> int:
        return int(self._read("SELECT COUNT(*) FROM results WHERE disposition = ?", (disposition,))[0][0])

    def count_results_by_disposition(self) -> dict[str, int]:
        """{disposition: number of results received with it} over the whole journal."""
        return {str(d): int(n) for d, n in self._read("SELECT disposition, COUNT(*) FROM results GROUP BY disposition")}

    def count_losses_by_reason(self) -> dict[str, int]:
        """{detected_by: number of worker losses detected that way} over the whole journal."""
        return {str(d): int(n) for d, n in self._read("SELECT detected_by, COUNT(*) FROM losses GROUP BY detected_by")}

    def count_events(self, kind: str) -> int:
        return int(self._read("SELECT COUNT(*) FROM events WHERE kind = ?", (kind,))[0][0])

    def last_loss_seq(self) -> int:
        """Number of the latest journaled worker loss (0: none yet)."""
        return int(self._read("SELECT COALESCE(MAX(seq), 0) FROM losses")[0][0])

    def losses(self, after_seq: int = 0, limit: int = 500, latest: int | None = None) -> list[dict]:
        """Worker losses, oldest first: those numbered after `after_seq` (at most `limit`), or with
        `latest`, the last `latest` of them."""
        columns = ", ".join(LOSS_COLUMNS)
        if latest is not None:
            rows = self._read(f"SELECT {columns} FROM losses ORDER BY seq DESC LIMIT ?", (latest,))
            rows.reverse()
        else:
            rows = self._read(f"SELECT {columns} FROM losses WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit))
        return [loss_dict(*row) for row in rows]

    def curves(self, task_id: str | None = None) -> list[dict]:
        """Learning-curve points ({task_id, attempt, step, reported_at, metrics}) of every trial (or
        one), by trial, then attempt and step."""
        sql = f"SELECT {', '.join(CURVE_COLUMNS)} FROM curves"
        params: tuple = ()
        if task_id is not None:
            sql, params = sql + " WHERE task_id = ?", (task_id,)
        out = []
        for r in self._read(sql + " ORDER BY task_id, attempt, step", params):
            row = dict(zip(CURVE_COLUMNS, r, strict=True))
            row["metrics"] = json.loads(row.pop("metrics_json"))
            out.append(row)
        return out

    def curve_steps(self) -> dict[str, int]:
        """{task id: the highest step its curve reached} for every trial with a curve."""
        return {str(t): int(n) for t, n in self._read("SELECT task_id, MAX(step) FROM curves GROUP BY task_id")}

    def events(self, kind: str | tuple[str, ...] | None = None) -> list[dict]:
        """Events (of one kind, or of several kinds interleaved) in the order they were journaled."""
        sql = "SELECT seq, ts, kind, task_id, attempt, worker_id, worker_name, detail FROM events"
        params: tuple = ()
        if isinstance(kind, tuple):
            sql += f" WHERE kind IN ({', '.join('?' * len(kind))})"
            params = kind
        elif kind:
            sql += " WHERE kind = ?"
            params = (kind,)
        out = []
        for r in self._read(sql + " ORDER BY seq", params):
            out.append({"seq": r[0], "ts": r[1], "kind": r[2], "task_id": r[3], "attempt": r[4],
                        "worker_id": r[5], "worker_name": r[6], "detail": json.loads(r[7]) if r[7] else {}})
        return out
