"""The trained best model out: `load_model(path)` and `validation_metrics(model, evaluation)`.

A finished experiment leaves `best/` beside its journal (`runs/<name>/best/` for `morphml run`;
`morphml results NAME` fetches it from a cluster): `architecture.json` (the canonical graph),
`metrics.json` (the trial's recorded metrics) and `model.pt`, the trial's final checkpoint as
the trainer saved it (torch tensors; its "model" entry is the state dict). `load_model` builds
the module from architecture.json, loads the weights with `torch.load(..., weights_only=True)`
(a plain state dict file works too), checks every key and shape against the architecture, and
returns it in eval mode on the CPU. `validation_metrics` scores a module on the validation
split exactly as the trainer did (same split, same batches, eval mode), so a loaded best model
gives back its recorded val_accuracy.

Imports torch at import time; `morphml.evaluation` loads it only when called.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from morphml.evaluation import checkpoint_file
from morphml.evaluation.datasets import load_dataset
from morphml.evaluation.model import build_model
from morphml.evaluation.settings import training_settings


def _paths(path: Path | str) -> tuple[Path, Path]:
    """(model.pt, architecture.json) for a best/ folder or a model.pt inside one."""
    path = Path(path)
    if path.is_dir():
        return path / "model.pt", path / "architecture.json"
    return path, path.with_name("architecture.json")


def load_model(path: Path | str, device: str | torch.device = "cpu") -> nn.Module:
    """The trained module of a best/ folder (or of its model.pt), in eval mode.

    Raises FileNotFoundError naming the missing file, and checkpoint_file.CheckpointError (a
    ValueError) naming the file and key when the weights do not fit the architecture."""
    weights, arch_file = _paths(path)
    for needed in (weights, arch_file):
        if not needed.is_file():
            raise FileNotFoundError(f"load_model({str(path)!r}): {needed} does not exist (a best/ folder holds "
                                    f"model.pt and architecture.json)")
    arch = json.loads(arch_file.read_text())
    model = build_model(arch)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise checkpoint_file.CheckpointError(f"{weights}: not a loadable torch file ({type(exc).__name__})") from None
    if isinstance(state, Mapping) and state.get("format") == checkpoint_file.FORMAT:
        state = checkpoint_file.read_checkpoint(weights, name=str(weights))
    elif isinstance(state, Mapping):
        state = {"model": dict(state)}
    else:
        raise checkpoint_file.CheckpointError(f"{weights}: holds a {type(state).__name__}, expected a state dict")
    checkpoint_file.check_fits(state, model, str(weights))
    model.load_state_dict(state["model"], strict=True)
    return model.to(device).eval()


def validation_metrics(model: nn.Module, evaluation: Mapping[str, Any] | None = None) -> dict[str, float]:
    """{"val_accuracy", "val_loss"} of `model` on the validation split of spec.evaluation's
    dataset, computed as the trainer computes them."""
    from morphml.evaluation.trainer import _validate

    spec = dict(evaluation or {})
    settings = training_settings(spec)
    dataset = load_dataset(spec.get("dataset"))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x_val = torch.from_numpy(dataset.x_val).to(device)
    y_val = torch.from_numpy(dataset.y_val).to(device)
    accuracy, loss = _validate(model, x_val, y_val, settings, deadline=time.monotonic() + 3600)
    return {"val_accuracy": accuracy, "val_loss": loss}
