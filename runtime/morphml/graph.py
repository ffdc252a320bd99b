"""Architecture graphs: a DAG of ops with a canonical JSON form, a stable hash, shape inference,
cost estimates, and the builder that turns a search space's drawn layer program into a graph.

Canonical JSON (the contract with evaluation and the wire)::

    {"input_shape": [C, H, W] or [F], "num_classes": 10,
     "nodes": [{"id": "n0", "op": "input", "params": {}}, ..., {"id": "n9", "op": "output", "params": {"units": 10}}],
     "edges": [["n0", "n1"], ...]}

For ops with several inputs (add, concat) the input order is the order of their edges in the list;
it matters: concat stacks in that order, and add keeps the FIRST input's channel (or feature) count,
projecting every other input with a different count to it (1x1 conv with bias for images, linear
layer with bias for flat tensors; counted in ``param_count()``). sepconv2d is a k x k depthwise
conv without bias followed by a 1x1 pointwise conv with bias.

Shape rules (pure Python, what ``infer_shapes()`` computes and what the built model must match):
conv2d/sepconv2d/depthwise_conv2d use TensorFlow-style "same" padding (an even kernel gets the
extra row/column after), output [filters, ceil(H/stride), ceil(W/stride)]; depthwise_conv2d needs
filters to be a multiple of the input channels. maxpool/avgpool use no padding:
out = (H - pool_size) // stride + 1, refused when pool_size > H (a dimension would shrink below 1).
global_avgpool: [C, H, W] -> [C]. flatten: [C, H, W] -> [C*H*W]. dense/output flatten an image
input first. batchnorm works on both ranks.

Canonical labelling: nodes are numbered by a depth-first walk from the output node that follows
each node's inputs in edge order, numbering a node once all its inputs are numbered. That walk
depends only on structure, so the numbering is the same for any relabelled copy, and equal
canonical forms mean the same architecture (the walk is invertible). ``arch_hash`` is a SHA-256
over that form (input shape, class count, ops, params, numbered edges).

Mutation and crossover need a search space's vocabulary as well as graphs, so they live one layer
up, in `morphml.mutation`; a graph never refers to the space it was drawn from, so the JSON stays
exactly the contract above.

Imports: the standard library and `morphml.ops` (the op vocabulary and parameter rules). Never
`morphml.space` or anything above it; no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from morphml.ops import CONV_OPS, MERGE_OPS, OP_PARAMS, POOL_OPS, REQUIRED, SHAPE_PRESERVING_OPS


class GraphError(ValueError):
    """An architecture graph is malformed or invalid; the message names the node, op and param."""

    def __init__(self, message: str, *, node: str | None = None, op: str | None = None, reason: str | None = None):
        prefix = ""
        if node is not None:
            prefix = f"node {node} ({op}): " if op else f"node {node}: "
        super().__init__(prefix + message)
        self.node = node
        self.op = op
        # The message without the node id: what sampling counts when it reports why samples fail.
        self.reason = (f"{op}: {message}" if op else message) if reason is None else reason


@dataclass(frozen=True)
class Node:
    id: str
    op: str
    params: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "op": self.op, "params": dict(self.params)}


Shape = tuple[int, ...]



def normalize_params(op: str, params: Any, *, node: str = "?") -> dict[str, Any]:
    """Check a node's params against the vocabulary and fill defaults (so equal layers hash equal)."""
    if op not in OP_PARAMS:
        raise GraphError(f"unknown op {op!r}; allowed: {', '.join(OP_PARAMS)}", node=node)
    if not isinstance(params, Mapping):
        raise GraphError(f"params must be a mapping, got {params!r}", node=node, op=op)
    rules = OP_PARAMS[op]
    result: dict[str, Any] = {}
    for name in params:
        if name not in rules:
            allowed = ", ".join(rules) or "no parameters"
            raise GraphError(f"unknown param {name!r}; allowed: {allowed}", node=node, op=op)
    for name, rule in rules.items():
        value = params.get(name)
        if value is None:
            if name == "stride" and op in POOL_OPS:
                value = result.get("pool_size", params.get("pool_size"))
            elif rule.default is not REQUIRED and rule.default is not None:
                value = rule.default
            else:
                raise GraphError(f"param {name!r} is required", node=node, op=op)
        try:
            result[name] = rule.normalize(value)
        except ValueError as exc:
            raise GraphError(f"param {name!r}: {value!r} is not allowed; expected {exc}", node=node, op=op) from None
    return result


def node_output_shape(node: Node, in_shapes: Sequence[Shape]) -> Shape:
    """Output shape of one node given its input shapes (in edge order); GraphError if impossible."""
    op, p = node.op, node.params

    def fail(message: str) -> GraphError:
        return GraphError(message, node=node.id, op=op)

    if op in MERGE_OPS:
        ranks = {len(s) for s in in_shapes}
        if len(ranks) != 1:
            raise fail(f"inputs mix image [C, H, W] and flat [F] tensors: {[list(s) for s in in_shapes]}")
        if len(in_shapes[0]) == 3 and len({s[1:] for s in in_shapes}) != 1:
            raise fail(f"inputs have different spatial sizes {[list(s) for s in in_shapes]}; {op} needs equal H x W")
        if op == "add":
            return in_shapes[0]
        if len(in_shapes[0]) == 3:
            return (sum(s[0] for s in in_shapes),) + in_shapes[0][1:]
        return (sum(s[0] for s in in_shapes),)
    (x,) = in_shapes
    if op in CONV_OPS or op in POOL_OPS or op == "global_avgpool":
        if len(x) != 3:
            raise fail(f"needs an image input [C, H, W], got flat {list(x)} (after flatten, dense or global_avgpool)")
        channels, height, width = x
        if op in CONV_OPS:
            if op == "depthwise_conv2d" and p["filters"] % channels != 0:
                raise fail(f"filters {p['filters']} is not a multiple of the {channels} input channels")
            stride = p["stride"]
            return (p["filters"], -(-height // stride), -(-width // stride))
        if op == "global_avgpool":
            return (channels,)
        size, stride = p["pool_size"], p["stride"]
        if size > height or size > width:
            raise fail(f"pool_size {size} on a {height}x{width} input shrinks a dimension below 1")
        return (channels, (height - size) // stride + 1, (width - size) // stride + 1)
    if op in SHAPE_PRESERVING_OPS:
        return x
    if op == "flatten":
        return (math.prod(x),)
    if op in ("dense", "output"):
        return (p["units"],)
    raise fail("has no shape rule")  # input is handled by the caller


def _node_cost(node: Node, in_shapes: Sequence[Shape], out: Shape) -> tuple[int, int]:
    """(trainable parameters, FLOPs) of one node, exactly as the built model has them.

    FLOPs count a multiply-accumulate as 2 and only weighted layers (convs, dense layers and add
    projections); the evaluation layer's pure-Python plan uses the same rules.
    """
    op, p = node.op, node.params
    if op == "conv2d":
        k, cin = p["kernel_size"], in_shapes[0][0]
        return k * k * cin * out[0] + out[0], 2 * out[1] * out[2] * k * k * cin * out[0]
    if op == "sepconv2d":
        k, cin = p["kernel_size"], in_shapes[0][0]
        # depthwise k x k (groups=cin, no bias) then pointwise 1x1 to filters (with bias)
        return k * k * cin + cin * out[0] + out[0], 2 * out[1] * out[2] * (k * k * cin + cin * out[0])
    if op == "depthwise_conv2d":
        k = p["kernel_size"]
        return k * k * out[0] + out[0], 2 * out[1] * out[2] * k * k * out[0]
    if op in ("dense", "output"):
        fan_in = math.prod(in_shapes[0])
        return fan_in * out[0] + out[0], 2 * fan_in * out[0]
    if op == "batchnorm":
        return 2 * in_shapes[0][0], 0
    if op == "add":
        params = macs = 0
        target = in_shapes[0][0]
        spatial = math.prod(in_shapes[0][1:]) if len(in_shapes[0]) == 3 else 1
        for shape in in_shapes[1:]:
            if shape[0] != target:
                params += shape[0] * target + target
                macs += spatial * shape[0] * target
        return params, 2 * macs
    return 0, 0


class ArchitectureGraph:
    """One architecture: input shape, class count, nodes (op + params) and ordered edges.

    Treat instances as immutable: mutation and crossover return new graphs.
    ``==`` compares the exact JSON (ids included); compare ``arch_hash`` for "same architecture".
    """

    # _hash, _shapes, _structure, _canonical: results computed once (the graph never changes).
    __slots__ = ("input_shape", "num_classes", "nodes", "edges", "_by_id", "_hash", "_shapes", "_structure",
                 "_canonical", "_preds")

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        nodes: Iterable[Node | Mapping[str, Any]],
        edges: Iterable[Sequence[str]],
        *,
        _normalized: bool = False,
    ) -> None:
        # _normalized: the Node objects' params already went through normalize_params (graphs
        # this module builds itself); the check is then not repeated.
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) not in (1, 3) or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in input_shape
        ):
            raise GraphError(
                f"input_shape: {input_shape!r} is not allowed; expected [C, H, W] or [F] of positive integers"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise GraphError(f"num_classes: {num_classes!r} is not allowed; expected a positive integer")
        self.input_shape: Shape = tuple(input_shape)
        self.num_classes = num_classes
        built: list[Node] = []
        by_id: dict[str, Node] = {}
        for index, raw in enumerate(nodes):
            node_id: Any  # as read; checked below
            op: Any
            if isinstance(raw, Node):
                node_id, op, params = raw.id, raw.op, raw.params
            elif isinstance(raw, Mapping):
                extra = sorted(set(raw) - {"id", "op", "params"})
                if extra:
                    raise GraphError(f"nodes[{index}]: unknown field {extra[0]!r}; allowed: id, op, params")
                node_id, op, params = raw.get("id"), raw.get("op"), raw.get("params", {})
            else:
                raise GraphError(f"nodes[{index}]: expected {{id, op, params}}, got {raw!r}")
            if not isinstance(node_id, str) or not node_id:
                raise GraphError(f"nodes[{index}].id: {node_id!r} is not allowed; expected a non-empty string")
            if node_id in by_id:
                raise GraphError(f"nodes[{index}].id: duplicate node id {node_id!r}")
            if _normalized and isinstance(raw, Node):
                node = raw
            else:
                node = Node(node_id, op, normalize_params(op, params, node=node_id))
            built.append(node)
            by_id[node_id] = node
        edge_list: list[tuple[str, str]] = []
        seen: set[tuple[str, str]] = set()
        for index, edge in enumerate(edges):
            if not isinstance(edge, (list, tuple)) or len(edge) != 2:
                raise GraphError(f"edges[{index}]: {edge!r} is not allowed; expected [source id, target id]")
            src, dst = edge
            for end in (src, dst):
                if end not in by_id:
                    raise GraphError(f"edges[{index}]: {edge!r} names unknown node {end!r}")
            if src == dst:
                raise GraphError(f"edges[{index}]: self loop on node {src!r}")
            if (src, dst) in seen:
                raise GraphError(f"edges[{index}]: duplicate edge {[src, dst]}")
            seen.add((src, dst))
            edge_list.append((src, dst))
        self.nodes: tuple[Node, ...] = tuple(built)
        self.edges: tuple[tuple[str, str], ...] = tuple(edge_list)
        self._by_id = by_id
        self._hash: str | None = None
        self._shapes: dict[str, Shape] | None = None
        self._structure: tuple[str, str] | None = None
        self._canonical: tuple[str, ...] | None = None
        self._preds: dict[str, tuple[str, ...]] | None = None

    # -- JSON -----------------------------------------------------------------------------------

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str, *, validate: bool = True) -> ArchitectureGraph:
        """Read the canonical JSON (a dict or a JSON string); validates unless told not to."""
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise GraphError(f"not JSON: {exc}") from None
        if not isinstance(data, Mapping):
            raise GraphError(
                f"expected an object with input_shape, num_classes, nodes, edges; got {type(data).__name__}"
            )
        missing = [key for key in ("input_shape", "num_classes", "nodes", "edges") if key not in data]
        if missing:
            raise GraphError(f"{missing[0]}: missing; an architecture has input_shape, num_classes, nodes, edges")
        extra = sorted(set(data) - {"input_shape", "num_classes", "nodes", "edges"})
        if extra:
            raise GraphError(f"{extra[0]}: unknown field; allowed: input_shape, num_classes, nodes, edges")
        if not isinstance(data["nodes"], list) or not isinstance(data["edges"], list):
            raise GraphError("nodes and edges must be lists")
        graph = cls(data["input_shape"], data["num_classes"], data["nodes"], data["edges"])
        if validate:
            graph.validate()
        return graph

    def to_json(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "nodes": [node.to_json() for node in self.nodes],
            "edges": [[src, dst] for src, dst in self.edges],
        }

    def to_json_string(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ArchitectureGraph) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.arch_hash)

    def __len__(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        return f"ArchitectureGraph({self.summary()!r}, nodes={len(self.nodes)}, hash={self.arch_hash[:12]})"

    # -- structure ------------------------------------------------------------------------------

    def node(self, node_id: str) -> Node:
        return self._by_id[node_id]

    def predecessors(self) -> dict[str, list[str]]:
        """node id -> input node ids in edge order (the port order of add/concat)."""
        return {node_id: list(inputs) for node_id, inputs in self._pred_map().items()}

    def _pred_map(self) -> dict[str, tuple[str, ...]]:
        """predecessors(), computed once and shared read-only by this class's own methods."""
        if self._preds is None:
            preds: dict[str, list[str]] = {node.id: [] for node in self.nodes}
            for src, dst in self.edges:
                preds[dst].append(src)
            self._preds = {node_id: tuple(inputs) for node_id, inputs in preds.items()}
        return self._preds

    def successors(self) -> dict[str, list[str]]:
        succs: dict[str, list[str]] = {node.id: [] for node in self.nodes}
        for src, dst in self.edges:
            succs[src].append(dst)
        return succs

    def _endpoints(self) -> tuple[str, str]:
        inputs = [n.id for n in self.nodes if n.op == "input"]
        outputs = [n.id for n in self.nodes if n.op == "output"]
        if len(inputs) != 1:
            raise GraphError(f"an architecture has exactly one input node, found {len(inputs)}: {inputs}")
        if len(outputs) != 1:
            raise GraphError(f"an architecture has exactly one output node, found {len(outputs)}: {outputs}")
        return inputs[0], outputs[0]

    def topological_order(self) -> list[str]:
        """Kahn's algorithm in node-list order; GraphError naming a node on a cycle."""
        preds = self._pred_map()
        succs = self.successors()
        pending = {node_id: len(p) for node_id, p in preds.items()}
        ready = [n.id for n in self.nodes if pending[n.id] == 0]
        order: list[str] = []
        while ready:
            current = ready.pop(0)
            order.append(current)
            for nxt in succs[current]:
                pending[nxt] -= 1
                if pending[nxt] == 0:
                    ready.append(nxt)
        if len(order) != len(self.nodes):
            stuck = next(n for n in self.nodes if pending[n.id] > 0)
            raise GraphError("is on a cycle; an architecture must be acyclic", node=stuck.id, op=stuck.op)
        return order

    def _check_structure(self) -> tuple[str, str]:
        if self._structure is not None:
            return self._structure
        input_id, output_id = self._endpoints()
        preds, succs = self._pred_map(), self.successors()
        for node in self.nodes:
            count = len(preds[node.id])
            if node.op == "input":
                if count:
                    raise GraphError("the input node cannot have inputs", node=node.id, op=node.op)
            elif node.op in MERGE_OPS:
                if count < 2:
                    raise GraphError(f"needs at least 2 inputs, has {count}", node=node.id, op=node.op)
            elif count != 1:
                raise GraphError(f"needs exactly 1 input, has {count}", node=node.id, op=node.op)
            if node.op == "output" and succs[node.id]:
                raise GraphError("the output node cannot feed other nodes", node=node.id, op=node.op)
        self.topological_order()
        forward = reachable(input_id, succs)
        backward = reachable(output_id, preds)
        for node in self.nodes:
            if node.id not in forward:
                raise GraphError("is not reachable from the input node", node=node.id, op=node.op)
            if node.id not in backward:
                raise GraphError("does not lead to the output node", node=node.id, op=node.op)
        self._structure = (input_id, output_id)
        return self._structure

    # -- validation and shapes ------------------------------------------------------------------

    def infer_shapes(self) -> dict[str, Shape]:
        """node id -> output shape, in topological order; GraphError on any inconsistency."""
        if self._shapes is not None:
            return dict(self._shapes)
        self._check_structure()
        preds = self._pred_map()
        shapes: dict[str, Shape] = {}
        for node_id in self.topological_order():
            node = self._by_id[node_id]
            if node.op == "input":
                shapes[node_id] = self.input_shape
            else:
                shapes[node_id] = node_output_shape(node, [shapes[p] for p in preds[node_id]])
        output = next(n for n in self.nodes if n.op == "output")
        if output.params["units"] != self.num_classes:
            raise GraphError(
                f"units {output.params['units']} differs from num_classes {self.num_classes}",
                node=output.id,
                op="output",
            )
        self._shapes = shapes
        return dict(shapes)

    def validate(self) -> ArchitectureGraph:
        """Raise GraphError naming the node/op/param if invalid; return self otherwise."""
        self.infer_shapes()
        return self

    def is_valid(self) -> bool:
        try:
            self.validate()
        except GraphError:
            return False
        return True

    # -- canonical form and hash ----------------------------------------------------------------

    def canonical_order(self) -> list[str]:
        """Node ids in canonical order (see module docstring); input first, output last."""
        if self._canonical is not None:
            return list(self._canonical)
        _, output_id = self._check_structure()
        preds = self._pred_map()
        visited = {output_id}
        order: list[str] = []
        stack: list[tuple[str, Any]] = [(output_id, iter(preds[output_id]))]
        while stack:
            node_id, inputs = stack[-1]
            for pred in inputs:
                if pred not in visited:
                    visited.add(pred)
                    stack.append((pred, iter(preds[pred])))
                    break
            else:
                stack.pop()
                order.append(node_id)
        self._canonical = tuple(order)
        return order

    def canonical(self) -> ArchitectureGraph:
        """The same architecture with nodes in canonical order and ids n0, n1, ..."""
        order = self.canonical_order()
        rename = {old: f"n{index}" for index, old in enumerate(order)}
        preds = self._pred_map()
        edges = [[rename[src], rename[dst]] for dst in order for src in preds[dst]]
        if len(order) == len(self.nodes) and all(node.id == f"n{i}" and node.id == order[i] for i, node in
                                                  enumerate(self.nodes)) and [list(e) for e in self.edges] == edges:
            return self  # already canonical (graphs are immutable, so sharing is safe)
        nodes = [Node(rename[old], self._by_id[old].op, dict(self._by_id[old].params)) for old in order]
        graph = ArchitectureGraph(self.input_shape, self.num_classes, nodes, edges, _normalized=True)
        if self._shapes is not None:
            graph._shapes = {rename[k]: v for k, v in self._shapes.items()}
        return graph

    @property
    def arch_hash(self) -> str:
        """Hex SHA-256 over topology + params, independent of node ids and node-list order."""
        if self._hash is None:
            order = self.canonical_order()
            index = {node_id: i for i, node_id in enumerate(order)}
            preds = self._pred_map()
            payload = {
                "input_shape": list(self.input_shape),
                "num_classes": self.num_classes,
                "nodes": [[self._by_id[n].op, self._by_id[n].params, [index[p] for p in preds[n]]] for n in order],
            }
            text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
            self._hash = hashlib.sha256(text.encode()).hexdigest()
        return self._hash

    # -- costs and description ------------------------------------------------------------------

    def node_costs(self) -> dict[str, tuple[int, int]]:
        """node id -> (trainable parameters, FLOPs) of that node in the built model."""
        shapes = self.infer_shapes()
        preds = self._pred_map()
        return {
            node.id: (0, 0)
            if node.op == "input"
            else _node_cost(node, [shapes[x] for x in preds[node.id]], shapes[node.id])
            for node in self.nodes
        }

    def _costs(self) -> tuple[int, int]:
        costs = self.node_costs().values()
        return sum(p for p, _ in costs), sum(f for _, f in costs)

    def param_count(self) -> int:
        """Trainable parameters of the built model (weights and biases, batchnorm scale and shift)."""
        return self._costs()[0]

    def flops(self) -> int:
        """Forward-pass FLOPs per example: 2 x multiply-accumulates of convs, dense layers, projections."""
        return self._costs()[1]

    def summary(self, max_length: int = 120) -> str:
        """Short one-line description, e.g. 'conv32k3-bn-conv32k3-add-maxpool2-fc64-drop0.2'."""
        tokens = [_token(self._by_id[n]) for n in self.canonical_order()]
        tokens = [t for t in tokens if t]
        collapsed: list[str] = []
        index = 0
        while index < len(tokens):
            run = 1
            while index + run < len(tokens) and tokens[index + run] == tokens[index]:
                run += 1
            collapsed.append(tokens[index] + (f"x{run}" if run > 1 else ""))
            index += run
        text = "-".join(collapsed)
        if len(text) > max_length:
            text = text[: max_length - 3].rstrip("-") + "..."
        return text


def reachable(start: str, neighbours: Mapping[str, Sequence[str]]) -> set[str]:
    """Every node reachable from ``start`` (itself included) along ``neighbours``."""
    seen = {start}
    frontier = [start]
    while frontier:
        for nxt in neighbours[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return seen


def _token(node: Node) -> str:
    op, p = node.op, node.params
    stride = lambda: f"s{p['stride']}" if p.get("stride", 1) != 1 else ""  # noqa: E731
    if op == "conv2d":
        return f"conv{p['filters']}k{p['kernel_size']}{stride()}"
    if op == "sepconv2d":
        return f"sep{p['filters']}k{p['kernel_size']}{stride()}"
    if op == "depthwise_conv2d":
        return f"dw{p['filters']}k{p['kernel_size']}{stride()}"
    if op in POOL_OPS:
        suffix = f"s{p['stride']}" if p["stride"] != p["pool_size"] else ""
        return f"{'max' if op == 'maxpool' else 'avg'}pool{p['pool_size']}{suffix}"
    if op == "dense":
        return f"fc{p['units']}"
    if op == "dropout":
        return f"drop{p['rate']:g}"
    short = {"global_avgpool": "gap", "batchnorm": "bn", "flatten": "flat", "identity": "id", "concat": "cat"}
    if op in ("input", "output"):
        return ""
    return short.get(op, op)


# --------------------------------------------------------------------------------------------
# Building from a drawn layer program (what SearchSpace.sample draws)
# --------------------------------------------------------------------------------------------


def build_graph_from_choices(
    program: Sequence[tuple[Any, ...]], input_shape: Sequence[int], num_classes: int
) -> ArchitectureGraph:
    """Turn a drawn layer program (see `SearchSpace._draw`) into a validated canonical graph.

    Shapes are tracked while building so that a depthwise conv without a filter count gets the
    channel count of its input, and an impossible layer fails fast.
    """
    nodes: list[Node] = [Node("n0", "input", {})]
    edges: list[list[str]] = []
    shapes: dict[str, Shape] = {"n0": tuple(input_shape)}
    current = "n0"
    starts: list[str] = []

    def add(op: str, params: Mapping[str, Any], inputs: list[str]) -> str:
        node_id = f"n{len(nodes)}"
        if op == "depthwise_conv2d" and params.get("filters") is None:
            shape = shapes[inputs[0]]
            params = {**params, "filters": shape[0] if len(shape) == 3 else 1}
        node = Node(node_id, op, normalize_params(op, params, node=node_id))
        shapes[node_id] = node_output_shape(node, [shapes[i] for i in inputs])
        nodes.append(node)
        edges.extend([i, node_id] for i in inputs)
        return node_id

    for instruction in program:
        kind = instruction[0]
        if kind == "layer":
            current = add(instruction[1], instruction[2], [current])
        elif kind == "begin":
            starts.append(current)
        elif kind == "end":
            start = starts.pop()
            skip = instruction[1]
            if skip != "none" and start != current:
                # Body output first: a residual add keeps the body's channel count.
                current = add(skip, {}, [current, start])
        else:  # pragma: no cover - programs come from SearchSpace._draw
            raise AssertionError(instruction)
    add("output", {"units": num_classes}, [current])
    graph = ArchitectureGraph(input_shape, num_classes, nodes, edges, _normalized=True)
    graph._check_structure()
    graph._shapes = shapes  # what infer_shapes() would compute again: same ops, same input order
    return graph.canonical()
