"""Unit tests: the chart's metrics pieces without a helm binary (tests/cluster renders the chart).

The Grafana dashboard is valid JSON whose every query names only metrics that exist (the master's
METRICS table, the operator's two); the ServiceMonitor and dashboard templates render nothing
unless their values enable them; the values the templates read exist with their documented
defaults.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from morphml.distributed.metrics import METRICS

pytestmark = pytest.mark.unit

CHART = Path(__file__).resolve().parents[2] / "helm" / "morphml"
OPERATOR_METRICS = {"morphml_operator_experiments", "morphml_operator_reconcile_errors_total"}


def exposed_names() -> set[str]:
    names = set(OPERATOR_METRICS)
    for spec in METRICS:
        if spec.type == "counter":
            names.add(spec.name + "_total")
        elif spec.type == "histogram":
            names |= {spec.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(spec.name)
    return names


def test_dashboard_queries_name_only_existing_metrics_and_cover_the_main_ones():
    dashboard = json.loads((CHART / "dashboards" / "morphml.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\b(morphml_[a-z_]+)", expr)}
    assert used <= exposed_names(), used - exposed_names()
    for needed in ("morphml_trials_total", "morphml_worker_losses_total", "morphml_best_objective",
                   "morphml_lease_to_result_seconds_bucket", "morphml_journal_commit_seconds_bucket",
                   "morphml_operator_experiments"):
        assert needed in used, needed
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_optional_templates_are_guarded_by_their_values_which_default_to_off():
    values = yaml.safe_load((CHART / "values.yaml").read_text())["metrics"]
    assert values["serviceMonitor"]["enabled"] is False and values["dashboard"]["enabled"] is False
    assert values["scrapeAnnotations"] is False and values["operatorPort"] == 8081
    for template, guard in (("servicemonitor.yaml", ".Values.metrics.serviceMonitor.enabled"),
                            ("dashboard-configmap.yaml", ".Values.metrics.dashboard.enabled")):
        text = (CHART / "templates" / template).read_text()
        body = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
        assert body[0] == "{{- if " + guard + " }}" and body[-1] == "{{- end }}", template
    configmap = (CHART / "templates" / "dashboard-configmap.yaml").read_text()
    assert '.Files.Get "dashboards/morphml.json"' in configmap
