"""Search spaces: which layers an architecture may have and which values each parameter may take.

What lives here:
- `Layer` (one layer with a choice list per parameter; `optional=True` lets sampling drop it), `Block` (a group of
  layers repeated min..max times, each repetition optionally closed by a residual `add` or a
  `concat` skip connection) and `SearchSpace` (an ordered list of those, plus the dataset binding:
  input shape and class count);
- `SearchSpace.from_spec(dict)` reads the manifest's declarative form (camelCase names, every
  parameter a list) into the same objects the Python API builds; `SearchSpace.to_spec()` writes it;
- `SearchSpace.sample()`: draws a layer program and has `morphml.graph.build_graph_from_choices`
  turn it into an `ArchitectureGraph`.

The op vocabulary (`OP_PARAMS`, `LAYER_TYPES`, `REQUIRED`, ...) lives in `morphml.ops`; its names
are re-exported here because the manifest tests and users know them as `morphml.space.*`.

Imports: the standard library, `morphml.ops` and `morphml.graph` (the space builds graphs; the graph
knows nothing of spaces). Mutation and crossover, which need both, are in `morphml.mutation`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from morphml.graph import ArchitectureGraph, GraphError, build_graph_from_choices
from morphml.ops import (
    ACTIVATIONS,
    GRAPH_OPS,
    LAYER_TYPES,
    OP_PARAMS,
    REQUIRED,
    SKIP_KINDS,
    ParamRule,
    as_rng,
    camel_to_snake,
    snake_to_camel,
)

__all__ = [
    "ACTIVATIONS",
    "GRAPH_OPS",
    "LAYER_TYPES",
    "OP_PARAMS",
    "REQUIRED",
    "SKIP_KINDS",
    "Block",
    "Layer",
    "ParamRule",
    "SearchSpace",
    "SearchSpaceError",
    "as_rng",
    "camel_to_snake",
    "snake_to_camel",
]


class SearchSpaceError(ValueError):
    """A search space definition (Python API or manifest) is wrong, or no valid sample exists.

    The message names where (e.g. ``searchSpace.layers[2].kernelSize``), the value, and what is
    allowed.
    """


# --------------------------------------------------------------------------------------------
# Layers and blocks
# --------------------------------------------------------------------------------------------


def _as_choices(value: Any, where: str) -> list[Any]:
    """A list/tuple is a choice list, anything else is a fixed value (a one-element list)."""
    if isinstance(value, (list, tuple)):
        choices = list(value)
        if not choices:
            raise SearchSpaceError(f"{where}: empty choice list; give at least one value")
        return choices
    return [value]


class Layer:
    """One layer of a search space: an op and, per parameter, a list of values to choose from.

    Build with the factory methods (``Layer.conv2d(filters=[32, 64], kernel_size=[3, 5])``): a list
    means "choose one", a scalar is fixed. ``optional=True`` lets sampling leave the layer out.
    """

    __slots__ = ("op", "choices", "optional", "shape")

    def __init__(
        self,
        op: str,
        params: Mapping[str, Any] | None = None,
        *,
        optional: bool = False,
        where: str | None = None,
        shape: Sequence[int] | None = None,
    ) -> None:
        where = where or op
        if op not in OP_PARAMS or op in ("add", "concat"):
            raise SearchSpaceError(
                f"{where}: unknown layer type {op!r}; allowed: {', '.join(('input',) + LAYER_TYPES + ('output',))}"
            )
        if not isinstance(optional, bool):
            raise SearchSpaceError(f"{where}.optional: {optional!r} is not allowed; use true or false")
        rules = OP_PARAMS[op]
        given = dict(params or {})
        choices: dict[str, list[Any]] = {}
        for name, value in given.items():
            if name not in rules:
                allowed = ", ".join(rules) or "no parameters"
                raise SearchSpaceError(f"{where}.{name}: unknown parameter for {op}; allowed: {allowed}")
            rule = rules[name]
            values = _as_choices(value, f"{where}.{name}")
            normalized: list[Any] = []
            for index, item in enumerate(values):
                if item is None and rule.default is None:
                    normalized.append(None)
                    continue
                try:
                    normalized.append(rule.normalize(item))
                except ValueError as exc:
                    at = f"{where}.{name}" + (f"[{index}]" if len(values) > 1 else "")
                    raise SearchSpaceError(f"{at}: {item!r} is not allowed; expected {exc}") from None
            # Duplicates would only skew the sampling odds; keep the first of each.
            choices[name] = list(dict.fromkeys(normalized))
        for name, rule in rules.items():
            if name in choices:
                continue
            if rule.default is REQUIRED and op != "output":
                raise SearchSpaceError(f"{where}.{name}: required parameter of {op} is missing")
            choices[name] = [None if rule.default is REQUIRED else rule.default]
        self.op = op
        # Vocabulary order, not the caller's keyword order: sampling draws parameters in this
        # order, so the manifest form and the Python API draw the same architectures.
        self.choices = {name: choices[name] for name in rules}
        self.optional = optional
        self.shape = tuple(shape) if shape is not None else None

    # -- factories (the original MorphML API) -------------------------------------------------

    @staticmethod
    def input(shape: Sequence[int]) -> Layer:
        """The input layer; ``shape`` is [C, H, W] for images or [F] for flat features."""
        return Layer("input", {}, shape=_check_input_shape(shape, "input.shape"))

    @staticmethod
    def output(units: Any = None, activation: Any = None) -> Layer:
        """The classifier: a dense layer to ``units`` classes (None: the dataset's class count).

        ``activation`` is accepted for compatibility ('softmax'/'none'); the loss applies softmax.
        """
        if activation not in (None, "softmax", "none", "linear"):
            raise SearchSpaceError(f"output.activation: {activation!r} is not allowed; expected softmax or none")
        if isinstance(units, (list, tuple)) and len(units) > 1:
            raise SearchSpaceError(f"output.units: {list(units)!r} is not allowed; the class count is one fixed number")
        return Layer("output", {} if units is None else {"units": units})

    @staticmethod
    def conv2d(
        filters: Any, kernel_size: Any = 3, stride: Any = 1, activation: Any = "relu", optional: bool = False
    ) -> Layer:
        return Layer(
            "conv2d",
            {"filters": filters, "kernel_size": kernel_size, "stride": stride, "activation": activation},
            optional=optional,
        )

    @staticmethod
    def sepconv2d(
        filters: Any, kernel_size: Any = 3, stride: Any = 1, activation: Any = "relu", optional: bool = False
    ) -> Layer:
        """Depthwise separable convolution: a k x k depthwise conv, then a 1 x 1 conv to ``filters``."""
        return Layer(
            "sepconv2d",
            {"filters": filters, "kernel_size": kernel_size, "stride": stride, "activation": activation},
            optional=optional,
        )

    @staticmethod
    def depthwise_conv2d(
        filters: Any = None, kernel_size: Any = 3, stride: Any = 1, activation: Any = "relu", optional: bool = False
    ) -> Layer:
        """Depthwise conv; ``filters`` must be a multiple of the input channels (None: same count)."""
        return Layer(
            "depthwise_conv2d",
            {"filters": filters, "kernel_size": kernel_size, "stride": stride, "activation": activation},
            optional=optional,
        )

    @staticmethod
    def maxpool(pool_size: Any = 2, stride: Any = None, optional: bool = False) -> Layer:
        return Layer("maxpool", {"pool_size": pool_size, "stride": stride}, optional=optional)

    @staticmethod
    def avgpool(pool_size: Any = 2, stride: Any = None, optional: bool = False) -> Layer:
        return Layer("avgpool", {"pool_size": pool_size, "stride": stride}, optional=optional)

    @staticmethod
    def global_avgpool(optional: bool = False) -> Layer:
        return Layer("global_avgpool", {}, optional=optional)

    @staticmethod
    def batchnorm(optional: bool = False) -> Layer:
        return Layer("batchnorm", {}, optional=optional)

    @staticmethod
    def dropout(rate: Any = 0.5, optional: bool = False) -> Layer:
        return Layer("dropout", {"rate": rate}, optional=optional)

    @staticmethod
    def relu(optional: bool = False) -> Layer:
        return Layer("relu", {}, optional=optional)

    @staticmethod
    def gelu(optional: bool = False) -> Layer:
        return Layer("gelu", {}, optional=optional)

    @staticmethod
    def silu(optional: bool = False) -> Layer:
        return Layer("silu", {}, optional=optional)

    @staticmethod
    def tanh(optional: bool = False) -> Layer:
        return Layer("tanh", {}, optional=optional)

    @staticmethod
    def flatten(optional: bool = False) -> Layer:
        return Layer("flatten", {}, optional=optional)

    @staticmethod
    def dense(units: Any, activation: Any = "relu", optional: bool = False) -> Layer:
        return Layer("dense", {"units": units, "activation": activation}, optional=optional)

    @staticmethod
    def identity(optional: bool = False) -> Layer:
        return Layer("identity", {}, optional=optional)

    # -- sampling and description --------------------------------------------------------------

    def sample_params(self, rng: random.Random) -> dict[str, Any]:
        """One value per parameter; parameters are visited in the vocabulary's fixed order."""
        return {name: rng.choice(values) for name, values in self.choices.items()}

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"type": self.op}
        if self.optional:
            spec["optional"] = True
        rules = OP_PARAMS[self.op]
        for name, values in self.choices.items():
            # Defaults that were never chosen explicitly stay out of the manifest form.
            if values == [rules[name].default] or values == [None]:
                continue
            spec[snake_to_camel(name)] = list(values)
        return spec

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v if len(v) > 1 else v[0]!r}" for k, v in self.choices.items())
        extra = ", optional=True" if self.optional else ""
        return f"Layer.{self.op}({params}{extra})"


class Block:
    """Layers repeated ``repeat`` = (min, max) times; each repetition may close with a skip.

    ``skip`` lists the skip kinds to choose from per repetition: 'none' (plain chain), 'add'
    (residual: add(body output, repetition input); a channel mismatch gets a 1x1 projection in the
    built model) or 'concat' (concatenate body output and repetition input along channels).
    """

    __slots__ = ("layers", "repeat", "skip")

    def __init__(
        self,
        layers: Iterable[Layer | Block],
        repeat: int | Sequence[int] = 1,
        skip: str | Sequence[str] = "none",
        *,
        where: str = "block",
    ) -> None:
        items = list(layers)
        if not items:
            raise SearchSpaceError(f"{where}.layers: a block needs at least one layer")
        for index, item in enumerate(items):
            if not isinstance(item, (Layer, Block)):
                raise SearchSpaceError(f"{where}.layers[{index}]: expected a Layer or Block, got {item!r}")
            if isinstance(item, Layer) and item.op in ("input", "output"):
                raise SearchSpaceError(f"{where}.layers[{index}]: {item.op} layers cannot be inside a block")
        if isinstance(repeat, bool):
            raise SearchSpaceError(f"{where}.repeat: {repeat!r} is not allowed; expected an integer or (min, max)")
        if isinstance(repeat, int):
            low, high = repeat, repeat
        else:
            bounds = list(repeat)
            if len(bounds) != 2:
                raise SearchSpaceError(f"{where}.repeat: {repeat!r} is not allowed; expected (min, max)")
            low, high = bounds
        for label, value in (("min", low), ("max", high)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 32:
                raise SearchSpaceError(
                    f"{where}.repeat.{label}: {value!r} is not allowed; expected an integer in [0, 32]"
                )
        if low > high:
            raise SearchSpaceError(f"{where}.repeat: min {low} is greater than max {high}")
        skips = _as_choices(skip, f"{where}.skip")
        for index, kind in enumerate(skips):
            if kind not in SKIP_KINDS:
                raise SearchSpaceError(
                    f"{where}.skip[{index}]: {kind!r} is not allowed; expected one of {', '.join(SKIP_KINDS)}"
                )
        self.layers: list[Layer | Block] = items
        self.repeat = (low, high)
        self.skip: list[str] = list(dict.fromkeys(skips))

    def to_spec(self) -> dict[str, Any]:
        return {
            "block": {
                "repeat": {"min": self.repeat[0], "max": self.repeat[1]},
                "skip": list(self.skip),
                "layers": [item.to_spec() for item in self.layers],
            }
        }

    def __repr__(self) -> str:
        return f"Block({self.layers!r}, repeat={self.repeat}, skip={self.skip})"


def _check_input_shape(shape: Any, where: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) not in (1, 3):
        raise SearchSpaceError(f"{where}: {shape!r} is not allowed; expected [C, H, W] or [F]")
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise SearchSpaceError(f"{where}: {shape!r} is not allowed; every dimension must be a positive integer")
    return tuple(shape)


def _check_num_classes(num_classes: Any, where: str) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise SearchSpaceError(f"{where}: {num_classes!r} is not allowed; expected a positive integer")
    return num_classes


# --------------------------------------------------------------------------------------------
# The search space
# --------------------------------------------------------------------------------------------


class SearchSpace:
    """An ordered list of layers and blocks, bound to a dataset's input shape and class count.

    The input node and the output (dense to the class count) are added by sampling when the space
    does not list them. Bind the data with ``space.bind(input_shape, num_classes)`` (what the runtime
    does with the dataset's shape), with ``Layer.input(shape=...)`` / ``Layer.output(units=...)``,
    or per call with ``sample(input_shape=..., num_classes=...)``.
    """

    DEFAULT_MAX_ATTEMPTS = 100

    def __init__(
        self,
        name: str = "search_space",
        layers: Iterable[Layer | Block] | None = None,
        *,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise SearchSpaceError(f"name: {name!r} is not allowed; expected a non-empty string")
        self.name = name
        self.items: list[Layer | Block] = []
        self._input_shape: tuple[int, ...] | None = None
        self._num_classes: int | None = None
        self._input_layer: Layer | None = None
        self._output_layer: Layer | None = None
        for item in layers or ():
            self.add_layer(item)
        if input_shape is not None or num_classes is not None:
            self.bind(input_shape, num_classes)

    # -- building -------------------------------------------------------------------------------

    def add_layer(self, layer: Layer | Block) -> SearchSpace:
        where = f"layers[{len(self.items)}]"
        if not isinstance(layer, (Layer, Block)):
            raise SearchSpaceError(f"{where}: expected a Layer or Block, got {layer!r}")
        if self._output_layer is not None:
            raise SearchSpaceError(f"{where}: nothing can follow the output layer")
        if isinstance(layer, Layer) and layer.op == "input":
            if self.items:
                raise SearchSpaceError(f"{where}: the input layer must be the first layer")
            self._input_layer = layer
        if isinstance(layer, Layer) and layer.op == "output":
            self._output_layer = layer
        self.items.append(layer)
        return self

    def add_layers(self, *layers: Layer | Block) -> SearchSpace:
        for layer in layers:
            self.add_layer(layer)
        return self

    def add_block(
        self, layers: Iterable[Layer | Block], repeat: int | Sequence[int] = 1, skip: str | Sequence[str] = "none"
    ) -> SearchSpace:
        return self.add_layer(Block(layers, repeat=repeat, skip=skip, where=f"layers[{len(self.items)}]"))

    def bind(self, input_shape: Sequence[int] | None, num_classes: int | None) -> SearchSpace:
        """Set the dataset's input shape and class count (in place; returns self for chaining)."""
        if input_shape is not None:
            given = list(input_shape) if isinstance(input_shape, tuple) else input_shape
            shape = _check_input_shape(given, "input_shape")
            if self._input_layer is not None and self._input_layer.shape != shape:
                raise SearchSpaceError(
                    f"input_shape: {list(shape)} conflicts with the space's input layer shape "
                    f"{list(self._input_layer.shape or ())}"
                )
            self._input_shape = shape
        if num_classes is not None:
            classes = _check_num_classes(num_classes, "num_classes")
            fixed = self._output_layer.choices.get("units", [None])[0] if self._output_layer else None
            if fixed is not None and fixed != classes:
                raise SearchSpaceError(f"num_classes: {classes} conflicts with the space's output layer units {fixed}")
            self._num_classes = classes
        return self

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        if self._input_shape is not None:
            return self._input_shape
        return self._input_layer.shape if self._input_layer is not None else None

    @property
    def num_classes(self) -> int | None:
        if self._num_classes is not None:
            return self._num_classes
        if self._output_layer is not None:
            return self._output_layer.choices.get("units", [None])[0]
        return None

    # -- manifest form --------------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], path: str = "searchSpace") -> SearchSpace:
        """Build a space from the manifest's ``spec.searchSpace`` (camelCase, every param a list)."""
        if not isinstance(spec, Mapping):
            raise SearchSpaceError(f"{path}: expected a mapping with 'layers', got {spec!r}")
        unknown = sorted(set(spec) - {"name", "layers"})
        if unknown:
            raise SearchSpaceError(f"{path}.{unknown[0]}: unknown field; allowed: name, layers")
        name = spec.get("name", "search_space")
        if not isinstance(name, str) or not name:
            raise SearchSpaceError(f"{path}.name: {name!r} is not allowed; expected a non-empty string")
        layers = spec.get("layers")
        if not isinstance(layers, list) or not layers:
            raise SearchSpaceError(f"{path}.layers: {layers!r} is not allowed; expected a non-empty list of layers")
        space = cls(name)
        for index, entry in enumerate(layers):
            space.items.append(_item_from_spec(entry, f"{path}.layers[{index}]"))
        return space

    def to_spec(self) -> dict[str, Any]:
        """The manifest form (camelCase, every parameter a list); input/output come from the data."""
        layers = [
            item.to_spec()
            for item in self.items
            if not (isinstance(item, Layer) and item.op in ("input", "output"))
        ]
        return {"name": self.name, "layers": layers}

    def fingerprint(self) -> str:
        """A digest of the space and its data binding; optimizer state records it to refuse a mismatch."""
        payload = {
            "space": self.to_spec(),
            "input_shape": list(self.input_shape or ()),
            "num_classes": self.num_classes,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    # -- what mutations may use -----------------------------------------------------------------

    def layers(self) -> list[Layer]:
        """Every layer of the space (blocks flattened, input/output left out), in space order."""
        found: list[Layer] = []

        def walk(items: Iterable[Layer | Block]) -> None:
            for item in items:
                if isinstance(item, Block):
                    walk(item.layers)
                elif item.op not in ("input", "output"):
                    found.append(item)

        walk(self.items)
        return found

    def vocabulary(self) -> dict[str, dict[str, list[Any]]]:
        """op -> parameter -> every value any layer of that op may take (first-seen order).

        Mutations draw replacement values from here, so a mutated graph only uses values the
        space allows for that op.
        """
        vocab: dict[str, dict[str, list[Any]]] = {}
        for layer in self.layers():
            params = vocab.setdefault(layer.op, {})
            for name, values in layer.choices.items():
                merged = params.setdefault(name, [])
                for value in values:
                    if value not in merged:
                        merged.append(value)
        return vocab

    def skip_kinds(self) -> list[str]:
        """Skip connection kinds ('add', 'concat') any block of the space may use."""
        kinds: list[str] = []

        def walk(items: Iterable[Layer | Block]) -> None:
            for item in items:
                if isinstance(item, Block):
                    for kind in item.skip:
                        if kind != "none" and kind not in kinds:
                            kinds.append(kind)
                    walk(item.layers)

        walk(self.items)
        return kinds

    # -- sampling -------------------------------------------------------------------------------

    def sample(
        self,
        rng: random.Random | int | None = None,
        *,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        max_attempts: int | None = None,
    ) -> ArchitectureGraph:
        """A random valid architecture from this space.

        ``rng`` is a `random.Random` (advanced in place), an int seed, or None. Samples that do not
        validate for the input shape (e.g. too many pools for 8x8) are drawn again, up to
        ``max_attempts``; if none validates, SearchSpaceError says why.
        """
        shape = _check_input_shape(list(input_shape), "input_shape") if input_shape is not None else self.input_shape
        classes = _check_num_classes(num_classes, "num_classes") if num_classes is not None else self.num_classes
        if shape is None or classes is None:
            missing = "input_shape" if shape is None else "num_classes"
            raise SearchSpaceError(
                f"{missing}: the space {self.name!r} is not bound to a dataset; call space.bind(input_shape, "
                "num_classes), add Layer.input(shape=...)/Layer.output(units=...), or pass them to sample()"
            )
        if not any(isinstance(item, Block) or item.op not in ("input", "output") for item in self.items):
            raise SearchSpaceError(f"layers: the space {self.name!r} has no layers between input and output")
        generator = as_rng(rng)
        attempts = max_attempts or self.DEFAULT_MAX_ATTEMPTS
        reasons: dict[str, int] = {}
        for _ in range(attempts):
            try:
                return build_graph_from_choices(self._draw(generator), shape, classes)
            except GraphError as exc:
                reason = exc.reason
                reasons[reason] = reasons.get(reason, 0) + 1
        common = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
        detail = "; ".join(f"{reason} ({count}x)" for reason, count in common)
        raise SearchSpaceError(
            f"searchSpace: none of {attempts} samples of {self.name!r} is a valid architecture for input shape "
            f"{list(shape)} and {classes} classes; most common reasons: {detail}"
        )

    def _draw(self, rng: random.Random) -> list[tuple]:
        """Draw one layer sequence as a flat program for the graph builder.

        Instructions: ("layer", op, params), ("begin",) marks a repetition start, ("end", skip)
        closes it (skip in none/add/concat). The graph builder turns this into nodes and edges.
        """
        program: list[tuple] = []

        def walk(items: Iterable[Layer | Block]) -> None:
            for item in items:
                if isinstance(item, Block):
                    repeats = rng.randint(*item.repeat)
                    for _ in range(repeats):
                        program.append(("begin",))
                        walk(item.layers)
                        program.append(("end", rng.choice(item.skip)))
                    continue
                if item.op in ("input", "output"):
                    continue
                if item.optional and rng.random() < 0.5:
                    continue
                program.append(("layer", item.op, item.sample_params(rng)))

        walk(self.items)
        return program

    def __repr__(self) -> str:
        return (
            f"SearchSpace({self.name!r}, {len(self.items)} items, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes})"
        )


def _item_from_spec(entry: Any, where: str) -> Layer | Block:
    if not isinstance(entry, Mapping):
        raise SearchSpaceError(f"{where}: expected a mapping with 'type' or 'block', got {entry!r}")
    if "block" in entry:
        extra = sorted(set(entry) - {"block"})
        if extra:
            raise SearchSpaceError(f"{where}.{extra[0]}: unknown field next to 'block'")
        return _block_from_spec(entry["block"], f"{where}.block")
    if "type" not in entry:
        raise SearchSpaceError(f"{where}: a layer needs 'type' (one of {', '.join(LAYER_TYPES)}) or be a 'block'")
    op = entry["type"]
    if op not in LAYER_TYPES:
        hint = " (input and output come from the dataset)" if op in ("input", "output") else ""
        raise SearchSpaceError(f"{where}.type: unknown layer type {op!r}{hint}; allowed: {', '.join(LAYER_TYPES)}")
    optional = entry.get("optional", False)
    if not isinstance(optional, bool):
        raise SearchSpaceError(f"{where}.optional: {optional!r} is not allowed; use true or false")
    rules = OP_PARAMS[op]
    params: dict[str, Any] = {}
    for key, value in entry.items():
        if key in ("type", "optional"):
            continue
        name = camel_to_snake(key)
        if name not in rules or key != snake_to_camel(name):
            allowed = ", ".join(snake_to_camel(n) for n in rules) or "no parameters"
            raise SearchSpaceError(f"{where}.{key}: unknown parameter for {op}; allowed: {allowed}")
        if not isinstance(value, list):
            raise SearchSpaceError(
                f"{where}.{key}: {value!r} is not allowed; in a manifest every parameter is a list of choices"
            )
        params[name] = value
    try:
        return Layer(op, params, optional=optional, where=where)
    except SearchSpaceError as exc:
        # Layer names parameters in snake_case; the manifest reader speaks camelCase.
        message = str(exc)
        for name in rules:
            message = message.replace(f"{where}.{name}", f"{where}.{snake_to_camel(name)}")
        raise SearchSpaceError(message) from None


def _block_from_spec(spec: Any, where: str) -> Block:
    if not isinstance(spec, Mapping):
        raise SearchSpaceError(f"{where}: expected a mapping with repeat, skip and layers, got {spec!r}")
    extra = sorted(set(spec) - {"repeat", "skip", "layers"})
    if extra:
        raise SearchSpaceError(f"{where}.{extra[0]}: unknown field; allowed: repeat, skip, layers")
    repeat_spec = spec.get("repeat", {"min": 1, "max": 1})
    if not isinstance(repeat_spec, Mapping):
        raise SearchSpaceError(f"{where}.repeat: {repeat_spec!r} is not allowed; expected {{min, max}}")
    extra = sorted(set(repeat_spec) - {"min", "max"})
    if extra:
        raise SearchSpaceError(f"{where}.repeat.{extra[0]}: unknown field; allowed: min, max")
    low = repeat_spec.get("min", 1)
    high = repeat_spec.get("max", low)
    skip = spec.get("skip", ["none"])
    if not isinstance(skip, list):
        raise SearchSpaceError(f"{where}.skip: {skip!r} is not allowed; expected a list of none, add, concat")
    layers = spec.get("layers")
    if not isinstance(layers, list) or not layers:
        raise SearchSpaceError(f"{where}.layers: {layers!r} is not allowed; expected a non-empty list of layers")
    items = [_item_from_spec(entry, f"{where}.layers[{index}]") for index, entry in enumerate(layers)]
    return Block(items, repeat=(low, high), skip=skip, where=where)
