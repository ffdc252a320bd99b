"""`Segment`: which epochs of a trial one lease trains, and where its checkpoints go.

A lease (worker.proto `Lease`) trains a trial in a segment: resume after `start_epoch` epochs
from the checkpoint file `resume`, train until `stop_epoch` epochs in total (0: the evaluation's
full budget), and save a checkpoint after each epoch in `save_epochs`. The trial runner builds
one from its request; the built-in trainer (`morphml.evaluation.trainer`) carries it out.

Custom `module:function` evaluators get no checkpoints: under a scheduler with rungs their
`spec.evaluation.epochs` is set to the segment's `stop_epoch` and they train from the
start (docs/evaluation.md, "Checkpoints").

Imports: the standard library only (no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# on_checkpoint(epoch, path, sha256, size): a checkpoint file is written and complete.
CheckpointCallback = Callable[[int, str, str, int], None]


@dataclass(frozen=True)
class Segment:
    task_id: str = ""
    attempt: int = 0
    start_epoch: int = 0
    stop_epoch: int = 0  # 0: spec.evaluation.epochs
    save_epochs: tuple[int, ...] = ()
    checkpoint_dir: str | None = None  # where checkpoints are written; None: none are
    arch_hash: str = ""  # the trial's architecture (stored in and checked against checkpoints)
    resume: str | None = None  # local path of the checkpoint to resume from
    resume_key: str = ""  # its store key, for messages
    resume_sha256: str | None = None
    resume_size: int | None = None
    fallback: str | None = None  # the worker could not fetch the checkpoint: train from 0, say why
    on_checkpoint: CheckpointCallback | None = None

    @classmethod
    def from_request(cls, data: Mapping[str, Any] | None, task_id: str = "", attempt: int = 0,
                     on_checkpoint: CheckpointCallback | None = None) -> Segment | None:
        """From the trial runner request's "segment" object (None/absent: no segment)."""
        if not data:
            return None
        size = data.get("resume_size")
        return cls(task_id=task_id, attempt=attempt, start_epoch=int(data.get("start_epoch") or 0),
                   stop_epoch=int(data.get("stop_epoch") or 0),
                   save_epochs=tuple(int(e) for e in data.get("save_epochs") or ()),
                   checkpoint_dir=data.get("checkpoint_dir") or None, arch_hash=str(data.get("arch_hash") or ""),
                   resume=data.get("resume") or None, resume_key=str(data.get("resume_key") or ""),
                   resume_sha256=data.get("resume_sha256") or None, resume_size=None if size is None else int(size),
                   fallback=data.get("fallback") or None, on_checkpoint=on_checkpoint)
