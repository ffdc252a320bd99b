"""pod_loss.decide: when the operator reports a worker pod gone to its master (issue 6), and
pod_loss.gone_retry_delay: when it tries again while the master does not answer (issue 10).

Pure functions, no cluster: every path (deleted, terminating, failed, evicted, unready past the
threshold, starting, healthy; answered, nobody left, recovered, unreachable) spelled out.
Imports: pytest, morphml_operator.pod_loss.
"""

from __future__ import annotations

import datetime

import pytest

from morphml_operator import pod_loss
from morphml_operator.pod_loss import PodLossDecision, decide, gone_retry_delay, ready_condition

pytestmark = pytest.mark.unit

T0 = datetime.datetime(2026, 11, 29, 10, 0, 0, tzinfo=datetime.UTC)


def pod(ready: str | None = "True", since: datetime.datetime = T0, phase: str = "Running", **extra) -> dict:
    conditions = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-11-29T09:00:00Z"}]
    if ready is not None:
        conditions.append({"type": "Ready", "status": ready,
                           "lastTransitionTime": since.strftime("%Y-%m-%dT%H:%M:%SZ")})
    body = {"metadata": {"name": "w-1", "namespace": "ml", "uid": "u1"},
            "status": {"phase": phase, "conditions": conditions}}
    body["metadata"].update(extra.pop("metadata", {}))
    body["status"].update(extra.pop("status", {}))
    return body


def at(seconds: float) -> float:
    return T0.timestamp() + seconds


def test_deleted_event_is_a_loss_at_once():
    assert decide("DELETED", pod(), at(0), 5.0, True).reason == "pod deleted"


def test_deletion_timestamp_is_a_loss_before_the_pod_is_gone():
    terminating = pod(metadata={"deletionTimestamp": "2026-11-29T10:01:00Z"})
    assert decide("MODIFIED", terminating, at(0), 5.0, True).reason == "pod terminating"


@pytest.mark.parametrize("status, reason", [
    ({"phase": "Failed", "reason": "Evicted"}, "pod evicted"),
    ({"phase": "Failed"}, "pod failed"),
    ({"phase": "Succeeded"}, "pod succeeded"),
])
def test_ended_pods_are_lost(status, reason):
    assert decide("MODIFIED", pod(status=status), at(0), 5.0, True).reason == reason


def test_unready_past_the_threshold_is_a_loss():
    decision = decide("MODIFIED", pod(ready="False"), at(7.5), 5.0, was_ready=True)
    assert decision.reason == "pod unready for 7.5 s" and decision.recheck_in is None


def test_unready_below_the_threshold_asks_for_a_recheck_when_it_would_pass():
    decision = decide("MODIFIED", pod(ready="False"), at(2.0), 5.0, was_ready=True)
    assert decision == PodLossDecision(reason=None, recheck_in=pytest.approx(3.0), ready=False)


def test_exactly_at_the_threshold_counts():
    assert decide(None, pod(ready="False"), at(5.0), 5.0, was_ready=True).reason is not None


def test_a_pod_never_ready_is_starting_not_lost():
    assert decide("ADDED", pod(ready="False"), at(600), 5.0, was_ready=False) == PodLossDecision(ready=False)
    assert decide("ADDED", pod(ready=None, phase="Pending"), at(600), 5.0, was_ready=False) == PodLossDecision()


def test_a_ready_pod_is_fine_and_says_so():
    assert decide("MODIFIED", pod(), at(100), 5.0, was_ready=True) == PodLossDecision(ready=True)


def test_unready_without_a_transition_time_waits_the_whole_threshold():
    body = pod(ready="False")
    del body["status"]["conditions"][1]["lastTransitionTime"]
    assert decide(None, body, at(0), 4.0, was_ready=True).recheck_in == pytest.approx(4.0)


def test_ready_condition_reads_status_and_time():
    assert ready_condition(pod()) == (True, T0.timestamp())
    assert ready_condition({"status": {}}) == (None, None)


def test_the_threshold_is_a_typed_operator_setting():
    from morphml_operator.settings import OperatorSettings, SettingsError

    assert OperatorSettings().worker_unready_seconds == 5.0
    assert OperatorSettings.from_env({"MORPHML_OPERATOR_WORKER_UNREADY_SECONDS": "2.5"}).worker_unready_seconds == 2.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(SettingsError, match="MORPHML_OPERATOR_WORKER_UNREADY_SECONDS"):
            OperatorSettings.from_env({"MORPHML_OPERATOR_WORKER_UNREADY_SECONDS": bad})


@pytest.mark.parametrize("outcome", [pod_loss.GONE_ANSWERED, pod_loss.GONE_NOBODY, pod_loss.GONE_RECOVERED])
def test_worker_gone_is_not_retried_once_the_master_knows_or_nobody_is_left(outcome):
    assert gone_retry_delay(outcome, attempt=0, elapsed=0.0, give_up_after=300) is None


def test_worker_gone_to_an_unreachable_master_backs_off_to_every_five_seconds():
    delays = [gone_retry_delay(pod_loss.GONE_UNREACHABLE, attempt, elapsed=1.0, give_up_after=300)
              for attempt in range(7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_worker_gone_retries_stop_at_the_deadline_and_never_sleep_past_it():
    assert gone_retry_delay(pod_loss.GONE_UNREACHABLE, attempt=9, elapsed=298.0, give_up_after=300) == 2.0
    assert gone_retry_delay(pod_loss.GONE_UNREACHABLE, attempt=9, elapsed=300.0, give_up_after=300) is None
    assert gone_retry_delay(pod_loss.GONE_UNREACHABLE, attempt=0, elapsed=0.0, give_up_after=0) is None


# --------------------------------------------------------------------------- oom_kills


def oom_pod(state: dict, last: dict | None = None, restarts: int = 0, limit: str | None = "512Mi") -> dict:
    resources = {"limits": {"memory": limit}} if limit else {}
    body = pod(status={"containerStatuses": [{"name": "worker", "restartCount": restarts, "state": state,
                                              "lastState": last or {}}]})
    body["spec"] = {"containers": [{"name": "worker", "resources": resources}]}
    return body


OOM = {"terminated": {"reason": "OOMKilled", "exitCode": 137, "finishedAt": "2026-11-29T10:00:03Z"}}


def test_a_container_oom_killed_and_restarted_is_named_with_its_limit():
    [kill] = pod_loss.oom_kills(oom_pod({"running": {}}, OOM, restarts=1))
    assert kill.container == "worker" and kill.key == "u1-worker-1"
    assert kill.message == ("worker pod w-1: container worker was OOMKilled at 2026-11-29T10:00:03Z (exit code 137, "
                            "out of memory at its limit of 512Mi, spec.workers.resources.limits.memory); restarted "
                            "(1 restart); its trials go back to the queue without a retry")


def test_a_container_dead_of_oom_before_its_restart_has_the_key_the_restart_will_have():
    [dead] = pod_loss.oom_kills(oom_pod(OOM, restarts=0))
    [restarted] = pod_loss.oom_kills(oom_pod({"running": {}}, OOM, restarts=1))
    assert dead.key == restarted.key  # one Event per kill, whichever event shows it first
    assert "restarted" not in dead.message
    [second] = pod_loss.oom_kills(oom_pod({"running": {}}, OOM, restarts=2))
    assert second.key != restarted.key and "(2 restarts)" in second.message


@pytest.mark.parametrize("state, last", [
    ({"running": {}}, {}),
    ({"running": {}}, {"terminated": {"reason": "Error", "exitCode": 1}}),
    ({"terminated": {"reason": "Completed", "exitCode": 0}}, OOM),  # the latest end was not the OOM killer
    ({"waiting": {"reason": "ContainerCreating"}}, {}),
])
def test_other_terminations_are_not_oom_kills(state, last):
    assert pod_loss.oom_kills(oom_pod(state, last, restarts=1)) == []


def test_no_limit_and_no_statuses():
    [kill] = pod_loss.oom_kills(oom_pod(OOM, limit=None))
    assert "out of memory with no memory limit set" in kill.message
    assert pod_loss.oom_kills(pod()) == []
