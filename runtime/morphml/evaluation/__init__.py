"""morphml.evaluation: score an architecture graph by training it.

Public API:
- `evaluate_architecture(arch_json, evaluation_spec, device=None, seed=0) -> dict` (workers call it)
- `build_model(graph_or_json) -> torch.nn.Module`
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
    "load_user_evaluator",
    "plan_graph",
    "training_settings",
]
