"""morphml.evaluation: score an architecture graph by training it.

Public API:
- `evaluate_architecture(arch_json, evaluation_spec, device=None, seed=0) -> dict` (workers call it)
- `build_model(graph_or_json) -> torch.nn.Module`
- `load_model(best_dir) -> torch.nn.Module` (a finished experiment's trained best model, eval mode),
  `validation_metrics(model, evaluation_spec)` (its val_accuracy / val_loss as the trainer measures)
- `load_dataset(dataset_spec) -> Dataset`, `dataset_shape(dataset_spec) -> (input_shape, num_classes)`
- `training_settings(evaluation_spec) -> TrainingSettings`, `load_user_evaluator("module:function")`
- `plan_graph(graph_or_json) -> GraphPlan` (validation, shapes, params, FLOPs without torch)
- `TrialFailure(kind, message)`, `EvaluationSpecError`, `FAILURE_KINDS`

Layering: may import morphml.space / graph / optimizers, never anything below it. torch is
imported only inside functions (model.py and trainer.py import it and are loaded lazily), so
`import morphml.evaluation` and `dataset_shape` work without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from morphml.evaluation.datasets import DATASET_NAMES, Dataset, clear_cache, dataset_shape, load_dataset
from morphml.evaluation.errors import FAILURE_KINDS, EvaluationSpecError, TrialFailure
from morphml.evaluation.evaluate import ReportDecision, evaluate_architecture, load_user_evaluator
from morphml.evaluation.settings import TrainingSettings, training_settings
from morphml.evaluation.shapes import GraphPlan, NodePlan, plan_graph

if TYPE_CHECKING:  # torch is loaded only when a model is built
    import torch


def build_model(graph_or_json: Any) -> torch.nn.Module:
    """Build the torch module for a graph; raises TrialFailure("invalid") for a graph that cannot be built."""
    from morphml.evaluation.model import build_model as _build_model

    return _build_model(graph_or_json)


def load_model(path: Any, device: Any = "cpu") -> torch.nn.Module:
    """The trained best model of a finished experiment: `load_model("runs/<name>/best")`
    (see morphml.evaluation.saved)."""
    from morphml.evaluation.saved import load_model as _load_model

    return _load_model(path, device)


def validation_metrics(model: torch.nn.Module, evaluation_spec: Any = None) -> dict[str, float]:
    """{"val_accuracy", "val_loss"} of a module on spec.evaluation's validation split, as the trainer computes them."""
    from morphml.evaluation.saved import validation_metrics as _validation_metrics

    return _validation_metrics(model, evaluation_spec)


__all__ = [
    "DATASET_NAMES",
    "FAILURE_KINDS",
    "Dataset",
    "EvaluationSpecError",
    "GraphPlan",
    "NodePlan",
    "ReportDecision",
    "TrainingSettings",
    "TrialFailure",
    "build_model",
    "clear_cache",
    "dataset_shape",
    "evaluate_architecture",
    "load_dataset",
    "load_model",
    "load_user_evaluator",
    "plan_graph",
    "training_settings",
    "validation_metrics",
]
