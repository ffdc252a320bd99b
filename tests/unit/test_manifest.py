"""morphml.experiment.load_manifest: defaults, sources, the Experiment it returns."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from morphml.experiment import (
    Budget,
    FaultTolerance,
    ManifestError,
    Objective,
    WorkerSettings,
    apply_defaults,
    crd_schema,
    load_manifest,
)

pytestmark = pytest.mark.unit

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.yaml"

MINIMAL = """\
apiVersion: morphml.io/v1alpha1
kind: NASExperiment
metadata:
  name: tiny
spec:
  searchSpace:
    layers:
      - type: dense
        units: [8]
  evaluation:
    dataset:
      name: synthetic
"""


def test_digits_example_validates_with_its_own_values():
    experiment = load_manifest(DIGITS)
    assert experiment.name == "digits"
    assert experiment.objective == Objective(metric="val_accuracy", goal="maximize")
    assert experiment.budget == Budget(max_trials=24, max_failed_trials=5)
    assert experiment.fault_tolerance == FaultTolerance(10, 3, 2)
    assert experiment.workers == WorkerSettings(replicas=2, gpus_per_worker=0, trials_per_worker=1)
    assert experiment.optimizer_spec["populationSize"] == 8
    assert experiment.evaluation["dataset"] == {"name": "digits"}


def test_digits_example_gets_the_schema_defaults_it_leaves_out():
    spec = load_manifest(DIGITS).spec
    assert spec["evaluation"]["weightDecay"] == 0
    assert spec["workers"]["trialsPerWorker"] == 1
    assert spec["master"] == {"persistence": {"size": "1Gi"}}
    assert spec["suspend"] is False


def test_minimal_manifest_is_filled_with_every_default():
    experiment = load_manifest(MINIMAL)
    spec = experiment.spec
    assert spec["optimizer"] == {
        "algorithm": "genetic",
        "populationSize": 20,
        "generations": 10,
        "mutationRate": 0.2,
        "crossoverRate": 0.5,
        "elitism": 1,
        "tournamentSize": 2,
    }
    assert spec["evaluation"] == {
        "dataset": {"name": "synthetic"},
        "epochs": 5,
        "batchSize": 64,
        "learningRate": 0.001,
        "optimizer": "adam",
        "weightDecay": 0,
        "timeoutSeconds": 600,
    }
    assert experiment.objective == Objective()
    assert experiment.budget == Budget(max_trials=50, max_failed_trials=10)
    assert experiment.fault_tolerance.heartbeat_timeout_seconds == 30
    assert experiment.workers.concurrent_trials == 1
    assert experiment.suspend is False


def test_nested_defaults_fill_a_block_without_repeat_or_skip():
    document = yaml.safe_load(MINIMAL)
    document["spec"]["searchSpace"]["layers"].insert(0, {"block": {"layers": [{"type": "relu"}]}})
    block = load_manifest(document).spec["searchSpace"]["layers"][0]["block"]
    assert block == {"layers": [{"type": "relu"}], "repeat": {"min": 1, "max": 1}, "skip": ["none"]}


def test_null_section_is_defaulted_like_a_missing_one():
    # `optimizer:` with nothing under it is null in YAML; the API server prunes and defaults it.
    text = MINIMAL + "  optimizer:\n"
    assert load_manifest(text).optimizer_spec["algorithm"] == "genetic"


def test_gpu_workers_run_one_trial_per_gpu():
    document = yaml.safe_load(MINIMAL)
    document["spec"]["workers"] = {"gpusPerWorker": 2, "trialsPerWorker": 4}
    assert load_manifest(document).workers.concurrent_trials == 2


def test_defaults_do_not_change_the_callers_dict():
    document = yaml.safe_load(MINIMAL)
    load_manifest(document)
    assert "optimizer" not in document["spec"]


def test_apply_defaults_leaves_wrong_types_for_validation_to_name():
    spec_schema = crd_schema()["properties"]["spec"]
    document = {"optimizer": "genetic"}
    apply_defaults(document, spec_schema)
    assert document["optimizer"] == "genetic"


def test_load_from_path_text_and_dict_agree(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(MINIMAL)
    from_path = load_manifest(path)
    assert from_path.spec == load_manifest(str(path)).spec == load_manifest(MINIMAL).spec
    assert from_path.spec == load_manifest(yaml.safe_load(MINIMAL)).spec


def test_missing_file_is_a_manifest_error_naming_the_file(tmp_path):
    with pytest.raises(ManifestError, match=r"nope\.yaml"):
        load_manifest(tmp_path / "nope.yaml")


def test_broken_yaml_is_a_manifest_error():
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest("spec: [unclosed\nmore: 1\n")


def test_two_documents_are_refused():
    with pytest.raises(ManifestError, match="exactly one YAML document"):
        load_manifest(MINIMAL + "---\n" + MINIMAL)


def test_not_a_mapping_is_refused():
    with pytest.raises(ManifestError, match="mapping"):
        load_manifest(["a", "list"])


def test_wrong_kind_and_api_version_are_named():
    document = yaml.safe_load(MINIMAL)
    document["kind"] = "Experiment"
    document["apiVersion"] = "kubeflow.org/v1beta1"
    with pytest.raises(ManifestError) as refused:
        load_manifest(document)
    assert refused.value.fields == ["apiVersion", "kind"]


def test_missing_name_is_refused():
    document = yaml.safe_load(MINIMAL)
    del document["metadata"]
    with pytest.raises(ManifestError) as refused:
        load_manifest(document)
    assert refused.value.fields == ["metadata.name"]


def test_every_problem_is_reported_at_once():
    document = yaml.safe_load(MINIMAL)
    document["spec"]["workers"] = {"replicas": -1}
    document["spec"]["faultTolerance"] = {"missedHeartbeats": 0}
    document["spec"]["optimizer"] = {"populationSize": 4, "elitism": 4}
    with pytest.raises(ManifestError) as refused:
        load_manifest(document)
    assert set(refused.value.fields) == {
        "spec.workers.replicas",
        "spec.faultTolerance.missedHeartbeats",
        "spec.optimizer.elitism",
    }


def test_message_names_value_and_what_is_allowed():
    document = yaml.safe_load(MINIMAL)
    document["spec"]["optimizer"] = {"algorithm": "bayesian"}
    with pytest.raises(ManifestError) as refused:
        load_manifest(document)
    message = str(refused.value)
    assert "spec.optimizer.algorithm" in message
    assert "'bayesian'" in message
    assert "'genetic', 'regularizedEvolution', 'random'" in message


def test_unknown_field_names_the_allowed_ones():
    document = yaml.safe_load(MINIMAL)
    document["spec"]["optimizer"] = {"popSize": 4}
    with pytest.raises(ManifestError) as refused:
        load_manifest(document)
    assert refused.value.fields == ["spec.optimizer.popSize"]
    assert "populationSize" in str(refused.value)


def test_status_in_a_manifest_is_ignored():
    document = yaml.safe_load(MINIMAL)
    document["status"] = {"phase": "Bogus"}
    assert "status" not in load_manifest(document).manifest


def test_search_space_spec_defaults_its_name_to_the_experiment():
    assert load_manifest(MINIMAL).search_space_spec["name"] == "tiny"


def test_to_yaml_round_trips_through_load_manifest():
    experiment = load_manifest(DIGITS)
    assert load_manifest(experiment.to_yaml()).manifest == experiment.manifest


def test_objective_compares_by_goal():
    assert Objective(goal="maximize").is_better(0.9, 0.8)
    assert Objective(metric="val_loss", goal="minimize").is_better(0.1, 0.2)
    assert Objective().is_better(0.1, None)
