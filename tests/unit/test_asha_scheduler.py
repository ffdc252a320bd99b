"""ASHA and Hyperband as pure state machines (distributed/schedulers.py): rungs, which trial a
free slot promotes, round-robin brackets, multi-objective ranking, and the replay a restarted
master does. No coordinator, no journal, no clock."""

from __future__ import annotations

import pytest

from morphml.distributed.schedulers import (
    Asha,
    EarlyStoppingSettings,
    Promotion,
    SuccessiveHalving,
    make_scheduler,
    rung_epochs,
)

pytestmark = pytest.mark.unit


def asha(min_resource=1, eta=3, epochs=9, kind="asha", goal="maximize", goals=None) -> Asha:
    settings = EarlyStoppingSettings(kind, min_resource=min_resource, reduction_factor=eta)
    scheduler = make_scheduler(settings, goal, epochs, goals)
    assert isinstance(scheduler, Asha)
    return scheduler


@pytest.mark.parametrize("min_resource, eta, full, rungs", [
    (1, 3, 9, [1, 3, 9]),
    (1, 3, 8, [1, 3, 8]),  # the full budget is always the top rung
    (2, 2, 8, [2, 4, 8]),
    (5, 3, 5, [5]),  # first rung at the full budget: no early stopping
])
def test_rungs_are_min_resource_times_eta_powers_below_the_full_budget_plus_it(min_resource, eta, full, rungs):
    assert rung_epochs(min_resource, eta, full) == rungs


def test_a_free_slot_promotes_only_the_top_third_of_a_rung_and_each_trial_once():
    a = asha()
    for trial in ("a", "b"):
        assert a.assign(trial) == 1
        assert a.record(trial, 1, {"a": 0.9, "b": 0.5}[trial]) is False  # rung 1 of [1, 3, 9]: paused
    assert a.promotions() == []  # floor(2 / 3) = 0
    a.assign("c")
    a.record("c", 1, 0.7)
    assert a.promotions() == [Promotion("a", 1, 3)]  # floor(3 / 3) = 1: the best of three
    a.promote(a.promotions()[0])
    assert a.target("a") == 3 and a.promotions() == []  # never twice from the same rung
    for trial, value in (("d", 0.95), ("e", 0.1), ("f", 0.2)):
        a.assign(trial)
        a.record(trial, 1, value)
    # six results: the top two are d (0.95) and a (0.9); a was promoted already
    assert a.promotions() == [Promotion("d", 1, 3)]


def test_the_highest_rung_is_promoted_first_and_minimize_ranks_low_values_first():
    a = asha(goal="minimize")
    for i, value in enumerate([0.3, 0.1, 0.2, 0.4, 0.5, 0.6]):
        a.assign(f"t{i}")
        a.record(f"t{i}", 1, value)
    assert [p.trial_id for p in a.promotions()] == ["t1", "t2"]  # lowest loss first
    for trial in ("t1", "t2", "t0"):
        a.promote(Promotion(trial, 1, 3))
    for trial, value in (("t1", 0.05), ("t2", 0.07), ("t0", 0.2)):
        assert a.record(trial, 3, value) is False
    # rung 3 has three results (top one: t1) and rung 1 still has nothing left in its top two
    assert a.promotions()[0] == Promotion("t1", 3, 9)
    assert a.record("t1", 9, 0.01) is True  # the top rung: finished


def test_hyperband_deals_new_trials_to_brackets_in_turn_each_an_asha_with_a_larger_first_rung():
    h = asha(kind="hyperband")
    assert [b.rungs for b in h.brackets] == [[1, 3, 9], [3, 9], [9]]
    assert [h.next_first_epochs(i) for i in range(4)] == [1, 3, 9, 1]
    assert [h.assign(f"t{i}") for i in range(6)] == [1, 3, 9, 1, 3, 9]
    assert h.bracket_of == {"t0": 0, "t1": 1, "t2": 2, "t3": 0, "t4": 1, "t5": 2}
    assert h.record("t2", 9, 0.5) is True  # the last bracket trains the full budget at once
    with pytest.raises(ValueError, match="not one of its rungs"):
        h.record("t1", 1, 0.5)  # bracket 1 has no 1-epoch rung


def test_a_replay_of_the_same_events_gives_the_same_state_and_promotions():
    events = [("assign", "a"), ("assign", "b"), ("assign", "c"), ("record", "a", 1, 0.9), ("record", "b", 1, 0.4),
              ("record", "c", 1, 0.6), ("promote", Promotion("a", 1, 3)), ("assign", "d"), ("record", "d", 1, 0.8)]

    def play(scheduler, upto):
        for event in events[:upto]:
            if event[0] == "assign":
                scheduler.assign(event[1])
            elif event[0] == "record":
                scheduler.record(*event[1:])
            else:
                scheduler.promote(event[1])
        return scheduler

    live, again = play(asha(), len(events)), play(asha(), len(events))
    assert again.promotions() == live.promotions()
    assert again.target_of == live.target_of and again.rungs_status() == live.rungs_status()
    # after the replay "a" is not promotable again from rung 1
    assert all(p.trial_id != "a" for p in again.promotions())


def test_below_the_full_budget_of_epochs_left_every_paused_trial_follows_ashas_promotions():
    a = asha()  # rungs 1, 3, 9
    for trial, value in (("a", 0.9), ("b", 0.4), ("c", 0.6), ("d", 0.7)):
        a.assign(trial)
        a.record(trial, 1, value)
    a.promote(Promotion("a", 1, 3))
    a.record("a", 3, 0.95)
    # ASHA's own rule: floor(4 / 3) = 1 at rung 1 ("a", taken), floor(1 / 3) = 0 at rung 3: nothing
    assert a.promotions() == a.promotions(epochs_left=9) == []
    # fewer epochs left than a new trial needs to reach 9: the end game, highest rung first, then best
    assert a.promotions(epochs_left=8) == [Promotion("a", 3, 9, closing=True), Promotion("d", 1, 3, closing=True),
                                           Promotion("c", 1, 3, closing=True), Promotion("b", 1, 3, closing=True)]
    a.promote(Promotion("a", 3, 9, closing=True))
    a.promote(Promotion("d", 1, 3, closing=True))
    assert [p.trial_id for p in a.promotions(epochs_left=2)] == ["c", "b"]  # each trial once from a rung


def test_in_the_end_game_ashas_own_promotions_still_come_first():
    a = asha(kind="hyperband")  # brackets with first rungs 1, 3, 9 (round-robin)
    for trial in ("a", "b", "c", "d", "e", "f"):
        a.assign(trial)  # a, d: bracket 0; b, e: bracket 1; c, f: bracket 2
    for trial, value in (("a", 0.5), ("d", 0.6)):
        a.record(trial, 1, value)
    for trial, value in (("b", 0.7), ("e", 0.2)):
        a.record(trial, 3, value)
    for trial in ("g", "h", "i", "j", "k", "l", "m"):
        a.assign(trial)
    for trial, value in (("g", 0.9), ("j", 0.1)):  # bracket 0 now has 4 results at rung 1: "g" is its top
        a.record(trial, 1, value)
    own = a.promotions(epochs_left=100)
    assert own == [Promotion("g", 1, 3, 0)]
    assert a.promotions(epochs_left=5) == own + [
        Promotion("b", 3, 9, 1, closing=True), Promotion("e", 3, 9, 1, closing=True),
        Promotion("d", 1, 3, 0, closing=True), Promotion("a", 1, 3, 0, closing=True),
        Promotion("j", 1, 3, 0, closing=True)]


def test_several_objectives_rank_a_rung_by_non_dominated_front_then_crowding():
    bracket = SuccessiveHalving([1, 3], 2, ("maximize", "minimize"))
    # (accuracy up, params down): x and y are non-dominated, z is dominated by x
    for trial, value in (("x", (0.9, 100.0)), ("y", (0.8, 10.0)), ("z", (0.85, 200.0)), ("w", (0.7, 300.0))):
        bracket.results[0][trial] = value
    assert bracket.ranked(0)[:2] in (["x", "y"], ["y", "x"])
    assert bracket.ranked(0)[2:] == ["z", "w"]
    assert set(bracket.top(0)) == {"x", "y"}  # floor(4 / 2) = 2: the first front
