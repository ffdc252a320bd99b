"""The NASExperiment manifest: load, default and validate it the way the API server does.

`load_manifest(path_or_dict) -> Experiment` reads a manifest (YAML file, YAML text or a dict),
applies the CRD schema's defaults (structural defaulting, as the API server does), validates it
against the CRD's openAPIV3Schema and its CEL rules (`x-kubernetes-validations`, evaluated with
cel-python), and raises `ManifestError` naming every bad field (e.g. `spec.optimizer.elitism`),
its value and what is allowed. The schema is read from the CRD file packaged next to this module
(`morphml/crd/nasexperiments.morphml.io.yaml`, a copy of `crds/` checked by a unit test), so
`morphml run` refuses exactly the manifests `kubectl apply` refuses.

`Experiment.build_optimizer()` is the one manifest -> optimizer mapping; the one manifest ->
coordinator settings mapping is `morphml.distributed.settings` (a layer below: it returns the
distributed layer's `ExperimentSettings`, so it cannot live here).

Imports: the standard library, PyYAML, jsonschema, celpy; morphml.space, morphml.optimizers and
morphml.evaluation only lazily inside the methods that need them (loading a manifest stays light:
no torch, no grpc).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # typing only: loading a manifest imports none of these
    from morphml.optimizers import Optimizer
    from morphml.space import SearchSpace

API_VERSION = "morphml.io/v1alpha1"
KIND = "NASExperiment"
CRD_VERSION = "v1alpha1"
CRD_FILE = Path(__file__).resolve().parent / "crd" / "nasexperiments.morphml.io.yaml"


class ManifestError(ValueError):
    """A manifest the API server would refuse. `problems` lists (field path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        lines = [f"{path}: {message}" if path else message for path, message in self.problems]
        if len(lines) == 1:
            text = f"{where}invalid NASExperiment manifest: {lines[0]}"
        else:
            text = f"{where}invalid NASExperiment manifest ({len(lines)} problems):\n  " + "\n  ".join(lines)
        super().__init__(text)

    @property
    def fields(self) -> list[str]:
        """The field paths named by the problems, in order."""
        return [path for path, _ in self.problems]


# --------------------------------------------------------------------------- the CRD schema


@functools.cache
def load_crd(path: str | os.PathLike[str] | None = None) -> dict:
    """The CustomResourceDefinition as a dict (the packaged copy unless `path` is given)."""
    with open(path or CRD_FILE, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def crd_schema(version: str = CRD_VERSION) -> dict:
    """The openAPIV3Schema of one served version of the CRD."""
    for entry in load_crd()["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise KeyError(f"the NASExperiment CRD has no version {version!r}")


# --------------------------------------------------------------------------- field paths


def format_path(parts: tuple[Any, ...] | list[Any]) -> str:
    """('spec', 'searchSpace', 'layers', 1, 'type') -> 'spec.searchSpace.layers[1].type'."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _show(value: Any) -> str:
    """A value as a user wrote it in YAML, short."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
        return text if len(text) <= 60 else text[:57] + "..."
    return str(value)


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null" if value is None else type(value).__name__


# --------------------------------------------------------------------------- structural defaulting


def apply_defaults(value: Any, schema: Mapping[str, Any]) -> Any:
    """Fill in schema defaults in place, the way the API server's structural defaulting does.

    A missing (or null, for a non-nullable field) property with a `default` gets a deep copy of it;
    then defaulting recurses into every property, so `default: {}` on an object also fills in that
    object's own defaulted fields. Values of the wrong type are left alone for validation to name.
    """
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for key, sub in properties.items():
            if key in value and value[key] is None and not sub.get("nullable", False):
                del value[key]
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            if key in properties:
                apply_defaults(item, properties[key])
            elif isinstance(additional, dict):
                apply_defaults(item, additional)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(item, schema["items"])
    return value


# --------------------------------------------------------------------------- OpenAPI validation


def _strict_schema(schema: Any) -> Any:
    """The CRD schema as JSON Schema draft 4, with unknown fields refused.

    The API server (with kubectl's default strict field validation) refuses unknown fields of an
    object that declares `properties`; a structural schema cannot say `additionalProperties: false`
    itself, so it is added here. `x-kubernetes-*` keys are left in place (jsonschema ignores them).
    """
    if isinstance(schema, list):
        return [_strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    dropped = ("default", "x-kubernetes-validations")
    result = {key: _strict_schema(item) for key, item in schema.items() if key not in dropped}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields", False)
    ):
        result["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string"):
        result["type"] = ["integer", "string"]
    return result


@functools.cache
def _validator() -> Any:  # a jsonschema.Draft4Validator
    import jsonschema

    return jsonschema.Draft4Validator(_strict_schema(crd_schema()))


def _describe_schema_error(error: Any) -> tuple[str, str]:  # error: a jsonschema.ValidationError
    """(field path, message) for one jsonschema error, in the API server's terms."""
    path = list(error.absolute_path)
    value = error.instance
    rule = error.validator
    limit = error.validator_value
    if rule == "required":
        missing = [name for name in limit if name not in value]
        name = missing[0] if missing else "?"
        return format_path(path + [name]), "Required value: this field is required"
    if rule == "additionalProperties":
        allowed = sorted((error.schema.get("properties") or {}).keys())
        unknown = sorted(key for key in value if key not in allowed)
        name = unknown[0] if unknown else "?"
        return format_path(path + [name]), f"unknown field; allowed fields here: {', '.join(allowed)}"
    field = format_path(path)
    if rule == "enum":
        return field, f"Unsupported value {_show(value)}: supported values: {', '.join(_show(v) for v in limit)}"
    if rule == "type":
        wanted = " or ".join(limit) if isinstance(limit, list) else limit
        return field, f"Invalid value {_show(value)}: must be of type {wanted}, not {_type_name(value)}"
    if rule == "minimum":
        strict = error.schema.get("exclusiveMinimum") is True
        relation = "greater than" if strict else "greater than or equal to"
        return field, f"Invalid value {_show(value)}: must be {relation} {limit}"
    if rule == "maximum":
        strict = error.schema.get("exclusiveMaximum") is True
        relation = "less than" if strict else "less than or equal to"
        return field, f"Invalid value {_show(value)}: must be {relation} {limit}"
    if rule == "minItems":
        return field, f"Invalid value: must have at least {limit} item{'s' if limit != 1 else ''}"
    if rule == "maxItems":
        return field, f"Too many: {len(value)}: must have at most {limit} items"
    if rule == "minLength":
        return field, f"Invalid value {_show(value)}: must be at least {limit} characters"
    if rule == "maxLength":
        return field, f"Too long: must have at most {limit} characters"
    if rule == "pattern":
        return field, f"Invalid value {_show(value)}: must match the pattern {limit!r}"
    return field, f"Invalid value {_show(value)}: {error.message}"


def _set_duplicates(value: Any, schema: Mapping[str, Any], path: tuple) -> list[tuple[str, str]]:
    """Duplicates in lists marked `x-kubernetes-list-type: set` (the API server refuses them)."""
    problems: list[tuple[str, str]] = []
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            sub = properties.get(key, additional if isinstance(additional, dict) else None)
            if sub:
                problems += _set_duplicates(item, sub, path + (key,))
    elif isinstance(value, list):
        if schema.get("x-kubernetes-list-type") == "set":
            seen: list[Any] = []
            for index, item in enumerate(value):
                if any(item == earlier and type(item) is type(earlier) for earlier in seen):
                    problems.append((format_path(path + (index,)), f"Duplicate value: {_show(item)}"))
                seen.append(item)
        if isinstance(schema.get("items"), dict):
            for index, item in enumerate(value):
                problems += _set_duplicates(item, schema["items"], path + (index,))
    return problems


# --------------------------------------------------------------------------- CEL rules


@functools.cache
def _cel_program(rule: str) -> Any:  # a celpy Runner
    import celpy

    environment = celpy.Environment()
    return environment.program(environment.compile(rule))


def _field_path_parts(field_path: str) -> tuple:
    """'.repeat.min' -> ('repeat', 'min'); also accepts "['key']" and '[0]' segments."""
    parts: list[Any] = []
    for name, key, index in re.findall(r"\.([A-Za-z_][A-Za-z0-9_]*)|\['([^']*)'\]|\[(\d+)\]", field_path):
        parts.append(name or key if not index else int(index))
    return tuple(parts)


def _single_reference(rule: str) -> tuple:
    """The one field a rule without fieldPath reads, e.g. ('metadata', 'name'); () if several.

    The API server reports such a rule at the object that carries it (for the root rule on
    metadata.name, at no path at all); naming the field it reads is more use to a reader.
    """
    field_chain = r"self((?:\.[A-Za-z_][A-Za-z0-9_]*)+?)"
    until = r"(?=\.[A-Za-z_][A-Za-z0-9_]*\(|[^A-Za-z0-9_.]|$)"  # a method call, an operator or the end
    references = set(re.findall(field_chain + until, rule))
    return _field_path_parts(references.pop()) if len(references) == 1 else ()


def _lookup(value: Any, parts: tuple) -> Any:
    for part in parts:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def _cel_problems(value: Any, schema: Mapping[str, Any], path: tuple, skip: set[tuple]) -> list[tuple[str, str]]:
    """Evaluate every `x-kubernetes-validations` rule at every place the instance reaches it.

    Subtrees that already failed the OpenAPI checks (`skip`) are not evaluated: their rules
    would only fail on the wrong types the first error already names.
    """
    if any(path[: len(bad)] == bad for bad in skip):
        return []
    problems: list[tuple[str, str]] = []
    rules = schema.get("x-kubernetes-validations") or []
    if rules:
        import celpy

        activation = {"self": celpy.json_to_cel(value)}
        for rule in rules:
            if "oldSelf" in rule["rule"]:
                continue  # transition rules only apply to updates of a stored object
            try:
                result = _cel_program(rule["rule"]).evaluate(activation)
                passed = bool(result) if isinstance(result, celpy.celtypes.BoolType) else False
                detail = rule.get("message") or f"failed rule: {rule['rule']}"
            except celpy.CELEvalError as error:
                passed, detail = False, f"rule {rule['rule']!r} could not be evaluated: {error.args[0]}"
            if passed:
                continue
            parts = _field_path_parts(rule.get("fieldPath", "")) or _single_reference(rule["rule"])
            field = format_path(path + parts) or "(root)"
            if parts:
                shown = _lookup(value, parts)
                detail = f"Invalid value {_show(shown)}: {detail}"
            problems.append((field, detail))
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            sub = properties.get(key, additional if isinstance(additional, dict) else None)
            if sub:
                problems += _cel_problems(item, sub, path + (key,), skip)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            problems += _cel_problems(item, schema["items"], path + (index,), skip)
    return problems


# --------------------------------------------------------------------------- validation entry point


def validate_manifest(manifest: Mapping[str, Any], source: str | None = None) -> dict:
    """The manifest with defaults applied, or `ManifestError` listing every problem.

    Order as in the API server: defaulting, then the OpenAPI schema (types, ranges, enums,
    patterns, required and unknown fields, list sets), then the CEL rules.
    """
    if not isinstance(manifest, Mapping):
        what = f"a manifest is a mapping (apiVersion, kind, metadata, spec), not {_type_name(manifest)}"
        raise ManifestError([("", what)], source)
    document = copy.deepcopy(dict(manifest))
    problems: list[tuple[str, str]] = []
    if document.get("apiVersion") != API_VERSION:
        problems.append(
            ("apiVersion", f"Unsupported value {_show(document.get('apiVersion'))}: supported values: {API_VERSION!r}")
        )
    if document.get("kind") != KIND:
        problems.append(("kind", f"Unsupported value {_show(document.get('kind'))}: supported values: {KIND!r}"))
    metadata = document.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str) or not metadata.get("name"):
        problems.append(("metadata.name", "Required value: name or generateName is required"))
    if problems:
        raise ManifestError(problems, source)
    document.pop("status", None)  # status is the operator's; a manifest's status is ignored as by the API server

    schema = crd_schema()
    apply_defaults(document, schema)
    schema_errors = sorted(_validator().iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    seen: set[tuple[str, str]] = set()
    for error in schema_errors:
        problem = _describe_schema_error(error)
        if problem not in seen:
            seen.add(problem)
            problems.append(problem)
    problems += _set_duplicates(document, schema, ())
    skip = {tuple(error.absolute_path) for error in schema_errors}
    problems += _cel_problems(document, schema, (), skip)
    if problems:
        raise ManifestError(problems, source)
    return document


# --------------------------------------------------------------------------- reference text


def manifest_reference() -> str:
    """A Markdown table of every spec field: path, type, default, limits, description (from the CRD).

    docs/kubernetes.md embeds this text; a unit test fails when the two differ.
    """
    rows = ["| field | type | default | allowed | description |", "|---|---|---|---|---|"]

    def allowed(node: Mapping[str, Any]) -> str:
        parts = []
        if "enum" in node:
            parts.append(", ".join(f"`{v}`" for v in node["enum"]))
        if "minimum" in node:
            parts.append(f"{'>' if node.get('exclusiveMinimum') else '>='} {node['minimum']}")
        if "maximum" in node:
            parts.append(f"{'<' if node.get('exclusiveMaximum') else '<='} {node['maximum']}")
        if "minItems" in node:
            parts.append(f"{node['minItems']}+ items")
        if "pattern" in node and len(node["pattern"]) <= 40:
            parts.append(f"matches `{node['pattern']}`")
        return "; ".join(parts)

    def type_of(node: Mapping[str, Any]) -> str:
        if node.get("x-kubernetes-int-or-string"):
            return "quantity"
        if node.get("type") == "array":
            items = node.get("items") or {}
            return f"list of {type_of(items)}"
        if node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
            return f"map of {type_of(node['additionalProperties'])}"
        return str(node.get("type", ""))

    def walk(node: Mapping[str, Any], path: str) -> None:
        default = f"`{_show(node['default'])}`" if "default" in node and node["default"] != {} else ""
        description = " ".join(str(node.get("description", "")).split()).replace("|", "\\|")
        item = node.get("items") if node.get("type") == "array" else None
        item_allowed = allowed(item) if isinstance(item, Mapping) else ""
        limits = "; ".join(filter(None, [f"each {item_allowed}" if item_allowed else "", allowed(node)]))
        rows.append(f"| `{path}` | {type_of(node)} | {default} | {limits} | {description} |")
        for name, sub in (node.get("properties") or {}).items():
            walk(sub, f"{path}.{name}")
        if isinstance(item, Mapping) and item.get("properties"):
            if path.endswith("block.layers"):
                rows.append(f"| `{path}[].*` | | | | The fields of `spec.searchSpace.layers[]`, except `block`. |")
                return
            for name, sub in item["properties"].items():
                walk(sub, f"{path}[].{name}")

    walk(crd_schema()["properties"]["spec"], "spec")
    return "\n".join(rows) + "\n"


# --------------------------------------------------------------------------- the Experiment


@dataclasses.dataclass(frozen=True)
class Objective:
    """The metric that ranks trials and whether larger is better."""

    metric: str = "val_accuracy"
    goal: str = "maximize"

    @property
    def maximize(self) -> bool:
        return self.goal == "maximize"

    def is_better(self, candidate: float, incumbent: float | None) -> bool:
        """True when `candidate` beats `incumbent` (anything beats None)."""
        if incumbent is None:
            return True
        return candidate > incumbent if self.maximize else candidate < incumbent

    def to_spec(self) -> dict:
        return {"metric": self.metric, "goal": self.goal}


@dataclasses.dataclass(frozen=True)
class Budget:
    """When the search stops: trials finished, epochs leased (None: no limit), and failed trials
    that fail the experiment."""

    max_trials: int = 50
    max_failed_trials: int = 10
    max_epochs: int | None = None


@dataclasses.dataclass(frozen=True)
class FaultTolerance:
    """Heartbeat timing and retry budget of failing trials."""

    heartbeat_interval_seconds: int = 10
    missed_heartbeats: int = 3
    max_task_retries: int = 2
    max_task_losses: int = 5

    @property
    def heartbeat_timeout_seconds(self) -> int:
        """Silence after which a worker is declared dead."""
        return self.heartbeat_interval_seconds * self.missed_heartbeats


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    """How many workers, and how many trials each runs at once."""

    replicas: int = 1
    gpus_per_worker: int = 0
    trials_per_worker: int = 1

    @property
    def concurrent_trials(self) -> int:
        """Trials one worker runs at once: one per GPU, else trialsPerWorker."""
        return self.gpus_per_worker if self.gpus_per_worker > 0 else self.trials_per_worker


@dataclasses.dataclass
class Experiment:
    """A validated NASExperiment: the manifest with defaults applied and typed views of it."""

    name: str
    namespace: str | None
    manifest: dict  # the whole object, defaults applied
    spec: dict  # manifest["spec"], camelCase as in the manifest
    objective: Objective
    budget: Budget
    fault_tolerance: FaultTolerance
    workers: WorkerSettings
    evaluation: dict  # spec.evaluation, camelCase, what morphml.evaluation takes
    optimizer_spec: dict  # spec.optimizer, camelCase, what morphml.optimizers.build_optimizer takes
    suspend: bool = False
    _search_space: Any = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def from_manifest(cls, document: dict) -> Experiment:
        """An Experiment from an already validated, defaulted manifest."""
        spec = document["spec"]
        budget = spec["budget"]
        faults = spec["faultTolerance"]
        workers = spec["workers"]
        return cls(
            name=document["metadata"]["name"],
            namespace=document["metadata"].get("namespace"),
            manifest=document,
            spec=spec,
            # With spec.objectives, its first entry is the primary objective (best, Best column).
            objective=Objective(metric=spec["objectives"][0]["metric"], goal=spec["objectives"][0]["goal"])
            if spec.get("objectives")
            else Objective(metric=spec["objective"]["metric"], goal=spec["objective"]["goal"]),
            budget=Budget(max_trials=budget["maxTrials"], max_failed_trials=budget["maxFailedTrials"],
                          max_epochs=budget.get("maxEpochs")),
            fault_tolerance=FaultTolerance(
                heartbeat_interval_seconds=faults["heartbeatIntervalSeconds"],
                missed_heartbeats=faults["missedHeartbeats"],
                max_task_retries=faults["maxTaskRetries"],
                max_task_losses=faults.get("maxTaskLosses", FaultTolerance.max_task_losses),
            ),
            workers=WorkerSettings(
                replicas=workers["replicas"],
                gpus_per_worker=workers["gpusPerWorker"],
                trials_per_worker=workers["trialsPerWorker"],
            ),
            evaluation=spec["evaluation"],
            optimizer_spec=spec["optimizer"],
            suspend=bool(spec.get("suspend", False)),
        )

    @property
    def search_space_spec(self) -> dict:
        """spec.searchSpace with its name filled in (the experiment name when unset)."""
        space = dict(self.spec["searchSpace"])
        space.setdefault("name", self.name)
        return space

    def dataset_shape(self) -> tuple[tuple[int, ...], int]:
        """(input_shape, num_classes) of spec.evaluation.dataset (no torch for digits/synthetic/npz)."""
        from morphml.evaluation.datasets import dataset_shape  # lazily: only the master and CLI need it

        return dataset_shape(self.evaluation["dataset"])

    @property
    def search_space(self) -> SearchSpace:
        """The morphml.space.SearchSpace the manifest declares (built once, on first use).

        Not bound to the dataset: `build_optimizer()` binds it (that needs the dataset's shape).
        """
        if self._search_space is None:
            from morphml.space import SearchSpace  # lazily: loading a manifest needs no NAS core

            self._search_space = SearchSpace.from_spec(self.search_space_spec, path="spec.searchSpace")
        return self._search_space

    def build_optimizer(self) -> Optimizer:
        """A fresh optimizer over this experiment's search space, bound to its dataset's shape.

        An optimizer the manifest asks for but this master cannot build (e.g. ``tpe`` without Optuna
        installed) is a `ManifestError` naming the field, so `morphml run` / `master` say it in one line.
        """
        from morphml.optimizers import OptimizerError, build_optimizer

        input_shape, num_classes = self.dataset_shape()
        space = self.search_space
        space.bind(input_shape, num_classes)
        try:
            return build_optimizer(self.optimizer_spec, space, self.objective.to_spec(), input_shape=input_shape,
                                   num_classes=num_classes, max_trials=self.budget.max_trials,
                                   objectives=self.objectives or None, constraints=self.constraints or None)
        except OptimizerError as exc:
            field, sep, message = str(exc).partition(": ")
            if not sep or not field.startswith("spec."):
                raise
            raise ManifestError([(field, message)], self.name) from None

    @property
    def objectives(self) -> list[dict]:
        """spec.objectives: [{metric, goal}, ...] of a multi-objective search, [] for one objective."""
        return [dict(o) for o in self.spec.get("objectives") or []]

    @property
    def constraints(self) -> dict:
        """spec.constraints (camelCase: maxParams, maxFlops, maxLatencyMs), {} for none."""
        return dict(self.spec.get("constraints") or {})

    @property
    def artifacts(self) -> dict:
        """spec.artifacts (camelCase: checkpointIntervalEpochs, keep, s3), defaults applied; the
        distributed layer maps it (morphml.distributed.checkpoints.ArtifactSettings.from_spec)."""
        return dict(self.spec.get("artifacts") or {})

    def to_yaml(self) -> str:
        """The defaulted manifest as YAML (what the operator mounts into the master pod)."""
        return yaml.safe_dump(self.manifest, sort_keys=False)


# --------------------------------------------------------------------------- --set overrides

OVERRIDE_SEGMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")


def _override_steps(text: str) -> tuple[list[Any], Any]:
    """('spec.searchSpace.layers[0].filters=[16]') -> (['spec', 'searchSpace', 'layers', 0, 'filters'], [16])."""
    path, sep, raw = text.partition("=")
    segments = path.split(".") if sep else []
    if len(segments) < 2 or segments[0] not in ("spec", "metadata"):
        why = f"--set {text!r}: expected PATH=VALUE with PATH under spec or metadata, e.g. spec.budget.maxTrials=2"
        raise ManifestError([("", why)])
    steps: list[Any] = []
    for segment in segments:
        match = OVERRIDE_SEGMENT.match(segment)
        if not match:
            why = f"--set {text!r}: {segment!r} is not a field name (letters, digits and _; a list item as name[0])"
            raise ManifestError([("", why)])
        steps.append(match.group(1))
        steps += [int(index) for index in re.findall(r"\d+", match.group(2))]
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ManifestError([(path, f"--set {text!r}: the value is not valid YAML: {error}")]) from error
    return steps, value


def apply_overrides(document: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """`morphml run --set PATH=VALUE`: set fields of a manifest before it is defaulted and validated.

    PATH is a dotted field path under `spec` or `metadata` (`spec.budget.maxTrials`, list items as
    `spec.searchSpace.layers[0].filters`); VALUE is read as YAML (`2` an integer, `true` a boolean,
    `[16, 32]` a list, anything else a string). Missing objects on the way are created; validation
    then judges the result like any manifest, so a bad value is refused naming its field.
    Returns a copy; the input is not changed.
    """
    document = copy.deepcopy(document)
    for text in overrides:
        steps, value = _override_steps(text)
        node: Any = document
        for position, step in enumerate(steps):
            here = format_path(steps[: position + 1])
            last = position == len(steps) - 1
            if isinstance(step, int):
                if not isinstance(node, list) or step >= len(node):
                    raise ManifestError([(here, f"--set {text!r}: there is no list item {step} here")])
            elif not isinstance(node, dict):
                raise ManifestError([(here, f"--set {text!r}: {format_path(steps[:position])} is not an object")])
            elif not last and node.get(step) is None:
                node[step] = [] if isinstance(steps[position + 1], int) else {}
            if last:
                node[step] = value
            else:
                node = node[step]
    return document


def load_manifest(source: str | os.PathLike[str] | Mapping[str, Any],
                  overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Read, default and validate a NASExperiment manifest; raise ManifestError naming bad fields.

    `source` is a path to a YAML file, YAML text (anything with a newline), or a dict;
    `overrides` are `PATH=VALUE` texts applied first (`apply_overrides`, `morphml run --set`).
    """
    label: str | None = None
    if not isinstance(source, (str, os.PathLike)):
        document: Any = source  # a dict (or anything else, which validation names)
    else:
        text_source = str(source)
        if isinstance(source, str) and "\n" in source:
            text, label = source, None
        else:
            label = text_source
            try:
                text = Path(text_source).read_text(encoding="utf-8")
            except OSError as error:
                what = f"cannot read the manifest file: {error.strerror or error}"
                raise ManifestError([("", what)], label) from error
        try:
            documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
        except yaml.YAMLError as error:
            raise ManifestError([("", f"not valid YAML: {error}")], label) from error
        if len(documents) != 1:
            raise ManifestError([("", f"expected exactly one YAML document, found {len(documents)}")], label)
        document = documents[0]
    if overrides:
        document = apply_overrides(document, overrides)
    return Experiment.from_manifest(validate_manifest(document, label))
