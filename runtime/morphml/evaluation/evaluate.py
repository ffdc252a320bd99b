"""`evaluate_architecture`: score one architecture under `spec.evaluation`, the function workers call.

Either the built-in path (dataset + graph -> torch module -> trainer) or, when
`spec.evaluation.evaluator` is "module:function", the user's function
`fn(arch_json: dict, evaluation_spec: dict, device: str | None) -> dict`.
Every failure leaves as `TrialFailure(kind, message)`.

Imports no torch at import time: the torch modules (model, trainer) are imported inside
`evaluate_architecture` on the built-in path only, so a user evaluator that does not use torch
runs in a process that never loads it.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from morphml.evaluation.datasets import load_dataset
from morphml.evaluation.errors import EvaluationSpecError, TrialFailure
from morphml.evaluation.settings import training_settings
from morphml.evaluation.shapes import as_arch_dict, plan_graph

EVALUATOR_FIELD = "spec.evaluation.evaluator"
UserEvaluator = Callable[[dict, dict, "str | None"], dict]


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


def _call_user_evaluator(path: str, arch: dict, spec: dict, device: str | None) -> dict:
    try:
        fn = load_user_evaluator(path)
    except EvaluationSpecError as exc:
        raise TrialFailure("invalid", str(exc)) from None
    try:
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
    arch_json: Any, evaluation_spec: Mapping[str, Any] | None, device: str | None = None, seed: int = 0
) -> dict[str, Any]:
    """Train and validate one architecture; return metrics or raise TrialFailure.

    Metrics: val_accuracy, val_loss, train_loss, params, flops, train_seconds, epochs, device
    (a user evaluator returns its own dict).
    """
    started = time.monotonic()
    if evaluation_spec is not None and not isinstance(evaluation_spec, Mapping):
        raise TrialFailure("invalid", f"spec.evaluation: must be an object, got {type(evaluation_spec).__name__}")
    spec = dict(evaluation_spec or {})
    arch = as_arch_dict(arch_json)
    if spec.get("evaluator"):
        return _call_user_evaluator(spec["evaluator"], arch, spec, device)
    try:
        return _train_builtin(arch, spec, device, seed, started)
    except TrialFailure:
        raise
    except ImportError as exc:
        raise TrialFailure(
            "exception", f"the built-in trainer needs torch and scikit-learn (the 'worker' extra): {_describe(exc)}"
        ) from None
    except Exception as exc:
        kind = "oom" if _is_oom(exc) else "exception"
        raise TrialFailure(kind, _describe(exc)) from None


def _train_builtin(arch: dict, spec: dict, device: str | None, seed: int, started: float) -> dict[str, Any]:
    plan = plan_graph(arch)
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
    metrics = trainer.train_and_validate(model, dataset, settings, chosen, seed=seed, started=started)
    metrics["flops"] = plan.flops
    return metrics
