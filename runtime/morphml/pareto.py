"""Pareto dominance over several objectives: non-dominated sorting, crowding distance, the front.

What lives here: `dominates(a, b)`, `non_dominated_sort(points)` (the fronts of NSGA-II, Deb et al.
2002, as lists of indices), `crowding_distance(points, front)`, `pareto_front(points)` (indices of
the first front), `knee_point(points, front)`. A point is a sequence of floats where LARGER IS
BETTER in every coordinate: callers turn a minimized objective into its negation first
(`orient(values, goals)`). Ties: equal points do not dominate each other, so both stay on the
same front.

Imports: the standard library only (the optimizers, the results writer and the tests use it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Point = Sequence[float]


def orient(values: Sequence[float], goals: Sequence[str]) -> tuple[float, ...]:
    """The values as a larger-is-better point: minimized objectives are negated."""
    if len(values) != len(goals):
        raise ValueError(f"orient: {len(values)} values for {len(goals)} goals")
    return tuple(float(v) if g == "maximize" else -float(v) for v, g in zip(values, goals, strict=True))


def dominates(a: Point, b: Point) -> bool:
    """True when `a` is at least as good as `b` everywhere and strictly better somewhere."""
    better = False
    for x, y in zip(a, b, strict=True):
        if x < y:
            return False
        if x > y:
            better = True
    return better


def non_dominated_sort(points: Sequence[Point]) -> list[list[int]]:
    """Indices of `points` by front: front 0 is dominated by nothing, front k only by fronts < k.

    Deb's fast non-dominated sort, O(M N^2); each front lists its indices in ascending order.
    """
    n = len(points)
    dominated_by_me: list[list[int]] = [[] for _ in range(n)]
    count = [0] * n  # how many points dominate i
    for i in range(n):
        for j in range(i + 1, n):
            if dominates(points[i], points[j]):
                dominated_by_me[i].append(j)
                count[j] += 1
            elif dominates(points[j], points[i]):
                dominated_by_me[j].append(i)
                count[i] += 1
    fronts: list[list[int]] = []
    current = [i for i in range(n) if count[i] == 0]
    while current:
        fronts.append(sorted(current))
        following: list[int] = []
        for i in current:
            for j in dominated_by_me[i]:
                count[j] -= 1
                if count[j] == 0:
                    following.append(j)
        current = following
    return fronts


def crowding_distance(points: Sequence[Point], front: Sequence[int]) -> dict[int, float]:
    """index -> crowding distance within `front` (Deb et al.): the boundary points of each
    objective get infinity, the others the sum over objectives of their neighbours' gap,
    normalised by that objective's range on the front. Larger = more isolated = preferred."""
    distance = dict.fromkeys(front, 0.0)
    if len(front) <= 2:
        return dict.fromkeys(front, math.inf)
    for m in range(len(points[front[0]])):
        ordered = sorted(front, key=lambda i: (points[i][m], i))
        low, high = points[ordered[0]][m], points[ordered[-1]][m]
        distance[ordered[0]] = distance[ordered[-1]] = math.inf
        if high == low:
            continue
        for k in range(1, len(ordered) - 1):
            distance[ordered[k]] += (points[ordered[k + 1]][m] - points[ordered[k - 1]][m]) / (high - low)
    return distance


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the non-dominated points (ascending); [] for no points."""
    fronts = non_dominated_sort(points)
    return fronts[0] if fronts else []


def knee_point(points: Sequence[Point], front: Sequence[int]) -> int | None:
    """The front's point closest (Euclidean, after scaling each objective to [0, 1] over the
    front) to the ideal point made of the best value of every objective; the earliest index wins a
    tie. None for an empty front."""
    if not front:
        return None
    dims = len(points[front[0]])
    lows = [min(points[i][m] for i in front) for m in range(dims)]
    highs = [max(points[i][m] for i in front) for m in range(dims)]

    def gap(i: int) -> float:
        total = 0.0
        for m in range(dims):
            span = highs[m] - lows[m]
            if span > 0:
                total += ((highs[m] - points[i][m]) / span) ** 2
        return total

    return min(sorted(front), key=gap)
