"""The master's Prometheus metrics: what `/metrics` on the master's metrics port serves.

`MasterMetrics(coordinator)` owns one CollectorRegistry of its own (never prometheus_client's
global one: tests run several masters in one process). Counts and gauges come from a custom
collector that reads `ExperimentCoordinator.counts()` at scrape time, so there is no second
bookkeeping that could drift from the journal: the coordinator restores those counts from the
journal at start, so `morphml_trials_total{outcome="succeeded"}` equals the journal's count after a
master restart too (Prometheus sees no counter reset). Histograms are observed on the hot path
through the coordinator's and the journal's hooks (`on_accepted_result`, `on_commit_seconds`,
`on_fsync_seconds`); they start empty in each master process (a reset `rate()` handles).

METRICS is the table of names, types, labels and help texts; docs/observability.md shows it and
tests/unit/test_metrics.py pins both.

Imports: prometheus_client, morphml.distributed.{coordinator, journal}. Never torch, never grpc.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .journal import JournalError

if TYPE_CHECKING:
    from .coordinator import ExperimentCoordinator

log = logging.getLogger("morphml.metrics")

TRIAL_OUTCOMES = ("succeeded", "failed", "stopped")
TRIAL_STATES = ("pending", "running")
RESULT_DISPOSITIONS = ("accepted", "stale", "duplicate", "unknown", "refused")
LOSS_REASONS = ("stream", "heartbeat", "pod_gone", "deregister")
WORKER_STATES = ("registering", "idle", "busy", "draining", "dead")
PHASES = ("Pending", "Running", "Succeeded", "Failed")

# Trials last from milliseconds (tests, benchmarks) to hours (GPU training).
TRIAL_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)
# A commit writes a few rows; an fsync is ~0.1 ms on tmpfs to tens of ms on a network disk.
JOURNAL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


@dataclass(frozen=True)
class MetricSpec:
    """One metric as a scrape shows it (name without the _total/_bucket suffixes)."""

    name: str
    type: str  # counter, gauge, histogram
    labels: tuple[str, ...]
    help: str


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("morphml_trials", "counter", ("outcome",),
               "Trials finished, by outcome (succeeded, failed, stopped); each trial counted once, "
               "over the whole journal."),
    MetricSpec("morphml_trials_current", "gauge", ("state",),
               "Trials proposed and not finished, by state (pending: waiting for a lease, running: leased)."),
    MetricSpec("morphml_trial_budget", "gauge", (), "Trials the experiment may finish (spec.budget.maxTrials)."),
    MetricSpec("morphml_best_objective", "gauge", (),
               "Objective value of the best succeeded trial (see morphml_experiment_info for metric and goal); "
               "absent until a trial succeeds."),
    MetricSpec("morphml_experiment_phase", "gauge", ("phase",),
               "1 for the experiment's current phase, 0 for the others."),
    MetricSpec("morphml_experiment_info", "gauge", ("experiment", "metric", "goal"),
               "Always 1: the experiment's name, objective metric and goal."),
    MetricSpec("morphml_workers", "gauge", ("state",),
               "Worker registrations known to this master, by state (dead ones stay counted)."),
    MetricSpec("morphml_worker_losses", "counter", ("detected_by",),
               "Worker losses, by how they were detected (stream, heartbeat, pod_gone, deregister while holding "
               "trials), over the whole journal."),
    MetricSpec("morphml_trial_retries", "counter", (),
               "Failed attempts that were given another attempt (spec.faultTolerance.maxTaskRetries)."),
    MetricSpec("morphml_results", "counter", ("disposition",),
               "Trial results received, by disposition (accepted, stale, duplicate, unknown, refused), "
               "over the whole journal."),
    MetricSpec("morphml_lease_to_result_seconds", "histogram", (),
               "Seconds from a lease to its accepted result (queueing on the worker, the trial, the report)."),
    MetricSpec("morphml_trial_duration_seconds", "histogram", (),
               "Seconds an accepted trial attempt ran, as its worker reported."),
    MetricSpec("morphml_journal_commit_seconds", "histogram", (),
               "Seconds one journal commit took (buffered writes and the SQLite COMMIT, before the fsync)."),
    MetricSpec("morphml_journal_fsync_seconds", "histogram", (),
               "Seconds one fsync of the journal's WAL took (one fsync may cover several commits)."),
)
SPECS = {spec.name: spec for spec in METRICS}


class CoordinatorCollector(Collector):
    """Counts and gauges read from the coordinator at scrape time (ExperimentCoordinator.counts())."""

    def __init__(self, coordinator: ExperimentCoordinator):
        self.coord = coordinator

    def describe(self) -> Iterator[Metric]:
        return iter(())  # names are fixed (METRICS) but reading them needs the coordinator's lock

    def collect(self) -> Iterator[Metric]:
        try:
            c = self.coord.counts()
        except JournalError:
            return  # halted: its memory may be ahead of the journal, so nothing is reported
        trials = counter("morphml_trials")
        for outcome in TRIAL_OUTCOMES:
            trials.add_metric([outcome], c[outcome])
        yield trials
        current = gauge("morphml_trials_current")
        for state in TRIAL_STATES:
            current.add_metric([state], c[state])
        yield current
        yield gauge("morphml_trial_budget", c["budget"])
        if c["best"] is not None:
            yield gauge("morphml_best_objective", float(c["best"]))
        phase = gauge("morphml_experiment_phase")
        for name in PHASES:
            phase.add_metric([name], 1.0 if c["phase"] == name else 0.0)
        yield phase
        info = gauge("morphml_experiment_info")
        info.add_metric([c["experiment_name"], c["metric"], c["goal"]], 1.0)
        yield info
        yield labelled(gauge("morphml_workers"), WORKER_STATES, c["workers"])
        yield labelled(counter("morphml_worker_losses"), LOSS_REASONS, c["losses"])
        yield counter("morphml_trial_retries", c["retries"])
        yield labelled(counter("morphml_results"), RESULT_DISPOSITIONS, c["results"])


def counter(name: str, value: float | None = None) -> CounterMetricFamily:
    spec = SPECS[name]
    return CounterMetricFamily(name, spec.help, value=value, labels=None if value is not None else spec.labels)


def gauge(name: str, value: float | None = None) -> GaugeMetricFamily:
    spec = SPECS[name]
    return GaugeMetricFamily(name, spec.help, value=value, labels=None if value is not None else spec.labels)


def labelled(family: CounterMetricFamily | GaugeMetricFamily, known: tuple[str, ...],
             counts: dict[str, int]) -> CounterMetricFamily | GaugeMetricFamily:
    """Every known label value (0 when none), plus any other the journal holds: a series that
    exists from the start makes increase() and absent() alerts work."""
    for value in dict.fromkeys(known + tuple(sorted(counts))):
        family.add_metric([value], counts.get(value, 0))
    return family


def histogram(name: str, buckets: tuple[float, ...]) -> Histogram:
    spec = SPECS[name]
    return Histogram(name, spec.help, registry=None, buckets=buckets)


class HistogramCollector(Collector):
    """The master's histograms without their `_created` samples: those are a timestamp per
    process (a restart changes it), which the text format shows as one more gauge per histogram."""

    def __init__(self, histograms: list[Histogram]):
        self.histograms = histograms

    def collect(self) -> Iterator[Metric]:
        for hist in self.histograms:
            for family in hist.collect():
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
                yield family


class MasterMetrics:
    """One master's metrics: its registry, the hooks that feed the histograms, the HTTP endpoint."""

    def __init__(self, coordinator: ExperimentCoordinator):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(CoordinatorCollector(coordinator))
        self.lease_to_result = histogram("morphml_lease_to_result_seconds", TRIAL_BUCKETS)
        self.trial_duration = histogram("morphml_trial_duration_seconds", TRIAL_BUCKETS)
        self.journal_commit = histogram("morphml_journal_commit_seconds", JOURNAL_BUCKETS)
        self.journal_fsync = histogram("morphml_journal_fsync_seconds", JOURNAL_BUCKETS)
        self.registry.register(HistogramCollector(
            [self.lease_to_result, self.trial_duration, self.journal_commit, self.journal_fsync]))
        coordinator.on_accepted_result = self._accepted
        coordinator.journal.on_commit_seconds = self.journal_commit.observe
        coordinator.journal.on_fsync_seconds = self.journal_fsync.observe
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def _accepted(self, lease_to_result: float, duration: float) -> None:
        self.lease_to_result.observe(lease_to_result)
        self.trial_duration.observe(duration)

    def render(self) -> bytes:
        """The text a scrape of /metrics returns."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serves /metrics over HTTP on host:port (0: a free port) from a daemon thread; returns the port."""
        host = host.strip("[]")
        try:
            self._httpd, self._thread = start_http_server(port, host, self.registry)
        except OSError as exc:
            raise OSError(f"metrics port: cannot listen on {host}:{port} ({exc})") from exc
        self.port = int(self._httpd.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
