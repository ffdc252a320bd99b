"""The operator's settings: one typed object, read from the environment once at import.

Every knob the operator has is here with its environment variable, its default and its unit;
nothing else in the operator reads `os.environ`. The Helm chart sets these variables from
values.yaml. A bad value stops the operator at start with a message naming the variable.

Imports: the standard library and morphml_operator.builders only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from .builders import PodDefaults

PREFIX = "MORPHML_OPERATOR_"


class SettingsError(ValueError):
    """An environment variable with a value the operator cannot use."""


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    """What the operator needs to know; field `x` is read from MORPHML_OPERATOR_X."""

    master_image: str = "morphml-master:0.1.0"
    worker_image: str = "morphml-worker:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    # How often the timer reconciles an experiment and polls its master (seconds).
    status_interval_seconds: float = 5.0
    # Deadline of one GetStatus / WorkerGone call to the master (seconds).
    master_rpc_timeout_seconds: float = 3.0
    # How the operator reaches a master: {pod_ip}, {service}, {namespace}, {port} are filled in.
    # The pod IP needs no cluster DNS; "{service}.{namespace}.svc:{port}" works too.
    master_address_template: str = "{pod_ip}:{port}"
    # Seconds a worker pod that was Ready may stay unready before the operator tells the master
    # it is gone (pod_loss.decide); deleted, failed and evicted pods are reported at once.
    worker_unready_seconds: float = 5.0
    # Seconds the operator keeps retrying WorkerGone (with backoff) while the master does not
    # answer; after that the master's own heartbeat timeout is the only detection left.
    worker_gone_retry_seconds: float = 300.0
    # Seconds a worker pod gets between SIGTERM and SIGKILL to hand its trial back.
    worker_grace_seconds: int = 60
    # kopf: the finalizer it puts on experiments (only while a handler needs one).
    finalizer: str = "morphml.io/finalizer"
    # kopf: annotation prefix for handler progress and the last handled spec (not status: the
    # CRD's status schema is typed and would prune kopf's own fields).
    annotation_prefix: str = "morphml.io"
    # kopf: server-side watch timeout (seconds) and HTTP request timeout (seconds).
    watch_timeout_seconds: int = 300
    request_timeout_seconds: float = 30.0
    # kopf: the lowest log level also posted as a Kubernetes Event (DEBUG, INFO, WARNING, ERROR).
    posting_level: str = "WARNING"
    # The operator's own Prometheus /metrics port (0: not served); docs/observability.md.
    metrics_port: int = 8081
    # Address it listens on (the chart sets the pod's IP, like kopf's liveness endpoint).
    metrics_host: str = "0.0.0.0"
    # Put prometheus.io/scrape, /port, /path annotations on each experiment's master Service.
    metrics_scrape_annotations: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            variable = PREFIX + field.name.upper()
            if variable not in env:
                continue
            raw = env[variable]
            kind: type = type(field.default)
            try:
                if kind is bool:  # bool("false") is True: only the spellings below are accepted
                    if raw.strip().lower() not in ("true", "false", "1", "0"):
                        raise ValueError(raw)
                    values[field.name] = raw.strip().lower() in ("true", "1")
                else:
                    values[field.name] = kind(raw) if kind is not str else raw
            except ValueError:
                expected = "true or false" if kind is bool else kind.__name__
                raise SettingsError(f"{variable}={raw!r}: expected {expected}") from None
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise SettingsError(
                f"{PREFIX}IMAGE_PULL_POLICY={self.image_pull_policy!r}: expected Always, IfNotPresent or Never")
        if self.posting_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise SettingsError(f"{PREFIX}POSTING_LEVEL={self.posting_level!r}: expected DEBUG, INFO, WARNING or ERROR")
        for name in ("status_interval_seconds", "master_rpc_timeout_seconds", "watch_timeout_seconds",
                     "request_timeout_seconds", "worker_grace_seconds", "worker_unready_seconds",
                     "worker_gone_retry_seconds"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{PREFIX}{name.upper()}={getattr(self, name)}: must be greater than 0")
        if not 0 <= self.metrics_port <= 65535:
            raise SettingsError(f"{PREFIX}METRICS_PORT={self.metrics_port}: expected a port 0..65535 (0: off)")
        try:
            self.master_address_template.format(pod_ip="", service="", namespace="", port=0)
        except (KeyError, IndexError, ValueError) as error:
            raise SettingsError(f"{PREFIX}MASTER_ADDRESS_TEMPLATE={self.master_address_template!r}: {error}") from None

    @property
    def pod_defaults(self) -> PodDefaults:
        return PodDefaults(
            master_image=self.master_image,
            worker_image=self.worker_image,
            image_pull_policy=self.image_pull_policy,
            worker_grace_seconds=self.worker_grace_seconds,
        )
