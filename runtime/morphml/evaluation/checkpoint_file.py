"""The checkpoint file of a trial: what the built-in trainer saves after an epoch and resumes from.

A checkpoint is `torch.save` of one dict holding tensors, ints, floats and strs only (and the
bools/None torch's own optimizer state dict has), so it loads with `torch.load(...,
weights_only=True)`: no pickle of arbitrary objects is ever read back. Keys:

- `format` ("morphml-checkpoint-1"), `epoch` (epochs trained), `arch_hash` (of the architecture
  it was trained for), `train_loss` (of that last epoch);
- `model`: the model's state_dict; `optimizer`: the optimizer's state_dict;
- `rng_torch`, `rng_data` (the data-order generator), `rng_cuda` (when on CUDA): RNG states as
  uint8 tensors, so a resumed run draws the same numbers an uninterrupted one would.

`read_checkpoint` checks, in this order, and raises `CheckpointError` naming the file and what
is wrong: size and sha256 (when the caller knows them), that torch can load it with
weights_only, the keys and their types, the architecture hash, and that every state dict key
and tensor shape fits the model to resume (`check_fits`). Only then does `restore` touch the
model, so a refused checkpoint leaves a fresh model behind and the trial trains from 0.

Imports torch at import time (loaded only by the trainer and `morphml.evaluation.saved`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "morphml-checkpoint-1"
REQUIRED = {"format": str, "epoch": int, "arch_hash": str, "model": dict, "optimizer": dict,
            "rng_torch": torch.Tensor, "rng_data": torch.Tensor}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the key or check."""


def file_digest(path: Path | str) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def save_checkpoint(path: Path | str, *, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                    arch_hash: str, data_generator: torch.Generator, train_loss: float = float("nan")
                    ) -> tuple[str, int]:
    """Writes the checkpoint to `path` (a temporary name first, renamed when whole); returns
    (sha256, size)."""
    path = Path(path)
    state: dict[str, Any] = {
        "format": FORMAT, "epoch": int(epoch), "arch_hash": str(arch_hash), "train_loss": float(train_loss),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": _to_cpu(optimizer.state_dict()),
        "rng_torch": torch.get_rng_state(), "rng_data": data_generator.get_state(),
    }
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return file_digest(path)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def read_checkpoint(path: Path | str, *, sha256: str | None = None, size: int | None = None,
                    arch_hash: str | None = None, name: str | None = None) -> dict[str, Any]:
    """The checkpoint's dict, checked (see the module docstring); CheckpointError otherwise,
    its message starting "checkpoint <name>" (default: the file's name)."""
    path = Path(path)
    label = name or path.name
    try:
        actual_sha, actual_size = file_digest(path)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {label}: cannot be read ({exc.strerror or exc})") from None
    if size is not None and actual_size != size:
        raise CheckpointError(f"checkpoint {label}: {actual_size} bytes, the journal says {size} (truncated?)")
    if sha256 is not None and actual_sha != sha256:
        raise CheckpointError(f"checkpoint {label}: sha256 {actual_sha[:16]}... does not match the "
                              f"journaled {sha256[:16]}... (corrupt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise CheckpointError(f"checkpoint {label}: not a loadable torch file "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {label}: holds a {type(state).__name__}, expected a dict")
    for key, kind in REQUIRED.items():
        if key not in state:
            raise CheckpointError(f"checkpoint {label}: key {key!r} is missing")
        if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool)):
            raise CheckpointError(f"checkpoint {label}: key {key!r} is a {type(state[key]).__name__}, "
                                  f"expected {kind.__name__}")
    if state["format"] != FORMAT:
        raise CheckpointError(f"checkpoint {label}: format {state['format']!r}, this MorphML reads {FORMAT!r}")
    if arch_hash is not None and state["arch_hash"] != arch_hash:
        raise CheckpointError(f"checkpoint {label}: key 'arch_hash' is {state['arch_hash'][:12]}..., "
                              f"the trial's architecture is {arch_hash[:12]}... (wrong architecture)")
    return state


def check_fits(state: dict[str, Any], model: nn.Module, name: str = "checkpoint") -> None:
    """CheckpointError unless `state["model"]` has exactly the model's state dict keys, each a
    tensor of the same shape."""
    own = model.state_dict()
    saved = state["model"]
    missing = sorted(set(own) - set(saved))
    extra = sorted(set(saved) - set(own))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(repr(k) for k in missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(repr(k) for k in extra[:3])}{' ...' if len(extra) > 3 else ''}")
        raise CheckpointError(f"{name}: key 'model' does not fit the architecture ({'; '.join(parts)})")
    for key, tensor in own.items():
        value = saved[key]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{name}: key 'model.{key}' is a {type(value).__name__}, expected a tensor")
        if tuple(value.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{name}: key 'model.{key}' has shape {list(value.shape)}, the architecture "
                                  f"needs {list(tensor.shape)} (wrong architecture)")


def restore(state: dict[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer,
            data_generator: torch.Generator, name: str = "checkpoint") -> None:
    """Loads a checked checkpoint into model, optimizer and RNGs (CheckpointError when the
    optimizer state does not fit; call `check_fits` first for the model)."""
    model.load_state_dict(state["model"], strict=True)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{name}: key 'optimizer' does not fit ({exc})") from None
    try:
        torch.set_rng_state(state["rng_torch"])
        data_generator.set_state(state["rng_data"])
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if device.type == "cuda" and isinstance(state.get("rng_cuda"), torch.Tensor):
            torch.cuda.set_rng_state(state["rng_cuda"], device)
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{name}: an RNG state (rng_torch/rng_data) is invalid ({exc})") from None
