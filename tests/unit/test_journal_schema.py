"""Unit tests: the journal's schema version and migrations. A journal written by the release
before schema versions (testdata/journal_v1.db, made by that release's code, see
testdata/make_journal_v1.py) is upgraded in place and the experiment resumes on it; a newer
version, a file that is not SQLite, a corrupt one and an SQLite file of something else are
refused with a message naming the file, and their bytes are left as they were."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from pathlib import Path

import pytest

from morphml.distributed import journal as journal_module
from morphml.distributed.clock import ManualClock
from morphml.distributed.coordinator import ExperimentCoordinator, ExperimentSettings
from morphml.distributed.journal import SCHEMA_VERSION, Journal, JournalError
from morphml.distributed.states import LossReason
from test_leases_coordinator import CountingOptimizer, leases

pytestmark = pytest.mark.unit

V1_FIXTURE = Path(__file__).resolve().parent / "testdata" / "journal_v1.db"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_next_to(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.fixture
def v1_journal(tmp_path) -> Path:
    path = tmp_path / "journal.db"
    shutil.copyfile(V1_FIXTURE, path)
    return path


def test_a_version_1_journal_is_upgraded_in_place_and_the_experiment_resumes_on_it(v1_journal):
    with pytest.raises(JournalError, match=f"journal {v1_journal}: schema version 1, this MorphML reads 3"):
        Journal.open_read_only(v1_journal)  # read-only never upgrades
    journal = Journal(v1_journal)
    assert journal.schema_version() == SCHEMA_VERSION == 3
    # Version 2 numbers worker losses: the two the v1 master saw (w2's clean leave was none).
    assert [(loss["seq"], loss["worker_name"], loss["detected_by"]) for loss in journal.losses()] == \
        [(1, "w1", "heartbeat"), (2, "w0", "stream")]
    assert journal.losses()[1]["requeued"] == [("t000003", 2), ("t000005", 1)]
    clock = ManualClock()
    coord = ExperimentCoordinator(CountingOptimizer(), ExperimentSettings(name="v1", max_trials=6), journal, clock)
    st = coord.status()
    assert (st["succeeded"], st["loss_seq"]) == (3, 2)
    assert [loss["seq"] for loss in st["losses"]] == [1, 2]
    worker_id, _ = coord.register("w4", 0, 4)
    coord.connect(worker_id)
    coord.worker_lost(worker_id, LossReason.STREAM)
    assert coord.status()["loss_seq"] == 3  # numbering goes on after the back-filled losses
    out = sorted((t.task_id, t.orphan_attempt) for t in coord.leases.tasks.values() if t.orphan_attempt)
    assert out == [("t000003", 3), ("t000005", 2)]  # w3's leases, held for it across the restart
    worker_id, adopted = coord.register("w3", 0, 2, running=[("t000005", 2)])  # w3 reconnects still running one
    assert adopted == [("t000005", 2)]
    assert coord.report_result("t000005", 2, True, {"val_accuracy": 0.8}) == "accepted"
    box = coord.connect(worker_id)
    for _ in range(8):  # w3 lost the other one: its hold runs out and it is leased again
        clock.advance(5)
        coord.heartbeat(worker_id)
        coord.check_heartbeats()
    while not coord.done:
        pending = leases(box)
        assert pending, coord.status()
        for m in pending:
            coord.report_result(m.task_id, m.attempt, True, {"val_accuracy": 0.6})
    assert coord.phase == "Succeeded"
    finished = journal.load_tasks()
    assert len(finished) == 6 and all(t.state.value == "succeeded" for t in finished)
    counted = [e["task_id"] for e in journal.events("succeeded")]
    assert sorted(counted) == sorted(t.task_id for t in finished)  # each trial counted exactly once
    journal.close()
    assert Journal.open_read_only(v1_journal).schema_version() == 3


def test_a_migration_that_fails_leaves_the_file_at_its_old_version(v1_journal, monkeypatch):
    def broken(db):
        db.execute("CREATE TABLE losses(seq INTEGER PRIMARY KEY)")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setitem(journal_module.MIGRATIONS, 1, broken)
    with pytest.raises(JournalError, match=f"journal {v1_journal}: upgrading schema version 1 to 2 failed"):
        Journal(v1_journal)
    monkeypatch.undo()
    journal = Journal(v1_journal)  # nothing of the failed step stayed: the real one runs now
    assert journal.schema_version() == 3 and len(journal.losses()) == 2
    journal.close()


def test_a_new_journal_has_the_current_version_and_the_same_layout_as_an_upgraded_one(tmp_path, v1_journal):
    fresh = Journal(tmp_path / "new.db")
    assert fresh.schema_version() == SCHEMA_VERSION
    fresh.close()
    Journal(v1_journal).close()

    def layout(path: Path) -> dict:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)  # the test inspects the files themselves
        try:
            return {name: [col[1:3] for col in db.execute(f"PRAGMA table_info({name})")]
                    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()

    assert layout(tmp_path / "new.db") == layout(v1_journal)


def test_a_version_2_journal_gets_the_curves_table_and_keeps_curves_across_reopening(tmp_path):
    path = tmp_path / "v2.db"
    Journal(path).close()
    db = sqlite3.connect(path)  # make it what a version-2 master wrote: no curves table
    db.execute("DROP TABLE curves")
    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(JournalError, match="schema version 2, this MorphML reads 3"):
        Journal.open_read_only(path)
    journal = Journal(path)
    assert journal.schema_version() == 3 and journal.curves() == []
    journal.add_curve_point("t000001", 1, 1, 10.0, {"val_accuracy": 0.5})
    journal.add_curve_point("t000001", 1, 2, 11.0, {"val_accuracy": 0.6})
    journal.add_curve_point("t000001", 1, 2, 12.0, {"val_accuracy": 0.7})  # the same step again replaces it
    journal.close()
    reopened = Journal.open_read_only(path)
    assert [(p["step"], p["metrics"]["val_accuracy"]) for p in reopened.curves("t000001")] == [(1, 0.5), (2, 0.7)]
    assert reopened.curve_steps() == {"t000001": 2}
    reopened.close()


def test_a_journal_of_a_newer_schema_version_is_refused_and_left_as_it_was(tmp_path):
    path = tmp_path / "journal.db"
    journal = Journal(path)
    journal.set_meta("schema_version", SCHEMA_VERSION + 1)
    journal.close()
    before, names = digest(path), files_next_to(path)
    with pytest.raises(JournalError, match=f"journal {path}: schema version {SCHEMA_VERSION + 1} is newer than this "
                                           f"MorphML knows"):
        Journal(path)
    assert digest(path) == before and files_next_to(path) == names


@pytest.mark.parametrize("make_file, message", [
    (lambda p: p.write_bytes(b"\x00\x01garbage" * 500), "not an SQLite database"),
    (lambda p: p.write_text("trial_id,val_accuracy\nt1,0.5\n"), "not an SQLite database"),
    (lambda p: p.write_bytes(journal_module.SQLITE_MAGIC + b"\xff" * 4000), "cannot be read as an SQLite database"),
], ids=["binary-garbage", "a-csv-file", "corrupt-sqlite"])
def test_a_file_that_is_not_a_readable_database_is_refused_by_name_and_not_written(tmp_path, make_file, message):
    path = tmp_path / "journal.db"
    make_file(path)
    before, names = digest(path), files_next_to(path)
    with pytest.raises(JournalError, match=f"journal {path}: {message}.*nothing was written"):
        Journal(path)
    assert digest(path) == before and files_next_to(path) == names


def test_an_sqlite_database_of_something_else_is_refused_by_name_and_not_written(tmp_path):
    path = tmp_path / "journal.db"
    db = sqlite3.connect(path)  # someone else's database, in the default rollback-journal mode
    db.execute("CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("INSERT INTO users(name) VALUES ('ada')")
    db.commit()
    db.close()
    before, names = digest(path), files_next_to(path)
    with pytest.raises(JournalError, match=f"journal {path}: an SQLite database but not a MorphML journal "
                                           r"\(its tables: users\)"):
        Journal(path)
    assert digest(path) == before and files_next_to(path) == names
