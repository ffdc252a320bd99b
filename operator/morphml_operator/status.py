"""Pure status computation: what the master reports + what the cluster shows -> the CR's status and Events.

`compute_status(...)` takes the master's GetStatus answer (as a dict, or None when the master could
not be reached), the worker Deployment's ready/desired counts, the previous status and the clock
reading, and returns the new status and the Events worth emitting (milestones only: started, new
best, worker lost, finished, failed). No I/O: the timer handler feeds it and writes the result.

Worker losses: `status.lastLossSeq` is the number of the last loss turned into an Event and
`status.workersLost` counts them (every loss but a clean Deregister); both only grow, and are a
function of the previous status and the losses after lastLossSeq, so recomputing them after a
failed status patch gives the same answer.

Rules that make the printer columns trustworthy:
- a terminal phase (Succeeded, Failed) never changes again;
- trial counts never go down (a master that restarts is unreachable for a while; then it resumes
  from its journal with the same counts);
- an unreachable master leaves the counts as they were and says so in the MasterReady condition.

Imports: the standard library and morphml_operator.builders only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .builders import selector_string

TERMINAL_PHASES = ("Succeeded", "Failed")
BEST_SUMMARY_WIDTH = 60


@dataclasses.dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the experiment."""

    type: str  # Normal or Warning
    reason: str
    message: str
    # Set for an Event that must exist once however often it is posted (a worker loss, keyed by
    # its seq): the handler names the Event after it, and the API server refuses a second copy.
    key: str = ""


def primary_metric(spec: Mapping[str, Any]) -> str:
    """The metric the Best column shows: the first of spec.objectives when that list is set,
    else spec.objective.metric (the CRD's CEL rule keeps the two in agreement)."""
    objectives = spec.get("objectives") or []
    if objectives and objectives[0].get("metric"):
        return str(objectives[0]["metric"])
    return str((spec.get("objective") or {}).get("metric", "val_accuracy"))

def _condition(previous: list[dict], type_: str, status: bool, reason: str, message: str, now: str,
               generation: int | None) -> dict:
    """A condition, keeping lastTransitionTime when the status did not change."""
    value = "True" if status else "False"
    old = next((c for c in previous if c.get("type") == type_), None)
    changed = old is None or old.get("status") != value
    condition = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now if changed or old is None else old.get("lastTransitionTime", now),
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def format_best_summary(value: float, architecture: str, width: int = BEST_SUMMARY_WIDTH) -> str:
    """'0.9722 conv32k3-bn-pool2-fc64' cut to `width` characters (the Best printer column)."""
    text = f"{value:.4f} {architecture}".strip()
    return text if len(text) <= width else text[: width - 3] + "..."


def compute_status(
    *,
    name: str,
    spec: Mapping[str, Any],
    generation: int | None,
    previous: Mapping[str, Any] | None,
    master: Mapping[str, Any] | None,
    workers_ready: int,
    workers_desired: int,
    now: str,
    master_error: str = "",
) -> tuple[dict, list[Event]]:
    """The new status and the Events to post. `master` is GetStatus as a dict with proto field names."""
    previous = dict(previous or {})
    events: list[Event] = []
    old_phase = previous.get("phase")
    budget = int((spec.get("budget") or {}).get("maxTrials", 0))
    old_trials = previous.get("trials") or {}

    # Trial counts: from the master when reachable, never lower than what was shown.
    if master is not None:
        succeeded = int(master.get("succeeded", 0))
        failed = int(master.get("failed", 0))
        stopped = int(master.get("stopped", 0))  # early-stopped: finished, not failed
        running = int(master.get("running", 0))
        registered = sum(1 for w in master.get("workers", []) if w.get("state") != "dead")
    else:
        succeeded = failed = stopped = running = 0
        registered = int((previous.get("workers") or {}).get("registered", 0))
    succeeded = max(succeeded, int(old_trials.get("succeeded", 0)))
    failed = max(failed, int(old_trials.get("failed", 0)))
    stopped = max(stopped, int(old_trials.get("stopped", 0)))
    if master is None:
        running = int(old_trials.get("running", 0))
    done = succeeded + failed + stopped

    # Phase.
    master_phase = (master or {}).get("phase", "")
    if old_phase in TERMINAL_PHASES:
        phase = old_phase
    elif master_phase in TERMINAL_PHASES:
        phase = master_phase
    elif spec.get("suspend"):
        phase = "Suspended"
    elif master_phase == "Running" or old_phase == "Running":
        # A restarted master says Pending until its workers reconnect; the search itself did not
        # go back to waiting, so neither does the phase.
        phase = "Running"
    else:
        phase = "Pending"

    if phase != old_phase:
        if phase == "Running" and old_phase in (None, "Pending"):
            events.append(Event("Normal", "Started", f"search started: {workers_ready} of {workers_desired} workers "
                                                     f"ready, budget {budget} trials"))
        elif phase == "Suspended":
            events.append(Event("Normal", "Suspended",
                                "spec.suspend is true: workers scaled to 0, no new trials start"))
        elif old_phase == "Suspended" and phase in ("Running", "Pending"):
            events.append(Event("Normal", "Resumed", "spec.suspend is false: workers scaled back up"))

    status: dict[str, Any] = {
        "phase": phase,
        "observedGeneration": generation,
        "trials": {"done": done, "succeeded": succeeded, "failed": failed, "stopped": stopped,
                   "running": running if phase not in TERMINAL_PHASES else 0, "budget": budget},
        "trialsSummary": f"{done}/{budget}",
        "workers": {
            "ready": workers_ready,
            "desired": workers_desired,
            "registered": registered,
            "selector": selector_string(name, "worker"),
        },
        "workersSummary": f"{workers_ready}/{workers_desired}",
    }
    if generation is None:
        del status["observedGeneration"]

    # Message.
    if master is not None and master.get("message"):
        status["message"] = master["message"]
    elif master is not None:
        status["message"] = f"{done} of {budget} trials finished, {running} running, {registered} workers registered"
    elif master is None and phase not in TERMINAL_PHASES:
        status["message"] = f"master not reachable yet: {master_error}" if master_error else "waiting for the master"
    elif previous.get("message"):
        status["message"] = previous["message"]

    # Times.
    start_time = previous.get("startTime")
    if start_time is None and phase in ("Running", *TERMINAL_PHASES):
        start_time = now
    if start_time:
        status["startTime"] = start_time
    completion = previous.get("completionTime")
    if completion is None and phase in TERMINAL_PHASES:
        completion = now
    if completion:
        status["completionTime"] = completion

    # Best trial.
    old_best = previous.get("best") or None
    best = old_best
    reported = (master or {}).get("best")
    if reported and reported.get("trial_id"):
        value = float(reported.get("metric", 0.0))
        architecture = reported.get("summary", "")
        best = {
            "metric": (master or {}).get("metric") or primary_metric(spec),
            "value": value,
            "trialId": reported["trial_id"],
            "architecture": architecture,
            "summary": format_best_summary(value, architecture),
        }
        if reported.get("checkpoint"):
            # Its final checkpoint's key in the artifact store (spec.artifacts): what a resumed
            # or fetched model comes from.
            best["checkpoint"] = reported["checkpoint"]
        if not old_best or old_best.get("trialId") != best["trialId"]:
            text = f"trial {best['trialId']}: {best['metric']}={value:.4f} {architecture}".strip()
            events.append(Event("Normal", "NewBest", text))
    if best:
        status["best"] = best

    # Pareto front of a multi-objective search (spec.objectives): its size and, per objective,
    # the best value on the front and the trial that has it (the extreme trade-offs). The
    # printer columns stay as they are (Best shows the first objective).
    front = (master or {}).get("pareto") if master is not None else previous.get("pareto")
    if front and master is not None:
        front = {
            "size": int(front.get("size", 0)),
            "best": [{"metric": b.get("metric", ""), "goal": b.get("goal", ""), "value": float(b.get("value", 0.0)),
                      "trialId": b.get("trial_id", "")} for b in front.get("best", [])],
        }
    if front:
        status["pareto"] = front

    # Worker losses. The master numbers each loss (WorkerLoss.seq: journaled, never reused, kept
    # across master restarts) and `master["losses"]` holds those after status.lastLossSeq (the
    # handler asks for them page by page). Each new one is one Event, keyed by its seq so that
    # posting it twice (the status patch that remembers the seq failed) makes one Event, not two.
    last_seq = int(previous.get("lastLossSeq", 0))
    lost = int(previous.get("workersLost", 0))
    # Pods the operator itself stopped (suspend, scale down, the end) are not losses worth a Warning.
    previously_registered = int((previous.get("workers") or {}).get("registered", 0))
    stopping_on_purpose = (bool(spec.get("suspend")) or phase in TERMINAL_PHASES
                           or workers_desired < previously_registered)
    for loss in sorted((master or {}).get("losses", []), key=lambda item: int(item.get("seq", 0))):
        seq = int(loss.get("seq", 0))
        if seq <= last_seq:
            continue  # already turned into an Event (or older than what this status counted from)
        last_seq = seq
        if loss.get("detected_by") == "deregister":
            continue  # a clean exit (SIGTERM) that handed its trials back is not a loss
        lost += 1
        requeued = len(loss.get("requeued", []))
        who = loss.get("worker_name") or loss.get("worker_id")
        back = f"{requeued} trial{'s' if requeued != 1 else ''} back in the queue"
        key = f"worker-loss-{seq}"
        if stopping_on_purpose:
            events.append(Event("Normal", "WorkerStopped",
                                f"worker {who} stopped ({loss.get('detected_by')}); {back}", key))
        else:
            events.append(Event("Warning", "WorkerLost",
                                f"worker {who} lost (detected by {loss.get('detected_by')}); {back}", key))
    status["workersLost"] = lost
    status["lastLossSeq"] = last_seq

    # Terminal milestones.
    if phase != old_phase and phase == "Succeeded":
        best_text = f"; best {best['metric']}={best['value']:.4f} ({best['trialId']})" if best else ""
        events.append(Event("Normal", "Succeeded",
                            f"search finished: {done} trials ({failed} failed){best_text}; workers scaled to 0"))
    elif phase != old_phase and phase == "Failed":
        events.append(Event("Warning", "Failed",
                            f"search failed: {status.get('message', 'see the master log')}; workers scaled to 0"))

    # Conditions.
    old_conditions = list(previous.get("conditions") or [])
    conditions = [
        _condition(old_conditions, "MasterReady", master is not None,
                   "MasterServing" if master is not None else "MasterUnreachable",
                   "the master answers GetStatus" if master is not None
                   else (master_error or "no answer from the master"),
                   now, generation),
        _condition(old_conditions, "WorkersReady", workers_desired > 0 and workers_ready >= workers_desired,
                   "AllWorkersReady" if workers_ready >= workers_desired else "WorkersNotReady",
                   f"{workers_ready} of {workers_desired} worker pods ready", now, generation),
        _condition(old_conditions, "Suspended", phase == "Suspended",
                   "SpecSuspend" if phase == "Suspended" else "NotSuspended",
                   "spec.suspend is true" if phase == "Suspended" else "spec.suspend is false", now, generation),
        _condition(old_conditions, "Succeeded", phase == "Succeeded",
                   "BudgetReached" if phase == "Succeeded" else "NotFinished",
                   status.get("message", "") if phase == "Succeeded" else "the search has not finished",
                   now, generation),
        _condition(old_conditions, "Failed", phase == "Failed", "SearchFailed" if phase == "Failed" else "NotFailed",
                   status.get("message", "") if phase == "Failed" else "the search has not failed", now, generation),
    ]
    status["conditions"] = conditions
    return status, events
