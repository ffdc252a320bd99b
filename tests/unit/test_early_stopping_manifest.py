"""spec.earlyStopping as `morphml run` validates it (the CRD's schema and CEL rules): defaults,
the allowed types, and refusals naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from morphml.distributed.schedulers import EarlyStoppingSettings
from morphml.distributed.settings import settings_for_experiment
from morphml.experiment import ManifestError, load_manifest

pytestmark = pytest.mark.unit

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.yaml"


def manifest(early_stopping=None) -> dict:
    document = yaml.safe_load(DIGITS.read_text(encoding="utf-8"))
    if early_stopping is not None:
        document["spec"]["earlyStopping"] = early_stopping
    return document


def test_absent_means_none_and_median_reaches_the_coordinator_settings():
    assert settings_for_experiment(load_manifest(manifest())).early_stopping == EarlyStoppingSettings("none", 0)
    experiment = load_manifest(manifest({"type": "median", "warmupSteps": 3}))
    assert settings_for_experiment(experiment).early_stopping == EarlyStoppingSettings("median", 3)
    assert load_manifest(manifest({"type": "median"})).spec["earlyStopping"] == {"type": "median", "warmupSteps": 0}


@pytest.mark.parametrize("value, field", [
    ({"type": "pbt"}, "spec.earlyStopping.type"),
    ({"type": "median", "warmupSteps": -1}, "spec.earlyStopping.warmupSteps"),
    ({"type": "none", "warmupSteps": 2}, "spec.earlyStopping.warmupSteps"),  # CEL: median only
    ({"type": "median", "rungs": 3}, "spec.earlyStopping.rungs: unknown field"),
])
def test_bad_early_stopping_is_refused_naming_the_field(value, field):
    with pytest.raises(ManifestError) as refused:
        load_manifest(manifest(value))
    assert field in str(refused.value), str(refused.value)
