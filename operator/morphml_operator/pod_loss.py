"""When is a worker pod lost? The pure decision behind the operator's pod-liveness path.

The operator's pod handler (handlers.worker_pod_event) feeds every watch event of a worker pod
through `decide`, and tells the experiment's master `WorkerGone` when it returns a loss, so the
pod's trials are re-leased at once instead of after heartbeatInterval x missedHeartbeats.

A worker pod is lost when:
- its DELETED event arrives, or it carries a deletionTimestamp (deleted, evicted through the
  Eviction API, scaled down, node drained): reason "pod deleted" / "pod terminating";
- its phase is Failed or Succeeded (evicted by the kubelet, OOM-killed with restartPolicy Never,
  ...): reason "pod failed" / "pod evicted" / "pod succeeded";
- it was Ready before and has been unready for longer than `unready_after` seconds (a wedged or
  partitioned worker the kubelet's readiness probe gave up on): reason "pod unready for N s".
  A pod that has never been Ready is starting, not lost. An unready pod not yet past the
  threshold gets `recheck_in`: the handler looks again then (no watch event would come).

A worker container killed by the OOM killer (the kubelet's `OOMKilled`) is named by `oom_kills`,
so the cause can be told to the user, not only the loss.

Telling the master can fail (it is restarting, frozen, cut off): `gone_retry_delay` says when to
try again, with backoff, until the master answers or there is nobody left to tell.

Imports: the standard library only (no kopf, no kubernetes client), so it is unit tested alone.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class PodLossDecision:
    """`reason` set: report the pod gone now. `recheck_in` set: look again after that many seconds."""

    reason: str | None = None
    recheck_in: float | None = None
    # The pod's Ready condition as this event shows it (True, False, or None when absent).
    ready: bool | None = None


def _parse_time(value: Any) -> float | None:
    if not value:
        return None
    if isinstance(value, datetime.datetime):
        moment = value
    else:
        try:
            moment = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def ready_condition(pod: Mapping[str, Any]) -> tuple[bool | None, float | None]:
    """(status of the Ready condition, when it last changed as a UNIX time); (None, None) if absent."""
    for condition in ((pod.get("status") or {}).get("conditions") or []):
        if condition.get("type") == "Ready":
            return condition.get("status") == "True", _parse_time(condition.get("lastTransitionTime"))
    return None, None


def decide(event_type: str | None, pod: Mapping[str, Any], now: float, unready_after: float,
           was_ready: bool) -> PodLossDecision:
    """Is this worker pod lost, judged from one watch event (or a re-read) at UNIX time `now`?

    `was_ready`: the pod has been seen Ready before (by an earlier event); `unready_after`: seconds
    a Ready pod may stay unready before it counts as lost.
    """
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    ready, since = ready_condition(pod)
    if event_type == "DELETED":
        return PodLossDecision(reason="pod deleted", ready=ready)
    if metadata.get("deletionTimestamp"):
        return PodLossDecision(reason="pod terminating", ready=ready)
    phase = status.get("phase")
    if phase == "Failed":
        why = status.get("reason") or ""
        return PodLossDecision(reason="pod evicted" if why == "Evicted" else "pod failed", ready=ready)
    if phase == "Succeeded":
        return PodLossDecision(reason="pod succeeded", ready=ready)
    if ready is False and was_ready:
        unready_for = 0.0 if since is None else max(0.0, now - since)
        if unready_for >= unready_after:
            return PodLossDecision(reason=f"pod unready for {unready_for:.1f} s", ready=ready)
        return PodLossDecision(recheck_in=unready_after - unready_for, ready=ready)
    return PodLossDecision(ready=ready)


# --------------------------------------------------------------------------- a container OOM-killed


@dataclasses.dataclass(frozen=True)
class OomKill:
    """A container of a worker pod ended by the kernel's OOM killer, as the kubelet reports it.

    `key` is the same for every event showing the same termination (pod uid, container, restart
    count), so a caller posting an Event per OOM kill (named after the key) posts each once."""

    key: str
    container: str
    message: str


def oom_kills(pod: Mapping[str, Any]) -> list[OomKill]:
    """The pod's containers whose latest termination is `OOMKilled` (exit 137), newest state first.

    The whole container is killed when the kubelet asks the kernel for it (cgroup v2 with
    `memory.oom.group`, the default since Kubernetes 1.28) or when the OOM killer picks the
    worker process itself; the kubelet then shows the termination in `state.terminated` (pod
    phase Failed, or before the restart) or, once it restarted the container, in
    `lastState.terminated`. A trial runner OOM-killed inside a live container is not here: the
    worker reports that one itself (kind "oom").
    """
    metadata = pod.get("metadata") or {}
    limits = {c.get("name"): ((c.get("resources") or {}).get("limits") or {}).get("memory")
              for c in ((pod.get("spec") or {}).get("containers") or [])}
    found = []
    for status in ((pod.get("status") or {}).get("containerStatuses") or []):
        state, last = status.get("state") or {}, status.get("lastState") or {}
        terminated = state.get("terminated") or last.get("terminated") or {}
        if terminated.get("reason") != "OOMKilled":
            continue
        name = str(status.get("name", ""))
        restarts = int(status.get("restartCount", 0) or 0)
        current = "terminated" in state
        # A restarted container's count includes the restart after this kill; a dead one's not yet.
        number = restarts + 1 if current else restarts
        limit = limits.get(name)
        at = f" at {terminated['finishedAt']}" if terminated.get("finishedAt") else ""
        then = "" if current else f"; restarted ({restarts} restart{'s' if restarts != 1 else ''})"
        where = (f"at its limit of {limit}, spec.workers.resources.limits.memory" if limit
                 else "with no memory limit set: the node's memory")
        message = (f"worker pod {metadata.get('name', '')}: container {name} was OOMKilled{at} (exit code "
                   f"{terminated.get('exitCode', 137)}, out of memory {where}){then}; "
                   "its trials go back to the queue without a retry")
        found.append(OomKill(key=f"{metadata.get('uid', '')}-{name}-{number}", container=name, message=message))
    return found


# --------------------------------------------------------------------------- reporting a lost pod

# Outcomes of one WorkerGone attempt (handlers._tell_master_gone).
GONE_ANSWERED = "answered"  # the master replied: it knows (its reply says what it requeued)
GONE_NOBODY = "nobody"  # the experiment is deleted or finished: no master will come back to tell
GONE_RECOVERED = "recovered"  # the unready pod is Ready again before the master heard of it
GONE_UNREACHABLE = "unreachable"  # no answer (frozen, restarting, cut off) or no master address yet

GONE_FIRST_RETRY_SECONDS = 0.5
GONE_MAX_RETRY_SECONDS = 5.0


def gone_retry_delay(outcome: str, attempt: int, elapsed: float, give_up_after: float) -> float | None:
    """Seconds until WorkerGone is tried again after attempt number `attempt` (0 = the first), or None: stop.

    Only an unreachable master is retried: 0.5 s, 1 s, 2 s, 4 s, then every 5 s (a master back
    from a restart hears of the pod within 5 s), until `give_up_after` seconds have passed since
    the first attempt. Past that the master's heartbeat timeout has long declared the worker dead
    if the master is running at all.
    """
    if outcome != GONE_UNREACHABLE:
        return None
    if elapsed >= give_up_after:
        return None
    delay = min(GONE_FIRST_RETRY_SECONDS * 2 ** max(0, attempt), GONE_MAX_RETRY_SECONDS)
    return max(0.0, min(delay, give_up_after - elapsed))
