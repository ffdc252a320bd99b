"""Architecture graph -> torch.nn.Module.

`build_model` reads the graph through `morphml.evaluation.shapes.plan_graph` (validation and
shape inference in pure Python) and then creates one torch layer per node with explicit sizes,
so no lazy modules are used and the parameter count is known before training. The module runs the
DAG in topological order.

This module imports torch at import time; `morphml.evaluation` imports it only when a model is
built, so `import morphml.evaluation` stays torch-free.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from morphml.evaluation.shapes import GraphPlan, NodePlan, plan_graph, same_padding

_ACTIVATION_LAYERS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _with_activation(layers: list[nn.Module], activation: str | None) -> nn.Module:
    if activation is not None:
        layers.append(_ACTIVATION_LAYERS[activation]())
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def _conv_layers(node: NodePlan) -> nn.Module:
    c, h, w = node.in_shapes[0]
    p = node.params
    k, stride, filters = p["kernel_size"], p["stride"], p["filters"]
    top, bottom = same_padding(h, k, stride)
    left, right = same_padding(w, k, stride)
    layers: list[nn.Module] = []
    if top == bottom and left == right:
        padding: Any = (top, left)
    else:
        # Even kernels need one more row/column on one side; pad explicitly (TF "same").
        layers.append(nn.ZeroPad2d((left, right, top, bottom)))
        padding = 0
    if node.op == "conv2d":
        layers.append(nn.Conv2d(c, filters, k, stride=stride, padding=padding))
    elif node.op == "sepconv2d":
        layers.append(nn.Conv2d(c, c, k, stride=stride, padding=padding, groups=c, bias=False))
        layers.append(nn.Conv2d(c, filters, 1))
    else:  # depthwise_conv2d
        layers.append(nn.Conv2d(c, filters, k, stride=stride, padding=padding, groups=c))
    return _with_activation(layers, p["activation"])


class _Add(nn.Module):
    """Sum of inputs; inputs whose channel count differs from the first are projected (1x1)."""

    def __init__(self, in_shapes: tuple[tuple[int, ...], ...]):
        super().__init__()
        target = in_shapes[0][0]
        projections: list[nn.Module] = [nn.Identity()]
        for shape in in_shapes[1:]:
            if shape[0] == target:
                projections.append(nn.Identity())
            elif len(shape) == 3:
                projections.append(nn.Conv2d(shape[0], target, 1))
            else:
                projections.append(nn.Linear(shape[0], target))
        self.projections = nn.ModuleList(projections)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        total = self.projections[0](inputs[0])
        for projection, x in zip(self.projections[1:], inputs[1:], strict=True):
            total = total + projection(x)
        return total


class _Concat(nn.Module):
    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.cat(inputs, dim=1)


class _Flatten(nn.Module):
    """Flattens [N, C, H, W] to [N, C*H*W]; leaves [N, F] alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) if x.dim() > 2 else x


def _node_module(node: NodePlan) -> nn.Module:
    op, p, shape = node.op, node.params, (node.in_shapes[0] if node.in_shapes else ())
    if op == "input" or op == "identity":
        return nn.Identity()
    if op in ("conv2d", "sepconv2d", "depthwise_conv2d"):
        return _conv_layers(node)
    if op == "maxpool":
        return nn.MaxPool2d(p["pool_size"], stride=p["stride"])
    if op == "avgpool":
        return nn.AvgPool2d(p["pool_size"], stride=p["stride"])
    if op == "global_avgpool":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    if op == "batchnorm":
        return nn.BatchNorm2d(shape[0]) if len(shape) == 3 else nn.BatchNorm1d(shape[0])
    if op == "dropout":
        return nn.Dropout(p["rate"])
    if op in _ACTIVATION_LAYERS:
        return _ACTIVATION_LAYERS[op]()
    if op == "flatten":
        return _Flatten()
    if op in ("dense", "output"):
        features = 1
        for d in shape:
            features *= d
        layers: list[nn.Module] = [_Flatten()] if len(shape) == 3 else []
        layers.append(nn.Linear(features, p["units"]))
        return _with_activation(layers, p["activation"])
    if op == "add":
        return _Add(node.in_shapes)
    if op == "concat":
        return _Concat()
    raise AssertionError(f"plan_graph accepted unknown op {op!r}")  # pragma: no cover


class GraphModule(nn.Module):
    """Runs the planned DAG in topological order. `plan` keeps shapes, params and FLOPs per node."""

    def __init__(self, plan: GraphPlan):
        super().__init__()
        self.plan = plan
        # ModuleDict keys cannot contain "."; index the layers by position instead of node id.
        self.layers = nn.ModuleList(_node_module(node) for node in plan.nodes)
        index = {node.id: i for i, node in enumerate(plan.nodes)}
        self._input_indices = [tuple(index[src] for src in node.inputs) for node in plan.nodes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs: list[torch.Tensor | None] = [None] * len(self.layers)
        for i, layer in enumerate(self.layers):
            inputs = self._input_indices[i]
            if not inputs:
                outputs[i] = layer(x)
            else:
                outputs[i] = layer(*(outputs[j] for j in inputs))
        result = outputs[-1]  # the output node is last in topological order
        assert result is not None, "a planned graph has at least its output node"
        return result

    def extra_repr(self) -> str:
        return f"nodes={len(self.plan.nodes)}, params={self.plan.param_count}"


def build_model(graph_or_json: Any) -> GraphModule:
    """Build the torch module for a graph (ArchitectureGraph, canonical JSON dict or JSON string).

    Raises TrialFailure("invalid", ...) naming the node/op/param when the graph cannot be built.
    """
    return GraphModule(plan_graph(graph_or_json))
