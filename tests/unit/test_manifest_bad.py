"""Bad NASExperiment manifests, each refused with the offending field named.

`BAD_MANIFESTS` is a table shared by two tiers: here `morphml.experiment.load_manifest` must refuse
each one naming the field, and tests/cluster/test_operator_crd.py sends the same table to a real
kube-apiserver, which must refuse each one naming the same field. Each case starts from
examples/digits.yaml and changes one thing.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from morphml.experiment import ManifestError, load_manifest

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.yaml"


def digits_manifest() -> dict:
    """A fresh copy of the canonical example manifest."""
    return yaml.safe_load(DIGITS.read_text(encoding="utf-8"))


@dataclasses.dataclass(frozen=True)
class BadManifest:
    """One way to get a manifest wrong, and the field path both validators must name."""

    name: str
    change: Callable[[dict], Any]  # mutates a copy of digits.yaml in place
    field: str

    def manifest(self) -> dict:
        document = digits_manifest()
        self.change(document)
        return document


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A change that sets spec.<dotted path> (integers index lists) to value."""

    def change(document: dict) -> None:
        node: Any = document
        parts = [int(p) if p.isdigit() else p for p in path.split(".")]
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = copy.deepcopy(value)

    return change


def _delete(path: str) -> Callable[[dict], None]:
    def change(document: dict) -> None:
        node: Any = document
        parts = [int(p) if p.isdigit() else p for p in path.split(".")]
        for part in parts[:-1]:
            node = node[part]
        del node[parts[-1]]

    return change


BAD_MANIFESTS: list[BadManifest] = [
    BadManifest("missing_search_space", _delete("spec.searchSpace"), "spec.searchSpace"),
    BadManifest("empty_layer_list", _set("spec.searchSpace.layers", []), "spec.searchSpace.layers"),
    BadManifest(
        "unknown_layer_type", _set("spec.searchSpace.layers.0.type", "conv3d"), "spec.searchSpace.layers[0].type"
    ),
    BadManifest(
        "scalar_instead_of_choice_list",
        _set("spec.searchSpace.layers.0.filters", 16),
        "spec.searchSpace.layers[0].filters",
    ),
    BadManifest(
        "parameter_on_wrong_layer_type",
        _set("spec.searchSpace.layers.0.units", [64]),
        "spec.searchSpace.layers[0].units",
    ),
    BadManifest("dense_without_units", _delete("spec.searchSpace.layers.5.units"), "spec.searchSpace.layers[5].type"),
    BadManifest(
        "layer_with_type_and_block", _set("spec.searchSpace.layers.2.type", "conv2d"), "spec.searchSpace.layers[2]"
    ),
    BadManifest(
        "repeat_min_above_max",
        _set("spec.searchSpace.layers.2.block.repeat", {"min": 3, "max": 2}),
        "spec.searchSpace.layers[2].block.repeat.min",
    ),
    BadManifest(
        "dropout_rate_one", _set("spec.searchSpace.layers.6.rate", [1.0]), "spec.searchSpace.layers[6].rate[0]"
    ),
    BadManifest(
        "duplicate_choice", _set("spec.searchSpace.layers.0.filters", [16, 16]), "spec.searchSpace.layers[0].filters[1]"
    ),
    BadManifest("unknown_optimizer", _set("spec.optimizer.algorithm", "bayesian"), "spec.optimizer.algorithm"),
    BadManifest("population_size_one", _set("spec.optimizer.populationSize", 1), "spec.optimizer.populationSize"),
    BadManifest("elitism_not_below_population", _set("spec.optimizer.elitism", 8), "spec.optimizer.elitism"),
    BadManifest(
        "tournament_larger_than_population", _set("spec.optimizer.tournamentSize", 9), "spec.optimizer.tournamentSize"
    ),
    BadManifest("mutation_rate_above_one", _set("spec.optimizer.mutationRate", 1.5), "spec.optimizer.mutationRate"),
    BadManifest("epochs_wrong_type", _set("spec.evaluation.epochs", "many"), "spec.evaluation.epochs"),
    BadManifest("unknown_dataset", _set("spec.evaluation.dataset.name", "imagenet"), "spec.evaluation.dataset.name"),
    BadManifest(
        "npz_dataset_without_path", _set("spec.evaluation.dataset.name", "npz"), "spec.evaluation.dataset.path"
    ),
    BadManifest("copies_on_plain_digits", _set("spec.evaluation.dataset.copies", 8), "spec.evaluation.dataset.copies"),
    BadManifest(
        "validation_copies_zero",
        _set("spec.evaluation.dataset", {"name": "digits-hard", "validationCopies": 0}),
        "spec.evaluation.dataset.validationCopies",
    ),
    BadManifest(
        "evaluator_not_module_function", _set("spec.evaluation.evaluator", "my evaluator"), "spec.evaluation.evaluator"
    ),
    BadManifest("missing_evaluation", _delete("spec.evaluation"), "spec.evaluation"),
    BadManifest("val_loss_maximized", _set("spec.objective.metric", "val_loss"), "spec.objective.goal"),
    BadManifest("max_failed_above_max_trials", _set("spec.budget.maxFailedTrials", 30), "spec.budget.maxFailedTrials"),
    BadManifest("negative_replicas", _set("spec.workers.replicas", -1), "spec.workers.replicas"),
    BadManifest("negative_gpus", _set("spec.workers.gpusPerWorker", -1), "spec.workers.gpusPerWorker"),
    BadManifest(
        "missed_heartbeats_zero",
        _set("spec.faultTolerance.missedHeartbeats", 0),
        "spec.faultTolerance.missedHeartbeats",
    ),
    BadManifest("max_task_losses_zero", _set("spec.faultTolerance.maxTaskLosses", 0),
                "spec.faultTolerance.maxTaskLosses"),
    BadManifest("suspend_wrong_type", _set("spec.suspend", "yes"), "spec.suspend"),
    BadManifest("name_too_long_for_pod_names", _set("metadata.name", "d" * 51), "metadata.name"),
]


pytestmark = pytest.mark.unit


def test_table_covers_at_least_twelve_kinds():
    assert len({case.field for case in BAD_MANIFESTS}) >= 12
    assert len({case.name for case in BAD_MANIFESTS}) == len(BAD_MANIFESTS)


@pytest.mark.parametrize("case", BAD_MANIFESTS, ids=lambda case: case.name)
def test_bad_manifest_is_refused_naming_the_field(case: BadManifest):
    with pytest.raises(ManifestError) as refused:
        load_manifest(case.manifest())
    assert case.field in refused.value.fields, str(refused.value)
    assert case.field in str(refused.value)


def test_unchanged_digits_is_accepted():
    # The table's base must be valid, or every case above would pass for the wrong reason.
    assert load_manifest(digits_manifest()).name == "digits"
