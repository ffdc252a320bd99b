"""Architecture graph: canonical JSON, hash, validation, shapes, costs, summary, variation."""

from __future__ import annotations

import json
import random

import pytest

from morphml.graph import ArchitectureGraph, GraphError
from morphml.mutation import crossover, mutate
from morphml.space import Block, Layer, SearchSpace

pytestmark = pytest.mark.unit


def conv(filters: int = 8, k: int = 3) -> dict:
    return {"op": "conv2d", "params": {"filters": filters, "kernel_size": k, "stride": 1, "activation": "relu"}}


def chain_graph(*ops: dict, skips: list[tuple[int, int]] = (), shape=(1, 8, 8), classes: int = 10) -> ArchitectureGraph:
    """input -> ops... -> output; each skip (body_index, shortcut_index) adds add(body, shortcut)
    after ops[body_index] (indices into ops, -1 = the input)."""
    nodes = [{"id": "in", "op": "input", "params": {}}]
    edges = []
    previous = "in"
    for index, op in enumerate(ops):
        node_id = f"x{index}"
        nodes.append({"id": node_id, **op})
        edges.append([previous, node_id])
        previous = node_id
        for body, shortcut in skips:
            if body == index:
                merge = f"add{index}"
                nodes.append({"id": merge, "op": "add", "params": {}})
                edges.append([node_id, merge])
                edges.append(["in" if shortcut == -1 else f"x{shortcut}", merge])
                previous = merge
    nodes.append({"id": "out", "op": "output", "params": {"units": classes}})
    edges.append([previous, "out"])
    return ArchitectureGraph(shape, classes, nodes, edges).validate()


def relabelled(graph: ArchitectureGraph, seed: int) -> ArchitectureGraph:
    """Same architecture: new random ids, shuffled node list, edges shuffled except that each
    node's inputs keep their relative order (that order is meaningful for add/concat)."""
    rng = random.Random(seed)
    ids = [n.id for n in graph.nodes]
    fresh = [f"node-{rng.randrange(10**9)}-{i}" for i in range(len(ids))]
    rng.shuffle(fresh)
    rename = dict(zip(ids, fresh, strict=True))
    nodes = [{"id": rename[n.id], "op": n.op, "params": dict(n.params)} for n in graph.nodes]
    rng.shuffle(nodes)
    by_target: dict[str, list[list[str]]] = {}
    for src, dst in graph.edges:
        by_target.setdefault(dst, []).append([rename[src], rename[dst]])
    queues = list(by_target.values())
    edges = []
    while queues:
        queue = rng.choice(queues)
        edges.append(queue.pop(0))
        if not queue:
            queues.remove(queue)
    return ArchitectureGraph(graph.input_shape, graph.num_classes, nodes, edges).validate()


# -- JSON ---------------------------------------------------------------------------------------


def test_canonical_json_round_trips_exactly() -> None:
    graph = chain_graph(conv(), conv(), skips=[(1, 0)]).canonical()
    data = graph.to_json()
    assert ArchitectureGraph.from_json(data).to_json() == data
    assert ArchitectureGraph.from_json(json.dumps(data)).to_json() == data
    assert data["nodes"][0] == {"id": "n0", "op": "input", "params": {}}
    assert data["nodes"][-1]["op"] == "output"


def test_defaults_are_filled_so_short_and_full_params_hash_equal() -> None:
    short = chain_graph({"op": "conv2d", "params": {"filters": 8}}, {"op": "maxpool", "params": {"pool_size": 2}})
    full = chain_graph(conv(8, 3), {"op": "maxpool", "params": {"pool_size": 2, "stride": 2}})
    assert short.arch_hash == full.arch_hash
    assert short.nodes[2].params == {"pool_size": 2, "stride": 2}


def test_dropout_rate_zero_int_and_float_hash_equal() -> None:
    flat = {"op": "flatten", "params": {}}
    assert (
        chain_graph(flat, {"op": "dropout", "params": {"rate": 0}}).arch_hash
        == chain_graph(flat, {"op": "dropout", "params": {"rate": 0.0}}).arch_hash
    )


# -- hash ---------------------------------------------------------------------------------------


def test_relabelled_copies_hash_equal() -> None:
    space = (
        SearchSpace("h")
        .add_layers(
            Layer.conv2d(filters=[8, 16]),
            Block(
                [Layer.conv2d(filters=[8, 16]), Layer.batchnorm(optional=True)], repeat=(1, 3), skip=["add", "concat"]
            ),
            Layer.global_avgpool(),
        )
        .bind([3, 8, 8], 4)
    )
    rng = random.Random(0)
    for seed in range(30):
        graph = space.sample(rng)
        copy = relabelled(graph, seed)
        assert [n.id for n in copy.nodes] != [n.id for n in graph.nodes]
        assert copy.arch_hash == graph.arch_hash
        assert copy.canonical().to_json() == graph.canonical().to_json()


def test_moved_skip_connection_hashes_different() -> None:
    ops = (conv(), conv(), conv(), conv())
    residual_from_first = chain_graph(*ops, skips=[(2, 0)])
    residual_from_second = chain_graph(*ops, skips=[(2, 1)])
    residual_later = chain_graph(*ops, skips=[(3, 1)])
    no_skip = chain_graph(*ops)
    hashes = {g.arch_hash for g in (residual_from_first, residual_from_second, residual_later, no_skip)}
    assert len(hashes) == 4


def test_concat_input_order_is_part_of_the_architecture() -> None:
    def concat_graph(order: list[str]) -> ArchitectureGraph:
        nodes = [
            {"id": "i", "op": "input", "params": {}},
            {"id": "a", **conv(8)},
            {"id": "b", **conv(16)},
            {"id": "c", "op": "concat", "params": {}},
            {"id": "o", "op": "output", "params": {"units": 3}},
        ]
        edges = [["i", "a"], ["a", "b"]] + [[x, "c"] for x in order] + [["c", "o"]]
        return ArchitectureGraph([1, 8, 8], 3, nodes, edges).validate()

    assert concat_graph(["a", "b"]).arch_hash != concat_graph(["b", "a"]).arch_hash


def test_shared_layer_and_two_identical_parallel_layers_hash_different() -> None:
    def graph(shared: bool) -> ArchitectureGraph:
        nodes = [{"id": "i", "op": "input", "params": {}}, {"id": "a", **conv(8)}, {"id": "b", **conv(8)}]
        nodes += [{"id": "m", "op": "add", "params": {}}, {"id": "o", "op": "output", "params": {"units": 3}}]
        edges = [["i", "a"], ["a", "m"], ["a" if shared else "b", "m"] if not shared else ["i", "m"], ["m", "o"]]
        if not shared:
            edges.insert(1, ["i", "b"])
        return ArchitectureGraph([1, 8, 8], 3, nodes if not shared else nodes[:2] + nodes[3:], edges).validate()

    assert graph(True).arch_hash != graph(False).arch_hash


def test_equal_hash_exactly_when_equal_canonical_form_over_many_samples() -> None:
    space = (
        SearchSpace("many")
        .add_layers(
            Layer.conv2d(filters=[4, 8], kernel_size=[1, 3]),
            Block(
                [Layer.conv2d(filters=[4, 8], kernel_size=[3]), Layer.relu(optional=True)],
                repeat=(0, 2),
                skip=["none", "add", "concat"],
            ),
            Layer.global_avgpool(optional=True),
        )
        .bind([2, 4, 4], 3)
    )
    rng = random.Random(0)
    by_hash: dict[str, str] = {}
    by_form: dict[str, str] = {}
    for _ in range(1500):
        graph = mutate(space.sample(rng), space, rng)
        form = graph.canonical().to_json_string()
        assert by_hash.setdefault(graph.arch_hash, form) == form
        assert by_form.setdefault(form, graph.arch_hash) == graph.arch_hash
    assert len(by_hash) > 300  # the check saw many distinct architectures, not a handful


def test_params_input_shape_and_classes_change_the_hash() -> None:
    base = chain_graph(conv(8))
    assert base.arch_hash != chain_graph(conv(16)).arch_hash
    assert base.arch_hash != chain_graph(conv(8), shape=(3, 8, 8)).arch_hash
    assert base.arch_hash != chain_graph(conv(8), classes=5).arch_hash


# -- validation ---------------------------------------------------------------------------------


def raw(nodes: list, edges: list, shape=(1, 8, 8), classes: int = 2) -> dict:
    return {"input_shape": list(shape), "num_classes": classes, "nodes": nodes, "edges": edges}


IN = {"id": "i", "op": "input", "params": {}}
OUT = {"id": "o", "op": "output", "params": {"units": 2}}


@pytest.mark.parametrize(
    ("data", "mentions"),
    [
        (
            raw(
                [IN, {"id": "a", "op": "relu", "params": {}}, {"id": "b", "op": "relu", "params": {}}, OUT],
                [["i", "a"], ["a", "b"], ["b", "a"], ["b", "o"]],
            ),
            "a",
        ),
        (
            raw(
                [IN, {"id": "a", "op": "relu", "params": {}}, {"id": "b", "op": "relu", "params": {}}, OUT],
                [["i", "a"], ["b", "a"], ["a", "b"], ["b", "o"]],
            ),
            "needs exactly 1 input",
        ),
        (raw([IN, dict(IN, id="j"), OUT], [["i", "o"]]), "exactly one input node"),
        (
            raw([IN, {"id": "a", "op": "relu", "params": {}}, OUT], [["i", "o"], ["i", "a"]]),
            "node a (relu): does not lead to the output",
        ),
        (
            raw(
                [IN, {"id": "p", "op": "maxpool", "params": {"pool_size": 3}}, OUT],
                [["i", "p"], ["p", "o"]],
                shape=(1, 2, 2),
            ),
            "node p (maxpool): pool_size 3 on a 2x2 input shrinks a dimension below 1",
        ),
        (
            raw(
                [IN, {"id": "f", "op": "flatten", "params": {}}, {"id": "c", **conv()}, OUT],
                [["i", "f"], ["f", "c"], ["c", "o"]],
            ),
            "node c (conv2d): needs an image input",
        ),
        (
            raw([IN, {"id": "c", "op": "conv3d", "params": {}}, OUT], [["i", "c"], ["c", "o"]]),
            "node c: unknown op 'conv3d'",
        ),
        (
            raw(
                [IN, {"id": "c", "op": "conv2d", "params": {"filters": 8, "padding": 1}}, OUT], [["i", "c"], ["c", "o"]]
            ),
            "node c (conv2d): unknown param 'padding'",
        ),
        (
            raw(
                [IN, {"id": "c", "op": "conv2d", "params": {"filters": 8, "kernel_size": 17}}, OUT],
                [["i", "c"], ["c", "o"]],
            ),
            "node c (conv2d): param 'kernel_size': 17 is not allowed",
        ),
        (
            raw([IN, dict(OUT, params={"units": 3})], [["i", "o"]]),
            "node o (output): units 3 differs from num_classes 2",
        ),
        (
            raw([IN, {"id": "m", "op": "add", "params": {}}, OUT], [["i", "m"], ["m", "o"]]),
            "node m (add): needs at least 2 inputs",
        ),
        (
            raw(
                [IN, {"id": "p", "op": "maxpool", "params": {}}, {"id": "m", "op": "concat", "params": {}}, OUT],
                [["i", "p"], ["p", "m"], ["i", "m"], ["m", "o"]],
            ),
            "node m (concat): inputs have different spatial sizes",
        ),
        (
            raw(
                [IN, {"id": "f", "op": "flatten", "params": {}}, {"id": "m", "op": "add", "params": {}}, OUT],
                [["i", "f"], ["f", "m"], ["i", "m"], ["m", "o"]],
            ),
            "node m (add): inputs mix image",
        ),
        (
            raw(
                [IN, {"id": "d", "op": "depthwise_conv2d", "params": {"filters": 3}}, OUT],
                [["i", "d"], ["d", "o"]],
                shape=(2, 8, 8),
            ),
            "not a multiple of the 2 input channels",
        ),
        (raw([IN, IN, OUT], [["i", "o"]]), "duplicate node id 'i'"),
        (raw([IN, OUT], [["i", "o"], ["i", "o"]]), "duplicate edge"),
        (raw([IN, OUT], [["i", "x"]]), "unknown node 'x'"),
        (raw([IN, OUT], [["i", "o"]], shape=(8, 8)), "input_shape"),
        ({"input_shape": [1, 8, 8], "nodes": [], "edges": []}, "num_classes: missing"),
    ],
)
def test_invalid_graphs_are_refused_naming_the_node(data: dict, mentions: str) -> None:
    with pytest.raises(GraphError) as info:
        ArchitectureGraph.from_json(data)
    assert mentions in str(info.value)


def test_cycle_is_reported() -> None:
    data = raw(
        [IN, {"id": "m", "op": "add", "params": {}}, {"id": "a", "op": "relu", "params": {}}, OUT],
        [["i", "m"], ["a", "m"], ["m", "a"], ["a", "o"]],
    )
    with pytest.raises(GraphError, match=r"cycle|does not lead|needs exactly"):
        ArchitectureGraph.from_json(data)


# -- shapes, costs, summary -----------------------------------------------------------------------


def test_shapes_params_and_flops_of_a_small_network() -> None:
    graph = chain_graph(conv(4, 3), {"op": "maxpool", "params": {"pool_size": 2}}, {"op": "flatten", "params": {}})
    shapes = graph.infer_shapes()
    assert shapes["x0"] == (4, 8, 8) and shapes["x1"] == (4, 4, 4) and shapes["x2"] == (64,)
    assert graph.param_count() == (9 * 1 * 4 + 4) + (64 * 10 + 10)
    assert graph.flops() == 2 * (8 * 8 * 9 * 1 * 4) + 2 * 64 * 10


def test_residual_add_with_channel_mismatch_counts_its_projection() -> None:
    graph = chain_graph(conv(8), conv(16), skips=[(1, 0)])
    assert graph.infer_shapes()["add1"] == (16, 8, 8)
    body = 9 * 1 * 8 + 8 + 9 * 8 * 16 + 16
    projection = 8 * 16 + 16
    head = 16 * 64 * 10 + 10
    assert graph.param_count() == body + projection + head


def test_strided_conv_uses_same_padding_and_flat_input_works() -> None:
    strided = chain_graph({"op": "conv2d", "params": {"filters": 4, "kernel_size": 3, "stride": 2}}, shape=(1, 7, 7))
    assert strided.infer_shapes()["x0"] == (4, 4, 4)
    flat = chain_graph({"op": "dense", "params": {"units": 16}}, {"op": "batchnorm", "params": {}}, shape=(20,))
    assert flat.infer_shapes()["x1"] == (16,)
    assert flat.param_count() == 20 * 16 + 16 + 32 + 16 * 10 + 10


def test_summary_is_one_short_line() -> None:
    graph = chain_graph(
        conv(32),
        {"op": "batchnorm", "params": {}},
        conv(32),
        conv(32),
        {"op": "maxpool", "params": {}},
        {"op": "dense", "params": {"units": 64}},
        {"op": "dropout", "params": {"rate": 0.2}},
        skips=[(3, 1)],
    )
    assert graph.summary() == "conv32k3-bn-conv32k3x2-add-maxpool2-fc64-drop0.2"
    big = chain_graph(*[conv(8, k) for k in (1, 3, 5, 7, 9, 11, 13, 15)] * 4)
    assert len(big.summary()) <= 120 and "\n" not in big.summary()


# -- variation ----------------------------------------------------------------------------------


def small_space() -> SearchSpace:
    return (
        SearchSpace("m")
        .add_layers(
            Layer.conv2d(filters=[8, 16, 32], kernel_size=[3, 5]),
            Block([Layer.conv2d(filters=[8, 16])], repeat=(1, 2), skip=["none", "add"]),
            Layer.maxpool(pool_size=[2]),
            Layer.flatten(),
            Layer.dense(units=[16, 32]),
        )
        .bind([1, 8, 8], 10)
    )


@pytest.mark.parametrize("kind", ["change_param", "add_layer", "remove_layer", "add_skip", "remove_skip"])
def test_each_mutation_kind_changes_the_architecture_validly(kind: str) -> None:
    space = small_space()
    rng = random.Random(3)
    changed = 0
    for _ in range(40):
        parent = space.sample(rng)
        if kind == "remove_skip":
            parent = mutate(parent, space, rng, kinds=["add_skip"])
        child = mutate(parent, space, rng, kinds=[kind])
        child.validate()
        changed += child.arch_hash != parent.arch_hash
    assert changed >= 30


def test_change_param_stays_within_the_space_vocabulary() -> None:
    space = small_space()
    vocab = space.vocabulary()
    rng = random.Random(9)
    graph = space.sample(rng)
    for _ in range(100):
        graph = mutate(graph, space, rng, kinds=["change_param"])
        for node in graph.nodes:
            for name, value in node.params.items():
                if node.op in vocab and name in vocab[node.op] and None not in vocab[node.op][name]:
                    assert value in vocab[node.op][name]


def test_mutation_that_cannot_succeed_returns_the_parent() -> None:
    space = SearchSpace("fixed").add_layers(Layer.conv2d(filters=8), Layer.flatten()).bind([1, 8, 8], 2)
    parent = space.sample(0)
    assert mutate(parent, space, 0, kinds=["change_param"]).arch_hash == parent.arch_hash


def test_crossover_combines_the_head_of_one_parent_with_the_tail_of_the_other() -> None:
    first = chain_graph(conv(8), conv(8), {"op": "flatten", "params": {}}, {"op": "dense", "params": {"units": 16}})
    second = chain_graph(conv(32), conv(32), {"op": "flatten", "params": {}}, {"op": "dense", "params": {"units": 64}})
    rng = random.Random(0)
    children = {crossover(first, second, rng).summary() for _ in range(40)}
    assert any(s.startswith("conv8") and "fc64" in s for s in children), children
    for summary in children:
        assert summary


def test_crossover_refuses_parents_for_different_data() -> None:
    with pytest.raises(GraphError, match="same input_shape"):
        crossover(chain_graph(conv()), chain_graph(conv(), shape=(3, 8, 8)), 0)
