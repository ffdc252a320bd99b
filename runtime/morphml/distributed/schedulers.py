"""Early-stopping schedulers (`spec.earlyStopping`): pure state machines, events in, decisions out.

A scheduler sees every progress report the master journals for a live attempt (`Report`:
trial id, step, the objective's value at that step) and answers each with a `Decision`
(CONTINUE or STOP). It holds no clock, no I/O and no threads: the coordinator feeds it under
its lock, journals a STOP before it is sent to the worker, and after a restart rebuilds it by
feeding it the journaled curves again (`restore`), so the same reports give the same state.
The idea is dask's worker_state_machine: the decision logic is a plain object that tests drive
with events, no gRPC needed.

- `none` (NoStopping): every report continues; today's behaviour.
- `median` (MedianStopping): Katib's and Optuna's median rule. At step s > warmupSteps, a trial
  whose best value up to s is worse than the median of the other trials' values at s is
  stopped. Steps 1..warmupSteps are never judged, and a step no other trial reached yet
  continues (there is nothing to compare with).

asha and hyperband come later (issue 12); they need checkpoints to promote trials.

Imports: dataclasses, enum, statistics only.
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

EARLY_STOPPING_FIELD = "spec.earlyStopping"
SCHEDULER_TYPES = ("none", "median")


class Decision(str, enum.Enum):
    CONTINUE = "continue"
    STOP = "stop"


@dataclass(frozen=True)
class Report:
    """One progress report of a live attempt: the objective's value after `step` steps (epochs)."""

    trial_id: str
    step: int
    value: float


@dataclass(frozen=True)
class EarlyStoppingSettings:
    """spec.earlyStopping, validated: type none|median, warmupSteps >= 0."""

    type: str = "none"
    warmup_steps: int = 0

    @classmethod
    def from_spec(cls, spec: Any) -> EarlyStoppingSettings:
        """From the manifest's spec.earlyStopping (absent/None: type none). Raises ValueError
        naming the field and what is allowed."""
        if spec is None:
            return cls()
        if not isinstance(spec, Mapping):
            raise ValueError(f"{EARLY_STOPPING_FIELD}: must be an object, got {type(spec).__name__}")
        unknown = sorted(set(spec) - {"type", "warmupSteps"})
        if unknown:
            raise ValueError(f"{EARLY_STOPPING_FIELD}: unknown field(s) {', '.join(unknown)}; "
                             f"allowed type, warmupSteps")
        kind = spec.get("type", "none")
        if kind not in SCHEDULER_TYPES:
            raise ValueError(f"{EARLY_STOPPING_FIELD}.type={kind!r}: allowed {', '.join(SCHEDULER_TYPES)}")
        warmup = spec.get("warmupSteps", 0)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"{EARLY_STOPPING_FIELD}.warmupSteps={warmup!r}: must be an integer >= 0")
        return cls(type=kind, warmup_steps=warmup)

    def to_spec(self) -> dict:
        return {"type": self.type, "warmupSteps": self.warmup_steps}


class NoStopping:
    """`none`: every trial trains its full budget."""

    def observe(self, report: Report) -> Decision:
        return Decision.CONTINUE

    def restore(self, reports: Iterable[Report]) -> None:
        return None


@dataclass
class MedianStopping:
    """The median rule (see the module docstring). `goal` is the objective's: maximize or minimize."""

    goal: str = "maximize"
    warmup_steps: int = 0
    # trial id -> {step: value}: every report seen, the last one per step
    curves: dict[str, dict[int, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.goal not in ("maximize", "minimize"):
            raise ValueError(f"goal={self.goal!r}: allowed maximize, minimize")
        if self.warmup_steps < 0:
            raise ValueError(f"{EARLY_STOPPING_FIELD}.warmupSteps={self.warmup_steps}: must be >= 0")

    def _worse(self, a: float, b: float) -> bool:
        return a < b if self.goal == "maximize" else a > b

    def restore(self, reports: Iterable[Report]) -> None:
        """Feeds journaled reports back after a restart (their decisions were journaled then)."""
        for report in reports:
            self.curves.setdefault(report.trial_id, {})[report.step] = report.value

    def observe(self, report: Report) -> Decision:
        curve = self.curves.setdefault(report.trial_id, {})
        curve[report.step] = report.value
        if report.step <= self.warmup_steps:
            return Decision.CONTINUE
        others = [c[report.step] for t, c in self.curves.items() if t != report.trial_id and report.step in c]
        if not others:
            return Decision.CONTINUE
        so_far = [v for s, v in curve.items() if s <= report.step]
        best = max(so_far) if self.goal == "maximize" else min(so_far)
        return Decision.STOP if self._worse(best, statistics.median(others)) else Decision.CONTINUE


Scheduler = NoStopping | MedianStopping


def make_scheduler(settings: EarlyStoppingSettings, goal: str) -> Scheduler:
    if settings.type == "median":
        return MedianStopping(goal=goal, warmup_steps=settings.warmup_steps)
    return NoStopping()
