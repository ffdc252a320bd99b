"""Unit tests: fail-stop. A journal write that fails (disk full at COMMIT, a failed fsync) halts
the coordinator: nothing of the failed change is sent (no lease, no ack, no shutdown), nothing
it changed in memory is served, every later call is refused with the same error naming the
file, and a coordinator restarted on the file resumes from what was committed."""

from __future__ import annotations

import os
import sqlite3
import time

import grpc
import pytest

from morphml.distributed.clock import ManualClock
from morphml.distributed.coordinator import ExperimentCoordinator, ExperimentSettings
from morphml.distributed.journal import Journal, JournalError
from test_leases_coordinator import CountingOptimizer, join, leases

pytestmark = pytest.mark.unit

DISK_FULL = "database or disk is full"


class FailingCommits:
    """The journal's sqlite3 connection, except that COMMIT fails the way SQLite's does when the
    disk is full (SQLITE_FULL). Everything else goes to the real connection."""

    def __init__(self, real: sqlite3.Connection):
        self.real = real
        self.commits_refused = 0

    def execute(self, sql: str, *args):
        if sql.strip().upper() == "COMMIT":
            self.commits_refused += 1
            raise sqlite3.OperationalError(DISK_FULL)
        return self.real.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.real, name)


def make(path, optimizer=None, max_trials=3, clock=None):
    settings = ExperimentSettings(max_trials=max_trials, heartbeat_interval=1.0, missed_heartbeats=3)
    return ExperimentCoordinator(optimizer or CountingOptimizer(), settings, Journal(path), clock or ManualClock())


def test_a_commit_that_fails_halts_the_coordinator_and_nothing_of_it_leaves_or_is_served(tmp_path):
    path = tmp_path / "j.db"
    coord = make(path)
    halts = []
    coord.on_halt.append(halts.append)
    _, box = join(coord, "a")
    (first,) = leases(box)
    faulty = FailingCommits(coord.journal._db)
    coord.journal._db = faulty

    with pytest.raises(JournalError, match=f"journal {path}: commit failed: OperationalError: {DISK_FULL}"):
        coord.report_result(first.task_id, first.attempt, True, {"val_accuracy": 0.5})
    assert box.empty()  # the next lease of that commit was never sent, nor anything else
    assert len(halts) == 1 and str(halts[0]).startswith(f"journal {path}: commit failed")
    # Its memory counted the result and leased the next task: none of that is served.
    for call in (coord.status, lambda: coord.wait_done(0), lambda: coord.register("b", 0, 1),
                 lambda: coord.heartbeat("a"), coord.check_heartbeats,
                 lambda: coord.report_result(first.task_id, first.attempt, True, {"val_accuracy": 0.5})):
        with pytest.raises(JournalError, match=DISK_FULL):
            call()
    assert faulty.commits_refused == 1  # refused without trying the disk again
    coord.journal._db = faulty.real  # the disk has room again: the journal still refuses
    with pytest.raises(JournalError, match=DISK_FULL):
        coord.journal.set_meta("phase", "Running")
    coord.journal.close()

    restarted = make(path)  # resumes from the journal: the task is still out on attempt 1
    task = restarted.leases.tasks[first.task_id]
    assert (task.state.value, task.orphan_attempt) == ("pending", 1)
    assert restarted.report_result(first.task_id, first.attempt, True, {"val_accuracy": 0.5}) == "accepted"
    assert restarted.succeeded == 1 and restarted.optimizer.told == [("c0", {"val_accuracy": 0.5})]
    assert [a.attempt for a in restarted.journal.load_attempts(first.task_id)] == [1]
    restarted.journal.close()


def test_a_failed_commit_of_the_last_result_does_not_end_the_experiment(tmp_path):
    coord = make(tmp_path / "j.db", max_trials=1)
    _, box = join(coord, "a")
    (only,) = leases(box)
    coord.journal._db = FailingCommits(coord.journal._db)
    with pytest.raises(JournalError):
        coord.report_result(only.task_id, only.attempt, True, {"val_accuracy": 0.5})
    assert coord.phase == "Succeeded"  # in memory...
    assert not coord.done and box.empty()  # ...but not done, and the worker was not told to stop
    with pytest.raises(JournalError):
        coord.wait_done(0)


def test_a_failed_fsync_is_fatal_and_its_written_commit_is_never_acknowledged(tmp_path, monkeypatch):
    path = tmp_path / "j.db"
    coord = make(path)
    _, box = join(coord, "a")
    (first,) = leases(box)

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(JournalError, match=f"journal {path}: fsync of the WAL failed: OSError"):
        coord.report_result(first.task_id, first.attempt, True, {"val_accuracy": 0.5})
    assert box.empty()
    with pytest.raises(JournalError, match="fsync of the WAL failed"):
        coord.status()
    monkeypatch.undo()
    coord.journal.close()
    # The commit reached the WAL before its fsync failed: the restart has it, once; the
    # worker's redelivery of the unacknowledged result is a duplicate, not a second count.
    restarted = make(path)
    assert restarted.succeeded == 1
    assert restarted.report_result(first.task_id, first.attempt, True, {"val_accuracy": 0.5}) == "duplicate"
    assert restarted.succeeded == 1
    restarted.journal.close()


def test_a_failed_commit_when_a_worker_is_declared_dead_sends_its_leases_to_no_one(tmp_path):
    clock = ManualClock()
    coord = make(tmp_path / "j.db", max_trials=4, clock=clock)
    _, box_a = join(coord, "a")
    assert len(leases(box_a)) == 1
    id_b, box_b = join(coord, "b", slots=2)
    assert len(leases(box_b)) == 2
    clock.advance(2.5)
    coord.heartbeat(id_b)  # b is alive, a is silent...
    clock.advance(1.0)
    coord.journal._db = FailingCommits(coord.journal._db)
    with pytest.raises(JournalError):
        coord.check_heartbeats()  # ...a is declared dead, its lease goes to b: in memory only
    assert box_b.empty()


def test_a_halted_master_server_stops_serving_and_answers_unavailable(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from morphml.distributed.master import MasterServer
    from morphml.distributed.proto import worker_pb2 as pb
    from morphml.distributed.proto import worker_pb2_grpc as pb_grpc

    coord = make(tmp_path / "j.db")
    server = MasterServer(coord, 0, "127.0.0.1")
    port = server.start()
    try:
        coord.journal._db = FailingCommits(coord.journal._db)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.MasterStub(channel).Register(pb.RegisterRequest(worker_name="a", slots=1), timeout=5)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "commit failed" in refused.value.details() and "j.db" in refused.value.details()

            def serving() -> bool:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                except grpc.RpcError:
                    return False  # stopped: no answer at all
                return reply.status == health_pb2.HealthCheckResponse.SERVING

            deadline = time.monotonic() + 10
            while serving() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not serving()
        with pytest.raises(JournalError, match="commit failed"):
            server.wait()  # what `morphml master` turns into its exit status
    finally:
        server.stop(0)
        coord.journal._db = getattr(coord.journal._db, "real", coord.journal._db)
        coord.journal.close()
