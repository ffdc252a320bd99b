"""Metrics on the cluster (issue 11, acceptance 1): a real Prometheus server scrapes the master of
an experiment while a worker pod is deleted mid-trial; after the run, Prometheus' HTTP API
(`/api/v1/query`) says what the master's journal says: trials succeeded and failed, worker losses
by detection path, results by disposition. The operator's own /metrics (chart wiring) is scraped
too and counts the experiment's phase.

Prometheus is the Debian package (installed through tests.cluster.hostdeps before the search starts:
on a fresh machine the install outlasts the whole search), run by the test with a
generated config (scrape interval 250 ms), a private storage directory and
`--web.listen-address=127.0.0.1:<free port>`; killed and removed in a `finally`. The process node
gives every pod a loopback IP, so the host process reaches the master's and the operator's ports.

Imports: pytest, yaml, the standard library, tests.cluster.{hostdeps, operator_trials}, the e2e
module's operator fixture and helpers, morphml's Journal.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from morphml.distributed.journal import Journal

from . import hostdeps
from .controlplane import free_port
from .operator_trials import journal_file
from .test_operator_e2e import quick_trials, wait_status

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
MASTER_METRICS_PORT = 9464
OPERATOR_METRICS_PORT = 8081


class Prometheus:
    """A Prometheus server on 127.0.0.1:<free port> scraping the given targets every 250 ms."""

    def __init__(self, workdir: Path, targets: dict[str, str]):
        hostdeps.ensure(["prometheus"])
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = {"global": {"scrape_interval": "250ms", "scrape_timeout": "200ms"},
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                                     for job, target in targets.items()]}
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(self.dir / "prometheus.log", "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [shutil.which("prometheus") or "prometheus", f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        reply = json.loads(NO_PROXY.open(url, timeout=10).read().decode())
        assert reply["status"] == "success", reply
        return reply["data"]

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.dir / "prometheus.log").read_text()[-3000:]
            try:
                if NO_PROXY.open(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        log = (self.dir / "prometheus.log").read_text()[-3000:]
        raise AssertionError(f"prometheus not ready in {timeout} s: {log}")

    def query(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        """{sorted labels without job/instance: value} of an instant query."""
        out = {}
        for series in self.api("/api/v1/query", query=expr)["result"]:
            labels = tuple(sorted((k, v) for k, v in series["metric"].items() if k not in ("job", "instance")))
            out[labels] = float(series["value"][1])
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir / "data", ignore_errors=True)


def journal_counts(path: Path) -> dict[str, dict[str, int]]:
    journal = Journal.open_read_only(path)
    try:
        tasks = journal.load_tasks()
        return {"outcome": {o: sum(t.state.value == o for t in tasks) for o in ("succeeded", "failed", "stopped")},
                "detected_by": journal.count_losses_by_reason(),
                "disposition": journal.count_results_by_disposition(),
                "phase": {journal.get_meta("phase"): 1}}
    finally:
        journal.close()


def by_label(series: dict[tuple[tuple[str, str], ...], float], label: str) -> dict[str, int]:
    """{label value: value} for the non-zero series (the journal's GROUP BY lists only those)."""
    return {dict(labels)[label]: int(v) for labels, v in series.items() if v}


@pytest.mark.timeout(600)
def test_prometheus_scraping_the_master_through_a_worker_pod_deletion_agrees_with_the_journal(
        kube, operator, kube_namespace, tmp_path):
    hostdeps.ensure(["prometheus"])  # first: a search started before a minute-long install ends before the chaos
    ns = kube_namespace
    name = "scraped"
    budget = 12
    kube.apply(quick_trials(name, 3, workers={"replicas": 2}, optimizer={"algorithm": "random", "seed": 7},
                            budget={"maxTrials": budget, "maxFailedTrials": 2}), ns)
    wait_status(kube, operator, ns, name, lambda s: (s.get("trials") or {}).get("running", 0) >= 2, 240,
                "both workers running a trial")
    master = kube.kubectl_json("get", "pod", f"{name}-master", "-n", ns)
    assert {"name": "metrics", "containerPort": MASTER_METRICS_PORT, "protocol": "TCP"} in \
        master["spec"]["containers"][0]["ports"]
    service = kube.kubectl_json("get", "service", f"{name}-master", "-n", ns)
    assert "metrics" in [p["name"] for p in service["spec"]["ports"]]
    operator_pod = kube.kubectl_json("get", "pod", operator[1], "-n", operator[0])
    prometheus = Prometheus(tmp_path / "prometheus", {
        "master": f"{master['status']['podIP']}:{MASTER_METRICS_PORT}",
        "operator": f"{operator_pod['status']['podIP']}:{OPERATOR_METRICS_PORT}"})
    try:
        prometheus.wait_ready()
        kube.wait_for(lambda: prometheus.query('up{job="master"} == 1'), 30, 0.5, "a first scrape of the master")

        # Chaos: a worker pod deleted while it runs a trial.
        selector = f"morphml.io/experiment={name},app.kubernetes.io/component=worker"
        victim = sorted(p["metadata"]["name"] for p in kube.pods(ns, selector) if kube.pod_ready(p))[0]
        kube.kubectl("delete", "pod", victim, "-n", ns, "--wait=false")
        status = wait_status(kube, operator, ns, name,
                             lambda s: s if s.get("phase") in ("Succeeded", "Failed") else None, 400, f"{name} to end")
        assert status["phase"] == "Succeeded", status

        final = journal_counts(journal_file(kube, ns, name))
        assert sum(final["outcome"].values()) == budget
        assert sum(final["detected_by"].values()) >= 1, final  # the deletion was a loss
        # A scrape of the finished master saw the end (it keeps serving after it).
        kube.wait_for(lambda: prometheus.query('max_over_time(morphml_experiment_phase{phase="Succeeded"}[15m]) == 1'),
                      30, 0.5, "Prometheus to have scraped the finished master")
        seen = {"outcome": "morphml_trials_total", "detected_by": "morphml_worker_losses_total",
                "disposition": "morphml_results_total"}
        for label, metric in seen.items():
            scraped = by_label(prometheus.query(f"max_over_time({metric}[15m])"), label)
            expected = {k: v for k, v in final[label].items() if v}
            assert scraped == expected, (metric, scraped, expected)
        # The operator's own /metrics (the chart's env and port): it watched this experiment finish.
        phases = prometheus.query('morphml_operator_experiments{phase="Succeeded"}')
        kube.wait_for(lambda: prometheus.query('morphml_operator_experiments{phase="Succeeded"} >= 1'), 30, 0.5,
                      f"the operator's metrics to count the Succeeded experiment (last: {phases})")
    finally:
        prometheus.stop()


CHART = Path(__file__).resolve().parents[2] / "helm" / "morphml"


def rendered(kube, *sets: str) -> list[dict]:
    args = ["template", "morphml", str(CHART), "--namespace", "mon"]
    for value in sets:
        args += ["--set", value]
    return [doc for doc in yaml.safe_load_all(kube.helm(*args).stdout) if doc]


@pytest.mark.timeout(120)
def test_chart_renders_monitors_and_dashboard_only_when_enabled_and_they_select_what_the_operator_makes(kube):
    from morphml_operator import builders

    plain = rendered(kube)
    assert not [d for d in plain if d["kind"] in ("ServiceMonitor", "PodMonitor")]
    assert not [d for d in plain if d["kind"] == "ConfigMap" and "morphml.json" in d.get("data", {})]
    operator_pod = next(d for d in plain if d["kind"] == "Deployment")["spec"]["template"]
    assert "annotations" not in operator_pod["metadata"]

    docs = rendered(kube, "metrics.serviceMonitor.enabled=true", "metrics.dashboard.enabled=true",
                    "metrics.scrapeAnnotations=true", "metrics.serviceMonitor.labels.release=kps")
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    service = builders.build_master_service("digits", "ml")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in [p["name"] for p in service["spec"]["ports"]]
    assert monitor["spec"]["namespaceSelector"] == {"any": True} and monitor["metadata"]["labels"]["release"] == "kps"
    deployment = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]
    pod_monitor = next(d for d in docs if d["kind"] == "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= deployment["metadata"]["labels"].items()
    container = deployment["spec"]["containers"][0]
    assert {"name": "metrics", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MORPHML_OPERATOR_METRICS_PORT"] == "8081"
    assert env["MORPHML_OPERATOR_METRICS_SCRAPE_ANNOTATIONS"] == "true"
    assert deployment["metadata"]["annotations"]["prometheus.io/port"] == "8081"
    dashboard = next(d for d in docs if d["kind"] == "ConfigMap" and "morphml.json" in d.get("data", {}))
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "dashboards" / "morphml.json").read_text())
    assert json.loads(dashboard["data"]["morphml.json"]) == shipped

    scoped = rendered(kube, "metrics.serviceMonitor.enabled=true", "operator.watchNamespaces={a,b}")
    assert next(d for d in scoped if d["kind"] == "ServiceMonitor")["spec"]["namespaceSelector"] == {
        "matchNames": ["a", "b"]}
