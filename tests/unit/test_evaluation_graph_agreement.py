"""morphml.graph and morphml.evaluation agree on every sampled architecture: the torch module has
exactly graph.param_count() parameters, the evaluation plan has the same shapes and FLOPs as the
graph, and the module runs a forward pass to [batch, num_classes]."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from morphml.evaluation import build_model, plan_graph  # noqa: E402
from morphml.graph import ArchitectureGraph  # noqa: E402
from morphml.mutation import crossover, mutate  # noqa: E402
from morphml.space import SearchSpace  # noqa: E402

pytestmark = pytest.mark.unit

# Every layer type, optional layers, and repeated blocks with add and concat skips.
EVERY_OP_SPACE = {
    "layers": [
        {
            "type": "conv2d",
            "filters": [4, 8],
            "kernelSize": [1, 3, 5],
            "stride": [1, 2],
            "activation": ["relu", "gelu", "none"],
        },
        {"type": "batchnorm", "optional": True},
        {
            "block": {
                "repeat": {"min": 0, "max": 2},
                "skip": ["none", "add", "concat"],
                "layers": [
                    {"type": "sepconv2d", "filters": [4, 6], "kernelSize": [3], "activation": ["silu"]},
                    {"type": "depthwise_conv2d", "kernelSize": [3], "activation": ["tanh"], "optional": True},
                    {"type": "relu", "optional": True},
                ],
            }
        },
        {"type": "maxpool", "poolSize": [2], "optional": True},
        {"type": "avgpool", "poolSize": [2, 3], "stride": [1], "optional": True},
        {"type": "gelu", "optional": True},
        {"type": "silu", "optional": True},
        {"type": "tanh", "optional": True},
        {"type": "identity", "optional": True},
        {"type": "global_avgpool", "optional": True},
        {"type": "flatten", "optional": True},
        {
            "block": {
                "repeat": {"min": 0, "max": 2},
                "skip": ["none", "add", "concat"],
                "layers": [
                    {"type": "dense", "units": [8, 12], "activation": ["relu", "none"]},
                    {"type": "dropout", "rate": [0.0, 0.3], "optional": True},
                ],
            }
        },
    ]
}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def check_agreement(graph: ArchitectureGraph) -> None:
    plan = plan_graph(graph.to_json())
    shapes = graph.infer_shapes()
    assert {node.id: tuple(node.out_shape) for node in plan.nodes} == {k: tuple(v) for k, v in shapes.items()}
    assert plan.param_count == graph.param_count(), graph.summary()
    assert plan.flops == graph.flops(), graph.summary()
    model = build_model(graph)  # the ArchitectureGraph object itself is accepted
    assert sum(p.numel() for p in model.parameters()) == graph.param_count(), graph.summary()
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, *graph.input_shape))
    assert tuple(out.shape) == (2, graph.num_classes)


@pytest.mark.timeout(120)
def test_sampled_and_mutated_graphs_build_with_the_graphs_param_count():
    space = SearchSpace.from_spec(EVERY_OP_SPACE)
    rng = random.Random(0)
    ops_seen: set[str] = set()
    for input_shape in ([3, 8, 8], [1, 9, 9]):
        space.bind(input_shape, 5)
        for _ in range(40):
            graph = space.sample(rng)
            check_agreement(graph)
            ops_seen.update(node["op"] for node in graph.to_json()["nodes"])
            child = mutate(graph, space, rng)
            check_agreement(child)
            check_agreement(crossover(graph, space.sample(rng), rng))
    # the sample covered the whole op vocabulary, skips included
    from morphml.evaluation.shapes import ALL_OPS

    assert ops_seen == set(ALL_OPS)


def test_digits_example_space_samples_build():
    import yaml

    with open(Path(__file__).resolve().parents[2] / "examples" / "digits.yaml") as handle:
        manifest = yaml.safe_load(handle)
    space = SearchSpace.from_spec(manifest["spec"]["searchSpace"]).bind([1, 8, 8], 10)
    rng = random.Random(1)
    for _ in range(20):
        check_agreement(space.sample(rng))
