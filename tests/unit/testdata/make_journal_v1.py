"""Writes journal_v1.db: a journal as MorphML wrote it before schema versions (schema version 1),
made by that release's own code, for tests/unit/test_journal_schema.py.

Run with the code of commit 8a9136e (the last release of the version-1 layout):

    git archive 8a9136e runtime | tar -x -C /tmp/v1
    PYTHONPATH=/tmp/v1/runtime:tests/unit python3 tests/unit/testdata/make_journal_v1.py

The run: 6 trials budget, worker w0 (2 slots) and w1; three results counted, w1 declared dead
by heartbeat holding a lease (a loss), w2 registers and leaves cleanly (not a loss), w0 is
lost with its stream and w3 takes over; two leases are out when the file is closed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from morphml.distributed.clock import ManualClock
from morphml.distributed.coordinator import ExperimentCoordinator, ExperimentSettings
from morphml.distributed.journal import Journal
from morphml.distributed.states import LossReason
from test_leases_coordinator import CountingOptimizer, leases

OUT = Path(__file__).resolve().parent / "journal_v1.db"


def main() -> None:
    assert "schema_version" not in Path(sys.modules["morphml.distributed.journal"].__file__).read_text(), \
        "run this with the version-1 code (see the docstring)"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{OUT}{suffix}").unlink(missing_ok=True)
    clock = ManualClock()
    settings = ExperimentSettings(name="v1", max_trials=6, heartbeat_interval=1.0, missed_heartbeats=3)
    coord = ExperimentCoordinator(CountingOptimizer(), settings, Journal(OUT), clock)
    w0, _ = coord.register("w0", 0, 2)
    box0 = coord.connect(w0)
    w1, _ = coord.register("w1", 0, 1)
    box1 = coord.connect(w1)
    first = leases(box0)
    (held,) = leases(box1)
    for m in first:
        assert coord.report_result(m.task_id, m.attempt, True, {"val_accuracy": 0.5}) == "accepted"
    clock.advance(2.5)
    coord.heartbeat(w0)
    clock.advance(1.0)
    assert coord.check_heartbeats() == [w1]  # loss 1: heartbeat, its lease requeued
    w2, _ = coord.register("w2", 0, 1)
    coord.deregister(w2, "clean leave")  # holds nothing: not a loss
    again = leases(box0)
    assert coord.report_result(again[0].task_id, again[0].attempt, True, {"val_accuracy": 0.7}) == "accepted"
    coord.worker_lost(w0, LossReason.STREAM, "stream closed")  # loss 2
    w3, _ = coord.register("w3", 0, 2)
    coord.connect(w3)
    coord.journal.close()
    st = coord.status()
    print(f"wrote {OUT}: {st['succeeded']} succeeded, {st['running']} running, "
          f"losses {[loss['worker_name'] for loss in st['losses']]}, lease {held.task_id} requeued")


if __name__ == "__main__":
    main()
