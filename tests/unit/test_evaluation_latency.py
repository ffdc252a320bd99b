"""The trainer measures each trained model's inference latency on its own device (latency_ms)."""

from __future__ import annotations

import time

import pytest
import torch

from morphml.evaluation import evaluate_architecture
from morphml.evaluation.trainer import LATENCY_BATCH, LATENCY_PASSES, LATENCY_WARMUP, measure_latency_ms
from morphml.graph import ArchitectureGraph

pytestmark = pytest.mark.unit

SPEC = {"dataset": {"name": "digits"}, "epochs": 1, "batchSize": 64}


def chain(*layers: tuple[str, dict]) -> dict:
    nodes = [{"id": "n0", "op": "input", "params": {}}]
    nodes += [{"id": f"n{i}", "op": op, "params": params} for i, (op, params) in enumerate(layers, 1)]
    nodes.append({"id": f"n{len(nodes)}", "op": "output", "params": {"units": 10}})
    edges = [[f"n{i}", f"n{i + 1}"] for i in range(len(nodes) - 1)]
    return ArchitectureGraph.from_json(
        {"input_shape": [1, 8, 8], "num_classes": 10, "nodes": nodes, "edges": edges}
    ).to_json()


class Sleeper(torch.nn.Module):
    """A forward pass that takes 4 ms and counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(0.004)
        return x


def test_latency_is_the_median_of_the_timed_passes_after_the_warm_up():
    model = Sleeper()
    latency = measure_latency_ms(model, torch.zeros(4, 3), torch.device("cpu"))
    assert model.calls == LATENCY_WARMUP + LATENCY_PASSES
    assert 4.0 <= latency < 40.0  # a median: one slow pass on a busy machine does not move it
    assert not model.training  # timed in eval mode


@pytest.mark.timeout(120)
def test_trained_models_report_latency_and_a_much_larger_model_is_slower():
    tiny = evaluate_architecture(chain(("flatten", {}), ("dense", {"units": 8})), SPEC, device="cpu", seed=0)
    large = evaluate_architecture(
        chain(
            ("conv2d", {"filters": 128, "kernel_size": 5}),
            ("conv2d", {"filters": 128, "kernel_size": 5}),
            ("flatten", {}),
            ("dense", {"units": 512}),
        ),
        SPEC,
        device="cpu",
        seed=0,
    )
    for metrics in (tiny, large):
        assert metrics["latency_ms"] > 0 and metrics["latency_batch"] == LATENCY_BATCH
    assert large["flops"] > 1000 * tiny["flops"]
    assert large["latency_ms"] > 5 * tiny["latency_ms"], (tiny["latency_ms"], large["latency_ms"])
