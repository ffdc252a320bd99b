"""The CRD and the NAS core agree: what the manifest schema allows is what morphml.space builds.

The CRD's enums and per-layer-type parameter rules are written by hand in YAML; these tests pin
them to morphml.space's own tables so the API server never accepts a layer the runtime refuses
(or refuses one it could build).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from morphml import space
from morphml.experiment import ManifestError, crd_schema, load_manifest

pytestmark = pytest.mark.unit

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.yaml"
LAYER = crd_schema()["properties"]["spec"]["properties"]["searchSpace"]["properties"]["layers"]["items"]
PARAMS = ["filters", "kernelSize", "stride", "poolSize", "units", "rate", "activation"]
SAMPLE_CHOICES = {
    "filters": [8],
    "kernelSize": [3],
    "stride": [1],
    "poolSize": [2],
    "units": [8],
    "rate": [0.1],
    "activation": ["relu"],
}


def manifest_with(layer: dict) -> dict:
    return {
        "apiVersion": "morphml.io/v1alpha1",
        "kind": "NASExperiment",
        "metadata": {"name": "one-layer"},
        "spec": {"searchSpace": {"layers": [layer]}, "evaluation": {"dataset": {"name": "digits"}}},
    }


def test_layer_type_enum_is_the_spaces_layer_types():
    assert LAYER["properties"]["type"]["enum"] == list(space.LAYER_TYPES)


def test_activation_and_skip_enums_match_the_space():
    assert LAYER["properties"]["activation"]["items"]["enum"] == list(space.ACTIVATIONS)
    skip = LAYER["properties"]["block"]["properties"]["skip"]["items"]["enum"]
    assert skip == list(space.SKIP_KINDS)


@pytest.mark.parametrize("layer_type", space.LAYER_TYPES)
def test_schema_allows_exactly_the_params_the_space_knows(layer_type):
    known = {space.camel_to_snake(p) for p in PARAMS} & set(space.OP_PARAMS[layer_type])
    required = {name for name, rule in space.OP_PARAMS[layer_type].items() if rule.default is space.REQUIRED}
    base = {"type": layer_type, **{p: SAMPLE_CHOICES[p] for p in PARAMS if space.camel_to_snake(p) in required}}
    load_manifest(manifest_with(base))  # the required params alone are enough
    for param in PARAMS:
        layer = {**base, param: SAMPLE_CHOICES[param]}
        if space.camel_to_snake(param) in known:
            load_manifest(manifest_with(layer))
        else:
            with pytest.raises(ManifestError) as refused:
                load_manifest(manifest_with(layer))
            assert f"spec.searchSpace.layers[0].{param}" in refused.value.fields


@pytest.mark.parametrize("layer_type", ["conv2d", "sepconv2d", "dense"])
def test_required_params_are_required_by_the_schema_too(layer_type):
    with pytest.raises(ManifestError) as refused:
        load_manifest(manifest_with({"type": layer_type}))
    assert "spec.searchSpace.layers[0].type" in refused.value.fields


def test_digits_builds_its_search_space_and_optimizer():
    experiment = load_manifest(DIGITS)
    assert experiment.search_space.name == "digits"
    optimizer = experiment.build_optimizer()
    candidates = optimizer.ask(2)
    assert candidates and all(c.graph.to_json()["input_shape"] == [1, 8, 8] for c in candidates)
