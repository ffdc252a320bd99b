"""spec.earlyStopping asha/hyperband and spec.budget.maxEpochs as `morphml run` validates them
(the CRD's schema and CEL rules, the same the API server applies) and as the settings mapping
checks them for callers without a manifest (MasterNode's config): defaults, and each bad value
refused naming the field and the value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from morphml.distributed.schedulers import EarlyStoppingSettings
from morphml.distributed.settings import settings_for_experiment, settings_for_master_config
from morphml.experiment import ManifestError, load_crd, load_manifest

pytestmark = pytest.mark.unit

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.yaml"  # evaluation.epochs: 8


def manifest(early_stopping=None, budget=None) -> dict:
    document = yaml.safe_load(DIGITS.read_text(encoding="utf-8"))
    if early_stopping is not None:
        document["spec"]["earlyStopping"] = early_stopping
    document["spec"]["budget"].update(budget or {})
    return document


def test_asha_and_hyperband_defaults_and_max_epochs_reach_the_coordinator_settings():
    settings = settings_for_experiment(load_manifest(manifest({"type": "asha"}, {"maxEpochs": 60})))
    assert settings.early_stopping == EarlyStoppingSettings("asha", 0, 1, 3, None)
    assert settings.max_epochs == 60
    hyperband = {"type": "hyperband", "minResource": 2, "reductionFactor": 2, "maxResource": 8}
    settings = settings_for_experiment(load_manifest(manifest(hyperband)))
    assert settings.early_stopping == EarlyStoppingSettings("hyperband", 0, 2, 2, 8) and settings.max_epochs is None


@pytest.mark.parametrize("early_stopping, budget, field, shown", [
    ({"type": "asha", "reductionFactor": 1}, {}, "spec.earlyStopping.reductionFactor", "Invalid value 1"),
    ({"type": "asha", "minResource": 9}, {}, "spec.earlyStopping.minResource", "Invalid value 9"),  # epochs 8
    ({"type": "asha", "minResource": 0}, {}, "spec.earlyStopping.minResource", "Invalid value 0"),
    ({"type": "hyperband", "minResource": 5, "maxResource": 4}, {}, "spec.earlyStopping.minResource",
     "Invalid value 5"),
    ({"type": "asha", "maxResource": 20}, {}, "spec.earlyStopping.maxResource", "Invalid value 20"),
    ({"type": "asha", "rungs": 3}, {}, "spec.earlyStopping.rungs", "unknown field"),
    ({"type": "median", "reductionFactor": 3}, {}, "spec.earlyStopping.type", "apply to type asha or hyperband"),
    (None, {"maxEpochs": 0}, "spec.budget.maxEpochs", "Invalid value 0"),
    (None, {"maxEpochs": "many"}, "spec.budget.maxEpochs", "must be of type integer"),
])
def test_bad_asha_input_is_refused_naming_the_field_and_value(early_stopping, budget, field, shown):
    with pytest.raises(ManifestError) as refused:
        load_manifest(manifest(early_stopping, budget))
    assert refused.value.fields == [field], str(refused.value)
    assert shown in str(refused.value), str(refused.value)


@pytest.mark.parametrize("config, message", [
    ({"early_stopping": {"type": "asha", "reductionFactor": 1}},
     "spec.earlyStopping.reductionFactor=1: must be an integer >= 2"),
    ({"early_stopping": {"type": "asha", "minResource": 9}, "evaluation": {"epochs": 8}},
     r"spec.earlyStopping.minResource=9: must be <= spec.evaluation.epochs \(8\)"),
    ({"early_stopping": {"type": "asha", "maxResource": 9}, "evaluation": {"epochs": 8}},
     r"spec.earlyStopping.maxResource=9: must be <= spec.evaluation.epochs \(8\)"),
    ({"early_stopping": {"type": "asha", "eta": 3}}, r"spec.earlyStopping: unknown field\(s\) eta"),
    ({"early_stopping": {"type": "none", "minResource": 2}},
     "spec.earlyStopping.minResource=2: applies to type asha or hyperband only"),
    ({"max_epochs": 0}, "spec.budget.maxEpochs=0: must be an integer >= 1"),
])
def test_the_same_checks_without_a_manifest_name_the_field(config, message):
    with pytest.raises(ValueError, match=message):
        settings_for_master_config({"max_trials": 4, **config}, optimizer=None)


def test_early_stopping_stays_immutable_in_the_crd():
    schema = load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rules = [r["rule"] for r in schema["properties"]["spec"]["properties"]["earlyStopping"]["x-kubernetes-validations"]]
    assert "self == oldSelf" in rules
