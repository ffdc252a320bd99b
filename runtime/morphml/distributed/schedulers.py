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

- `asha` (Asha): asynchronous successive halving, promotion-based (Li et al. 2020, "A System for
  Massively Parallel Hyperparameter Tuning"). Rungs at minResource * reductionFactor^k epochs below
  the full budget R, plus R. A trial trains one segment per rung (its lease's stop_epoch); its
  result at a rung below R pauses it. When a slot frees, the coordinator asks `promotions()`: a
  paused trial in the top floor(n_k / eta) of rung k (n_k results there), highest rung first, each
  trial promoted at most once from each rung; else a new trial starts at rung 0. With an epoch
  budget (spec.budget.maxEpochs), once fewer epochs are left than R, every other paused trial
  follows as a `closing` promotion (`promotions(epochs_left)`): the budget's end goes to the best
  trials found, not to new trials that could no longer reach R.
- `hyperband` (Asha with several brackets): bracket s = 0..s_max is an ASHA whose first rung is
  minResource * eta^s (the last bracket trains R at once), and new trials go to the brackets in
  turn (round-robin: trial i to bracket i mod (s_max + 1)). That is the asynchronous Hyperband of
  Li et al. 2020 (section 3.3) with an equal share of trials per bracket instead of the
  synchronous Hyperband's decreasing counts: every bracket then costs about the same epochs.
- With several objectives (`objectives`), a rung is ranked by non-dominated sorting, ties broken by
  crowding distance (morphml.pareto; multi-objective ASHA, Schmucker et al. 2021).

Asha's state is rebuilt after a restart from the journal's events (`assign` for every trial in
proposal order, then `record` / `promote` in journal order): the coordinator journals a
`rung_result` with every pause and a `promoted` with every promotion, in the transaction of the
state change, so the replay gives the same rungs and never promotes a trial twice.

Imports: dataclasses, enum, statistics and morphml.pareto only.
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from morphml.pareto import crowding_distance, non_dominated_sort, orient

EARLY_STOPPING_FIELD = "spec.earlyStopping"
SCHEDULER_TYPES = ("none", "median", "asha", "hyperband")
MULTI_FIDELITY_TYPES = ("asha", "hyperband")
DEFAULT_MIN_RESOURCE = 1
DEFAULT_REDUCTION_FACTOR = 3


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
    """spec.earlyStopping, validated: type none|median|asha|hyperband; warmupSteps >= 0 (median);
    minResource >= 1, reductionFactor >= 2, maxResource (asha/hyperband; None = the full epochs)."""

    type: str = "none"
    warmup_steps: int = 0
    min_resource: int = DEFAULT_MIN_RESOURCE
    reduction_factor: int = DEFAULT_REDUCTION_FACTOR
    max_resource: int | None = None

    @property
    def multi_fidelity(self) -> bool:
        """asha or hyperband: trials train in segments (rungs) and pause between them."""
        return self.type in MULTI_FIDELITY_TYPES

    @classmethod
    def from_spec(cls, spec: Any, epochs: int | None = None) -> EarlyStoppingSettings:
        """From the manifest's spec.earlyStopping (absent/None: type none). `epochs` is
        spec.evaluation.epochs (minResource and maxResource may not exceed it). Raises ValueError
        naming the field, its value and what is allowed (the CRD's rules, said the same way)."""
        if spec is None:
            return cls()
        if not isinstance(spec, Mapping):
            raise ValueError(f"{EARLY_STOPPING_FIELD}: must be an object, got {type(spec).__name__}")
        fields = ("type", "warmupSteps", "minResource", "reductionFactor", "maxResource")
        unknown = sorted(set(spec) - set(fields))
        if unknown:
            raise ValueError(f"{EARLY_STOPPING_FIELD}: unknown field(s) {', '.join(unknown)}; "
                             f"allowed {', '.join(fields)}")
        kind = spec.get("type", "none")
        if kind not in SCHEDULER_TYPES:
            raise ValueError(f"{EARLY_STOPPING_FIELD}.type={kind!r}: allowed {', '.join(SCHEDULER_TYPES)}")

        def integer(name: str, default: Any, minimum: int) -> Any:
            value = spec.get(name, default)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{EARLY_STOPPING_FIELD}.{name}={value!r}: must be an integer >= {minimum}")
            return value

        warmup = integer("warmupSteps", 0, 0)
        if warmup and kind != "median":
            raise ValueError(f"{EARLY_STOPPING_FIELD}.warmupSteps={warmup!r}: applies to type median only")
        rung_fields = [name for name in ("minResource", "reductionFactor", "maxResource") if spec.get(name) is not None]
        if rung_fields and kind not in MULTI_FIDELITY_TYPES:
            raise ValueError(f"{EARLY_STOPPING_FIELD}.{rung_fields[0]}={spec[rung_fields[0]]!r}: applies to type "
                             f"asha or hyperband only")
        min_resource = integer("minResource", DEFAULT_MIN_RESOURCE, 1)
        eta = integer("reductionFactor", DEFAULT_REDUCTION_FACTOR, 2)
        max_resource = integer("maxResource", None, 1)
        if epochs is not None and kind in MULTI_FIDELITY_TYPES:
            if max_resource is not None and max_resource > epochs:
                raise ValueError(f"{EARLY_STOPPING_FIELD}.maxResource={max_resource}: must be <= "
                                 f"spec.evaluation.epochs ({epochs})")
            top = max_resource if max_resource is not None else epochs
            if min_resource > top:
                what = "maxResource" if max_resource is not None else "spec.evaluation.epochs"
                raise ValueError(f"{EARLY_STOPPING_FIELD}.minResource={min_resource}: must be <= {what} ({top})")
        return cls(type=kind, warmup_steps=warmup, min_resource=min_resource, reduction_factor=eta,
                   max_resource=max_resource)

    def to_spec(self) -> dict:
        out: dict[str, Any] = {"type": self.type}
        if self.type == "median":
            out["warmupSteps"] = self.warmup_steps
        if self.multi_fidelity:
            out.update(minResource=self.min_resource, reductionFactor=self.reduction_factor)
            if self.max_resource is not None:
                out["maxResource"] = self.max_resource
        return out


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


def rung_epochs(min_resource: int, reduction_factor: int, full: int) -> list[int]:
    """The rungs: min_resource * reduction_factor^k for every k where that is below `full`, then `full`."""
    if min_resource < 1 or reduction_factor < 2 or full < 1:
        raise ValueError(f"rungs: min_resource={min_resource} (>= 1), reduction_factor={reduction_factor} (>= 2), "
                         f"full={full} (>= 1)")
    rungs, epoch = [], min_resource
    while epoch < full:
        rungs.append(epoch)
        epoch *= reduction_factor
    return rungs + [full]


@dataclass(frozen=True)
class Promotion:
    """Promote `trial_id` from its rung at `from_epoch` to train until `to_epoch` (in `bracket`).
    `closing`: taken in the epoch budget's end game, outside the top 1/eta (see `Asha.promotions`)."""

    trial_id: str
    from_epoch: int
    to_epoch: int
    bracket: int = 0
    closing: bool = False


Value = float | tuple[float, ...]  # one objective, or one value per objective (several objectives)


@dataclass
class SuccessiveHalving:
    """One bracket of ASHA: its rungs (epochs), the results at each rung, who was promoted from it."""

    rungs: list[int]
    reduction_factor: int
    goals: tuple[str, ...] = ("maximize",)
    bracket: int = 0
    results: list[dict[str, Value]] = field(default_factory=list)  # rung index -> {trial: value}
    promoted: list[set[str]] = field(default_factory=list)  # rung index -> trials promoted from it

    def __post_init__(self) -> None:
        self.results = [{} for _ in self.rungs]
        self.promoted = [set() for _ in self.rungs]

    def index(self, epoch: int) -> int:
        if epoch not in self.rungs:
            raise ValueError(f"bracket {self.bracket}: {epoch} epochs is not one of its rungs {self.rungs}")
        return self.rungs.index(epoch)

    def ranked(self, k: int) -> list[str]:
        """Rung k's trials, best first: by value (one objective) or by non-dominated front, then
        crowding distance, largest first (several); ties by trial id, so a replay ranks the same."""
        items = sorted(self.results[k].items())
        if len(self.goals) == 1:
            sign = -1.0 if self.goals[0] == "maximize" else 1.0
            return [t for t, v in sorted(items, key=lambda tv: (sign * _scalar(tv[1]), tv[0]))]
        points = [orient(_vector(v, len(self.goals)), self.goals) for _, v in items]
        order: list[str] = []
        for front in non_dominated_sort(points):
            crowding = crowding_distance(points, front)
            order += [items[i][0] for i in sorted(front, key=lambda i: (-crowding[i], items[i][0]))]
        return order

    def top(self, k: int) -> list[str]:
        """The top floor(n_k / eta) of rung k, best first."""
        return self.ranked(k)[: len(self.results[k]) // self.reduction_factor]

    def candidates(self) -> Iterator[Promotion]:
        """Every promotion ASHA allows now, highest rung first, best first within a rung."""
        for k in range(len(self.rungs) - 2, -1, -1):
            for trial in self.top(k):
                if trial not in self.promoted[k]:
                    yield Promotion(trial, self.rungs[k], self.rungs[k + 1], self.bracket)

    def closing_candidates(self) -> Iterator[Promotion]:
        """Every trial with a result at a rung below the top and not promoted from it, whatever its
        rank there: highest rung first, best first within a rung (the end game's promotions)."""
        for k in range(len(self.rungs) - 2, -1, -1):
            for trial in self.ranked(k):
                if trial not in self.promoted[k]:
                    yield Promotion(trial, self.rungs[k], self.rungs[k + 1], self.bracket, closing=True)


def _scalar(value: Value) -> float:
    return float(value[0]) if isinstance(value, tuple) else float(value)


def _vector(value: Value, n: int) -> tuple[float, ...]:
    if isinstance(value, tuple):
        return tuple(float(v) for v in value)
    return (float(value),) * n


class Asha:
    """`asha` (one bracket) or `hyperband` (brackets s = 0..s_max): see the module docstring.

    Events in (assign, record, promote), decisions out (promotions, target); no I/O."""

    def __init__(self, settings: EarlyStoppingSettings, goal: str, full_epochs: int,
                 goals: Sequence[str] | None = None):
        self.kind = settings.type
        self.full = settings.max_resource or full_epochs
        self.reduction_factor = settings.reduction_factor
        base = rung_epochs(min(settings.min_resource, self.full), settings.reduction_factor, self.full)
        self.goals = tuple(goals) if goals else (goal,)
        starts = range(len(base)) if settings.type == "hyperband" else range(1)
        self.brackets = [SuccessiveHalving(base[s:], settings.reduction_factor, self.goals, s) for s in starts]
        self.bracket_of: dict[str, int] = {}
        self.at: dict[str, int] = {}  # trial -> epochs of its last rung result
        self.target_of: dict[str, int] = {}  # trial -> stop_epoch of its current (or next) segment
        self._assigned = 0

    # --- events --------------------------------------------------------------------------------
    def next_first_epochs(self, offset: int = 0) -> int:
        """The first rung of the trial that would be assigned `offset` trials from now."""
        return self.brackets[(self._assigned + offset) % len(self.brackets)].rungs[0]

    def assign(self, trial_id: str) -> int:
        """A new trial: its bracket (round-robin); returns its first segment's stop_epoch."""
        if trial_id not in self.bracket_of:
            self.bracket_of[trial_id] = self._assigned % len(self.brackets)
            self._assigned += 1
            self.target_of[trial_id] = self.brackets[self.bracket_of[trial_id]].rungs[0]
        return self.target_of[trial_id]

    def record(self, trial_id: str, epoch: int, value: Value) -> bool:
        """The trial's result at rung `epoch`; True when that is its bracket's top rung (finished)."""
        bracket = self.brackets[self.bracket_of[trial_id]]
        k = bracket.index(epoch)
        bracket.results[k][trial_id] = value
        self.at[trial_id] = epoch
        return k == len(bracket.rungs) - 1

    def promote(self, promotion: Promotion) -> None:
        bracket = self.brackets[self.bracket_of[promotion.trial_id]]
        bracket.promoted[bracket.index(promotion.from_epoch)].add(promotion.trial_id)
        self.target_of[promotion.trial_id] = promotion.to_epoch

    # --- decisions -----------------------------------------------------------------------------
    def target(self, trial_id: str) -> int:
        """The stop_epoch of the trial's current segment."""
        return self.target_of[trial_id]

    def promotions(self, epochs_left: int | None = None) -> list[Promotion]:
        """Every promotion allowed now, in the order to take them: highest rung first (over all
        brackets), then bracket, then best first.

        `epochs_left`: what spec.budget.maxEpochs still allows (None: no epoch budget). Below the
        full budget R a new trial can no longer train to R, so the budget is in its end game: after
        ASHA's own promotions come every other paused trial's (`closing`), highest rung first, best
        first, so the last epochs take the best trials found so far further instead of training
        new trials for a rung or two."""
        found = sorted((p for b in self.brackets for p in b.candidates()), key=lambda p: (-p.from_epoch, p.bracket))
        if epochs_left is None or epochs_left >= self.full:
            return found
        taken = {(p.trial_id, p.from_epoch) for p in found}
        closing = [p for b in self.brackets for p in b.closing_candidates() if (p.trial_id, p.from_epoch) not in taken]
        return found + sorted(closing, key=lambda p: (-p.from_epoch, p.bracket))

    def rungs_status(self) -> list[dict]:
        """Per bracket and rung: epochs, results, promoted (what status() shows)."""
        return [{"bracket": b.bracket, "epochs": epoch, "results": len(b.results[k]), "promoted": len(b.promoted[k])}
                for b in self.brackets for k, epoch in enumerate(b.rungs)]

    # --- the progress-report interface of the other schedulers ---------------------------------
    def observe(self, report: Report) -> Decision:
        """Segments end at their stop_epoch (the coordinator says stop there); no other stop."""
        return Decision.CONTINUE

    def restore(self, reports: Iterable[Report]) -> None:
        return None  # rebuilt from rung_result / promoted events instead (see the module docstring)


Scheduler = NoStopping | MedianStopping | Asha


def make_scheduler(settings: EarlyStoppingSettings, goal: str, full_epochs: int = 1,
                   goals: Sequence[str] | None = None) -> Scheduler:
    if settings.type == "median":
        return MedianStopping(goal=goal, warmup_steps=settings.warmup_steps)
    if settings.multi_fidelity:
        return Asha(settings, goal, full_epochs, goals)
    return NoStopping()
