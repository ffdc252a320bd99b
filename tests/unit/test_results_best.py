"""best.json names the trial the master chose (journal meta `best`), also when that trial was
stopped early: with asha/hyperband and no trial at the full budget the best stopped trial is the
experiment's best (coordinator._update_best), and best.json used to be left out then."""

from __future__ import annotations

import json

import pytest

from morphml.distributed.journal import Journal
from morphml.distributed.leases import Task
from morphml.distributed.states import TaskState
from morphml.results import write_results

pytestmark = pytest.mark.unit

ARCH = json.dumps({"nodes": [], "edges": []})


def _journal(path, trials: list[tuple[str, TaskState, float]], best: str | None) -> None:
    journal = Journal(path)
    try:
        with journal.transaction():
            for seq, (task_id, state, value) in enumerate(trials, 1):
                task = Task(task_id=task_id, candidate_id=f"c{seq}", arch_json=ARCH, arch_hash=f"h{seq}",
                            summary=f"s{seq}", generation=0, seed=seq, proposed_at=float(seq), state=state,
                            metrics={"val_accuracy": value, "epochs": 1}, finished_attempt=1,
                            finished_at=float(seq))
                journal.save_task(task, seq)
            if best is not None:
                journal.set_meta("best", {"trial_id": best, "metric": {t: v for t, _, v in trials}[best]})
    finally:
        journal.close()


def test_best_json_is_the_masters_best_even_when_it_was_stopped(tmp_path):
    _journal(tmp_path / "journal.db", [("t000001", TaskState.STOPPED, 0.7), ("t000002", TaskState.STOPPED, 0.9),
                                       ("t000003", TaskState.STOPPED, 0.8)], best="t000002")
    summary = write_results(tmp_path / "journal.db", tmp_path / "out")
    assert summary["best"]["trial_id"] == "t000002"
    assert json.loads((tmp_path / "out" / "best.json").read_text())["value"] == 0.9


def test_without_a_journaled_best_the_best_succeeded_trial_is_chosen(tmp_path):
    _journal(tmp_path / "journal.db", [("t000001", TaskState.SUCCEEDED, 0.7), ("t000002", TaskState.STOPPED, 0.95),
                                       ("t000003", TaskState.SUCCEEDED, 0.8)], best=None)
    summary = write_results(tmp_path / "journal.db", tmp_path / "out")
    assert summary["best"]["trial_id"] == "t000003"


def test_a_rewrite_that_fails_leaves_the_previous_files_whole_and_no_partial_file(tmp_path, monkeypatch):
    """trials.csv and best.json go through a temporary file and a rename: the master serves
    trials.csv while it rewrites it, and a reader (or a full disk mid-write) must never leave half a
    file where the whole one was."""
    journal, out = tmp_path / "journal.db", tmp_path / "out"
    _journal(journal, [("t000001", TaskState.SUCCEEDED, 0.7)], best="t000001")
    write_results(journal, out)
    before = {name: (out / name).read_bytes() for name in ("trials.csv", "best.json")}
    assert before["trials.csv"].count(b"\n") == 2  # the header and one trial
    _journal(journal, [("t000002", TaskState.SUCCEEDED, 0.9)], best="t000002")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("morphml.distributed.checkpoints.os.replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_results(journal, out)
    assert {name: (out / name).read_bytes() for name in before} == before
    monkeypatch.undo()
    write_results(journal, out)
    assert (out / "trials.csv").read_bytes().count(b"\n") == 3
    assert json.loads((out / "best.json").read_text())["trial_id"] == "t000002"
