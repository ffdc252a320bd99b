"""Property tests: random samples, mutation chains and crossovers from a space with optional
layers, repeated blocks and skip connections always validate, and build and run in torch."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from morphml.graph import ArchitectureGraph
from morphml.mutation import crossover, mutate
from morphml.space import Block, Layer, SearchSpace

pytestmark = pytest.mark.unit

SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
MANY = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rich_space() -> SearchSpace:
    """Every layer kind, optional layers, nested repeated blocks with add/concat skips."""
    return (
        SearchSpace("rich")
        .add_layers(
            Layer.conv2d(filters=[8, 16], kernel_size=[1, 2, 3, 5], stride=[1, 2], activation=["relu", "gelu", "none"]),
            Layer.batchnorm(optional=True),
            Block(
                [
                    Layer.sepconv2d(filters=[8, 16], kernel_size=[3, 4]),
                    Layer.depthwise_conv2d(kernel_size=[3], optional=True),
                    Layer.silu(optional=True),
                    Block(
                        [Layer.conv2d(filters=[8], kernel_size=[3]), Layer.tanh()], repeat=(0, 1), skip=["none", "add"]
                    ),
                ],
                repeat=(0, 3),
                skip=["none", "add", "concat"],
            ),
            Layer.maxpool(pool_size=[2, 3], optional=True),
            Layer.avgpool(pool_size=[2], stride=[1, 2], optional=True),
            Layer.relu(optional=True),
            Layer.identity(optional=True),
            Layer.global_avgpool(optional=True),
            Layer.flatten(optional=True),
            Block(
                [Layer.dense(units=[16, 32], activation=["relu", "gelu"]), Layer.dropout(rate=[0.0, 0.3])],
                repeat=(0, 2),
                skip=["none", "add", "concat"],
            ),
        )
        .bind([1, 8, 8], 10)
    )


SPACE = rich_space()

# Flat feature input ([F]): only dense-side layers make sense; mutations that insert image layers
# must be refused and retried.
FLAT_SPACE = (
    SearchSpace("flat")
    .add_layers(
        Layer.dense(units=[8, 16]),
        Layer.batchnorm(optional=True),
        Block([Layer.dense(units=[8, 16]), Layer.gelu(optional=True)], repeat=(0, 2), skip=["none", "add", "concat"]),
        Layer.dropout(rate=[0.0, 0.5], optional=True),
    )
    .bind([12], 3)
)


def _chain(seed: int, length: int) -> list[ArchitectureGraph]:
    rng = random.Random(seed)
    graph = SPACE.sample(rng)
    chain = [graph]
    for _ in range(length):
        graph = mutate(graph, SPACE, rng)
        chain.append(graph)
    return chain


def _assert_valid_and_canonical(graph: ArchitectureGraph) -> None:
    graph.validate()
    data = graph.to_json()
    again = ArchitectureGraph.from_json(data)
    assert again.to_json() == data
    assert again.arch_hash == graph.arch_hash
    assert graph.param_count() > 0
    assert graph.flops() > 0


@MANY
@given(seed=SEEDS)
def test_every_sample_validates_and_round_trips(seed: int) -> None:
    _assert_valid_and_canonical(SPACE.sample(random.Random(seed)))


@MANY
@given(seed=SEEDS, length=st.integers(min_value=1, max_value=8))
def test_every_mutation_chain_stays_valid(seed: int, length: int) -> None:
    for graph in _chain(seed, length):
        _assert_valid_and_canonical(graph)


@settings(max_examples=200, deadline=None)
@given(seed=SEEDS, length=st.integers(min_value=0, max_value=6))
def test_flat_input_samples_and_mutants_stay_valid(seed: int, length: int) -> None:
    rng = random.Random(seed)
    graph = FLAT_SPACE.sample(rng)
    for _ in range(length):
        graph = mutate(graph, FLAT_SPACE, rng)
        _assert_valid_and_canonical(graph)
    assert all(len(shape) == 1 for shape in graph.infer_shapes().values())


@settings(max_examples=300, deadline=None)
@given(seed=SEEDS)
def test_crossover_children_are_valid(seed: int) -> None:
    rng = random.Random(seed)
    first, second = mutate(SPACE.sample(rng), SPACE, rng), SPACE.sample(rng)
    _assert_valid_and_canonical(crossover(first, second, rng))


# -- the torch half: the graph builds and runs a forward pass with the inferred shapes --------
# Needs B2's morphml.evaluation.build_model (present in this tree); torch is imported lazily so
# the pure-Python properties above run without it.


@pytest.fixture(scope="module")
def torch_module():
    import torch  # a test dependency (morphml[test]); missing torch must fail, not skip

    torch.set_num_threads(1)
    return torch


def _forward_matches_shapes(torch, graph: ArchitectureGraph) -> None:
    from morphml.evaluation import build_model

    model = build_model(graph)
    model.eval()
    batch = torch.zeros((2, *graph.input_shape))
    with torch.no_grad():
        out = model(batch)
    assert tuple(out.shape) == (2, graph.num_classes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == graph.param_count()


@MANY
@given(seed=SEEDS, length=st.integers(min_value=0, max_value=3))
def test_samples_and_mutants_build_and_run_forward(torch_module, seed: int, length: int) -> None:
    _forward_matches_shapes(torch_module, _chain(seed, length)[-1])
