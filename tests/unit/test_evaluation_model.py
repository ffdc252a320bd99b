"""Graph JSON -> torch module: every op builds and runs, shapes match the plan, parameter counts
match the plan (and morphml.graph), invalid graphs are refused naming the node and op."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from morphml.evaluation import TrialFailure, build_model, plan_graph  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def chain(input_shape, layers, num_classes=10):
    """Canonical JSON for input -> layers... -> output."""
    nodes = [{"id": "n0", "op": "input", "params": {}}]
    for i, (op, params) in enumerate(layers, start=1):
        nodes.append({"id": f"n{i}", "op": op, "params": params})
    nodes.append({"id": f"n{len(layers) + 1}", "op": "output", "params": {"units": num_classes}})
    edges = [[nodes[i]["id"], nodes[i + 1]["id"]] for i in range(len(nodes) - 1)]
    return {"input_shape": list(input_shape), "num_classes": num_classes, "nodes": nodes, "edges": edges}


def forward_shape(arch, batch=3):
    model = build_model(arch)
    model.eval()
    x = torch.randn(batch, *arch["input_shape"])
    with torch.no_grad():
        y = model(x)
    return model, tuple(y.shape)


def module_params(model):
    return sum(p.numel() for p in model.parameters())


SPATIAL_LAYERS = {
    "conv2d": ("conv2d", {"filters": 6, "kernel_size": 3, "stride": 1, "activation": "relu"}),
    "conv2d_stride2": ("conv2d", {"filters": 6, "kernel_size": 5, "stride": 2, "activation": "gelu"}),
    "sepconv2d": ("sepconv2d", {"filters": 8, "kernel_size": 3, "stride": 1, "activation": "silu"}),
    "depthwise_conv2d": ("depthwise_conv2d", {"filters": 6, "kernel_size": 3, "stride": 1, "activation": "tanh"}),
    "maxpool": ("maxpool", {"pool_size": 2}),
    "avgpool_stride1": ("avgpool", {"pool_size": 3, "stride": 1}),
    "global_avgpool": ("global_avgpool", {}),
    "batchnorm": ("batchnorm", {}),
    "dropout": ("dropout", {"rate": 0.3}),
    "relu": ("relu", {}),
    "gelu": ("gelu", {}),
    "silu": ("silu", {}),
    "tanh": ("tanh", {}),
    "identity": ("identity", {}),
    "flatten": ("flatten", {}),
    "dense_on_image": ("dense", {"units": 7, "activation": "relu"}),
}


@pytest.mark.parametrize("name", sorted(SPATIAL_LAYERS))
def test_every_op_builds_runs_and_matches_planned_shape_and_params(name):
    op, params = SPATIAL_LAYERS[name]
    arch = chain([3, 8, 8], [(op, params)])
    plan = plan_graph(arch)
    model, out = forward_shape(arch)
    assert out == (3, 10)
    assert module_params(model) == plan.param_count
    # the op's own planned output shape is what torch produces
    node = plan.nodes[1]
    probe = model.layers[1]
    probe.eval()
    with torch.no_grad():
        produced = probe(torch.randn(2, 3, 8, 8))
    assert tuple(produced.shape[1:]) == node.out_shape


def test_flat_input_chain_with_dense_batchnorm_dropout_and_activations():
    arch = chain([20], [("dense", {"units": 16, "activation": "gelu"}), ("batchnorm", {}),
                        ("dropout", {"rate": 0.1}), ("tanh", {}), ("dense", {"units": 8, "activation": "none"})], 3)
    model, out = forward_shape(arch)
    assert out == (3, 3)
    assert module_params(model) == plan_graph(arch).param_count == 20 * 16 + 16 + 32 + 16 * 8 + 8 + 8 * 3 + 3


def test_even_kernel_builds_with_same_padding():
    arch = chain([1, 8, 8], [("conv2d", {"filters": 4, "kernel_size": 2})])
    assert plan_graph(arch).nodes[1].out_shape == (4, 8, 8)
    _, out = forward_shape(arch)
    assert out == (3, 10)


def test_kernel_outside_the_graph_vocabulary_is_refused_naming_the_node():
    arch = chain([1, 8, 8], [("conv2d", {"filters": 4, "kernel_size": 17})])
    with pytest.raises(TrialFailure) as info:
        build_model(arch)
    assert info.value.kind == "invalid"
    assert "n1" in info.value.message and "kernel_size" in info.value.message and "17" in info.value.message


def test_conv_stride_uses_same_padding_and_ceil_output():
    arch = chain([1, 7, 7], [("conv2d", {"filters": 4, "kernel_size": 3, "stride": 2})])
    assert plan_graph(arch).nodes[1].out_shape == (4, 4, 4)
    _, out = forward_shape(arch)
    assert out == (3, 10)


def residual(channels_a, channels_b, merge="add", input_shape=(3, 8, 8)):
    """input -> a(conv) -> b(conv) ; merge(a, b) -> output: the skip spans conv b."""
    nodes = [
        {"id": "in", "op": "input", "params": {}},
        {"id": "a", "op": "conv2d", "params": {"filters": channels_a, "kernel_size": 3}},
        {"id": "b", "op": "conv2d", "params": {"filters": channels_b, "kernel_size": 3}},
        {"id": "m", "op": merge, "params": {}},
        {"id": "out", "op": "output", "params": {"units": 10}},
    ]
    edges = [["in", "a"], ["a", "b"], ["a", "m"], ["b", "m"], ["m", "out"]]
    return {"input_shape": list(input_shape), "num_classes": 10, "nodes": nodes, "edges": edges}


def test_add_with_same_channels_has_no_projection():
    arch = residual(8, 8)
    model, out = forward_shape(arch)
    assert out == (3, 10)
    assert plan_graph(arch).nodes[3].param_count == 0
    assert module_params(model) == plan_graph(arch).param_count


def test_add_with_channel_mismatch_projects_to_first_input_channels():
    arch = residual(8, 12)
    plan = plan_graph(arch)
    merge = plan.nodes[3]
    assert merge.out_shape == (8, 8, 8)  # first input (edge order) is "a" with 8 channels
    assert merge.param_count == 12 * 8 + 8  # 1x1 conv 12 -> 8 with bias
    model, out = forward_shape(arch)
    assert out == (3, 10)
    assert module_params(model) == plan.param_count


def test_concat_stacks_channels():
    arch = residual(8, 12, merge="concat")
    plan = plan_graph(arch)
    assert plan.nodes[3].out_shape == (20, 8, 8)
    model, out = forward_shape(arch)
    assert out == (3, 10)
    assert module_params(model) == plan.param_count


def test_flat_add_projects_and_flat_concat_joins_features():
    for merge, width in (("add", 16), ("concat", 16 + 24)):
        nodes = [
            {"id": "in", "op": "input", "params": {}},
            {"id": "a", "op": "dense", "params": {"units": 16}},
            {"id": "b", "op": "dense", "params": {"units": 24}},
            {"id": "m", "op": merge, "params": {}},
            {"id": "out", "op": "output", "params": {"units": 4}},
        ]
        edges = [["in", "a"], ["a", "b"], ["a", "m"], ["b", "m"], ["m", "out"]]
        arch = {"input_shape": [10], "num_classes": 4, "nodes": nodes, "edges": edges}
        plan = plan_graph(arch)
        assert plan.nodes[3].out_shape == (width,)
        model, out = forward_shape(arch)
        assert out == (3, 4)
        assert module_params(model) == plan.param_count


def test_merge_input_order_is_edge_order_not_node_order():
    arch = residual(8, 12)
    arch["edges"] = [["in", "a"], ["a", "b"], ["b", "m"], ["a", "m"], ["m", "out"]]
    assert plan_graph(arch).nodes[3].out_shape == (12, 8, 8)
    model, _ = forward_shape(arch)
    assert module_params(model) == plan_graph(arch).param_count


def test_node_ids_with_dots_and_any_order_in_the_list_build():
    arch = residual(4, 4)
    for node in arch["nodes"]:
        node["id"] = "block.0." + node["id"]
    arch["edges"] = [["block.0." + a, "block.0." + b] for a, b in arch["edges"]]
    arch["nodes"].reverse()
    _, out = forward_shape(arch)
    assert out == (3, 10)


def test_json_string_input_is_accepted():
    import json

    arch = chain([1, 8, 8], [("conv2d", {"filters": 4, "kernel_size": 3})])
    _, out = forward_shape(json.loads(json.dumps(arch)))
    assert build_model(json.dumps(arch)) is not None and out == (3, 10)


INVALID = [
    ("unknown op", lambda a: a["nodes"][1].update(op="conv3d"), "node n1: unknown op 'conv3d'; allowed:"),
    ("missing filters", lambda a: a["nodes"][1]["params"].pop("filters"),
     "node n1 (conv2d): param 'filters' is required"),
    ("zero kernel", lambda a: a["nodes"][1]["params"].update(kernel_size=0),
     "node n1 (conv2d): param 'kernel_size': 0 is not allowed"),
    ("bad activation", lambda a: a["nodes"][1]["params"].update(activation="swish"),
     "param 'activation': 'swish' is not allowed; expected one of relu"),
    ("pool too big", lambda a: a["nodes"][2]["params"].update(pool_size=16),
     "node n2 (maxpool): pool_size 16 on a 8x8 input shrinks a dimension below 1"),
    ("cycle", lambda a: a["edges"].append(["n2", "n1"]), "needs exactly 1 input"),
    ("unknown edge end", lambda a: a["edges"].append(["n1", "zz"]), "unknown node 'zz'"),
    ("two inputs", lambda a: a["nodes"][1].update(op="input", params={}), "exactly one input node"),
    ("output units", lambda a: a["nodes"][-1]["params"].update(units=3),
     "node n5 (output): units 3 differs from num_classes 10"),
    ("dead end", lambda a: (a["nodes"].append({"id": "x", "op": "relu", "params": {}}), a["edges"].append(["n1", "x"])),
     "node x (relu): does not lead to the output"),
    ("bad input shape", lambda a: a.update(input_shape=[1, 8]), "input_shape: [1, 8] is not allowed"),
    ("no edges key", lambda a: a.pop("edges"), "edges: missing"),
    ("dropout rate", lambda a: a["nodes"][3].update(op="dropout", params={"rate": 1.5}),
     "node n3 (dropout): param 'rate': 1.5 is not allowed"),
    ("conv on flat", lambda a: a["nodes"][4].update(op="conv2d", params={"filters": 2, "kernel_size": 3}),
     "node n4 (conv2d): needs an image input [C, H, W], got flat"),
]


@pytest.mark.parametrize("name,mutate,message", INVALID, ids=[case[0] for case in INVALID])
def test_invalid_graph_is_refused_as_invalid_trial_naming_the_node(name, mutate, message):
    arch = chain([1, 8, 8], [("conv2d", {"filters": 4, "kernel_size": 3}), ("maxpool", {"pool_size": 2}),
                             ("flatten", {}), ("dense", {"units": 8})])
    mutate(arch)
    with pytest.raises(TrialFailure) as info:
        build_model(arch)
    assert info.value.kind == "invalid"
    assert message in info.value.message


def test_real_cycle_is_named():
    arch = residual(4, 4)
    arch["edges"] = [["in", "a"], ["a", "m"], ["b", "m"], ["m", "b"], ["m", "out"]]
    arch["nodes"][2].update(op="relu", params={})
    with pytest.raises(TrialFailure, match=r"node [bm] \((relu|add)\): is on a cycle"):
        build_model(arch)


def test_add_of_different_spatial_sizes_is_refused():
    arch = residual(4, 4)
    arch["nodes"][2] = {"id": "b", "op": "maxpool", "params": {"pool_size": 2}}
    with pytest.raises(TrialFailure, match=r"node m \(add\): inputs have different spatial sizes"):
        build_model(arch)
