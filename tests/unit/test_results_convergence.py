"""convergence.png as drawn: integer trial ticks, every trial's point (stopped and failed drawn apart)
and the best-so-far line, and a legend whose window extent covers no data point.

The figure is the one `write_results` saves (`morphml.results.convergence_figure`), checked through
matplotlib's own artists after a draw: tick values and labels, collection offsets transformed to
display pixels (grown by each marker's radius), and the legend's bounding box.
"""

from __future__ import annotations

import math
import random
import re

import pytest

from morphml.results import convergence_figure, convergence_points, write_results

pytestmark = pytest.mark.unit

matplotlib = pytest.importorskip("matplotlib")  # the worker extra; the test extra installs it too


def trial(status: str, value: float | None) -> dict:
    return {"status": status, "metrics": {} if value is None else {"val_accuracy": value}}


def rising(n: int) -> list[dict]:
    """Values that climb into the upper right corner, where a 'lower/upper right' legend sat."""
    return [trial("succeeded", 0.5 + 0.5 * i / (n - 1)) for i in range(n)]


def everywhere(n: int, seed: int) -> list[dict]:
    """Points in every corner of the axes, some stopped early, some failed: no free corner."""
    rng = random.Random(seed)
    out = [trial("succeeded", 0.0), trial("succeeded", 1.0)]
    for _ in range(n - 4):
        roll = rng.random()
        if roll < 0.15:
            out.append(trial("failed", None))
        elif roll < 0.35:
            out.append(trial("stopped", rng.random()))
        else:
            out.append(trial("succeeded", rng.random()))
    return out + [trial("succeeded", 0.0), trial("succeeded", 1.0)]


CASES = {
    "five_rising": (rising(5), "maximize"),
    "two_trials": (rising(2), "maximize"),
    "three_trials": (rising(3), "maximize"),
    "seven_falling_loss": ([trial("succeeded", 2.0 - 0.25 * i) for i in range(7)], "minimize"),
    "forty_everywhere": (everywhere(40, 1), "maximize"),
    "thirteen_everywhere_minimize": (everywhere(13, 2), "minimize"),
    "all_failed_but_one": ([trial("failed", None)] * 4 + [trial("succeeded", 0.9)], "maximize"),
}


def drawn(trials, goal):
    fig = convergence_figure(trials, "val_accuracy", goal)
    fig.canvas.draw()
    return fig, fig.axes[0], fig.canvas.get_renderer()


def data_boxes(fig, ax):
    """Display-pixel boxes (x0, y0, x1, y1) of every drawn data point and best-line vertex."""
    boxes = []
    for collection in ax.collections:
        transform = collection.get_offset_transform()
        sizes = collection.get_sizes()
        for i, xy in enumerate(transform.transform(collection.get_offsets())):
            size = sizes[i % len(sizes)] if len(sizes) else 36.0
            radius = math.sqrt(size) / 2 * fig.dpi / 72  # scatter size is the marker area in points^2
            boxes.append((xy[0] - radius, xy[1] - radius, xy[0] + radius, xy[1] + radius))
    for line in ax.lines:
        for x, y in ax.transData.transform(line.get_xydata()):
            boxes.append((x, y, x, y))
    return boxes


def legend_of(fig, ax):
    legends = list(fig.legends) + ([ax.get_legend()] if ax.get_legend() else [])
    assert len(legends) == 1, f"expected one legend, found {len(legends)}"
    return legends[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_trial_ticks_are_whole_trial_numbers(case):
    trials, goal = CASES[case]
    _, ax, _ = drawn(trials, goal)
    low, high = ax.get_xlim()
    assert low <= 1 and high >= len(trials)
    visible = [t for t in ax.get_xticks() if low <= t <= high]
    assert visible, "no tick on the trial axis"
    assert all(float(t).is_integer() and 1 <= t <= len(trials) for t in visible), visible
    labels = [label.get_text() for label in ax.get_xticklabels() if low <= label.get_position()[0] <= high]
    assert labels and all(re.fullmatch(r"\d+", text) for text in labels), labels
    if len(trials) >= 2:
        assert len(visible) >= 2


@pytest.mark.parametrize("case", sorted(CASES))
def test_legend_covers_no_data_point(case):
    trials, goal = CASES[case]
    fig, ax, renderer = drawn(trials, goal)
    box = legend_of(fig, ax).get_window_extent(renderer)
    points = data_boxes(fig, ax)
    # every trial is drawn once, plus the best line's vertices
    assert sum(len(c.get_offsets()) for c in ax.collections) == len(trials)
    covered = [p for p in points if p[0] < box.x1 and p[2] > box.x0 and p[1] < box.y1 and p[3] > box.y0]
    assert not covered, f"legend {box} covers {len(covered)} of {len(points)} data points, e.g. {covered[:3]}"
    # and the legend is on the figure, not cut off
    fig_box = fig.bbox
    assert box.x0 >= fig_box.x0 and box.x1 <= fig_box.x1 and box.y0 >= fig_box.y0 and box.y1 <= fig_box.y1


def test_stopped_and_failed_trials_are_drawn_apart_and_named_with_their_counts():
    trials = [trial("succeeded", 0.6), trial("stopped", 0.4), trial("failed", None), trial("succeeded", 0.8),
              trial("stopped", 0.9), trial("failed", None), trial("failed", None)]
    fig, ax, _ = drawn(trials, "maximize")
    labels = [t.get_text() for t in legend_of(fig, ax).get_texts()]
    assert any(text.startswith("succeeded (2)") for text in labels), labels
    assert any(text.startswith("stopped early") and text.endswith("(2)") for text in labels), labels
    assert any(text.startswith("failed") and text.endswith("(3)") for text in labels), labels
    assert "best so far" in labels
    by_label = {c.get_label().split(" (")[0]: c for c in ax.collections}
    succeeded, stopped, failed = by_label["succeeded"], by_label["stopped early"], by_label["failed"]
    # stopped: hollow markers (no face), unlike the filled succeeded ones
    assert len(stopped.get_facecolors()) == 0 or all(fc[3] == 0 for fc in stopped.get_facecolors())
    assert all(fc[3] > 0 for fc in succeeded.get_facecolors())
    assert [x for x, _ in failed.get_offsets()] == [3, 6, 7]
    # the best-so-far line takes succeeded trials only: the stopped 0.9 is not a best
    points = convergence_points(trials, "val_accuracy", "maximize")
    assert points["best"] == [(1, 0.6), (2, 0.6), (3, 0.6), (4, 0.8), (5, 0.8), (6, 0.8), (7, 0.8)]
    assert points["stopped"] == [(2, 0.4), (5, 0.9)] and points["failed"] == [3, 6, 7]


def test_minimize_best_so_far_goes_down():
    values = [1.0, 0.7, 0.9, 0.5, 0.6]
    points = convergence_points([trial("succeeded", v) for v in values], "val_accuracy", "minimize")
    assert [y for _, y in points["best"]] == [1.0, 0.7, 0.7, 0.5, 0.5]


def test_write_results_saves_the_png(tmp_path):
    from morphml.distributed.journal import Journal

    journal_path = tmp_path / "journal.db"
    Journal(journal_path).close()  # an empty journal: no trial yet still gives a chart
    summary = write_results(journal_path, tmp_path, "val_accuracy", "maximize")
    assert summary["trials"] == 0
    png = (tmp_path / "convergence.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
