"""Unit tests: the master's Prometheus metrics (morphml.distributed.metrics).

The names, types and help texts a scrape shows are pinned twice: by NAMES_AND_TYPES here and by
the table in docs/observability.md (every row equal to what the scrape says). The counts are
driven through a real coordinator on a real SQLite journal with an injected clock, and read the
way Prometheus does (the text exposition, parsed by prometheus_client's parser); a second
coordinator on the same journal (a master restart) must report the same counters.
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from morphml.distributed.clock import ManualClock
from morphml.distributed.coordinator import ExperimentCoordinator, ExperimentSettings
from morphml.distributed.journal import Journal
from morphml.distributed.metrics import METRICS, MasterMetrics
from morphml.distributed.states import LossReason
from tests.unit.test_leases_coordinator import CountingOptimizer, join, leases

pytestmark = pytest.mark.unit

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
DOC = Path(__file__).resolve().parents[2] / "docs" / "observability.md"

# What a scrape shows (exposition names: counters with _total), in order.
NAMES_AND_TYPES = [
    ("morphml_trials_total", "counter", ("outcome",)),
    ("morphml_trials_current", "gauge", ("state",)),
    ("morphml_trial_budget", "gauge", ()),
    ("morphml_best_objective", "gauge", ()),
    ("morphml_experiment_phase", "gauge", ("phase",)),
    ("morphml_experiment_info", "gauge", ("experiment", "metric", "goal")),
    ("morphml_workers", "gauge", ("state",)),
    ("morphml_worker_losses_total", "counter", ("detected_by",)),
    ("morphml_trial_retries_total", "counter", ()),
    ("morphml_results_total", "counter", ("disposition",)),
    ("morphml_lease_to_result_seconds", "histogram", ()),
    ("morphml_trial_duration_seconds", "histogram", ()),
    ("morphml_journal_commit_seconds", "histogram", ()),
    ("morphml_journal_fsync_seconds", "histogram", ()),
]


def scrape(metrics: MasterMetrics) -> dict[str, dict]:
    """{exposition name: {"type", "help", "samples": {(sample name, sorted labels): value}}}."""
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        name = family.name + ("_total" if family.type == "counter" else "")
        out[name] = {"type": family.type, "help": family.documentation,
                     "samples": {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}}
    return out


def value(scraped: dict[str, dict], name: str, **labels: str) -> float:
    family = scraped[re.sub(r"_(count|sum)$", "", name)]  # a histogram's _count and _sum are its samples
    return family["samples"][(name, tuple(sorted(labels.items())))]


def doc_table() -> dict[str, tuple[str, tuple[str, ...], str]]:
    """The master metrics table of docs/observability.md: {name: (type, labels, help)}."""
    text = DOC.read_text()
    section = text.split("### Master metrics", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`morphml_"):
            labels = tuple(re.findall(r"`(\w+)`", cells[2]))
            rows[cells[0].strip("`")] = (cells[1], labels, cells[3])
    return rows


def make(path: Path, clock: ManualClock, max_trials: int = 6) -> ExperimentCoordinator:
    settings = ExperimentSettings(max_trials=max_trials, heartbeat_interval=1.0, missed_heartbeats=3,
                                  max_task_retries=1, name="metrics-unit")
    return ExperimentCoordinator(CountingOptimizer(), settings, Journal(path), clock)


def drive(coord: ExperimentCoordinator, clock: ManualClock) -> None:
    """2 succeeded (0.4 then 0.7), 1 retried then failed, a stale and a duplicate result, a
    stream loss and a pod_gone loss."""
    a, box_a = join(coord, "a", slots=3)
    first = leases(box_a)
    assert len(first) == 3
    clock.advance(2.0)
    assert coord.report_result(first[0].task_id, 1, True, {"val_accuracy": 0.4}, duration=1.5) == "accepted"
    assert coord.report_result(first[0].task_id, 1, True, {"val_accuracy": 0.4}) == "duplicate"
    assert coord.report_result(first[1].task_id, 1, False, None, "exception", "boom", duration=0.5) == "accepted"
    coord.worker_lost(a, LossReason.STREAM, "test")
    assert coord.report_result(first[2].task_id, 1, True, {"val_accuracy": 0.9}) == "stale"
    _, box_b = join(coord, "b", slots=3)
    relet = {m.task_id: m for m in leases(box_b)}
    retried = relet[first[1].task_id]  # attempt 2 went to a too, and was lost with it
    assert coord.report_result(retried.task_id, retried.attempt, False, None, "exception", "boom again") == "accepted"
    again = relet[first[2].task_id]
    assert coord.report_result(again.task_id, again.attempt, True, {"val_accuracy": 0.7}) == "accepted"
    coord.worker_gone("b", "pod deleted")


def test_scrape_shows_exactly_the_pinned_names_types_and_the_documented_help_texts(tmp_path):
    clock = ManualClock()
    coord = make(tmp_path / "j.db", clock)
    metrics = MasterMetrics(coord)
    drive(coord, clock)
    scraped = scrape(metrics)
    assert [(n, d["type"]) for n, d in scraped.items()] == [(n, t) for n, t, _ in NAMES_AND_TYPES]
    assert [(s.type, s.labels) for s in METRICS] == [(t, labels) for _, t, labels in NAMES_AND_TYPES]
    documented = doc_table()
    assert list(documented) == list(scraped)
    for (name, kind, labels), spec in zip(NAMES_AND_TYPES, METRICS, strict=True):
        assert documented[name] == (kind, labels, scraped[name]["help"]) == (kind, labels, spec.help), name
        for sample_name, sample_labels in scraped[name]["samples"]:
            assert {k for k, _ in sample_labels} - {"le"} == set(labels), (name, sample_name)
    for name, _, _ in NAMES_AND_TYPES:  # Prometheus conventions
        assert name.startswith("morphml_")
        assert name.endswith("_total") == (scraped[name]["type"] == "counter")
        assert not re.search(r"_(ms|milliseconds|minutes|hours)\b", name)


def test_counters_and_gauges_follow_the_coordinator_and_equal_the_journal_after_a_restart(tmp_path):
    clock = ManualClock()
    coord = make(tmp_path / "j.db", clock)
    metrics = MasterMetrics(coord)
    drive(coord, clock)
    s = scrape(metrics)
    expected = {("morphml_trials_total", "outcome", "succeeded"): 2, ("morphml_trials_total", "outcome", "failed"): 1,
                ("morphml_trials_total", "outcome", "stopped"): 0,
                ("morphml_worker_losses_total", "detected_by", "stream"): 1,
                ("morphml_worker_losses_total", "detected_by", "pod_gone"): 1,
                ("morphml_worker_losses_total", "detected_by", "heartbeat"): 0,
                ("morphml_results_total", "disposition", "accepted"): 4,
                ("morphml_results_total", "disposition", "stale"): 1,
                ("morphml_results_total", "disposition", "duplicate"): 1,
                ("morphml_workers", "state", "dead"): 2}
    for (name, label, label_value), count in expected.items():
        assert value(s, name, **{label: label_value}) == count, (name, label_value)
    assert value(s, "morphml_trial_retries_total") == 1
    assert value(s, "morphml_best_objective") == 0.7
    assert value(s, "morphml_trial_budget") == 6
    assert value(s, "morphml_experiment_phase", phase="Running") == 1
    assert value(s, "morphml_trials_current", state="running") == 0
    assert value(s, "morphml_trials_current", state="pending") == 3  # 3 more of the budget 6, no worker left
    # Histograms: the accepted results only (4), lease-to-result from the injected clock.
    assert value(s, "morphml_trial_duration_seconds_count") == 4
    assert value(s, "morphml_trial_duration_seconds_sum") == pytest.approx(2.0)
    assert value(s, "morphml_lease_to_result_seconds_count") == 4
    assert s["morphml_lease_to_result_seconds"]["samples"][
        ("morphml_lease_to_result_seconds_bucket", (("le", "1.0"),))] == 2  # the two at the relet's +0 s
    assert value(s, "morphml_journal_commit_seconds_count") > 0
    assert value(s, "morphml_journal_fsync_seconds_count") > 0
    coord.journal.close()

    # What the journal says, read as another process would.
    reading = Journal.open_read_only(tmp_path / "j.db")
    journal_counts = {"succeeded": sum(1 for t in reading.load_tasks() if t.state.value == "succeeded"),
                      "failed": sum(1 for t in reading.load_tasks() if t.state.value == "failed"),
                      "losses": reading.count_losses_by_reason(), "results": reading.count_results_by_disposition()}
    reading.close()
    restarted = make(tmp_path / "j.db", ManualClock())
    after = scrape(MasterMetrics(restarted))
    assert value(after, "morphml_trials_total", outcome="succeeded") == journal_counts["succeeded"] == 2
    assert value(after, "morphml_trials_total", outcome="failed") == journal_counts["failed"] == 1
    for reason, count in journal_counts["losses"].items():
        assert value(after, "morphml_worker_losses_total", detected_by=reason) == count
    for disposition, count in journal_counts["results"].items():
        assert value(after, "morphml_results_total", disposition=disposition) == count
    assert value(after, "morphml_trial_retries_total") == 1
    assert value(after, "morphml_best_objective") == 0.7
    assert value(after, "morphml_trial_duration_seconds_count") == 0  # histograms start empty per process
    restarted.journal.close()


@pytest.mark.timeout(30)
def test_two_masters_in_one_process_serve_their_own_metrics_over_http(tmp_path):
    clock = ManualClock()
    one, two = make(tmp_path / "one.db", clock, max_trials=3), make(tmp_path / "two.db", clock, max_trials=9)
    served = [MasterMetrics(one), MasterMetrics(two)]
    try:
        ports = [m.serve(0, "127.0.0.1") for m in served]
        assert ports[0] != ports[1]
        for port, budget in zip(ports, (3, 9), strict=True):
            deadline = time.monotonic() + 10
            while True:
                try:
                    body = NO_PROXY.open(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            assert f"morphml_trial_budget {float(budget)}" in body
    finally:
        for m in served:
            m.stop()
        one.journal.close()
        two.journal.close()


def test_a_halted_master_reports_no_counts(tmp_path):
    """Fail-stop: a halted coordinator's memory may be ahead of its journal, so its counts are not shown."""
    clock = ManualClock()
    coord = make(tmp_path / "j.db", clock)
    metrics = MasterMetrics(coord)
    coord._halt(RuntimeError("disk gone"))
    scraped = scrape(metrics)
    assert "morphml_trials_total" not in scraped and "morphml_journal_commit_seconds" in scraped
    coord.journal.close()


def test_a_trial_the_median_rule_stopped_is_counted_as_stopped_not_failed(tmp_path):
    from morphml.distributed.coordinator import ProgressReport
    from morphml.distributed.schedulers import EarlyStoppingSettings

    settings = ExperimentSettings(max_trials=3, max_failed_trials=0, heartbeat_interval=1.0,
                                  early_stopping=EarlyStoppingSettings("median", 1))
    coord = ExperimentCoordinator(CountingOptimizer(), settings, Journal(tmp_path / "j.db"), ManualClock())
    _, box = join(coord, "w", slots=3)
    trials = leases(box)
    for lease, curve in zip(trials, ([0.5, 0.8], [0.5, 0.85], [0.2, 0.3]), strict=True):
        key = coord.lease_key(lease.task_id, lease.attempt)
        for step, v in enumerate(curve, 1):
            coord.report_progress([ProgressReport(lease.task_id, lease.attempt, step, {"val_accuracy": v},
                                                  lease_key=key)])
    for lease in trials:
        assert coord.report_result(lease.task_id, lease.attempt, True, {"val_accuracy": 0.5}) == "accepted"
    s = scrape(MasterMetrics(coord))
    assert value(s, "morphml_trials_total", outcome="stopped") == 1
    assert value(s, "morphml_trials_total", outcome="succeeded") == 2
    assert value(s, "morphml_trials_total", outcome="failed") == 0
