"""The worker's liveness decision (morphml.distributed.liveness) with an injected clock: when a
part counts as stuck, when it has recovered, when a runner is to be replaced, and what is not
blamed on a part (a busy runner, no session, the checker's own absence)."""

from __future__ import annotations

import re

import pytest

from morphml.distributed.clock import ManualClock
from morphml.distributed.liveness import SESSION, LivenessMonitor, liveness_bounds, runner_part

RUNNER = runner_part(0)


def monitor(stuck: float = 10.0, replace: float = 20.0) -> tuple[ManualClock, LivenessMonitor]:
    clock = ManualClock()
    mon = LivenessMonitor(clock, check_period=1.0)
    mon.add_part(SESSION, stuck, active=False)
    mon.add_part(RUNNER, stuck, replace)
    return clock, mon


def run_for(clock: ManualClock, mon: LivenessMonitor, seconds: float, beat: tuple[str, ...] = ()):
    """Advances time one check period at a time, beating `beat` each second; the verdicts."""
    verdicts = []
    for _ in range(int(seconds)):
        clock.advance(1.0)
        for part in beat:
            mon.progress(part)
        verdicts.append(mon.check())
    return verdicts


def test_default_bounds_follow_the_heartbeat_interval_with_a_floor():
    assert liveness_bounds(10.0).stuck_after == 30.0 and liveness_bounds(10.0).replace_after == 60.0
    assert liveness_bounds(1.0).stuck_after == 10.0  # never below 10 s: a loaded host is late, not dead
    b = liveness_bounds(1.0, stuck_after=3.0, replace_after=4.0)
    assert (b.stuck_after, b.replace_after, b.check_period, b.beat_period) == (3.0, 4.0, 0.3, 0.3)
    with pytest.raises(ValueError, match=re.escape("replace_after_seconds=2.0: must be >= stuck_after_seconds=3.0")):
        liveness_bounds(1.0, stuck_after=3.0, replace_after=2.0)
    with pytest.raises(ValueError, match=re.escape("stuck_after_seconds=0: must be > 0")):
        liveness_bounds(1.0, stuck_after=0)


def test_a_silent_runner_is_stuck_after_the_bound_and_replaced_once_after_the_second():
    clock, mon = monitor()
    verdicts = run_for(clock, mon, 25)
    first_stuck = next(i for i, v in enumerate(verdicts) if not v.serving) + 1
    assert first_stuck == 11  # silent 11 s > 10 s; at 10 s exactly it is not yet
    assert verdicts[10].newly_stuck == (RUNNER,) and verdicts[10].stuck == {RUNNER: 11.0}
    replaced = [i + 1 for i, v in enumerate(verdicts) if v.replace]
    assert replaced == [21]  # once per episode, not on every later check
    assert all(not v.serving for v in verdicts[10:])
    assert mon.stuck(RUNNER) and not mon.stuck(SESSION)


def test_a_runner_that_beats_while_training_is_never_stuck():
    clock, mon = monitor()
    assert all(v.serving for v in run_for(clock, mon, 120, beat=(RUNNER,)))


def test_a_busy_runner_whose_cpu_time_grows_is_not_stuck_even_without_beats():
    # A trial holding the GIL in one long C call starves the beat thread but burns CPU.
    clock, mon = monitor()
    cpu = 0.0
    for _ in range(60):
        clock.advance(1.0)
        cpu += 0.7
        mon.observe_cpu(RUNNER, 4242, cpu)
        assert mon.check().serving
    # Same CPU reading from then on: the process stopped running, so it is stuck.
    verdicts = []
    for _ in range(12):
        clock.advance(1.0)
        mon.observe_cpu(RUNNER, 4242, cpu)
        verdicts.append(mon.check())
    assert all(v.serving for v in verdicts[:10]) and verdicts[10].newly_stuck == (RUNNER,)


def test_cpu_of_a_new_runner_process_is_no_progress_of_the_old_one():
    clock, mon = monitor()
    mon.observe_cpu(RUNNER, 100, 50.0)
    clock.advance(11.0)
    mon.observe_cpu(RUNNER, 200, 0.5)  # a replacement's first reading is only a baseline
    assert not mon.check().serving


def test_a_stopped_runner_that_is_continued_recovers_and_the_episode_ends():
    clock, mon = monitor()
    verdicts = run_for(clock, mon, 15)  # SIGSTOP: silent
    assert not verdicts[-1].serving
    clock.advance(1.0)
    mon.progress(RUNNER)  # SIGCONT: it beats again
    v = mon.check()
    assert v.serving and v.recovered == (RUNNER,)
    # A second episode is replaced again: the first one's "already replaced" is over.
    verdicts = run_for(clock, mon, 22)
    assert [i + 1 for i, v in enumerate(verdicts) if v.replace] == [21]


def test_the_session_loop_counts_only_while_a_session_is_open():
    clock, mon = monitor()
    mon.progress(RUNNER)
    assert all(v.serving for v in run_for(clock, mon, 40, beat=(RUNNER,)))  # master away: not stuck
    mon.activate(SESSION)
    verdicts = run_for(clock, mon, 11, beat=(RUNNER,))
    assert verdicts[-1].stuck == {SESSION: 11.0} and not verdicts[-1].replace  # a loop is never "replaced"
    mon.deactivate(SESSION)  # the session ended
    v = run_for(clock, mon, 1, beat=(RUNNER,))[0]
    assert v.serving and v.recovered == (SESSION,)


def test_the_checkers_own_absence_is_not_blamed_on_the_parts():
    # The whole worker was stopped (or starved) for 30 s: no check ran, and no part could beat.
    clock, mon = monitor()
    run_for(clock, mon, 3, beat=(RUNNER,))
    clock.advance(30.0)
    v = mon.check()
    assert v.serving and v.forgiven == pytest.approx(29.0)
    # ... but if the runner stays silent after the worker resumed, it is stuck as usual.
    verdicts = run_for(clock, mon, 12)
    assert not verdicts[-1].serving


def test_check_age_tells_a_checker_that_stopped_checking():
    clock, mon = monitor()
    assert mon.check_age() is None
    mon.check()
    clock.advance(12.0)
    assert mon.check_age() == 12.0
