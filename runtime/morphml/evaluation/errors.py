"""Errors raised by the evaluation layer.

Two kinds of error live here:

- `TrialFailure(kind, message)`: one trial could not produce metrics. `kind` says why, so the
  master can decide what to do (retry on another worker, count a failed trial). It is the only
  exception `evaluate_architecture` raises.
- `EvaluationSpecError`: a setting in `spec.evaluation` is wrong (unknown dataset, missing file,
  evaluator path that does not import, a negative batch size). The message names the field, the
  value and what is allowed. Raised by the functions the master calls directly (`dataset_shape`,
  `load_dataset`, `training_settings`, `load_user_evaluator`); inside `evaluate_architecture` it
  becomes a `TrialFailure` of kind "invalid".

Imports nothing but the standard library.
"""

from __future__ import annotations

#: Why a trial failed.
#: - "invalid": the architecture or the evaluation settings cannot be run at all (deterministic:
#:   retrying elsewhere gives the same answer).
#: - "nan": the loss (or a user evaluator's metric) became NaN or infinite.
#: - "timeout": training ran past `spec.evaluation.timeoutSeconds`.
#: - "oom": the accelerator ran out of memory.
#: - "exception": anything else; the message carries the exception text.
FAILURE_KINDS = ("exception", "nan", "timeout", "oom", "invalid")


class TrialFailure(Exception):
    """A trial that produced no metrics, with the reason as `kind` (one of FAILURE_KINDS)."""

    def __init__(self, kind: str, message: str):
        if kind not in FAILURE_KINDS:
            raise ValueError(f"TrialFailure kind {kind!r} is not one of {', '.join(FAILURE_KINDS)}")
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message

    def to_json(self) -> dict:
        return {"kind": self.kind, "message": self.message}


class EvaluationSpecError(ValueError):
    """A value in `spec.evaluation` is wrong; the message names the field and what is allowed."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
