"""The master's journal: an SQLite file holding every state change that matters.

Tables: `tasks` (one row per trial, its state and outcome), `attempts` (one row per lease),
`results` (every result received, counted or stale), `events` (append-only audit log:
proposed, leased, adopted, succeeded, failed, retry, requeued with the detection path,
worker_registered, worker_dead, stale_result, phase), `optimizer_ops` (every ask and tell
given to the optimizer, in order, with its arguments), `optimizer` (a snapshot of the
optimizer's state_dict and the last op it includes), `meta` (experiment name, phase, best).

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

JSON only (no pickle). Imports: sqlite3, json, morphml.distributed.leases/states.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator

from .leases import Attempt, Task
from .states import AttemptState, TaskState

SCHEMA = """
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
CREATE TABLE IF NOT EXISTS losses(
  seq INTEGER PRIMARY KEY, worker_id TEXT NOT NULL, worker_name TEXT NOT NULL, detected_by TEXT NOT NULL,
  detected_at REAL NOT NULL, requeued_json TEXT NOT NULL);
"""

SYNC_MODES = ("FULL", "NORMAL")


def loss_dict(seq: int, worker_id: str, worker_name: str, detected_by: str, detected_at: float,
              requeued_json: str) -> dict:
    """A worker loss as the coordinator's status shows it."""
    return {"seq": seq, "worker_id": worker_id, "worker_name": worker_name, "detected_by": detected_by,
            "detected_at": detected_at, "requeued": [(t, a) for t, a in json.loads(requeued_json)]}


class PendingCommit:
    """A commit from Journal.deferred_transaction(): written, durable only after finish()."""

    def __init__(self, journal: "Journal"):
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

    def __init__(self, path: str | Path, synchronous: str = "FULL"):
        mode = synchronous.upper()
        if mode not in SYNC_MODES:
            raise ValueError(f"journal synchronous={synchronous!r}: allowed {', '.join(m.lower() for m in SYNC_MODES)}")
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        wal = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        # FULL is kept by fsyncing the WAL ourselves after each commit (sync()): SQLite's own FULL
        # would fsync inside COMMIT, which a deferred_transaction() must be able to postpone.
        self._own_sync = mode == "FULL" and wal
        self._db.execute(f"PRAGMA synchronous={'NORMAL' if self._own_sync else mode}")
        self._wal_fd: int | None = None
        self._commits = 0  # commits so far; sync(n) makes the first n durable
        self._synced = 0
        self._sync_lock = threading.Lock()
        self._pending_commit: PendingCommit | None = None
        self._db.executescript(SCHEMA)
        self._lock = threading.RLock()
        self._depth = 0
        self._begun = False
        self._reset_buffer()
        self._next_op_seq = self._max_op_seq() + 1

    def _max_op_seq(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM optimizer_ops").fetchone()[0])

    def _reset_buffer(self) -> None:
        self._tasks: dict[str, tuple] = {}
        self._attempts: dict[tuple[str, int], tuple] = {}
        self._meta: dict[str, tuple] = {}
        self._results: list[tuple] = []
        self._events: list[tuple] = []
        self._ops: list[tuple] = []
        self._losses: list[tuple] = []
        self._snapshot: tuple | None = None
        self._after_commit: list = []

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None

    def sync(self, commit: int) -> None:
        """Makes every commit up to number `commit` durable (FULL): one fsync of the WAL, which
        also covers every later commit written by then, so concurrent callers share it."""
        if not self._own_sync:
            return
        with self._sync_lock:
            if self._synced >= commit:
                return
            target = self._commits  # all of these are written to the WAL already
            if self._wal_fd is None:
                self._wal_fd = os.open(self.path + "-wal", os.O_RDONLY)
                directory = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
                try:  # the WAL file's own directory entry must survive a power loss too
                    os.fsync(directory)
                finally:
                    os.close(directory)
            os.fsync(self._wal_fd)
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

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Nested calls join the outer transaction; the outermost commits."""
        with self._lock:
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if self._depth == 0:
                    self._reset_buffer()  # its after_commit callbacks are dropped with it
                    if self._begun:
                        self._begun = False
                        self._db.execute("ROLLBACK")
                    self._next_op_seq = self._max_op_seq() + 1
                raise
            self._depth -= 1
            if self._depth == 0:
                callbacks = self._after_commit
                try:
                    self._write_buffer()
                    if self._begun:
                        self._db.execute("COMMIT")
                        self._commits += 1
                except BaseException:
                    if self._begun:
                        self._db.execute("ROLLBACK")
                    self._next_op_seq = self._max_op_seq() + 1
                    raise
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
        return self._depth > 0 and self._lock._is_owned()

    def after_commit(self, callback) -> None:
        """Runs callback() after the current transaction commits (at once outside one)."""
        with self._lock:
            if self._depth == 0:
                callback()
            else:
                self._after_commit.append(callback)

    def _write_buffer(self) -> None:
        """Writes the buffered changes into the open SQLite transaction (beginning it if needed)."""
        if not (self._tasks or self._attempts or self._meta or self._results or self._events or self._ops
                or self._losses or self._snapshot):
            return
        db = self._db
        if not self._begun:
            db.execute("BEGIN IMMEDIATE")
            self._begun = True
        if self._tasks:
            db.executemany("INSERT OR REPLACE INTO tasks VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                           list(self._tasks.values()))
        if self._attempts:
            db.executemany("INSERT OR REPLACE INTO attempts VALUES (?,?,?,?,?,?,?,?)", list(self._attempts.values()))
        if self._meta:
            db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", list(self._meta.values()))
        if self._results:
            db.executemany(
                "INSERT INTO results(received_at, task_id, attempt, worker_name, disposition, ok, metrics_json,"
                " failure_kind, failure_message, duration_seconds) VALUES (?,?,?,?,?,?,?,?,?,?)", self._results)
        if self._events:
            db.executemany(
                "INSERT INTO events(ts, kind, task_id, attempt, worker_id, worker_name, detail) VALUES (?,?,?,?,?,?,?)",
                self._events)
        if self._ops:
            db.executemany("INSERT INTO optimizer_ops(seq, op, arg_json) VALUES (?, ?, ?)", self._ops)
        if self._losses:
            db.executemany("INSERT INTO losses(seq, worker_id, worker_name, detected_by, detected_at, requeued_json)"
                           " VALUES (?, ?, ?, ?, ?, ?)", self._losses)
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

    def _flush_for_read(self) -> None:
        if self._depth:
            self._write_buffer()

    # --- reads ---------------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        with self._lock:
            self._flush_for_read()
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def load_optimizer(self) -> tuple[dict | None, int]:
        """(last snapshot or None, op_seq it includes)."""
        with self._lock:
            self._flush_for_read()
            row = self._db.execute("SELECT state_json, op_seq FROM optimizer WHERE id = 1").fetchone()
        return (json.loads(row[0]), row[1]) if row else (None, 0)

    def optimizer_ops_after(self, seq: int) -> list[tuple[int, str, dict]]:
        with self._lock:
            self._flush_for_read()
            rows = self._db.execute("SELECT seq, op, arg_json FROM optimizer_ops WHERE seq > ? ORDER BY seq",
                                    (seq,)).fetchall()
        return [(r[0], r[1], json.loads(r[2])) for r in rows]

    def load_tasks(self) -> list[Task]:
        with self._lock:
            self._flush_for_read()
            rows = self._db.execute("SELECT * FROM tasks ORDER BY seq").fetchall()
        tasks = []
        for r in rows:
            tasks.append(Task(
                task_id=r[0], candidate_id=r[2], arch_json=r[3], arch_hash=r[4], summary=r[5], generation=r[6],
                seed=r[7], proposed_at=r[8], state=TaskState(r[9]), attempt=r[10], retries_used=r[11],
                avoid_workers=set(json.loads(r[12])), metrics=json.loads(r[13]) if r[13] else None,
                error_kind=r[14] or "", error_message=r[15] or "", finished_by=r[16] or "",
                finished_attempt=r[17] or 0, finished_at=r[18], duration_seconds=r[19] or 0.0))
        return tasks

    def load_attempts(self) -> list[Attempt]:
        with self._lock:
            self._flush_for_read()
            rows = self._db.execute("SELECT * FROM attempts ORDER BY leased_at").fetchall()
        return [Attempt(task_id=r[0], attempt=r[1], worker_id=r[2], worker_name=r[3], leased_at=r[4],
                        state=AttemptState(r[5]), ended_at=r[6], outcome=r[7] or "") for r in rows]

    def last_loss_seq(self) -> int:
        """Number of the latest journaled worker loss (0: none yet)."""
        with self._lock:
            self._flush_for_read()
            return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM losses").fetchone()[0])

    def losses(self, after_seq: int = 0, limit: int = 500, latest: int | None = None) -> list[dict]:
        """Worker losses, oldest first: those numbered after `after_seq` (at most `limit`), or with
        `latest`, the last `latest` of them."""
        columns = "seq, worker_id, worker_name, detected_by, detected_at, requeued_json"
        with self._lock:
            self._flush_for_read()
            if latest is not None:
                rows = self._db.execute(f"SELECT {columns} FROM losses ORDER BY seq DESC LIMIT ?", (latest,)).fetchall()
                rows.reverse()
            else:
                rows = self._db.execute(f"SELECT {columns} FROM losses WHERE seq > ? ORDER BY seq LIMIT ?",
                                        (after_seq, limit)).fetchall()
        return [loss_dict(*row) for row in rows]

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Read-only SQL for reports and tests."""
        with self._lock:
            self._flush_for_read()
            return self._db.execute(sql, params).fetchall()

    def events(self, kind: str | None = None) -> list[dict]:
        sql = "SELECT seq, ts, kind, task_id, attempt, worker_id, worker_name, detail FROM events"
        params: tuple = ()
        if kind:
            sql += " WHERE kind = ?"
            params = (kind,)
        out = []
        for r in self.query(sql + " ORDER BY seq", params):
            out.append({"seq": r[0], "ts": r[1], "kind": r[2], "task_id": r[3], "attempt": r[4],
                        "worker_id": r[5], "worker_name": r[6], "detail": json.loads(r[7]) if r[7] else {}})
        return out
