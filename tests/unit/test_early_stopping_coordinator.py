"""Unit tests: progress reports through the coordinator (curve journaled, median stop journaled
before it is answered, the trial finished as stopped, a restart knows it all); real SQLite
journal, injected clock, no gRPC."""

from __future__ import annotations

import pytest

from morphml.distributed.clock import ManualClock
from morphml.distributed.coordinator import ExperimentCoordinator, ExperimentSettings, ProgressReport
from morphml.distributed.journal import Journal
from morphml.distributed.schedulers import EarlyStoppingSettings
from morphml.distributed.states import LossReason, TaskState
from test_leases_coordinator import CountingOptimizer, join, leases

pytestmark = pytest.mark.unit


def make(path, optimizer=None, early="median", **kw):
    settings = ExperimentSettings(**{"max_trials": 3, "max_failed_trials": 0, "heartbeat_interval": 1.0,
                                     "early_stopping": EarlyStoppingSettings(early, 1), **kw})
    return ExperimentCoordinator(optimizer or CountingOptimizer(), settings, Journal(path), ManualClock())


def run_curve(coord, lease, values):
    """Reports values at steps 1, 2, ...; returns the decisions (True: stop)."""
    key = coord.lease_key(lease.task_id, lease.attempt)
    return [coord.report_progress([ProgressReport(lease.task_id, lease.attempt, step, {"val_accuracy": v},
                                                  lease_key=key)])[0]
            for step, v in enumerate(values, 1)]


def test_median_stops_the_weak_trial_which_finishes_stopped_not_failed(tmp_path):
    opt = CountingOptimizer()
    coord = make(tmp_path / "j.db", opt)
    _, box = join(coord, "w", slots=3)
    a, b, c = leases(box)
    assert run_curve(coord, a, [0.5, 0.8, 0.9]) == [False] * 3
    assert run_curve(coord, b, [0.5, 0.85, 0.95]) == [False] * 3
    # c: step 1 is warm-up; step 2: 0.3 < median(0.8, 0.85) -> stop
    assert run_curve(coord, c, [0.2, 0.3]) == [False, True]
    assert coord.journal.events("stop_decided")[0]["task_id"] == c.task_id  # journaled when answered
    # a report after the stop is answered stop again; a forged one is not recorded
    assert coord.report_progress([ProgressReport(c.task_id, c.attempt, 3, {"val_accuracy": 0.99})]) == [True]
    assert coord.report_progress([ProgressReport(a.task_id, a.attempt, 4, {"val_accuracy": 1.0},
                                                 lease_key="0" * 32)]) == [False]
    for lease, value in ((a, 0.9), (b, 0.8)):
        assert coord.report_result(lease.task_id, lease.attempt, True, {"val_accuracy": value, "epochs": 3}) \
            == "accepted"
    # the stopped trial's evaluator returns what it has: the optimizer is told the last reported value
    assert coord.report_result(c.task_id, c.attempt, True, {"val_accuracy": 0.31, "params": 7}) == "accepted"
    task = coord.leases.tasks[c.task_id]
    assert task.state is TaskState.STOPPED and task.metrics == {"val_accuracy": 0.99, "params": 7, "epochs": 3}
    assert opt.told[-1] == (task.candidate_id, task.metrics)
    st = coord.status()
    assert (st["succeeded"], st["stopped"], st["failed"], st["phase"]) == (2, 1, 0, "Succeeded")  # maxFailed 0
    assert [p["step"] for p in coord.journal.curves(a.task_id)] == [1, 2, 3]  # the forged step 4 is not there
    coord.journal.close()

    again = make(tmp_path / "j.db", CountingOptimizer())  # a restarted master on the same journal
    assert again.stopped == 1 and again.succeeded == 2
    assert again.scheduler.curves[a.task_id] == {1: 0.5, 2: 0.8, 3: 0.9}
    assert [(p["step"], p["metrics"]["val_accuracy"]) for p in again.journal.curves(c.task_id)] == \
        [(1, 0.2), (2, 0.3), (3, 0.99)]
    again.journal.close()


def test_reports_of_a_stale_attempt_are_not_the_live_curve(tmp_path):
    coord = make(tmp_path / "j.db", max_trials=1)
    w1, box = join(coord, "w1")
    (first,) = leases(box)
    assert run_curve(coord, first, [0.5]) == [False]
    coord.worker_lost(w1, LossReason.STREAM)
    _, box2 = join(coord, "w2")
    (second,) = leases(box2)
    assert second.attempt == first.attempt + 1
    # the old attempt keeps training somewhere: its reports are answered continue and not recorded
    assert run_curve(coord, first, [0.6, 0.7]) == [False, False]
    assert run_curve(coord, second, [0.4]) == [False]
    assert [(p["attempt"], p["step"]) for p in coord.journal.curves(first.task_id)] == \
        [(first.attempt, 1), (second.attempt, 1)]
    coord.journal.close()


def test_none_keeps_todays_behaviour(tmp_path):
    coord = make(tmp_path / "j.db", early="none", max_trials=2)
    _, box = join(coord, "w", slots=2)
    a, b = leases(box)
    assert run_curve(coord, a, [0.9, 0.9]) == [False, False]
    assert run_curve(coord, b, [0.1, 0.1]) == [False, False]  # would be stopped by median
    for lease in (a, b):
        coord.report_result(lease.task_id, lease.attempt, True, {"val_accuracy": 0.5})
    assert (coord.succeeded, coord.stopped) == (2, 0)
    coord.journal.close()
