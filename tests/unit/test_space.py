"""Search space: the Python API and the manifest form build the same space; bad definitions get
errors that name where, the value and what is allowed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from morphml.space import Block, Layer, SearchSpace, SearchSpaceError

pytestmark = pytest.mark.unit

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.yaml"


def digits_spec() -> dict:
    return yaml.safe_load(DIGITS.read_text())["spec"]["searchSpace"]


def digits_python_space() -> SearchSpace:
    """The same space as examples/digits.yaml, written with the Python API."""
    return SearchSpace("search_space").add_layers(
        Layer.conv2d(filters=[16, 32], kernel_size=[3, 5], activation=["relu", "gelu"]),
        Layer.batchnorm(optional=True),
        Block(
            [Layer.conv2d(filters=[16, 32], kernel_size=[3], activation=["relu"])], repeat=(0, 2), skip=["none", "add"]
        ),
        Layer.maxpool(pool_size=[2]),
        Layer.flatten(),
        Layer.dense(units=[32, 64, 128], activation=["relu"]),
        Layer.dropout(rate=[0.0, 0.2]),
    )


def hashes(space: SearchSpace, seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [space.sample(rng).arch_hash for _ in range(count)]


def test_manifest_form_builds_the_same_space_as_the_python_api() -> None:
    from_manifest = SearchSpace.from_spec(digits_spec()).bind([1, 8, 8], 10)
    from_python = digits_python_space().bind([1, 8, 8], 10)
    assert from_manifest.to_spec() == from_python.to_spec()
    assert hashes(from_manifest, 7, 30) == hashes(from_python, 7, 30)


def test_to_spec_round_trips_through_from_spec() -> None:
    space = SearchSpace.from_spec(digits_spec())
    again = SearchSpace.from_spec(space.to_spec())
    assert again.to_spec() == space.to_spec()
    assert again.fingerprint() == space.fingerprint()


def test_original_morphml_usage_with_input_and_output_layers() -> None:
    space = SearchSpace("original")
    space.add_layers(
        Layer.input(shape=(3, 16, 16)),
        Layer.conv2d(filters=[32, 64], kernel_size=[3, 5]),
        Layer.relu(),
        Layer.maxpool(pool_size=2),
        Layer.flatten(),
        Layer.dense(units=[64, 128]),
        Layer.output(units=10),
    )
    graph = space.sample(random.Random(0))
    assert graph.input_shape == (3, 16, 16)
    assert graph.num_classes == 10
    assert [n.op for n in graph.nodes] == ["input", "conv2d", "relu", "maxpool", "flatten", "dense", "output"]
    conv = graph.nodes[1].params
    assert conv["filters"] in (32, 64) and conv["kernel_size"] in (3, 5)


def test_sample_accepts_the_data_binding_per_call_and_an_int_seed() -> None:
    space = SearchSpace.from_spec(digits_spec())
    graph = space.sample(3, input_shape=[1, 8, 8], num_classes=4)
    assert graph.num_classes == 4 and graph.nodes[-1].params == {"units": 4}
    assert space.sample(3, input_shape=[1, 8, 8], num_classes=4).arch_hash == graph.arch_hash


def test_optional_layers_repeats_and_skips_change_the_topology() -> None:
    space = (
        SearchSpace("s")
        .add_layers(
            Layer.conv2d(filters=[8]),
            Layer.batchnorm(optional=True),
            Block([Layer.conv2d(filters=[8, 16])], repeat=(0, 3), skip=["none", "add", "concat"]),
            Layer.flatten(),
        )
        .bind([1, 8, 8], 3)
    )
    rng = random.Random(1)
    seen_bn, seen_ops, conv_counts = set(), set(), set()
    for _ in range(200):
        graph = space.sample(rng)
        ops = [n.op for n in graph.nodes]
        seen_bn.add("batchnorm" in ops)
        seen_ops.update(ops)
        conv_counts.add(ops.count("conv2d"))
    assert seen_bn == {True, False}
    assert {"add", "concat"} <= seen_ops
    assert conv_counts == {1, 2, 3, 4}  # the fixed conv plus 0..3 repeats


def test_residual_add_takes_the_body_output_first() -> None:
    space = (
        SearchSpace("r")
        .add_layers(Layer.conv2d(filters=[8]), Block([Layer.conv2d(filters=[16])], repeat=1, skip="add"))
        .bind([1, 8, 8], 2)
    )
    graph = space.sample(0)
    merge = next(n for n in graph.nodes if n.op == "add")
    inputs = [src for src, dst in graph.edges if dst == merge.id]
    assert [graph.node(i).params["filters"] for i in inputs] == [16, 8]
    assert graph.infer_shapes()[merge.id] == (16, 8, 8)


def test_vocabulary_and_skip_kinds_cover_blocks() -> None:
    space = SearchSpace.from_spec(digits_spec())
    vocab = space.vocabulary()
    assert vocab["conv2d"]["filters"] == [16, 32]
    assert vocab["conv2d"]["kernel_size"] == [3, 5]
    assert vocab["dense"]["units"] == [32, 64, 128]
    assert space.skip_kinds() == ["add"]


# -- errors -----------------------------------------------------------------------------------


def spec_with(layer: dict) -> dict:
    return {"layers": [{"type": "conv2d", "filters": [8]}, layer]}


@pytest.mark.parametrize(
    ("layer", "where", "mentions"),
    [
        ({"type": "conv3d", "filters": [8]}, "searchSpace.layers[1].type", ["conv3d", "conv2d"]),
        (
            {"type": "conv2d", "filters": [8], "kernelSize": []},
            "searchSpace.layers[1].kernelSize",
            ["empty choice list"],
        ),
        (
            {"type": "conv2d", "filters": [8], "kernelSize": [3, 16]},
            "searchSpace.layers[1].kernelSize[1]",
            ["16", "[1, 15]"],
        ),
        ({"type": "conv2d", "filters": [8], "kernal": [3]}, "searchSpace.layers[1].kernal", ["kernelSize"]),
        ({"type": "conv2d", "filters": [8], "kernel_size": [3]}, "searchSpace.layers[1].kernel_size", ["kernelSize"]),
        ({"type": "conv2d"}, "searchSpace.layers[1].filters", ["required"]),
        ({"type": "dense", "units": 64}, "searchSpace.layers[1].units", ["64", "list"]),
        ({"type": "dense", "units": [0]}, "searchSpace.layers[1].units", ["0", "integer"]),
        ({"type": "dropout", "rate": [1.5]}, "searchSpace.layers[1].rate", ["1.5", "[0, 1)"]),
        (
            {"type": "dense", "units": [8], "activation": ["swish"]},
            "searchSpace.layers[1].activation",
            ["swish", "gelu"],
        ),
        ({"type": "batchnorm", "optional": "yes"}, "searchSpace.layers[1].optional", ["yes"]),
        ({"type": "output", "units": [10]}, "searchSpace.layers[1].type", ["dataset"]),
        (
            {"block": {"repeat": {"min": 3, "max": 1}, "layers": [{"type": "relu"}]}},
            "searchSpace.layers[1].block.repeat",
            ["min 3"],
        ),
        (
            {"block": {"skip": ["residual"], "layers": [{"type": "relu"}]}},
            "searchSpace.layers[1].block.skip[0]",
            ["residual", "concat"],
        ),
        ({"block": {"layers": []}}, "searchSpace.layers[1].block.layers", ["non-empty"]),
        (
            {"block": {"layers": [{"type": "conv2d", "filters": [8], "kernelSize": []}]}},
            "searchSpace.layers[1].block.layers[0].kernelSize",
            ["empty"],
        ),
        ({"type": "relu", "repeat": 2}, "searchSpace.layers[1].repeat", ["unknown parameter"]),
    ],
)
def test_bad_manifest_layers_name_the_path_value_and_allowed(layer: dict, where: str, mentions: list[str]) -> None:
    with pytest.raises(SearchSpaceError) as info:
        SearchSpace.from_spec(spec_with(layer))
    message = str(info.value)
    assert message.startswith(where + ":"), message
    for text in mentions:
        assert text in message, message


def test_empty_layer_list_and_unknown_top_level_field_are_refused() -> None:
    with pytest.raises(SearchSpaceError, match=r"^searchSpace\.layers:"):
        SearchSpace.from_spec({"layers": []})
    with pytest.raises(SearchSpaceError, match=r"^searchSpace\.layer:"):
        SearchSpace.from_spec({"layer": [{"type": "relu"}]})


@pytest.mark.parametrize(
    ("build", "mentions"),
    [
        (lambda: Layer.conv2d(filters=[]), "conv2d.filters: empty choice list"),
        (lambda: Layer.conv2d(filters=[32], kernel_size=[0]), "conv2d.kernel_size: 0 is not allowed"),
        (lambda: Layer.dense(units=[True]), "dense.units: True is not allowed"),
        (lambda: Layer("conv3d"), "unknown layer type 'conv3d'"),
        (lambda: Layer("dense", {"units": [8], "size": [2]}), "dense.size: unknown parameter"),
        (lambda: Layer.input(shape=(8, 8)), "input.shape"),
        (lambda: Layer.output(units=[10, 20]), "output.units: [10, 20] is not allowed"),
        (lambda: Block([], repeat=1), "block.layers"),
        (lambda: Block([Layer.relu()], repeat=(2, 1)), "min 2 is greater than max 1"),
        (
            lambda: SearchSpace("s").add_layers(Layer.relu(), Layer.input(shape=(1, 8, 8))),
            "layers[1]: the input layer must be the first",
        ),
        (
            lambda: SearchSpace("s").add_layers(Layer.output(units=3), Layer.relu()),
            "layers[1]: nothing can follow the output",
        ),
    ],
)
def test_bad_python_api_definitions_are_refused(build, mentions: str) -> None:
    with pytest.raises(SearchSpaceError) as info:
        build()
    assert mentions in str(info.value)


def test_space_whose_every_sample_is_invalid_says_why() -> None:
    space = SearchSpace.from_spec(
        {"layers": [{"type": "conv2d", "filters": [8]}] + [{"type": "maxpool", "poolSize": [2]}] * 4}
    ).bind([1, 8, 8], 10)
    with pytest.raises(SearchSpaceError) as info:
        space.sample(random.Random(0), max_attempts=5)
    message = str(info.value)
    assert "none of 5 samples" in message
    assert "[1, 8, 8]" in message
    assert "maxpool" in message and "pool_size 2 on a 1x1 input" in message


def test_conv_after_flatten_in_every_sample_is_reported() -> None:
    space = SearchSpace("bad").add_layers(Layer.flatten(), Layer.conv2d(filters=8)).bind([1, 8, 8], 2)
    with pytest.raises(SearchSpaceError, match="conv2d: needs an image input"):
        space.sample(0)


def test_unbound_space_tells_how_to_bind() -> None:
    with pytest.raises(SearchSpaceError, match=r"input_shape: .*space\.bind"):
        SearchSpace.from_spec(digits_spec()).sample(0)


def test_bind_refuses_conflicts_and_bad_values() -> None:
    space = SearchSpace("s").add_layers(Layer.input(shape=(1, 8, 8)), Layer.relu(), Layer.output(units=10))
    with pytest.raises(SearchSpaceError, match="conflicts"):
        space.bind([3, 8, 8], None)
    with pytest.raises(SearchSpaceError, match="conflicts"):
        space.bind(None, 5)
    with pytest.raises(SearchSpaceError, match=r"num_classes: 0 is not allowed"):
        SearchSpace("t").bind([1, 8, 8], 0)
    with pytest.raises(SearchSpaceError, match=r"input_shape: \[0, 8, 8\]"):
        SearchSpace("t").bind([0, 8, 8], 3)
