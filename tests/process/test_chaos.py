"""Chaos: 8 workers, 200 quick trials, a worker SIGKILLed and replaced every ~2 s; every trial
finishes exactly once. Also: the operator's WorkerGone call is death at once."""

from __future__ import annotations

import os
import random
import signal
import time

import grpc
import pytest

from morphml.distributed.auth import token_metadata
from morphml.distributed.proto import worker_pb2 as pb
from morphml.distributed.proto import worker_pb2_grpc as pb_grpc
from proc_helpers import (
    TOKEN,
    assert_each_trial_once,
    finished,
    free_port,
    journal_attempts,
    journal_tasks,
    status,
    wait_for,
    write_manifest,
)

pytestmark = pytest.mark.process


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_chaos_workers_killed_and_replaced_every_two_seconds_all_trials_finish_exactly_once(procs, tmp_path):
    budget = 200
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:sleepy", max_trials=budget,
                              population=20, generations=20)
    port = free_port()
    procs.master(manifest, port, extra=["--heartbeat-interval", "1", "--missed-heartbeats", "3"])
    env = {"MORPHML_TEST_SLEEP": "0.6"}
    counter = iter(range(10_000))
    live = {}
    for _ in range(8):
        name = f"w{next(counter)}"
        live[name] = procs.worker(port, name, env=env)
    rng = random.Random(5)
    kills = 0
    deadline = time.monotonic() + 360
    while not finished(st := status(port)) and time.monotonic() < deadline:
        time.sleep(2.0)
        st = status(port) or st
        # kill a worker in the middle of a trial when there is one
        busy = sorted(w.worker_name for w in st.workers if w.state == "busy" and w.worker_name in live)
        victim = rng.choice(busy or sorted(live))
        os.killpg(live.pop(victim).pid, signal.SIGKILL)
        kills += 1
        name = f"w{next(counter)}"
        live[name] = procs.worker(port, name, env=env)
    st = wait_for(lambda: finished(s := status(port)) and s, 60, "the experiment to finish")
    journal = tmp_path / "journal.db"
    assert st.phase == "Succeeded" and st.succeeded == budget, st.message
    assert_each_trial_once(journal, budget)
    rerun = sum(1 for t in journal_tasks(journal) if t.finished_attempt > 1)
    losses = [loss.detected_by for loss in st.losses]
    print(f"\nchaos: {kills} workers killed, {len(losses)} losses seen ({set(losses)}), {rerun} trials re-run, "
          f"{st.stale_results} stale results")
    assert kills >= 5 and len(losses) >= kills // 2 and set(losses) <= {"stream", "heartbeat"}
    assert rerun >= 1


@pytest.mark.timeout(60)
def test_operator_worker_gone_call_requeues_the_pods_trials_at_once(procs, tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:sleepy", max_trials=2)
    port = free_port()
    procs.master(manifest, port, extra=["--heartbeat-interval", "5", "--missed-heartbeats", "3"])
    procs.worker(port, "pod-a", env={"MORPHML_TEST_SLEEP": "2"})
    wait_for(lambda: (s := status(port)) and s.running == 1, 30, "a running trial")
    called_at = time.time()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        reply = pb_grpc.MasterStub(ch).WorkerGone(pb.WorkerGoneRequest(worker="pod-a", reason="pod deleted"),
                                                  metadata=token_metadata(TOKEN), timeout=5)
    assert [r.task_id for r in reply.requeued] == ["t000001"] and len(reply.worker_ids) == 1
    st = status(port)
    loss = st.losses[0]
    assert loss.detected_by == "pod_gone" and loss.detected_at - called_at < 1.0
    # Back in the queue at once: attempt 1 is over. The worker process itself is alive (only its
    # "pod" was reported gone), so it may already have registered again and taken the task as
    # attempt 2; either way the first attempt can no longer count.
    attempts = [(a.attempt, a.state.value) for a in journal_attempts(tmp_path / "journal.db", "t000001")]
    assert attempts[0] == (1, "stale"), attempts
    assert st.pending >= 1 or [a for a, _ in attempts[1:]] == [2], (st, attempts)
    st = wait_for(lambda: finished(s := status(port)) and s, 60, "the experiment to finish")
    assert st.phase == "Succeeded"
    assert_each_trial_once(tmp_path / "journal.db", 2)
