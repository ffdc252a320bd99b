"""`morphml run --set PATH=VALUE`: manifest fields changed before validation (the override the
examples test shortens every example with); bad paths and bad values are refused naming them."""

from __future__ import annotations

from pathlib import Path

import pytest

from morphml.cli import build_parser, load_experiment
from morphml.experiment import ManifestError, apply_overrides, load_manifest

pytestmark = pytest.mark.unit

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.yaml"


def test_set_changes_fields_with_yaml_values_and_leaves_the_rest():
    experiment = load_manifest(DIGITS, ("spec.budget.maxTrials=2", "spec.budget.maxFailedTrials=0",
                                        "spec.evaluation.epochs=1", "spec.searchSpace.layers[0].filters=[8]",
                                        "spec.earlyStopping.type=median", "metadata.name=digits-short"))
    assert experiment.budget.max_trials == 2 and experiment.evaluation["epochs"] == 1
    assert experiment.spec["searchSpace"]["layers"][0]["filters"] == [8]
    assert experiment.spec["earlyStopping"] == {"type": "median", "warmupSteps": 0}  # created, then defaulted
    assert experiment.name == "digits-short"
    assert experiment.spec["optimizer"] == load_manifest(DIGITS).spec["optimizer"]


def test_overrides_do_not_change_the_input():
    document = {"apiVersion": "morphml.io/v1alpha1", "spec": {"budget": {"maxTrials": 5}}}
    assert apply_overrides(document, ["spec.budget.maxTrials=1"])["spec"]["budget"]["maxTrials"] == 1
    assert document["spec"]["budget"]["maxTrials"] == 5


@pytest.mark.parametrize(("override", "field", "says"), [
    ("spec.budget.maxTrials=0", "spec.budget.maxTrials", "greater than or equal to 1"),
    ("spec.evaluation.epochs=many", "spec.evaluation.epochs", "must be of type integer"),
    ("spec.budget.maxTrails=2", "spec.budget.maxTrails", "unknown field"),
    ("spec.searchSpace.layers[40].filters=[8]", "spec.searchSpace.layers[40]", "no list item 40"),
    ("spec.budget.maxTrials.x=1", "spec.budget.maxTrials.x", "spec.budget.maxTrials is not an object"),
    ("budget.maxTrials=2", "", "PATH under spec or metadata"),
    ("spec.budget.maxTrials", "", "expected PATH=VALUE"),
    ("spec.bud-get=1", "", "is not a field name"),
    ("spec.budget.maxTrials=[1", "spec.budget.maxTrials", "not valid YAML"),
])
def test_bad_overrides_are_refused_naming_the_field(override, field, says):
    with pytest.raises(ManifestError) as caught:
        load_manifest(DIGITS, (override,))
    assert (field in caught.value.fields) if field else True
    assert says in str(caught.value) and (not field or field in str(caught.value))


def test_morphml_run_takes_repeated_set():
    args = build_parser().parse_args(["run", str(DIGITS), "--set", "spec.budget.maxTrials=3",
                                      "--set", "spec.budget.maxFailedTrials=1", "--set", "spec.evaluation.epochs=2"])
    experiment = load_experiment(args.manifest, args.overrides)
    assert (experiment.budget.max_trials, experiment.evaluation["epochs"]) == (3, 2)
    assert build_parser().parse_args(["run", str(DIGITS)]).overrides == []
