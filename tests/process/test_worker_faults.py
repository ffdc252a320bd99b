"""Process tests: worker death by SIGKILL (broken stream), hang by SIGSTOP (heartbeat timeout),
SIGTERM drain, and failing evaluators, with real master and worker processes on loopback."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
import yaml

from morphml.distributed.auth import token_metadata
from morphml.distributed.proto import worker_pb2 as pb
from morphml.distributed.proto import worker_pb2_grpc as pb_grpc
from proc_helpers import (
    TOKEN,
    assert_each_trial_once,
    finished,
    free_port,
    journal_attempts,
    journal_events,
    journal_results,
    journal_task,
    journal_tasks,
    running_worker,
    status,
    wait_for,
    write_manifest,
)

pytestmark = pytest.mark.process


@pytest.mark.timeout(90)
def test_worker_killed_mid_trial_is_rerun_once_on_another_worker(procs, tmp_path):
    # Budget 2, three workers: two run a trial each, the third stays idle, so a killed
    # worker's trial can be re-leased the moment the death is seen. Heartbeats are slow
    # (2 s x 3) so only the broken stream can explain a quick re-lease.
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:sleepy", max_trials=2)
    port = free_port()
    procs.master(manifest, port, extra=["--heartbeat-interval", "2", "--missed-heartbeats", "3"])
    workers = {name: procs.worker(port, name, env={"MORPHML_TEST_SLEEP": "3"}) for name in ("wa", "wb", "wc")}
    victim, task_id, attempt = wait_for(lambda: running_worker(port), 30, "a running trial")
    assert attempt == 1
    killed_at = time.time()
    os.killpg(workers[victim].pid, signal.SIGKILL)
    st = wait_for(lambda: finished(status(port)) and status(port), 60, "the experiment to finish")
    assert st.phase == "Succeeded" and st.succeeded == 2
    journal = tmp_path / "journal.db"
    assert_each_trial_once(journal, 2)
    loss = [lost for lost in st.losses if lost.worker_name == victim]
    assert len(loss) == 1 and loss[0].detected_by == "stream"
    assert [(r.task_id, r.attempt) for r in loss[0].requeued] == [(task_id, 1)]
    relet = [e for e in journal_events(journal, "leased") if e["task_id"] == task_id and e["attempt"] == 2]
    assert len(relet) == 1 and relet[0]["worker_name"] != victim
    detect_s, relet_s = loss[0].detected_at - killed_at, relet[0]["ts"] - killed_at
    print(f"\nkill -> detected {detect_s * 1000:.0f} ms, kill -> re-leased {relet_s * 1000:.0f} ms")
    assert relet_s < 1.0, f"re-lease took {relet_s:.3f} s after SIGKILL (target < 1 s)"
    task = journal_task(journal, task_id)
    assert task.finished_attempt == 2 and task.finished_by != victim
    assert task.retries_used == 0  # the loss used no retry


@pytest.mark.timeout(90)
def test_hung_worker_is_declared_dead_after_missed_heartbeats_and_its_late_result_is_stale(procs, tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:sleepy", max_trials=2)
    port = free_port()
    interval, missed = 0.5, 3  # short, yet generous enough for healthy workers on a loaded machine
    procs.master(manifest, port, extra=["--heartbeat-interval", str(interval), "--missed-heartbeats", str(missed)])
    workers = {name: procs.worker(port, name, env={"MORPHML_TEST_SLEEP": "3"}) for name in ("wa", "wb", "wc")}
    victim, task_id, _ = wait_for(lambda: running_worker(port), 30, "a running trial")
    time.sleep(0.5)  # let the worker hand the lease to its trial process before it hangs
    stopped_at = time.time()
    os.kill(workers[victim].pid, signal.SIGSTOP)  # the worker hangs; its stream stays open
    try:
        st = wait_for(lambda: (s := status(port)) and any(lost.worker_name == victim for lost in s.losses) and s, 20,
                      "the hung worker to be declared dead")
        loss = next(lost for lost in st.losses if lost.worker_name == victim)
        assert loss.detected_by == "heartbeat"
        detect_s = loss.detected_at - stopped_at
        print(f"\nSIGSTOP -> declared dead {detect_s * 1000:.0f} ms (timeout {interval * missed:.1f} s)")
        # dead `missed` intervals after the last heartbeat, which came at most one interval before the stop
        assert interval * (missed - 1) <= detect_s < interval * missed + 2.0
        wait_for(lambda: [e for e in journal_events(tmp_path / "journal.db", "leased")
                          if e["task_id"] == task_id and e["attempt"] == 2], 10, "the re-lease")
    finally:
        os.kill(workers[victim].pid, signal.SIGCONT)
    wait_for(lambda: finished(status(port)), 60, "the experiment to finish")
    journal = tmp_path / "journal.db"
    # The resumed worker's trial finished meanwhile: its result arrives late and is stale.
    stale = wait_for(lambda: [(r["task_id"], r["attempt"]) for r in journal_results(journal, "stale")],
                     20, "the late result")
    assert stale == [(task_id, 1)]
    assert_each_trial_once(journal, 2)
    st = status(port)
    assert st.stale_results == 1 and st.succeeded == 2
    assert journal_task(journal, task_id).finished_attempt == 2


@pytest.mark.timeout(90)
def test_failing_evaluator_is_retried_on_another_worker_then_recorded_failed(procs, tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:raises_after_sleep", max_trials=3,
                              max_failed=1, retries=1)
    port = free_port()
    procs.master(manifest, port, extra=["--min-workers", "2"])  # both registered before any trial starts
    for name in ("wa", "wb"):
        procs.worker(port, name, env={"MORPHML_TEST_SLEEP": "1"})
    st = wait_for(lambda: finished(status(port)) and status(port), 60, "the experiment to end")
    assert st.phase == "Failed"
    assert "maxFailedTrials=1" in st.message
    journal = tmp_path / "journal.db"
    failed = [(t.task_id, t.error_kind, t.error_message, t.retries_used) for t in journal_tasks(journal, ("failed",))]
    # Failing for good the second task fails the experiment. How many tasks get there is up to
    # scheduling: a third task's last attempt can end in the same commit as the deciding one
    # (it did fail, and is counted), so: at least 2, each retried once on another worker.
    assert len(failed) >= 2 and st.failed >= 2
    for task_id, kind, message, retries in failed:
        assert kind == "exception" and "synthetic evaluator failure: loss exploded" in message and retries == 1
        attempts = [(a.worker_name, a.state.value) for a in journal_attempts(journal, task_id)]
        assert [s for _, s in attempts] == ["failed", "failed"]
        assert attempts[0][0] != attempts[1][0], f"retry ran on the same worker: {attempts}"


@pytest.mark.timeout(90)
def test_nan_metrics_are_a_failed_trial_of_kind_nan(procs, tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:returns_nan", max_trials=1,
                              max_failed=5, retries=0)
    port = free_port()
    procs.master(manifest, port)
    procs.worker(port, "wa")
    st = wait_for(lambda: finished(status(port)) and status(port), 60, "the experiment to end")
    assert st.phase == "Succeeded" and st.failed == 1
    assert [t.error_kind for t in journal_tasks(tmp_path / "journal.db")] == ["nan"]


@pytest.mark.timeout(90)
def test_sigterm_worker_finishes_its_trial_then_deregisters(procs, tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:sleepy", max_trials=3)
    port = free_port()
    procs.master(manifest, port)
    worker = procs.worker(port, "wa", extra=["--grace-seconds", "20"], env={"MORPHML_TEST_SLEEP": "1.5"})
    _, task_id, _ = wait_for(lambda: running_worker(port), 30, "a running trial")
    time.sleep(0.5)  # the trial has started on the worker (a lease not yet started is handed back)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    journal = tmp_path / "journal.db"
    task = journal_task(journal, task_id)
    assert (task.state.value, task.finished_by) == ("succeeded", "wa")
    st = status(port)
    assert not st.losses and st.running == 0  # a clean leave is not a loss
    dead = journal_events(journal, "worker_dead")
    assert [(e["worker_name"], e["detail"]["detected_by"], e["detail"]["requeued"]) for e in dead] == \
        [("wa", "deregister", [])]
    # the remaining trials go to the next worker
    procs.worker(port, "wb", env={"MORPHML_TEST_SLEEP": "0.1"})
    st = wait_for(lambda: finished(status(port)) and status(port), 60, "the experiment to finish")
    assert_each_trial_once(journal, 3)


@pytest.mark.timeout(60)
def test_evaluator_timeout_kills_the_trial_and_the_worker_keeps_heartbeating(procs, tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:hangs", max_trials=1, retries=0)
    text = manifest.read_text().replace("timeoutSeconds: 60", "timeoutSeconds: 2")
    manifest.write_text(text)
    port = free_port()
    procs.master(manifest, port, extra=["--heartbeat-interval", "1", "--missed-heartbeats", "3"])
    procs.worker(port, "wa")
    st = wait_for(lambda: finished(status(port)) and status(port), 40, "the experiment to end")
    assert st.failed == 1 and not st.losses  # the worker itself never looked dead
    [task] = journal_tasks(tmp_path / "journal.db")
    kind, message = task.error_kind, task.error_message
    assert kind == "timeout" and "timeoutSeconds=2" in message


@pytest.mark.timeout(60)
def test_sigterm_worker_hands_back_a_trial_that_outlasts_the_grace_period(procs, tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:sleepy", max_trials=1)
    port = free_port()
    procs.master(manifest, port)
    worker = procs.worker(port, "wa", extra=["--grace-seconds", "1"], env={"MORPHML_TEST_SLEEP": "30"})
    _, task_id, _ = wait_for(lambda: running_worker(port), 30, "a running trial")
    time.sleep(0.5)
    signalled = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    assert time.monotonic() - signalled < 10  # grace 1 s, not the trial's 30 s
    st = status(port)
    assert [(lost.detected_by, [(r.task_id, r.attempt) for r in lost.requeued]) for lost in st.losses] == \
        [("deregister", [(task_id, 1)])]
    assert st.pending == 1 and st.running == 0
    task = journal_task(tmp_path / "journal.db", task_id)
    assert (task.state.value, task.retries_used) == ("pending", 0)  # handed back, no retry used


@pytest.mark.timeout(60)
def test_draining_worker_declared_gone_does_not_register_again(procs, tmp_path):
    """A terminating pod is reported gone by the operator while its worker drains: the worker
    must not come back for new leases it would only hand back."""
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:sleepy", max_trials=4)
    port = free_port()
    procs.master(manifest, port)
    worker = procs.worker(port, "wa", extra=["--grace-seconds", "4"], env={"MORPHML_TEST_SLEEP": "3"})
    wait_for(lambda: running_worker(port), 30, "a running trial")
    time.sleep(0.5)
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        reply = pb_grpc.MasterStub(ch).WorkerGone(pb.WorkerGoneRequest(worker="wa", reason="pod deleted"),
                                                  metadata=token_metadata(TOKEN), timeout=5)
    assert list(reply.worker_ids) == ["wa/1"]
    assert worker.wait(timeout=30) == 0
    journal = tmp_path / "journal.db"
    registered = [e["worker_name"] for e in journal_events(journal, "worker_registered")]
    assert registered == ["wa"], f"the draining worker registered again: {registered}"
    leased = sum(1 for a in journal_attempts(journal) if a.worker_name == "wa")
    assert leased == 1


@pytest.mark.timeout(120)
def test_a_trial_that_kills_every_worker_it_runs_on_fails_after_max_task_losses(procs, tmp_path):
    """spec.faultTolerance.maxTaskLosses 2: the first trial SIGKILLs the worker that runs it (like
    an OOM kill of the whole container). Its first loss sends it back to the queue; a replacement
    worker (as a Deployment would start) takes it and dies too; that second loss fails the trial
    (kind lost) instead of taking down the next worker, and the other trials finish on the third."""
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:kills_its_worker", max_trials=4,
                              max_failed=1)
    doc = yaml.safe_load(manifest.read_text())
    doc["spec"]["faultTolerance"] = {"maxTaskLosses": 2}
    manifest.write_text(yaml.safe_dump(doc))
    poison = tmp_path / "poison"
    poison.mkdir()
    port = free_port()
    procs.master(manifest, port, extra=["--heartbeat-interval", "2", "--missed-heartbeats", "3"])
    env = {"MORPHML_TEST_POISON_DIR": str(poison)}
    workers = [procs.worker(port, "w1", env=env)]
    while not finished(status(port)):  # a replacement for each killed worker, as a Deployment does
        code = workers[-1].poll()
        if code is not None and code < 0:
            assert len(workers) < 4, "more workers died than maxTaskLosses allows"
            workers.append(procs.worker(port, f"w{len(workers) + 1}", env=env))
        time.sleep(0.1)
    st = status(port)
    assert (st.phase, st.succeeded, st.failed) == ("Succeeded", 3, 1), st
    # the third worker finished the other trials and lives on, or has already left cleanly at the end
    assert [w.poll() for w in workers[:2]] == [-signal.SIGKILL, -signal.SIGKILL] and len(workers) == 3
    assert workers[2].poll() in (None, 0), workers[2].log_path.read_text()[-2000:]
    journal = tmp_path / "journal.db"
    (failed,) = journal_tasks(journal, ("failed",))
    assert failed.error_kind == "lost" and "maxTaskLosses=2" in failed.error_message, failed.error_message
    assert failed.retries_used == 0  # losses use no retry
    (event,) = journal_events(journal, "failed")
    assert (event["task_id"], event["worker_name"], event["detail"]["losses"]) == (failed.task_id, "w2", 2)
    assert [(e["task_id"], e["worker_name"]) for e in journal_events(journal, "requeued")] == [(failed.task_id, "w1")]
    assert {a.worker_name for a in journal_attempts(journal, failed.task_id)} == {"w1", "w2"}
