"""`evaluate_architecture`: score one architecture under `spec.evaluation`, the function workers call.

Either the built-in path (dataset + graph -> torch module -> trainer) or, when
`spec.evaluation.evaluator` is "module:function", the user's function
`fn(arch_json: dict, evaluation_spec: dict, device: str | None) -> dict`. A user function that
takes a fourth parameter (or one named `report`) also gets `report(step, metrics) -> decision`:
it may call it after each step (epoch) with its metrics so far; the decision is
ReportDecision.CONTINUE or ReportDecision.STOP ("continue" / "stop", str values), STOP meaning
an early-stopping scheduler ended the trial: return the metrics you have now. Three-argument
functions are called as before. Every failure leaves as `TrialFailure(kind, message)`.

Imports no torch at import time: the torch modules (model, trainer) are imported inside
`evaluate_architecture` on the built-in path only, so a user evaluator that does not use torch
runs in a process that never loads it.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import ModuleType
from typing import Any

from morphml.evaluation.datasets import load_dataset
from morphml.evaluation.errors import EvaluationSpecError, TrialFailure
from morphml.evaluation.segments import Segment
from morphml.evaluation.settings import training_settings
from morphml.evaluation.shapes import as_arch_dict, plan_graph

EVALUATOR_FIELD = "spec.evaluation.evaluator"
UserEvaluator = Callable[..., dict]
# What the trial runner gives evaluate_architecture: report(step, metrics) -> True to stop.
ProgressCallback = Callable[[int, dict], bool]


class ReportDecision(str, enum.Enum):
    """What `report(step, metrics)` answers a user evaluator."""

    CONTINUE = "continue"
    STOP = "stop"


def takes_report(fn: Callable[..., Any]) -> bool:
    """True when a user evaluator accepts the report callable: a parameter named `report`, a
    fourth positional parameter, or *args. Three-argument evaluators get only the three."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature (some builtins): call it the old way
        return False
    if any(p.name == "report" for p in params) or any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 4


def user_report(progress: ProgressCallback | None) -> Callable[[int, Mapping[str, Any]], ReportDecision]:
    """The report(step, metrics) a user evaluator gets: checks its arguments (TrialFailure
    "invalid" naming them) and answers CONTINUE or STOP (always CONTINUE without a scheduler)."""
    def report(step: int, metrics: Mapping[str, Any]) -> ReportDecision:
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise TrialFailure("invalid", f"report(step={step!r}, ...): step must be an integer >= 1")
        if not isinstance(metrics, Mapping):
            raise TrialFailure("invalid", f"report(step={step}, metrics={metrics!r}): metrics must be a dict")
        if progress is None:
            return ReportDecision.CONTINUE
        return ReportDecision.STOP if progress(step, dict(metrics)) else ReportDecision.CONTINUE
    return report


def architecture_hash(arch: Mapping[str, Any]) -> str:
    """The architecture's hash as the master journals it (morphml.graph's arch_hash)."""
    from morphml.graph import ArchitectureGraph

    return ArchitectureGraph.from_json(dict(arch)).arch_hash


def load_user_evaluator(path: Any) -> UserEvaluator:
    """Import "module:function" (function may be dotted, e.g. "pkg.mod:Trainer.run").

    The current directory is tried as a last resort, so a module next to the manifest works with
    `morphml run`. Raises EvaluationSpecError naming spec.evaluation.evaluator.
    """
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise EvaluationSpecError(EVALUATOR_FIELD,
                                  f"{path!r} must look like 'module:function', e.g. 'my_pkg.train:evaluate'")
    module_name, attr_path = path.split(":")
    try:
        module = _import(module_name)
    except Exception as exc:
        raise EvaluationSpecError(
            EVALUATOR_FIELD, f"{path!r}: module {module_name!r} could not be imported ({type(exc).__name__}: {exc})"
        ) from None
    target: Any = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise EvaluationSpecError(EVALUATOR_FIELD, f"{path!r}: {target.__name__!r} has no attribute {part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise EvaluationSpecError(
            EVALUATOR_FIELD, f"{path!r}: {attr_path!r} is a {type(target).__name__}, not a callable "
            "fn(arch_json, evaluation_spec, device) -> dict"
        )
    return target


def _import(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        top = module_name.split(".")[0]
        if exc.name != top or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(module_name)


def _describe(exc: BaseException) -> str:
    """Exception type and message plus where it was raised (innermost frame)."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        text += f" (at {os.path.basename(last.filename)}:{last.lineno} in {last.name})"
    return text


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    return oom_type is not None and isinstance(exc, oom_type)


def _call_user_evaluator(path: str, arch: dict, spec: dict, device: str | None,
                         progress: ProgressCallback | None = None) -> dict:
    try:
        fn = load_user_evaluator(path)
    except EvaluationSpecError as exc:
        raise TrialFailure("invalid", str(exc)) from None
    try:
        if takes_report(fn):
            if any(p.name == "report" for p in inspect.signature(fn).parameters.values()):
                result = fn(arch, spec, device, report=user_report(progress))
            else:
                result = fn(arch, spec, device, user_report(progress))
        else:
            result = fn(arch, spec, device)
    except TrialFailure:
        raise
    except Exception as exc:
        kind = "oom" if _is_oom(exc) else "exception"
        raise TrialFailure(kind, f"evaluator {path!r} raised {_describe(exc)}") from None
    if not isinstance(result, Mapping):
        raise TrialFailure("exception",
                           f"evaluator {path!r} returned {type(result).__name__}, expected a dict of metrics")
    for key, value in result.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise TrialFailure("nan", f"evaluator {path!r} returned {key}={value}")
    return dict(result)


def evaluate_architecture(
    arch_json: Any, evaluation_spec: Mapping[str, Any] | None, device: str | None = None, seed: int = 0,
    progress: ProgressCallback | None = None, segment: Segment | None = None,
) -> dict[str, Any]:
    """Train and validate one architecture; return metrics or raise TrialFailure.

    Metrics: val_accuracy, val_loss, train_loss, params, flops, train_seconds, epochs, device
    (a user evaluator returns its own dict). `progress(step, metrics)`, when given, gets each
    epoch's metrics (the built-in trainer) or each report() of a user evaluator; True from it
    stops the trial early.

    `segment` (see morphml.evaluation.segments): the built-in trainer resumes from its checkpoint
    and saves checkpoints; a user evaluator gets no checkpoints, only its epochs: with
    `segment.stop_epoch` set, spec.evaluation.epochs is that, and it trains from the start.
    """
    started = time.monotonic()
    if evaluation_spec is not None and not isinstance(evaluation_spec, Mapping):
        raise TrialFailure("invalid", f"spec.evaluation: must be an object, got {type(evaluation_spec).__name__}")
    spec = dict(evaluation_spec or {})
    arch = as_arch_dict(arch_json)
    if spec.get("evaluator"):
        if segment is not None and segment.stop_epoch > 0:
            spec["epochs"] = segment.stop_epoch  # no checkpoints: it trains the segment's total from 0
        return _call_user_evaluator(spec["evaluator"], arch, spec, device, progress)
    try:
        return _train_builtin(arch, spec, device, seed, started, progress, segment)
    except TrialFailure:
        raise
    except ImportError as exc:
        raise TrialFailure(
            "exception", f"the built-in trainer needs torch and scikit-learn (the 'worker' extra): {_describe(exc)}"
        ) from None
    except Exception as exc:
        kind = "oom" if _is_oom(exc) else "exception"
        raise TrialFailure(kind, _describe(exc)) from None


def _train_builtin(arch: dict, spec: dict, device: str | None, seed: int, started: float,
                   progress: ProgressCallback | None = None, segment: Segment | None = None) -> dict[str, Any]:
    plan = plan_graph(arch)
    if segment is not None and not segment.arch_hash:
        segment = replace(segment, arch_hash=architecture_hash(arch))
    try:
        settings = training_settings(spec)
        dataset = load_dataset(spec.get("dataset"))
    except EvaluationSpecError as exc:
        raise TrialFailure("invalid", str(exc)) from None
    if tuple(plan.input_shape) != tuple(dataset.input_shape) or plan.num_classes != dataset.num_classes:
        raise TrialFailure(
            "invalid",
            f"architecture expects input_shape {list(plan.input_shape)} and {plan.num_classes} classes, "
            f"dataset {dataset.name!r} has {list(dataset.input_shape)} and {dataset.num_classes}",
        )

    import torch  # from here on the trial needs torch

    from morphml.evaluation import trainer
    from morphml.evaluation.model import GraphModule

    trainer.configure_threads()
    chosen = trainer.select_device(device)
    torch.manual_seed(seed)
    try:
        model = GraphModule(plan)
    except Exception as exc:
        raise TrialFailure("exception", f"building the model failed: {_describe(exc)}") from None
    metrics = trainer.train_and_validate(model, dataset, settings, chosen, seed=seed, started=started,
                                         report=progress, segment=segment)
    metrics["flops"] = plan.flops
    return metrics
