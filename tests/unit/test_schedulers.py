"""The early-stopping schedulers as state machines: reports in, decisions out (no gRPC, no clock)."""

from __future__ import annotations

import pytest

from morphml.distributed.schedulers import (
    Decision,
    EarlyStoppingSettings,
    MedianStopping,
    NoStopping,
    Report,
    make_scheduler,
)

pytestmark = pytest.mark.unit

STOP, GO = Decision.STOP, Decision.CONTINUE


def feed(scheduler, reports):
    return [scheduler.observe(Report(t, s, v)) for t, s, v in reports]


def test_median_stops_a_trial_whose_best_is_below_the_median_of_the_others_at_that_step():
    m = MedianStopping(goal="maximize", warmup_steps=1)
    # three trials reach step 2 with 0.5, 0.7, 0.9: the median of a fourth's peers is 0.7
    assert feed(m, [("a", 1, 0.4), ("a", 2, 0.5), ("b", 1, 0.6), ("b", 2, 0.7)]) == [GO, GO, GO, GO]
    assert feed(m, [("c", 1, 0.8), ("c", 2, 0.9)]) == [GO, GO]  # above the median of a, b (0.6)
    # d: step 1 is warm-up (never judged, though 0.1 is far below); step 2: best 0.65 < median(0.5, 0.7, 0.9)
    assert feed(m, [("d", 1, 0.1), ("d", 2, 0.65)]) == [GO, STOP]
    # e: best so far counts, not the last value: 0.75 at step 1 keeps it at step 2 despite 0.2
    assert feed(m, [("e", 1, 0.75), ("e", 2, 0.2)]) == [GO, GO]


def test_median_continues_where_no_other_trial_reached_the_step_and_during_warmup():
    m = MedianStopping(goal="maximize", warmup_steps=2)
    assert feed(m, [("a", 1, 0.9), ("a", 2, 0.9), ("a", 3, 0.9)]) == [GO, GO, GO]
    assert feed(m, [("b", 1, 0.1), ("b", 2, 0.1), ("b", 3, 0.1), ("b", 4, 0.1)]) == [GO, GO, STOP, GO]
    # step 4 of b: nobody else reached it: continue (a stopped trial's worker stops anyway)


def test_median_minimize_and_ties():
    m = MedianStopping(goal="minimize", warmup_steps=0)
    assert feed(m, [("a", 1, 1.0), ("b", 1, 3.0)]) == [GO, STOP]  # loss 3.0 is worse than 1.0
    assert feed(m, [("c", 1, 2.0)]) == [GO]  # equal to the median (2.0) is not worse
    assert feed(m, [("d", 1, 2.5)]) == [STOP]  # median of 1, 3, 2 is 2


def test_restore_rebuilds_the_same_state_as_the_reports_gave():
    reports = [("a", 1, 0.5), ("a", 2, 0.6), ("b", 1, 0.7), ("b", 2, 0.8)]
    live = MedianStopping(warmup_steps=0)
    feed(live, reports)
    again = MedianStopping(warmup_steps=0)
    again.restore(Report(t, s, v) for t, s, v in reports)
    assert again.curves == live.curves
    assert again.observe(Report("c", 2, 0.75)) == live.observe(Report("c", 2, 0.75)) == GO
    assert again.observe(Report("d", 2, 0.5)) == STOP


def test_none_never_stops():
    n = NoStopping()
    assert feed(n, [("a", 5, 0.9), ("b", 5, 0.0)]) == [GO, GO]


@pytest.mark.parametrize("spec, message", [
    ({"type": "pbt"}, r"spec.earlyStopping.type='pbt': allowed none, median, asha, hyperband"),
    ({"type": "median", "warmupSteps": -1}, r"spec.earlyStopping.warmupSteps=-1: must be an integer >= 0"),
    ({"type": "median", "warmupSteps": True}, r"spec.earlyStopping.warmupSteps=True"),
    ({"type": "median", "rate": 2}, r"spec.earlyStopping: unknown field\(s\) rate"),
    ("median", r"spec.earlyStopping: must be an object, got str"),
])
def test_bad_settings_name_the_field(spec, message):
    with pytest.raises(ValueError, match=message):
        EarlyStoppingSettings.from_spec(spec)


def test_settings_default_to_none_and_make_the_scheduler():
    assert EarlyStoppingSettings.from_spec(None) == EarlyStoppingSettings("none", 0)
    assert isinstance(make_scheduler(EarlyStoppingSettings.from_spec(None), "maximize"), NoStopping)
    median = make_scheduler(EarlyStoppingSettings.from_spec({"type": "median", "warmupSteps": 3}), "minimize")
    assert isinstance(median, MedianStopping) and (median.goal, median.warmup_steps) == ("minimize", 3)
