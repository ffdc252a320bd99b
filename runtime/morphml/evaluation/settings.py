"""Trainer settings read from `spec.evaluation` (camelCase, as in the manifest).

`training_settings(spec)` checks every field and raises EvaluationSpecError naming it
(`spec.evaluation.batchSize: 0 must be an integer >= 1`). Defaults apply to fields that are
missing or null; the CRD schema applies the same defaults to manifests.

Imports only the standard library and morphml.evaluation.errors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from morphml.evaluation.errors import EvaluationSpecError

OPTIMIZERS = ("adam", "sgd")
SGD_MOMENTUM = 0.9
DEFAULTS = {
    "epochs": 5,
    "batchSize": 64,
    "learningRate": 0.001,
    "optimizer": "adam",
    "weightDecay": 0.0,
    "timeoutSeconds": 600.0,
}


@dataclass(frozen=True)
class TrainingSettings:
    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    weight_decay: float
    timeout_seconds: float


def _number(spec: Mapping, key: str) -> float:
    value = spec.get(key)
    if value is None:
        value = DEFAULTS[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EvaluationSpecError(f"spec.evaluation.{key}", f"{value!r} must be a finite number")
    return value


def training_settings(spec: Mapping[str, Any] | None) -> TrainingSettings:
    spec = spec or {}
    if not isinstance(spec, Mapping):
        raise EvaluationSpecError("spec.evaluation", f"must be an object, got {type(spec).__name__}")
    epochs = _number(spec, "epochs")
    if not isinstance(epochs, int) or epochs < 1:
        raise EvaluationSpecError("spec.evaluation.epochs", f"{epochs!r} must be an integer >= 1")
    batch_size = _number(spec, "batchSize")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationSpecError("spec.evaluation.batchSize", f"{batch_size!r} must be an integer >= 1")
    learning_rate = _number(spec, "learningRate")
    if learning_rate <= 0:
        raise EvaluationSpecError("spec.evaluation.learningRate", f"{learning_rate!r} must be > 0")
    optimizer = spec.get("optimizer") or DEFAULTS["optimizer"]
    if optimizer not in OPTIMIZERS:
        raise EvaluationSpecError("spec.evaluation.optimizer", f"{optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    weight_decay = _number(spec, "weightDecay")
    if weight_decay < 0:
        raise EvaluationSpecError("spec.evaluation.weightDecay", f"{weight_decay!r} must be >= 0")
    timeout = _number(spec, "timeoutSeconds")
    if timeout <= 0:
        raise EvaluationSpecError("spec.evaluation.timeoutSeconds", f"{timeout!r} must be > 0")
    return TrainingSettings(epochs, batch_size, float(learning_rate), optimizer, float(weight_decay), float(timeout))
