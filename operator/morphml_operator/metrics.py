"""The operator's Prometheus metrics, served by `serve()` on settings.metrics_port (/metrics).

- `morphml_operator_experiments{phase}` (gauge): the experiments this operator reconciles, by
  status.phase (Pending, Running, Succeeded, Failed, and "" before the first status), from a table
  the handlers keep (`observe_phase`, `forget`) and read at scrape time.
- `morphml_operator_reconcile_errors_total{handler}` (counter): handler calls that raised (kopf
  then retries them), by handler; `counted(name)` wraps a handler to count them.

One registry of its own (not prometheus_client's global one). Imports: prometheus_client and the
standard library only (no kopf, no kubernetes client), so it is unit-testable on its own.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PHASES = ("Pending", "Running", "Succeeded", "Failed")
HANDLERS = ("create_or_resume", "spec_changed", "poll", "worker_pod_event")
EXPERIMENTS_HELP = "NASExperiments this operator reconciles, by status.phase (\"\" before the first status)."
ERRORS_HELP = "Operator handler calls that raised an error (kopf retries them), by handler."

_F = TypeVar("_F", bound=Callable[..., Any])


class OperatorMetrics(Collector):
    """The table of experiment phases, the error counter, and their registry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[str, str] = {}  # experiment uid -> its last known phase
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self.reconcile_errors = Counter("morphml_operator_reconcile_errors", ERRORS_HELP, ["handler"],
                                        registry=None)
        for handler in HANDLERS:
            self.reconcile_errors.labels(handler)  # every series exists from the start, at 0
        self.registry.register(_WithoutCreated(self.reconcile_errors))

    def observe_phase(self, uid: str, phase: str | None) -> None:
        with self._lock:
            self._phases[uid] = phase or ""

    def forget(self, uid: str) -> None:
        with self._lock:
            self._phases.pop(uid, None)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            phases = list(self._phases.values())
        family = GaugeMetricFamily("morphml_operator_experiments", EXPERIMENTS_HELP, labels=["phase"])
        for phase in dict.fromkeys(PHASES + tuple(sorted(set(phases)))):
            family.add_metric([phase], phases.count(phase))
        yield family

    def counted(self, handler: str) -> Callable[[_F], _F]:
        """Decorator: count the calls of `handler` that raise (the error still propagates to kopf)."""

        def wrap(function: _F) -> _F:
            @functools.wraps(function)
            def call(*args: Any, **kwargs: Any) -> Any:
                try:
                    return function(*args, **kwargs)
                except Exception:
                    self.reconcile_errors.labels(handler).inc()
                    raise

            return call  # type: ignore[return-value]

        return wrap

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serves /metrics on host:port from a daemon thread; returns the port (0: a free one)."""
        httpd, _ = start_http_server(port, host, self.registry)
        return int(httpd.server_address[1])


class _WithoutCreated(Collector):
    """A metric's families without the `_created` samples (a per-process timestamp, one more series)."""

    def __init__(self, metric: Counter):
        self.metric = metric

    def collect(self) -> Iterator[Metric]:
        for family in self.metric.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
