"""Which spec fields apply to a running experiment: docs/kubernetes.md's table, held against the CRD.

Every spec field is either applied live or refused by the API server with a CEL transition rule
(`self == oldSelf`) whose message names it. The rules are evaluated here the way the API server
evaluates transition rules (only where the old and the new object both have the value), with the
same cel-python programs `morphml run` uses for the other rules; tests/cluster/
test_operator_spec_changes.py shows the real API server refusing and the operator applying.

Imports: pytest, PyYAML, cel-python, morphml.experiment.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from morphml.experiment import _cel_program, crd_schema, validate_manifest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits.yaml"

# One change per field, each valid on its own (the new manifest passes validation).
SAMPLES: dict[str, Any] = {
    "spec.searchSpace.name": "another-space",
    "spec.searchSpace.layers": [{"type": "flatten"}, {"type": "dense", "units": [32]}],
    "spec.optimizer.mutationRate": 0.9,
    "spec.optimizer.seed": 99,
    "spec.evaluation.epochs": 9,
    "spec.evaluation.dataset": {"name": "synthetic", "shape": [8], "classes": 3},
    "spec.objective": {"metric": "val_loss", "goal": "minimize"},
    "spec.objectives": [{"metric": "val_accuracy", "goal": "maximize"}],
    "spec.constraints.maxParams": 20000,
    "spec.earlyStopping": {"type": "median", "warmupSteps": 2},
    "spec.master.persistence.size": "5Gi",
    "spec.master.persistence.storageClassName": "fast",
    "spec.budget.maxTrials": 99,
    "spec.budget.maxFailedTrials": 1,
    "spec.faultTolerance.heartbeatIntervalSeconds": 2,
    "spec.faultTolerance.missedHeartbeats": 5,
    "spec.faultTolerance.maxTaskRetries": 0,
    "spec.faultTolerance.maxTaskLosses": 2,
    "spec.master.image": "morphml-master:0.2.0",
    "spec.master.resources": {"limits": {"memory": "8Gi"}},
    "spec.workers.replicas": 7,
    "spec.workers.gpusPerWorker": 1,
    "spec.workers.trialsPerWorker": 2,
    "spec.workers.image": "morphml-worker:0.2.0",
    "spec.workers.resources": {"requests": {"cpu": "2"}},
    "spec.workers.nodeSelector": {"pool": "gpu"},
    "spec.workers.tolerations": [{"key": "dedicated", "operator": "Exists"}],
    "spec.workers.volumes": [{"claimName": "data", "mountPath": "/data", "readOnly": True}],
    "spec.artifacts.keep": "all",
    "spec.suspend": True,
}


def live_fields_table() -> dict[str, str]:
    """{spec path: "refused" | "applied"} from docs/kubernetes.md's "Which spec fields apply live"."""
    text = (ROOT / "docs" / "kubernetes.md").read_text(encoding="utf-8")
    table = text[text.index("<!-- live-fields:begin -->"): text.index("<!-- live-fields:end -->")]
    decisions: dict[str, str] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`spec"):
            continue
        for path in re.findall(r"`(spec[^`]*)`", cells[0]):
            decisions[path] = cells[1]
    return decisions


def decision_for(path: str, table: dict[str, str]) -> tuple[str, str]:
    """(row path, decision) of the most specific row covering `path`."""
    rows = [row for row in table if path == row or path.startswith(row + ".")]
    assert rows, f"{path}: no row of the live-fields table covers it"
    row = max(rows, key=len)
    return row, table[row]


def set_path(document: dict, path: str, value: Any) -> dict:
    document = copy.deepcopy(document)
    *parents, last = path.split(".")
    node = document
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return document


def transition_refusals(old: Any, new: Any, schema: dict, path: str = "") -> list[tuple[str, str]]:
    """(field, message) of every transition rule the update old -> new breaks.

    As the API server: a rule with oldSelf is checked where both objects have the field; lists are
    atomic here (no map-list items carry transition rules in this CRD), so only objects are entered.
    """
    refused = []
    for rule in schema.get("x-kubernetes-validations") or []:
        if "oldSelf" not in rule["rule"]:
            continue
        activation = {"self": celpy.json_to_cel(new), "oldSelf": celpy.json_to_cel(old)}
        result = _cel_program(rule["rule"]).evaluate(activation)
        if not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            refused.append((path.lstrip("."), rule["message"]))
    if isinstance(old, dict) and isinstance(new, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in old and key in new:
                refused += transition_refusals(old[key], new[key], sub, f"{path}.{key}")
    return refused


@pytest.fixture(scope="module")
def stored() -> dict:
    """digits.yaml as the API server stores it (defaults applied)."""
    return validate_manifest(yaml.safe_load(DIGITS.read_text()))


def test_the_table_covers_every_spec_field_once_and_says_refused_or_applied():
    table = live_fields_table()
    assert set(table.values()) <= {"refused", "applied"}, table
    spec = crd_schema()["properties"]["spec"]["properties"]
    # workers and master mix both kinds: each of their fields needs its own row.
    mixed = ("workers", "master")
    fields = [f"spec.{name}" for name in spec if name not in mixed]
    fields += [f"spec.{section}.{name}" for section in mixed for name in spec[section]["properties"]]
    for field in fields:
        decision_for(field, table)
    sampled = {decision_for(path, table)[0] for path in SAMPLES}
    assert sampled == set(table), f"rows without a sample change: {set(table) - sampled}"
    for field in fields:
        assert any(p == field or p.startswith(field + ".") or field.startswith(p + ".") for p in SAMPLES), field


@pytest.mark.parametrize("path", sorted(SAMPLES))
def test_each_field_change_is_refused_naming_it_or_accepted_as_the_table_says(stored, path):
    changed = validate_manifest(set_path(stored, path, SAMPLES[path]))  # the new manifest is valid on its own
    assert changed != stored, f"{path}: the sample is no change"
    row, decision = decision_for(path, live_fields_table())
    refusals = transition_refusals(stored, changed, crd_schema())
    if decision == "applied":
        assert refusals == [], f"{path} is documented as applied live but the API server would refuse it"
    else:
        assert refusals, f"{path} is documented as refused but the CRD has no rule that refuses it"
        name = row.removeprefix("spec.")
        for field, message in refusals:
            assert field == row and message.startswith(f"{name} cannot change"), (field, message)


def test_an_update_that_leaves_the_spec_as_it_was_is_never_refused(stored):
    assert transition_refusals(stored, copy.deepcopy(stored), crd_schema()) == []


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
@pytest.mark.parametrize("path", ["spec.budget.maxTrials", "spec.workers.replicas", "spec.suspend"])
def test_once_ended_every_spec_change_is_refused(stored, phase, path):
    ended = {**stored, "status": {"phase": phase}}
    changed = {**validate_manifest(set_path(stored, path, SAMPLES[path])), "status": {"phase": phase}}
    refusals = transition_refusals(ended, changed, crd_schema())
    assert [message.split(" (")[0] for _, message in refusals] == ["spec cannot change once the experiment has ended"]


def test_while_running_the_ended_rule_refuses_nothing_and_status_writes_pass(stored):
    running = {**stored, "status": {"phase": "Running"}}
    changed = {**validate_manifest(set_path(stored, "spec.budget.maxTrials", 99)), "status": {"phase": "Running"}}
    assert transition_refusals(running, changed, crd_schema()) == []
    # The operator writing the terminal phase (a status write: spec as it was) is not refused.
    assert transition_refusals(running, {**stored, "status": {"phase": "Succeeded"}}, crd_schema()) == []
