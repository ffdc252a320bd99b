"""morphml_operator.status.compute_status: master status + cluster counts -> CR status and Events."""

from __future__ import annotations

import pytest

from morphml_operator.settings import OperatorSettings, SettingsError
from morphml_operator.status import compute_status, format_best_summary

pytestmark = pytest.mark.unit

SPEC = {"budget": {"maxTrials": 24, "maxFailedTrials": 5}, "objective": {"metric": "val_accuracy", "goal": "maximize"},
        "workers": {"replicas": 2}, "suspend": False}


def master(phase="Running", succeeded=0, failed=0, running=0, best=None, losses=(), workers=(), message=""):
    status = {"phase": phase, "succeeded": succeeded, "failed": failed, "running": running, "budget": 24,
              "workers": list(workers), "losses": list(losses), "metric": "val_accuracy", "goal": "maximize",
              "message": message}
    if best:
        status["best"] = best
    return status


def step(previous, master_status, ready=2, desired=2, spec=SPEC, now="2026-11-29T09:00:00Z", error=""):
    return compute_status(name="digits", spec=spec, generation=1, previous=previous, master=master_status,
                          workers_ready=ready, workers_desired=desired, now=now, master_error=error)


def reasons(events):
    return [e.reason for e in events]


def test_first_look_without_master_is_pending():
    status, events = step(None, None, ready=0, error="no IP yet")
    assert status["phase"] == "Pending"
    assert status["trialsSummary"] == "0/24"
    assert status["workersSummary"] == "0/2"
    assert status["workers"]["selector"] == "morphml.io/experiment=digits,app.kubernetes.io/component=worker"
    assert "no IP yet" in status["message"]
    assert events == []
    master_ready = next(c for c in status["conditions"] if c["type"] == "MasterReady")
    assert (master_ready["status"], master_ready["reason"]) == ("False", "MasterUnreachable")


def test_running_master_starts_the_experiment_once():
    status, events = step({"phase": "Pending"}, master(succeeded=3, failed=1, running=2,
                                                       workers=[{"state": "busy"}, {"state": "dead"}]),
                          now="2026-11-29T09:01:00Z")
    assert status["phase"] == "Running"
    assert status["trials"] == {"done": 4, "succeeded": 3, "failed": 1, "stopped": 0, "running": 2, "budget": 24}
    assert status["trialsSummary"] == "4/24"
    assert status["workers"]["registered"] == 1
    assert status["startTime"] == "2026-11-29T09:01:00Z"
    assert status["message"] == "4 of 24 trials finished, 2 running, 1 workers registered"
    assert reasons(events) == ["Started"]
    again, events = step(status, master(succeeded=4, failed=1), now="2026-11-29T09:02:00Z")
    assert again["startTime"] == "2026-11-29T09:01:00Z" and events == []


def test_new_best_is_shown_and_announced_once():
    best = {"trial_id": "t000007", "metric": 0.97222, "summary": "conv32k3-bn-pool2-fc64"}
    status, events = step({"phase": "Running"}, master(succeeded=7, best=best))
    assert status["best"] == {"metric": "val_accuracy", "value": 0.97222, "trialId": "t000007",
                              "architecture": "conv32k3-bn-pool2-fc64", "summary": "0.9722 conv32k3-bn-pool2-fc64"}
    assert reasons(events) == ["NewBest"]
    assert "t000007" in events[0].message and "0.9722" in events[0].message
    _, events = step(status, master(succeeded=8, best=best))
    assert events == []


def test_unreachable_master_keeps_counts_and_best():
    best = {"trial_id": "t3", "metric": 0.9, "summary": "fc64"}
    running, _ = step({"phase": "Pending"}, master(succeeded=10, failed=2, running=2, best=best))
    status, events = step(running, None, error="UNAVAILABLE")
    assert status["phase"] == "Running"
    assert status["trials"] == running["trials"]
    assert status["best"] == running["best"]
    assert events == []
    assert next(c for c in status["conditions"] if c["type"] == "MasterReady")["status"] == "False"


def test_counts_never_go_backwards():
    shown, _ = step({"phase": "Running"}, master(succeeded=12, failed=1))
    status, _ = step(shown, master(succeeded=9, failed=0))  # e.g. a master still replaying its journal
    assert status["trials"]["done"] == 13 and status["trialsSummary"] == "13/24"


def test_success_is_terminal_and_announced():
    best = {"trial_id": "t9", "metric": 0.95, "summary": "fc64"}
    status, events = step({"phase": "Running", "startTime": "2026-11-29T09:00:00Z"},
                          master(phase="Succeeded", succeeded=24, best=best, message="budget reached"),
                          now="2026-11-29T09:10:00Z")
    assert status["phase"] == "Succeeded"
    assert status["completionTime"] == "2026-11-29T09:10:00Z"
    assert status["trials"]["running"] == 0
    assert reasons(events) == ["NewBest", "Succeeded"]
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert (succeeded["status"], succeeded["reason"]) == ("True", "BudgetReached")
    later, events = step(status, None, ready=0, desired=0, now="2026-11-29T09:11:00Z")
    assert later["phase"] == "Succeeded" and later["completionTime"] == "2026-11-29T09:10:00Z" and events == []
    assert later["best"]["trialId"] == "t9"


def test_failure_is_a_warning_with_the_masters_reason():
    status, events = step({"phase": "Running"},
                          master(phase="Failed", failed=6, message="6 failed trials > maxFailedTrials 5"))
    assert status["phase"] == "Failed"
    assert [(e.type, e.reason) for e in events] == [("Warning", "Failed")]
    assert "maxFailedTrials" in events[0].message


def loss(seq, detected_by="stream", name=None, requeued=1):
    return {"seq": str(seq), "worker_name": name or f"digits-worker-{seq}", "detected_by": detected_by,
            "requeued": [{"task_id": f"t{seq}", "attempt": 1}] * requeued}


def test_each_worker_loss_is_one_keyed_warning_and_deregistration_is_none():
    status, events = step({"phase": "Running"}, master(losses=[loss(1, "heartbeat", "digits-worker-a")]))
    assert [(e.type, e.reason, e.key) for e in events] == [("Warning", "WorkerLost", "worker-loss-1")]
    assert "digits-worker-a" in events[0].message and "heartbeat" in events[0].message
    assert "1 trial back" in events[0].message
    assert (status["workersLost"], status["lastLossSeq"]) == (1, 1)
    # A clean Deregister (seq 2) moves the number on but is neither an Event nor counted.
    status, events = step(status, master(losses=[loss(2, "deregister", requeued=0), loss(3, "pod_gone")]))
    assert [e.key for e in events] == ["worker-loss-3"]
    assert (status["workersLost"], status["lastLossSeq"]) == (2, 3)


def test_losses_at_or_below_last_loss_seq_are_not_posted_again():
    previous = {"phase": "Running", "workersLost": 4, "lastLossSeq": 5}
    status, events = step(previous, master(losses=[loss(4), loss(5), loss(6)]))
    assert [e.key for e in events] == ["worker-loss-6"]
    assert (status["workersLost"], status["lastLossSeq"]) == (5, 6)


def test_a_failed_status_patch_recomputes_the_same_losses_and_keys():
    previous = {"phase": "Running", "workersLost": 2, "lastLossSeq": 2}
    page = master(losses=[loss(3), loss(4)])
    first, first_events = step(previous, page)
    again, again_events = step(previous, page)  # the patch of `first` never landed
    assert first_events == again_events and [e.key for e in again_events] == ["worker-loss-3", "worker-loss-4"]
    assert (again["workersLost"], again["lastLossSeq"]) == (first["workersLost"], first["lastLossSeq"]) == (4, 4)


def test_one_hundred_and_fifty_losses_across_a_master_restart_count_one_hundred_and_fifty():
    status, posted = {"phase": "Running"}, []
    for first, last in ((1, 60), (61, 100), (101, 150)):  # pages as the master returns them
        status, events = step(status, master(losses=[loss(seq) for seq in range(first, last + 1)]))
        posted += [e.key for e in events]
    # The restarted master answers with nothing new until more losses come, and counts never drop.
    status, events = step(status, master(losses=[]))
    assert events == []
    assert posted == [f"worker-loss-{seq}" for seq in range(1, 151)]
    assert (status["workersLost"], status["lastLossSeq"]) == (150, 150)
    # An unreachable master keeps what was counted.
    status, events = step(status, None, error="restarting")
    assert (status["workersLost"], status["lastLossSeq"], events) == (150, 150, [])


def test_suspend_shows_suspended_and_resume_announces():
    suspended_spec = {**SPEC, "suspend": True}
    status, events = step({"phase": "Running"}, master(), ready=0, desired=0, spec=suspended_spec)
    assert status["phase"] == "Suspended" and reasons(events) == ["Suspended"]
    status, events = step(status, master())
    assert status["phase"] == "Running" and reasons(events) == ["Resumed"]


def test_condition_transition_time_moves_only_on_change():
    first, _ = step(None, None, now="2026-11-29T09:00:00Z")
    second, _ = step(first, None, now="2026-11-29T09:05:00Z")
    third, _ = step(second, master(), now="2026-11-29T09:06:00Z")

    def master_ready(status):
        return next(c for c in status["conditions"] if c["type"] == "MasterReady")

    assert master_ready(second)["lastTransitionTime"] == "2026-11-29T09:00:00Z"
    assert master_ready(third)["lastTransitionTime"] == "2026-11-29T09:06:00Z"


def test_best_summary_fits_the_column():
    assert format_best_summary(0.5, "x" * 100) == ("0.5000 " + "x" * 100)[:57] + "..."
    assert len(format_best_summary(0.5, "x" * 100)) == 60


def test_settings_read_from_environment():
    settings = OperatorSettings.from_env({"MORPHML_OPERATOR_WORKER_IMAGE": "w:2",
                                          "MORPHML_OPERATOR_STATUS_INTERVAL_SECONDS": "2.5"})
    assert settings.worker_image == "w:2" and settings.status_interval_seconds == 2.5
    assert settings.pod_defaults.worker_image == "w:2"


@pytest.mark.parametrize(("variable", "value"), [
    ("MORPHML_OPERATOR_STATUS_INTERVAL_SECONDS", "soon"),
    ("MORPHML_OPERATOR_STATUS_INTERVAL_SECONDS", "0"),
    ("MORPHML_OPERATOR_IMAGE_PULL_POLICY", "Sometimes"),
    ("MORPHML_OPERATOR_MASTER_ADDRESS_TEMPLATE", "{pod}:{port}"),
])
def test_bad_setting_names_the_variable(variable, value):
    with pytest.raises(SettingsError, match=variable):
        OperatorSettings.from_env({variable: value})


def test_restarted_master_saying_pending_does_not_send_running_back():
    status, events = step({"phase": "Running", "trials": {"succeeded": 5, "failed": 0}},
                          master(phase="Pending", succeeded=5))
    assert status["phase"] == "Running" and events == []


def test_workers_stopped_by_suspend_or_scale_down_are_not_warnings():
    stopped = loss(1, "pod_gone", "digits-worker-a")
    previous = {"phase": "Running", "workers": {"registered": 2}}
    status, events = step(previous, master(losses=[stopped]), ready=1, desired=1)  # scaled 2 -> 1
    assert [(e.type, e.reason) for e in events] == [("Normal", "WorkerStopped")]
    assert status["workersLost"] == 1  # counted all the same: the master lost a registration
    _, events = step(previous, master(losses=[stopped]), ready=0, desired=0, spec={**SPEC, "suspend": True})
    assert ("Normal", "WorkerStopped") in [(e.type, e.reason) for e in events]
    _, events = step(previous, master(losses=[stopped]), ready=1, desired=2)  # a pod died under a steady count
    assert [(e.type, e.reason) for e in events] == [("Warning", "WorkerLost")]


def test_best_names_the_first_of_several_objectives_when_the_master_does_not_say():
    objectives = [{"metric": "val_loss", "goal": "minimize"}, {"metric": "params", "goal": "minimize"}]
    spec = {**SPEC, "objectives": objectives}
    best = {"trial_id": "t000003", "metric": 0.12, "summary": "conv16k3-fc64"}
    reply = master(succeeded=3, best=best)
    reply.pop("metric", None)
    status, _ = step({"phase": "Running"}, reply, spec=spec)
    assert status["best"]["metric"] == "val_loss"


def test_early_stopped_trials_count_as_done_not_failed():
    reply = master(succeeded=3, failed=1)
    reply["stopped"] = 5
    status, _ = step({"phase": "Running"}, reply)
    assert status["trials"]["done"] == 9 and status["trials"]["stopped"] == 5 and status["trials"]["failed"] == 1
    assert status["trialsSummary"] == "9/24"
