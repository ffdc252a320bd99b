"""Pareto dominance: non-dominated sorting, crowding distance, the front and the knee point."""

from __future__ import annotations

import math
import random

import pytest

from morphml.pareto import crowding_distance, dominates, knee_point, non_dominated_sort, orient, pareto_front

pytestmark = pytest.mark.unit


def test_dominance_needs_one_strictly_better_coordinate_and_none_worse():
    assert dominates((2, 2), (1, 2)) and dominates((2, 3), (1, 2))
    assert not dominates((1, 2), (1, 2))  # equal points do not dominate each other
    assert not dominates((3, 1), (1, 3)) and not dominates((1, 3), (3, 1))


def test_orient_negates_minimized_objectives():
    assert orient([0.9, 1200], ["maximize", "minimize"]) == (0.9, -1200.0)
    with pytest.raises(ValueError, match="2 values for 1 goals"):
        orient([1, 2], ["maximize"])


def test_non_dominated_sort_gives_the_fronts_of_a_known_set():
    # larger is better in both coordinates
    points = [(1, 5), (2, 4), (3, 3), (2, 2), (1, 1), (0, 6), (2, 4), (1, 3)]
    fronts = non_dominated_sort(points)
    assert fronts == [[0, 1, 2, 5, 6], [3, 7], [4]]


def brute_front(points):
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


@pytest.mark.parametrize("seed", range(20))
def test_sorting_agrees_with_the_definition_on_random_points(seed):
    rng = random.Random(seed)
    points = [tuple(rng.randint(0, 6) for _ in range(rng.choice([2, 3]))) for _ in range(rng.randint(1, 30))]
    width = len(points[0])
    points = [p[:width] + (0,) * (width - len(p)) for p in points]
    fronts = non_dominated_sort(points)
    assert sorted(i for f in fronts for i in f) == list(range(len(points)))  # a partition
    assert fronts[0] == brute_front(points) == pareto_front(points)
    for level, front in enumerate(fronts):
        for i in front:
            for j in front:
                assert not dominates(points[i], points[j])  # mutually non-dominated
            if level:  # dominated by someone one front up
                assert any(dominates(points[k], points[i]) for k in fronts[level - 1])
    # every point off the first front is dominated by (or equal to) one on it
    for i in range(len(points)):
        assert any(points[k] == points[i] or dominates(points[k], points[i]) for k in fronts[0])


def test_crowding_distance_boundaries_are_infinite_and_inner_points_sum_normalised_gaps():
    points = [(0.0, 4.0), (1.0, 3.0), (3.0, 1.0), (4.0, 0.0)]
    distance = crowding_distance(points, [0, 1, 2, 3])
    assert distance[0] == distance[3] == math.inf
    # point 1: neighbours 0 and 2 -> (3-0)/4 on x plus (4-1)/4 on y
    assert distance[1] == pytest.approx(1.5)
    assert distance[2] == pytest.approx((4 - 1) / 4 + (3 - 0) / 4)
    assert crowding_distance(points, [1, 2]) == {1: math.inf, 2: math.inf}


def test_crowding_prefers_the_isolated_point():
    # 1 sits next to 0; 2 has the long gap to 3 on its other side
    points = [(0.0, 10.0), (1.0, 9.0), (1.1, 8.9), (10.0, 0.0)]
    distance = crowding_distance(points, [0, 1, 2, 3])
    assert distance[1] == pytest.approx(0.22) and distance[2] == pytest.approx(1.8)


def test_knee_point_is_the_front_point_nearest_the_ideal():
    points = [(0.0, 1.0), (0.8, 0.8), (1.0, 0.0)]
    assert knee_point(points, [0, 1, 2]) == 1
    assert knee_point(points, []) is None
