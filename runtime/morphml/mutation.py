"""Variation operators: mutation and crossover of architecture graphs.

What lives here: `mutate(graph, space, rng)` (one random change: a parameter, a layer added or
removed, a skip connection added or removed; values and ops come from the space's vocabulary),
`crossover(first, second, rng)` (one-point, at nodes every input-to-output path passes) and
`MUTATIONS` (the mutation kinds). Both return new canonical graphs; parents are never changed.

They need a graph and the space's vocabulary, so they sit above both: the optimizers call them,
the graph and the space know nothing of them.

Imports: the standard library, `morphml.ops`, `morphml.graph`, `morphml.space`. No torch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from morphml.graph import ArchitectureGraph, GraphError, Node, normalize_params, reachable
from morphml.ops import MERGE_OPS, POOL_OPS, as_rng
from morphml.space import SearchSpace

__all__ = ["MUTATIONS", "crossover", "mutate"]

MUTATIONS = ("change_param", "add_layer", "remove_layer", "add_skip", "remove_skip")
# change_param is the workhorse; topology changes are rarer so sizes get tuned too.
_MUTATION_WEIGHTS = {"change_param": 4, "add_layer": 1, "remove_layer": 1, "add_skip": 1, "remove_skip": 1}


class _Draft:
    """A mutable copy of a graph for the variation operators."""

    def __init__(self, graph: ArchitectureGraph) -> None:
        self.input_shape = graph.input_shape
        self.num_classes = graph.num_classes
        self.nodes: dict[str, tuple[str, dict[str, Any]]] = {n.id: (n.op, dict(n.params)) for n in graph.nodes}
        self.edges: list[list[str]] = [[s, d] for s, d in graph.edges]
        self._counter = 0

    def new_id(self) -> str:
        while True:
            self._counter += 1
            candidate = f"m{self._counter}"
            if candidate not in self.nodes:
                return candidate

    def build(self) -> ArchitectureGraph:
        if len(self.nodes) <= 2:
            raise GraphError("no layer would be left between input and output")
        nodes = [Node(node_id, op, params) for node_id, (op, params) in self.nodes.items()]
        return ArchitectureGraph(self.input_shape, self.num_classes, nodes, self.edges).validate().canonical()

    def prune_dead(self, output_id: str) -> None:
        """Drop nodes that no longer lead to the output (after a skip removal)."""
        preds: dict[str, list[str]] = {n: [] for n in self.nodes}
        for src, dst in self.edges:
            preds[dst].append(src)
        alive = reachable(output_id, preds)
        self.nodes = {k: v for k, v in self.nodes.items() if k in alive}
        self.edges = [e for e in self.edges if e[0] in alive and e[1] in alive]


def _mutation_choices(graph: ArchitectureGraph, space: SearchSpace) -> list[str]:
    vocab = space.vocabulary()
    kinds: list[str] = []
    if any(
        len([v for v in vocab.get(n.op, {}).get(name, []) if v is not None]) > 1
        for n in graph.nodes
        for name in n.params
    ):
        kinds.append("change_param")
    if space.layers():
        kinds.append("add_layer")
    if any(n.op not in ("input", "output", "add", "concat") for n in graph.nodes):
        kinds.append("remove_layer")
    if space.skip_kinds():
        kinds.append("add_skip")
    if any(n.op in MERGE_OPS for n in graph.nodes):
        kinds.append("remove_skip")
    return kinds


def _apply_mutation(kind: str, graph: ArchitectureGraph, space: SearchSpace, rng: random.Random) -> ArchitectureGraph:
    draft = _Draft(graph)
    order = graph.canonical_order()
    shapes = graph.infer_shapes()
    if kind == "change_param":
        vocab = space.vocabulary()
        slots = [
            (node_id, name, [v for v in vocab.get(draft.nodes[node_id][0], {}).get(name, []) if v is not None])
            for node_id in order
            for name in draft.nodes[node_id][1]
        ]
        slots = [(node_id, name, values) for node_id, name, values in slots if len(values) > 1]
        node_id, name, values = rng.choice(slots)
        op, params = draft.nodes[node_id]
        current = params[name]
        alternatives = [v for v in values if v != current] or values
        params[name] = rng.choice(alternatives)
        if op in POOL_OPS and name == "pool_size" and params["stride"] == current:
            params["stride"] = params["pool_size"]  # keep "stride = pool_size" when it was the default
        return draft.build()
    if kind == "add_layer":
        layer = rng.choice(space.layers())
        params = layer.sample_params(rng)
        edge_index = rng.randrange(len(draft.edges))
        src, dst = draft.edges[edge_index]
        if layer.op == "depthwise_conv2d" and params.get("filters") is None:
            shape = shapes[src]
            params["filters"] = shape[0] if len(shape) == 3 else 1
        new_id = draft.new_id()
        draft.nodes[new_id] = (layer.op, normalize_params(layer.op, params, node=new_id))
        # Keep the port position of dst: replace the edge in place, then feed the new node.
        draft.edges[edge_index] = [new_id, dst]
        draft.edges.append([src, new_id])
        return draft.build()
    if kind == "remove_layer":
        removable = [n for n in order if draft.nodes[n][0] not in ("input", "output", "add", "concat")]
        victim = rng.choice(removable)
        (pred,) = [s for s, d in draft.edges if d == victim]
        rewired = []
        for src, dst in draft.edges:
            if dst == victim:
                continue
            rewired.append([pred, dst] if src == victim else [src, dst])
        if len({tuple(e) for e in rewired}) != len(rewired):
            raise GraphError("removing it would feed the same node twice", node=victim, op=draft.nodes[victim][0])
        del draft.nodes[victim]
        draft.edges = rewired
        return draft.build()
    if kind == "add_skip":
        position = {n: i for i, n in enumerate(order)}
        # `late` gets its output merged with an earlier node's; the merge takes over late's consumers.
        lates = [n for n in order if draft.nodes[n][0] not in ("input", "output")]
        if not lates:
            raise GraphError("no node to attach a skip connection to")
        late = rng.choice(lates)
        earlies = [n for n in order if position[n] < position[late] and draft.nodes[n][0] != "output"]
        early = rng.choice(earlies)
        skip_kind = rng.choice(space.skip_kinds())
        merge_id = draft.new_id()
        draft.nodes[merge_id] = (skip_kind, {})
        draft.edges = [[merge_id, d] if s == late else [s, d] for s, d in draft.edges]
        draft.edges.append([late, merge_id])
        draft.edges.append([early, merge_id])
        return draft.build()
    if kind == "remove_skip":
        merges = [n for n in order if draft.nodes[n][0] in MERGE_OPS]
        merge = rng.choice(merges)
        main = next(s for s, d in draft.edges if d == merge)  # first input is the main path
        rewired = []
        for src, dst in draft.edges:
            if dst == merge:
                continue
            rewired.append([main, dst] if src == merge else [src, dst])
        if len({tuple(e) for e in rewired}) != len(rewired):
            raise GraphError("removing it would feed the same node twice", node=merge, op=draft.nodes[merge][0])
        del draft.nodes[merge]
        draft.edges = rewired
        draft.prune_dead(order[-1])
        return draft.build()
    raise ValueError(f"mutation kind {kind!r} is not one of {', '.join(MUTATIONS)}")


def mutate(
    graph: ArchitectureGraph,
    space: SearchSpace,
    rng: random.Random | int | None = None,
    *,
    kinds: Sequence[str] | None = None,
    max_attempts: int = 20,
) -> ArchitectureGraph:
    """One random mutation (change a param / add or remove a layer / add or remove a skip).

    Values and ops come from the space's vocabulary. A mutation that yields an invalid graph is
    retried (up to ``max_attempts``); if none succeeds, the parent comes back (canonical copy).
    """
    generator = as_rng(rng)
    allowed = [k for k in _mutation_choices(graph, space) if kinds is None or k in kinds]
    for _ in range(max_attempts if allowed else 0):
        kind = generator.choices(allowed, weights=[_MUTATION_WEIGHTS[k] for k in allowed])[0]
        try:
            return _apply_mutation(kind, graph, space, generator)
        except GraphError:
            continue
    return graph.canonical()


def _cut_points(graph: ArchitectureGraph, order: list[str]) -> list[int]:
    """Positions p (in canonical order) where every path from input to output passes order[p]."""
    position = {n: i for i, n in enumerate(order)}
    furthest_from = [0] * len(order)
    for src, dst in graph.edges:
        furthest_from[position[src]] = max(furthest_from[position[src]], position[dst])
    cuts = []
    reach = 0
    for p in range(len(order) - 1):
        if p > 0 and reach <= p:
            cuts.append(p)
        reach = max(reach, furthest_from[p])
    return cuts


def crossover(
    first: ArchitectureGraph,
    second: ArchitectureGraph,
    rng: random.Random | int | None = None,
    *,
    max_attempts: int = 10,
) -> ArchitectureGraph:
    """One-point crossover: ``first`` up to a cut node, then ``second`` after one of its cut nodes.

    A cut node is one every input-to-output path passes through, so both halves are closed
    subgraphs (skip connections inside a half are kept). Invalid children (e.g. shape mismatch at
    the seam) are retried; if none validates, a canonical copy of ``first`` comes back.
    """
    generator = as_rng(rng)
    order_a, order_b = first.canonical_order(), second.canonical_order()
    cuts_a, cuts_b = _cut_points(first, order_a), _cut_points(second, order_b)
    # The input node is a cut too (take all of `second`'s body after it).
    cuts_a, cuts_b = [0] + cuts_a, [0] + cuts_b
    if first.input_shape != second.input_shape or first.num_classes != second.num_classes:
        raise GraphError("crossover needs parents with the same input_shape and num_classes")
    for _ in range(max_attempts):
        cut_a, cut_b = generator.choice(cuts_a), generator.choice(cuts_b)
        if cut_a == 0 and cut_b == 0:
            continue
        keep_a = set(order_a[: cut_a + 1])
        seam_a, seam_b = order_a[cut_a], order_b[cut_b]
        take_b = set(order_b[cut_b + 1 :])
        nodes: list[Node] = [Node("a" + n, first.node(n).op, dict(first.node(n).params)) for n in order_a[: cut_a + 1]]
        nodes += [Node("b" + n, second.node(n).op, dict(second.node(n).params)) for n in order_b[cut_b + 1 :]]
        if len(nodes) <= 2:
            continue  # input straight to output: valid, but no architecture worth training
        edges = [["a" + s, "a" + d] for s, d in first.edges if s in keep_a and d in keep_a]
        for src, dst in second.edges:
            if dst in take_b:
                edges.append(["a" + seam_a if src == seam_b else "b" + src, "b" + dst])
        try:
            child = ArchitectureGraph(first.input_shape, first.num_classes, nodes, edges).validate().canonical()
        except GraphError:
            continue
        return child
    return first.canonical()
