"""Hardware constraints around any optimizer: candidates over a parameter or FLOP budget are never
handed out.

`ConstrainedOptimizer(inner, max_params=..., max_flops=..., max_latency_ms=...)` has the ask/tell
contract of the optimizer it wraps. Its `ask(n)` asks the inner optimizer and checks each
candidate's graph (`param_count()`, `flops()`, known before any training): a candidate over budget
is told to the inner optimizer at once as a failed trial (metrics ``{"status": "failed",
"infeasible": true, "error": "infeasible: params 31114 > maxParams 20000", "params": ..., "flops": ...,
"violation": 0.56}``), so it learns from it (GA/evolution: a failure, worst fitness; Optuna's TPE
and NSGA-II: a trial violating a constraint by ``violation``, see optuna_samplers.py), and asks
again, until it has ``n`` feasible candidates, the inner optimizer has none now, or
MAX_REFUSALS_PER_ASK were refused in this ask (then it returns what it has; with nothing found
and nothing outstanding it is finished: no feasible architecture turns up). The candidates it
refused in the last ask are in ``refused_in_last_ask`` (the coordinator journals them as an
optimizer op ``refuse`` before the ask that follows them, so the journal shows them refused before
any lease), and all of them in ``refused`` and in the state.

``max_latency_ms`` cannot be checked before training: a result whose ``latency_ms`` (measured by
the worker's trainer) exceeds it, or that has none (a custom evaluator that does not report it), is
told to the inner optimizer as infeasible (failed); the trial stays in the journal with its metrics.

Everything is deterministic (the checks are pure functions of the graph), so the coordinator's
replay of asks after a restart refuses the same candidates again. The state is the inner
optimizer's `state_dict()` plus a ``constraints`` entry (the limits and every refusal); loading a
state saved under other limits is an `OptimizerError`.

Imports: the standard library, the optimizer modules.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from morphml.optimizers.base import Candidate, Optimizer, OptimizerError, check_setting

MAX_REFUSALS_PER_ASK = 200
# constructor keyword -> (manifest field, metric it bounds)
LIMITS = {
    "max_params": ("maxParams", "params"),
    "max_flops": ("maxFlops", "flops"),
    "max_latency_ms": ("maxLatencyMs", "latency_ms"),
}


class ConstrainedOptimizer:
    """An optimizer whose asks never include a candidate over ``max_params`` / ``max_flops``."""

    def __init__(
        self,
        inner: Optimizer,
        *,
        max_params: int | None = None,
        max_flops: int | None = None,
        max_latency_ms: float | None = None,
    ) -> None:
        self.inner = inner
        self.limits: dict[str, float] = {}
        for name, value in (("max_params", max_params), ("max_flops", max_flops), ("max_latency_ms", max_latency_ms)):
            if value is not None:
                kind = "number" if name == "max_latency_ms" else "int"
                self.limits[name] = check_setting(name, value, kind, 0 if kind == "number" else 1)
        if not self.limits:
            raise OptimizerError("constraints: none given; set max_params, max_flops or max_latency_ms")
        if hasattr(inner, "constraints_aware"):
            inner.constraints_aware = True  # Optuna samplers learn from the violations (constraints_func)
        self.refused: list[dict[str, Any]] = []
        self.refused_in_last_ask: list[dict[str, Any]] = []
        self._gave_up = False

    def __getattr__(self, name: str) -> Any:
        # Everything else (best, outstanding, history, objective, pareto_front, ...) is the inner one's.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def violation(self, candidate: Candidate) -> str | None:
        """Why the candidate is over budget before training, or None."""
        graph = candidate.graph
        for name in ("max_params", "max_flops"):
            if name in self.limits:
                field, metric = LIMITS[name]
                value = graph.param_count() if metric == "params" else graph.flops()
                if value > self.limits[name]:
                    return f"{metric} {value} > {field} {self.limits[name]}"
        return None

    def excess(self, candidate: Candidate) -> float:
        """How far over its params/FLOPs budgets the candidate is: the sum of value / limit - 1
        over the limits it exceeds (what an Optuna sampler learns as the constraint violation)."""
        graph = candidate.graph
        total = 0.0
        for name in ("max_params", "max_flops"):
            if name in self.limits:
                value = graph.param_count() if name == "max_params" else graph.flops()
                total += max(0.0, value / self.limits[name] - 1.0)
        return total

    def ask(self, n: int = 1) -> list[Candidate]:
        self.refused_in_last_ask = []
        if self._gave_up:
            return []
        out: list[Candidate] = []
        refusals = 0
        while len(out) < n and refusals < MAX_REFUSALS_PER_ASK:
            batch = self.inner.ask(n - len(out))
            if not batch:
                break
            for candidate in batch:
                reason = self.violation(candidate)
                if reason is None:
                    out.append(candidate)
                    continue
                graph = candidate.graph
                record = {
                    "id": candidate.id,
                    "arch_hash": candidate.arch_hash,
                    "params": graph.param_count(),
                    "flops": graph.flops(),
                    "reason": reason,
                }
                self.inner.tell(
                    candidate.id,
                    {
                        "status": "failed",
                        "infeasible": True,
                        "error": f"infeasible: {reason}",
                        "params": record["params"],
                        "flops": record["flops"],
                        "violation": self.excess(candidate),
                    },
                )
                self.refused.append(record)
                self.refused_in_last_ask.append(record)
                refusals += 1
        if not out and refusals >= MAX_REFUSALS_PER_ASK and not self.inner.outstanding():
            self._gave_up = True  # no feasible architecture in that many draws: the search is over
        return out

    def tell(self, candidate_id: str | Candidate, metrics: Mapping[str, Any] | float | None) -> None:
        self.inner.tell(candidate_id, self._checked(metrics))

    def update(self, candidate_id: str | Candidate, metrics: Mapping[str, Any] | None) -> bool:
        """The inner optimizer's update, after the same latency check as a tell (a result now
        over maxLatencyMs is infeasible, which an update does not apply: see Optimizer.update)."""
        checked = self._checked(metrics)
        return self.inner.update(candidate_id, checked) if isinstance(checked, Mapping) else False

    def _checked(self, metrics: Mapping[str, Any] | float | None) -> Mapping[str, Any] | float | None:
        """The result as the inner optimizer must see it: infeasible when over maxLatencyMs."""
        limit = self.limits.get("max_latency_ms")
        if limit is not None and isinstance(metrics, Mapping):
            ok = str(metrics.get("status", "ok")).lower() not in ("failed", "error")
            latency = metrics.get("latency_ms")
            reason, violation = None, 1.0
            if isinstance(latency, bool) or not isinstance(latency, (int, float)) or not math.isfinite(latency):
                reason = "latency_ms was not reported (a custom evaluator must report it for maxLatencyMs)"
            elif latency > limit:
                reason, violation = f"latency_ms {latency} > maxLatencyMs {limit}", latency / limit - 1.0
            if ok and reason is not None:
                metrics = {
                    **metrics,
                    "status": "failed",
                    "infeasible": True,
                    "violation": violation,
                    "error": f"infeasible: {reason}",
                }
        return metrics

    def is_finished(self) -> bool:
        return self._gave_up or self.inner.is_finished()

    # -- state -------------------------------------------------------------------------------

    def _own_state(self) -> dict[str, Any]:
        return {"limits": dict(self.limits), "refused": list(self.refused), "gave_up": self._gave_up}

    def state_dict(self) -> dict[str, Any]:
        return {**self.inner.state_dict(), "constraints": self._own_state()}

    def state_json(self) -> str:
        text = self.inner.state_json()
        return text[:-1] + ', "constraints": ' + json.dumps(self._own_state()) + "}"

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or not isinstance(state.get("constraints"), Mapping):
            raise OptimizerError("state: saved without spec.constraints, this search has them; create a new experiment")
        own = state["constraints"]
        if dict(own.get("limits", {})) != self.limits:
            raise OptimizerError(
                f"state: saved under constraints {own.get('limits')}, this search has {self.limits}; "
                "constraints cannot change during a search"
            )
        self.inner.load_state_dict({k: v for k, v in state.items() if k != "constraints"})
        self.refused = list(own["refused"])
        self._gave_up = bool(own["gave_up"])
        self.refused_in_last_ask = []
