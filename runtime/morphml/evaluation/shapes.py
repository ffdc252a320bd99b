"""Pure-Python reading of an architecture graph: validation, topological order, shapes,
parameter count and a FLOPs estimate, computed from the canonical graph JSON alone.

The torch model builder (`morphml.evaluation.model`) builds exactly what this plan describes,
so every layer's input size is known before torch is touched and the parameter count of the built
module equals `GraphPlan.param_count`. Anything that cannot be built is refused here with
`TrialFailure("invalid", ...)` naming the node, op and parameter, never later inside torch.

Canonical graph JSON (the contract shared with morphml.graph and morphml.distributed):
    {"input_shape": [C, H, W] or [F], "num_classes": K,
     "nodes": [{"id": "n0", "op": "input", "params": {}}, ...],
     "edges": [["n0", "n1"], ...]}
Input order of an add/concat node is the order of its edges in the list.

Imports only the standard library and morphml.graph (no torch, no numpy): the master may use it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from morphml.evaluation.errors import TrialFailure

Shape = tuple[int, ...]

CONV_OPS = ("conv2d", "sepconv2d", "depthwise_conv2d")
POOL_OPS = ("maxpool", "avgpool")
ACTIVATION_OPS = ("relu", "gelu", "silu", "tanh")
MERGE_OPS = ("add", "concat")
SHAPE_PRESERVING_OPS = ACTIVATION_OPS + ("identity", "batchnorm", "dropout")
ALL_OPS = (
    ("input", "output") + CONV_OPS + POOL_OPS
    + ("global_avgpool", "batchnorm", "dropout") + ACTIVATION_OPS
    + ("flatten", "dense", "identity") + MERGE_OPS
)
#: Values of a conv/dense "activation" param. None / "none" / "linear" / "identity" mean no activation.
ACTIVATIONS = ACTIVATION_OPS
NO_ACTIVATION = (None, "none", "linear", "identity")


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


def _invalid(message: str) -> TrialFailure:
    return TrialFailure("invalid", message)


def _positive_int(node: str, op: str, params: Mapping, name: str, default: Any = ...) -> int:
    value = params.get(name, default)
    if value is ...:
        raise _invalid(f"node {node} ({op}): param {name} is required (a positive integer)")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _invalid(f"node {node} ({op}): param {name}={value!r} must be a positive integer")
    return value


def _activation(node: str, op: str, params: Mapping) -> str | None:
    value = params.get("activation")
    if value in NO_ACTIVATION:
        return None
    if value not in ACTIVATIONS:
        allowed = ", ".join(ACTIVATIONS + ("none",))
        raise _invalid(f"node {node} ({op}): param activation={value!r} is not one of {allowed}")
    return value


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow-style "same" padding (before, after) so the output is ceil(size / stride)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _check_shape(value: Any, what: str) -> Shape:
    if (
        not isinstance(value, (list, tuple))
        or len(value) not in (1, 3)
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise _invalid(f"{what}={value!r} must be [C, H, W] or [F] with positive integers")
    return tuple(value)


def _topological_order(ids: list[str], edges: list[tuple[str, str]]) -> list[str]:
    """Kahn's algorithm, ties broken by node list order so the result is deterministic."""
    position = {node_id: i for i, node_id in enumerate(ids)}
    indegree = {node_id: 0 for node_id in ids}
    successors: dict[str, list[str]] = {node_id: [] for node_id in ids}
    for src, dst in edges:
        indegree[dst] += 1
        successors[src].append(dst)
    ready = sorted((n for n in ids if indegree[n] == 0), key=position.__getitem__)
    order: list[str] = []
    while ready:
        node_id = ready.pop(0)
        order.append(node_id)
        for nxt in successors[node_id]:
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                ready.append(nxt)
        ready.sort(key=position.__getitem__)
    if len(order) != len(ids):
        cyclic = [n for n in ids if indegree[n] > 0]
        raise _invalid(f"graph has a cycle through nodes {', '.join(cyclic)}")
    return order


def plan_graph(graph_or_json: Any) -> GraphPlan:
    """Validate a graph and compute its shapes; raise TrialFailure("invalid") naming what is wrong."""
    arch = as_arch_dict(graph_or_json)
    for key in ("input_shape", "num_classes", "nodes", "edges"):
        if key not in arch:
            raise _invalid(f"architecture JSON has no {key!r} (needs input_shape, num_classes, nodes, edges)")
    input_shape = _check_shape(arch["input_shape"], "input_shape")
    num_classes = arch["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise _invalid(f"num_classes={num_classes!r} must be an integer >= 2")

    nodes_json = arch["nodes"]
    if not isinstance(nodes_json, list) or not nodes_json:
        raise _invalid("nodes must be a non-empty list")
    nodes: dict[str, tuple[str, dict]] = {}
    ids: list[str] = []
    for i, node in enumerate(nodes_json):
        if not isinstance(node, Mapping) or not isinstance(node.get("id"), str) or "op" not in node:
            raise _invalid(f"nodes[{i}] must be an object with a string id, an op and params")
        node_id, op = node["id"], node["op"]
        params = node.get("params") or {}
        if node_id in nodes:
            raise _invalid(f"node id {node_id!r} appears twice")
        if op not in ALL_OPS:
            raise _invalid(f"node {node_id}: op {op!r} is not one of {', '.join(ALL_OPS)}")
        if not isinstance(params, Mapping):
            raise _invalid(f"node {node_id} ({op}): params must be an object, got {params!r}")
        nodes[node_id] = (op, dict(params))
        ids.append(node_id)

    edges_json = arch["edges"]
    if not isinstance(edges_json, list):
        raise _invalid("edges must be a list of [source, target] pairs")
    edges: list[tuple[str, str]] = []
    seen_edges: set[tuple[str, str]] = set()
    for i, edge in enumerate(edges_json):
        if not isinstance(edge, (list, tuple)) or len(edge) != 2:
            raise _invalid(f"edges[{i}]={edge!r} must be a [source, target] pair")
        src, dst = edge
        for end in (src, dst):
            if end not in nodes:
                raise _invalid(f"edges[{i}]={list(edge)!r} names unknown node {end!r}")
        if src == dst:
            raise _invalid(f"edges[{i}]: node {src} has an edge to itself")
        if (src, dst) in seen_edges:
            raise _invalid(f"edges[{i}]: edge {src} -> {dst} appears twice")
        seen_edges.add((src, dst))
        edges.append((src, dst))

    inputs_of: dict[str, list[str]] = {node_id: [] for node_id in ids}
    outputs_of: dict[str, list[str]] = {node_id: [] for node_id in ids}
    for src, dst in edges:
        inputs_of[dst].append(src)
        outputs_of[src].append(dst)

    input_ids = [n for n in ids if nodes[n][0] == "input"]
    output_ids = [n for n in ids if nodes[n][0] == "output"]
    if len(input_ids) != 1:
        raise _invalid(f"graph needs exactly one input node, found {len(input_ids)}")
    if len(output_ids) != 1:
        raise _invalid(f"graph needs exactly one output node, found {len(output_ids)}")
    for node_id in ids:
        op = nodes[node_id][0]
        n_in = len(inputs_of[node_id])
        if op == "input" and n_in:
            raise _invalid(f"node {node_id} (input) must have no incoming edges")
        if op in MERGE_OPS and n_in < 2:
            raise _invalid(f"node {node_id} ({op}) needs at least 2 inputs, has {n_in}")
        if op not in MERGE_OPS and op != "input" and n_in != 1:
            raise _invalid(f"node {node_id} ({op}) needs exactly 1 input, has {n_in}")
        if op == "output" and outputs_of[node_id]:
            raise _invalid(f"node {node_id} (output) must have no outgoing edges")

    order = _topological_order(ids, edges)
    # Every node has an input path (in-degree rules + acyclic); it must also feed the output.
    feeds_output = {output_ids[0]}
    stack = [output_ids[0]]
    while stack:
        for src in inputs_of[stack.pop()]:
            if src not in feeds_output:
                feeds_output.add(src)
                stack.append(src)
    dead = [n for n in ids if n not in feeds_output]
    if dead:
        raise _invalid(f"nodes {', '.join(dead)} do not lead to the output node")

    shapes: dict[str, Shape] = {}
    planned: list[NodePlan] = []
    for node_id in order:
        op, params = nodes[node_id]
        in_shapes = tuple(shapes[src] for src in inputs_of[node_id])
        out_shape, resolved, n_params, flops = _plan_node(node_id, op, params, in_shapes, input_shape, num_classes)
        shapes[node_id] = out_shape
        planned.append(NodePlan(node_id, op, resolved, tuple(inputs_of[node_id]), in_shapes, out_shape, n_params, flops))

    _validate_with_graph(arch)
    return GraphPlan(
        input_shape=input_shape,
        num_classes=num_classes,
        nodes=tuple(planned),
        param_count=sum(p.param_count for p in planned),
        flops=sum(p.flops for p in planned),
        output_id=output_ids[0],
    )


def _validate_with_graph(arch: dict) -> None:
    """Run morphml.graph's validation as well, so the graph layer and the builder refuse the same
    graphs (it is stricter on a few params, e.g. odd kernel sizes only)."""
    try:
        from morphml.graph import ArchitectureGraph, GraphError
    except ImportError:  # graph layer absent: this module's own checks stand alone
        return
    try:
        ArchitectureGraph.from_json(arch).validate()
    except GraphError as exc:
        raise _invalid(str(exc)) from None


def _need_spatial(node_id: str, op: str, shape: Shape) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise _invalid(f"node {node_id} ({op}) needs a [C, H, W] input, got flat shape {list(shape)}")
    return shape  # type: ignore[return-value]


def _plan_node(
    node_id: str, op: str, params: dict, in_shapes: tuple[Shape, ...], input_shape: Shape, num_classes: int
) -> tuple[Shape, dict, int, int]:
    """Return (output shape, resolved params, parameter count, FLOPs) for one node.

    FLOPs count a multiply-accumulate as 2 and only weighted layers (conv, dense, projections).
    """
    if op == "input":
        return input_shape, {}, 0, 0
    shape = in_shapes[0]

    if op in CONV_OPS:
        c, h, w = _need_spatial(node_id, op, shape)
        k = _positive_int(node_id, op, params, "kernel_size")
        stride = 1 if params.get("stride") is None else _positive_int(node_id, op, params, "stride")
        activation = _activation(node_id, op, params)
        if op == "depthwise_conv2d":
            # Each input channel gets its own filters; filters (if given) must be a multiple of C.
            filters = c if params.get("filters") is None else _positive_int(node_id, op, params, "filters")
            if filters % c:
                raise _invalid(
                    f"node {node_id} ({op}): param filters={filters} must be a multiple of its "
                    f"{c} input channels (depthwise: each channel gets filters/C kernels)"
                )
        else:
            filters = _positive_int(node_id, op, params, "filters")
        oh, ow = -(-h // stride), -(-w // stride)
        if op == "conv2d":
            n_params = k * k * c * filters + filters
            macs = oh * ow * k * k * c * filters
        elif op == "sepconv2d":
            # depthwise k x k (no bias) then pointwise 1x1 with bias
            n_params = k * k * c + c * filters + filters
            macs = oh * ow * (k * k * c + c * filters)
        else:
            n_params = k * k * filters + filters
            macs = oh * ow * k * k * filters
        resolved = {"filters": filters, "kernel_size": k, "stride": stride, "activation": activation}
        return (filters, oh, ow), resolved, n_params, 2 * macs

    if op in POOL_OPS:
        c, h, w = _need_spatial(node_id, op, shape)
        pool = _positive_int(node_id, op, params, "pool_size")
        stride = pool if params.get("stride") is None else _positive_int(node_id, op, params, "stride")
        if pool > h or pool > w:
            raise _invalid(
                f"node {node_id} ({op}): pool_size={pool} is larger than its input {h}x{w} "
                f"(input shape {list(shape)})"
            )
        return (c, (h - pool) // stride + 1, (w - pool) // stride + 1), {"pool_size": pool, "stride": stride}, 0, 0

    if op == "global_avgpool":
        c, _, _ = _need_spatial(node_id, op, shape)
        return (c,), {}, 0, 0

    if op == "batchnorm":
        return shape, {}, 2 * shape[0], 0

    if op == "dropout":
        rate = params.get("rate", 0.0)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise _invalid(f"node {node_id} ({op}): param rate={rate!r} must be a number in [0, 1)")
        return shape, {"rate": float(rate)}, 0, 0

    if op in ACTIVATION_OPS or op == "identity":
        return shape, {}, 0, 0

    if op == "flatten":
        return (math.prod(shape),), {}, 0, 0

    if op in ("dense", "output"):
        features = math.prod(shape)
        if op == "output":
            units = _positive_int(node_id, op, params, "units", num_classes)
            if units != num_classes:
                raise _invalid(f"node {node_id} (output): param units={units} must equal num_classes={num_classes}")
            activation = None
        else:
            units = _positive_int(node_id, op, params, "units")
            activation = _activation(node_id, op, params)
        return (units,), {"units": units, "activation": activation}, features * units + units, 2 * features * units

    if op in MERGE_OPS:
        ranks = {len(s) for s in in_shapes}
        if len(ranks) != 1:
            shown = ", ".join(str(list(s)) for s in in_shapes)
            raise _invalid(f"node {node_id} ({op}): cannot merge flat and [C, H, W] inputs ({shown})")
        if len(shape) == 3:
            spatial = {s[1:] for s in in_shapes}
            if len(spatial) != 1:
                shown = ", ".join(str(list(s)) for s in in_shapes)
                raise _invalid(f"node {node_id} ({op}): inputs need the same spatial size, got {shown}")
        if op == "concat":
            return (sum(s[0] for s in in_shapes),) + shape[1:], {}, 0, 0
        # add: every input is brought to the first input's channels/features by a 1x1 projection
        # (a 1x1 conv for [C, H, W], a linear layer for flat inputs), with bias.
        target = shape[0]
        size = math.prod(shape[1:]) if len(shape) == 3 else 1
        n_params = sum(s[0] * target + target for s in in_shapes[1:] if s[0] != target)
        macs = sum(s[0] * target * size for s in in_shapes[1:] if s[0] != target)
        return (target,) + shape[1:], {}, n_params, 2 * macs

    raise _invalid(f"node {node_id}: op {op!r} is not supported")  # pragma: no cover - ALL_OPS checked above
