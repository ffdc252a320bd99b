"""Unit tests: the operator's Prometheus metrics (morphml_operator.metrics) and their settings.

Names, types and help texts are pinned against docs/observability.md's operator table; the
handlers keep kopf's handler ids (the wrapper that counts errors is transparent to kopf).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from morphml_operator.metrics import OperatorMetrics
from morphml_operator.settings import OperatorSettings, SettingsError

pytestmark = pytest.mark.unit

DOC = Path(__file__).resolve().parents[2] / "docs" / "observability.md"


def scrape(metrics: OperatorMetrics) -> dict[str, dict]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        name = family.name + ("_total" if family.type == "counter" else "")
        out[name] = {"type": family.type, "help": family.documentation,
                     "samples": {tuple(sorted(s.labels.items())): s.value for s in family.samples}}
    return out


def doc_rows() -> dict[str, tuple[str, tuple[str, ...], str]]:
    section = DOC.read_text().split("### Operator metrics", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`morphml_"):
            rows[cells[0].strip("`")] = (cells[1], tuple(re.findall(r"`(\w+)`", cells[2])), cells[3])
    return rows


def test_operator_metrics_names_types_and_help_texts_are_the_documented_ones():
    scraped = scrape(OperatorMetrics())
    assert [(n, d["type"]) for n, d in scraped.items()] == [
        ("morphml_operator_experiments", "gauge"), ("morphml_operator_reconcile_errors_total", "counter")]
    documented = doc_rows()
    assert list(documented) == list(scraped)
    assert documented["morphml_operator_experiments"][:2] == ("gauge", ("phase",))
    assert documented["morphml_operator_reconcile_errors_total"][:2] == ("counter", ("handler",))
    for name, data in scraped.items():
        assert documented[name][2] == data["help"], name


def test_experiments_by_phase_follow_observations_and_errors_are_counted_and_reraised():
    metrics = OperatorMetrics()
    metrics.observe_phase("u1", None)
    metrics.observe_phase("u2", "Running")
    metrics.observe_phase("u3", "Running")
    metrics.observe_phase("u1", "Running")
    metrics.observe_phase("u3", "Succeeded")
    metrics.forget("u2")
    metrics.forget("never-seen")

    @metrics.counted("poll")
    def poll(fail: bool) -> str:
        if fail:
            raise RuntimeError("api down")
        return "ok"

    assert poll(False) == "ok"
    with pytest.raises(RuntimeError, match="api down"):
        poll(True)
    scraped = scrape(metrics)
    phases = scraped["morphml_operator_experiments"]["samples"]
    assert phases == {(("phase", "Pending"),): 0, (("phase", "Running"),): 1, (("phase", "Succeeded"),): 1,
                      (("phase", "Failed"),): 0}
    errors = scraped["morphml_operator_reconcile_errors_total"]["samples"]
    assert errors[(("handler", "poll"),)] == 1 and errors[(("handler", "spec_changed"),)] == 0
    assert poll.__name__ == "poll" and poll.__wrapped__ is not None  # kopf's handler id comes from __wrapped__


def test_metrics_settings_parse_and_refuse_bad_values():
    settings = OperatorSettings.from_env({"MORPHML_OPERATOR_METRICS_PORT": "9000",
                                          "MORPHML_OPERATOR_METRICS_SCRAPE_ANNOTATIONS": "false"})
    assert settings.metrics_port == 9000 and settings.metrics_scrape_annotations is False
    assert OperatorSettings.from_env({"MORPHML_OPERATOR_METRICS_SCRAPE_ANNOTATIONS": "True"}).metrics_scrape_annotations
    with pytest.raises(SettingsError, match="METRICS_SCRAPE_ANNOTATIONS='yes please': expected true or false"):
        OperatorSettings.from_env({"MORPHML_OPERATOR_METRICS_SCRAPE_ANNOTATIONS": "yes please"})
    with pytest.raises(SettingsError, match="METRICS_PORT=70000: expected a port"):
        OperatorSettings.from_env({"MORPHML_OPERATOR_METRICS_PORT": "70000"})
