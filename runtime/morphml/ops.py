"""The op vocabulary and parameter rules: every op an architecture may contain, its parameters,
their defaults and allowed values. The one table the graph (checks nodes), the search space
(checks choices), the variation operators (pick replacement values) and the evaluation layer
(builds modules) all read.

What lives here: `ParamRule` (one parameter: kind, default, bounds, `normalize`), `OP_PARAMS`
(op -> parameter -> rule), `REQUIRED` (marks a parameter with no default), the op groups the
shape rules use (`CONV_OPS`, `POOL_OPS`, `SHAPE_PRESERVING_OPS`, `MERGE_OPS`), `LAYER_TYPES`
(what a search space may name), `ACTIVATIONS`, `SKIP_KINDS`, the manifest's name rule
(`camel_to_snake` / `snake_to_camel`) and `as_rng` (how every layer turns an rng argument
into a `random.Random`).

Imports: the standard library only. It is the bottom layer of `morphml`: ops -> graph -> space ->
mutation -> optimizers -> ...; nothing here may import another `morphml` module.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "silu", "tanh", "none")
SKIP_KINDS: tuple[str, ...] = ("none", "add", "concat")

# Marks a parameter with no default (must be given).
REQUIRED: Any = object()


@dataclass(frozen=True)
class ParamRule:
    """One parameter of one op: its default and the values it accepts."""

    kind: str  # "int", "rate", "activation"
    default: Any = REQUIRED
    low: int = 1
    high: int = 4096

    def allowed(self) -> str:
        if self.kind == "int":
            return f"an integer in [{self.low}, {self.high}]"
        if self.kind == "rate":
            return "a number in [0, 1)"
        if self.kind == "activation":
            return "one of " + ", ".join(ACTIVATIONS)
        raise AssertionError(self.kind)

    def normalize(self, value: Any) -> Any:
        """Return the canonical form of ``value`` or raise ValueError naming what is allowed."""
        if self.kind == "int":
            # bool is an int subclass; True as a filter count is a mistake, not 1.
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer() and not isinstance(value, bool):
                    value = int(value)
                else:
                    raise ValueError(self.allowed())
            if not self.low <= value <= self.high:
                raise ValueError(self.allowed())
            return value
        if self.kind == "rate":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(self.allowed())
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(self.allowed())
            # 0 and 0.0 must hash the same, so rates are always floats.
            return float(value)
        if self.kind == "activation":
            if value is None:
                return "none"
            if not isinstance(value, str) or value.lower() not in ACTIVATIONS:
                raise ValueError(self.allowed())
            return value.lower()
        raise AssertionError(self.kind)


_CONV_PARAMS = {
    "filters": ParamRule("int", REQUIRED, 1, 4096),
    "kernel_size": ParamRule("int", 3, 1, 15),
    "stride": ParamRule("int", 1, 1, 8),
    "activation": ParamRule("activation", "relu"),
}
_POOL_PARAMS = {
    "pool_size": ParamRule("int", 2, 1, 16),
    # None means "same as pool_size"; the graph always stores the resolved number.
    "stride": ParamRule("int", None, 1, 16),
}

# op -> parameter name -> rule. Graph-only ops (input, output, add, concat) are included because
# the graph checks its nodes against this table too.
OP_PARAMS: dict[str, dict[str, ParamRule]] = {
    "input": {},
    "output": {"units": ParamRule("int", REQUIRED, 1, 100000)},
    "conv2d": dict(_CONV_PARAMS),
    "sepconv2d": dict(_CONV_PARAMS),
    # filters must be a multiple of the input channels (depth multiplier); when a space leaves it
    # out, sampling uses the input channel count (multiplier 1).
    "depthwise_conv2d": {**_CONV_PARAMS, "filters": ParamRule("int", None, 1, 4096)},
    "maxpool": dict(_POOL_PARAMS),
    "avgpool": dict(_POOL_PARAMS),
    "global_avgpool": {},
    "batchnorm": {},
    "dropout": {"rate": ParamRule("rate", 0.5)},
    "relu": {},
    "gelu": {},
    "silu": {},
    "tanh": {},
    "flatten": {},
    "dense": {"units": ParamRule("int", REQUIRED, 1, 65536), "activation": ParamRule("activation", "relu")},
    "identity": {},
    "add": {},
    "concat": {},
}

# Op groups, by the shape rule they follow (see `morphml.graph`).
CONV_OPS: tuple[str, ...] = ("conv2d", "sepconv2d", "depthwise_conv2d")
POOL_OPS: tuple[str, ...] = ("maxpool", "avgpool")
SHAPE_PRESERVING_OPS: tuple[str, ...] = ("batchnorm", "dropout", "relu", "gelu", "silu", "tanh", "identity")
MERGE_OPS: tuple[str, ...] = ("add", "concat")


# Layer types a search space (and the manifest's `type:` field) may name. input/output are the
# dataset binding, add/concat come from blocks' skip connections.
LAYER_TYPES: tuple[str, ...] = (
    "conv2d",
    "sepconv2d",
    "depthwise_conv2d",
    "maxpool",
    "avgpool",
    "global_avgpool",
    "batchnorm",
    "dropout",
    "relu",
    "gelu",
    "silu",
    "tanh",
    "flatten",
    "dense",
    "identity",
)
GRAPH_OPS: tuple[str, ...] = tuple(OP_PARAMS)


def camel_to_snake(name: str) -> str:
    """A manifest field name as a parameter name: 'kernelSize' -> 'kernel_size'."""
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def snake_to_camel(name: str) -> str:
    """A parameter name as a manifest field name: 'kernel_size' -> 'kernelSize'."""
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def as_rng(rng: random.Random | int | None) -> random.Random:
    """A `random.Random` from an instance (used as is), a seed, or None (fresh, unseeded)."""
    if isinstance(rng, random.Random):
        return rng
    if rng is None or (isinstance(rng, int) and not isinstance(rng, bool)):
        return random.Random(rng)
    raise TypeError(f"rng: expected random.Random, an int seed or None, got {rng!r}")
