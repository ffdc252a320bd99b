"""Journal durability: FULL means the WAL is fsynced before a commit's after_commit callbacks
run (they send leases) and before a deferred commit's caller may acknowledge anything."""

from __future__ import annotations

import os

import pytest

from morphml.distributed.journal import Journal

pytestmark = pytest.mark.unit


@pytest.fixture
def fsyncs(monkeypatch):
    calls = []
    real = os.fsync

    def counting(fd):
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_a_plain_commit_is_fsynced_before_its_callbacks_run(tmp_path, fsyncs):
    journal = Journal(tmp_path / "j.db")
    seen = []
    with journal.transaction():
        journal.set_meta("phase", "Running")
        journal.after_commit(lambda: seen.append((journal._synced, journal._commits, len(fsyncs))))
    assert seen and seen[0][0] == seen[0][1] >= 1 and seen[0][2] >= 1
    assert journal.get_meta("phase") == "Running"


def test_a_deferred_commit_is_durable_and_its_callbacks_run_only_at_finish(tmp_path, fsyncs):
    journal = Journal(tmp_path / "j.db")
    sent = []
    with journal.deferred_transaction() as pending:
        journal.set_meta("best", 1)
        journal.after_commit(lambda: sent.append("lease"))
    assert sent == [] and journal._synced < pending.commit
    assert journal.get_meta("best") == 1  # written (visible), not yet fsynced
    before = len(fsyncs)
    pending.finish()
    assert sent == ["lease"] and journal._synced >= pending.commit and len(fsyncs) > before


def test_one_fsync_covers_every_commit_written_before_it(tmp_path, fsyncs):
    journal = Journal(tmp_path / "j.db")
    with journal.deferred_transaction() as first:
        journal.set_meta("a", 1)
    with journal.deferred_transaction() as second:
        journal.set_meta("b", 2)
    second.finish()
    count = len(fsyncs)
    first.finish()  # already durable: no second fsync
    assert len(fsyncs) == count and journal._synced >= first.commit


def test_normal_mode_never_fsyncs_and_a_deferred_transaction_must_be_outermost(tmp_path, fsyncs):
    journal = Journal(tmp_path / "j.db", synchronous="NORMAL")
    with journal.deferred_transaction() as pending:
        journal.set_meta("a", 1)
    pending.finish()
    assert fsyncs == [] and journal.get_meta("a") == 1
    with journal.transaction(), pytest.raises(RuntimeError, match="outermost"), journal.deferred_transaction():
        pass
