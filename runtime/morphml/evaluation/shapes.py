"""The build plan of an architecture: per node, its resolved params, inputs, shapes, parameter
count and FLOPs, read from `morphml.graph` (the single implementation of validation, shape
inference and costs).

The torch model builder (`morphml.evaluation.model`) builds exactly what this plan describes,
so every layer's input size is known before torch is touched and the parameter count of the built
module equals `GraphPlan.param_count` (== `ArchitectureGraph.param_count()`). Anything that cannot
be built is refused here with `TrialFailure("invalid", ...)` naming the node, op and parameter,
never later inside torch.

Imports only the standard library, morphml.ops and morphml.graph (no torch, no numpy).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from morphml.evaluation.errors import TrialFailure
from morphml.graph import ArchitectureGraph, GraphError, Shape
from morphml.ops import OP_PARAMS

#: Every op a graph may contain (the graph layer's vocabulary).
ALL_OPS = tuple(OP_PARAMS)


@dataclass(frozen=True)
class NodePlan:
    """One node with everything the builder needs: resolved params, inputs and shapes."""

    id: str
    op: str
    params: dict[str, Any]
    inputs: tuple[str, ...]
    in_shapes: tuple[Shape, ...]
    out_shape: Shape
    param_count: int
    flops: int


@dataclass(frozen=True)
class GraphPlan:
    """A validated graph in topological order (input first, output last)."""

    input_shape: Shape
    num_classes: int
    nodes: tuple[NodePlan, ...]
    param_count: int
    flops: int
    output_id: str = field(default="")


def as_arch_dict(graph_or_json: Any) -> dict:
    """Accept a canonical JSON dict, a JSON string, or an object with `to_json()` (ArchitectureGraph)."""
    value = graph_or_json
    if hasattr(value, "to_json") and not isinstance(value, (str, bytes, Mapping)):
        value = value.to_json()
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise TrialFailure("invalid", f"architecture is not valid JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise TrialFailure(
            "invalid",
            f"architecture must be a graph JSON object with input_shape, num_classes, nodes, edges; "
            f"got {type(value).__name__}",
        )
    return dict(value)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow-style "same" padding (before, after) so the output is ceil(size / stride)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _builder_params(op: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The graph's normalized params, with "no activation" as None and output's implicit None."""
    resolved = dict(params)
    if op == "output" or resolved.get("activation") == "none":
        resolved["activation"] = None
    return resolved


def plan_graph(graph_or_json: Any) -> GraphPlan:
    """Validate a graph and lay out its build; raise TrialFailure("invalid") naming what is wrong."""
    try:
        if isinstance(graph_or_json, ArchitectureGraph):
            graph = graph_or_json.validate()
        else:
            graph = ArchitectureGraph.from_json(as_arch_dict(graph_or_json))
        shapes = graph.infer_shapes()
        costs = graph.node_costs()
    except GraphError as exc:
        raise TrialFailure("invalid", str(exc)) from None
    preds = graph.predecessors()
    planned = []
    for node_id in graph.topological_order():
        node = graph.node(node_id)
        n_params, flops = costs[node_id]
        planned.append(
            NodePlan(
                id=node_id,
                op=node.op,
                params=_builder_params(node.op, node.params),
                inputs=tuple(preds[node_id]),
                in_shapes=tuple(shapes[src] for src in preds[node_id]),
                out_shape=shapes[node_id],
                param_count=n_params,
                flops=flops,
            )
        )
    return GraphPlan(
        input_shape=tuple(graph.input_shape),
        num_classes=graph.num_classes,
        nodes=tuple(planned),
        param_count=sum(p.param_count for p in planned),
        flops=sum(p.flops for p in planned),
        output_id=planned[-1].id,
    )
