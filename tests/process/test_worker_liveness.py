"""Process tests: the worker's gRPC health tracks the liveness of its parts.

Real master and worker processes on loopback; the health is read with grpc.health.v1 Check on
the worker's --health-port, the same call the kubelet's gRPC readiness probe makes. A runner is
wedged by SIGSTOP on that child only (found through /proc children of the worker pid): the
worker keeps heartbeating, so the master's own loss paths never fire, and only the worker's
liveness check can notice. With --heartbeat-interval 1 the bounds are the defaults' floor:
stuck after 10 s (NOT_SERVING), replaced after 20 s (morphml.distributed.liveness).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from morphml.distributed.auth import token_metadata
from morphml.distributed.proto import worker_pb2 as pb
from morphml.distributed.proto import worker_pb2_grpc as pb_grpc
from proc_helpers import (
    TOKEN,
    assert_each_trial_once,
    finished,
    free_port,
    journal_events,
    journal_rows,
    running_worker,
    status,
    wait_for,
    write_manifest,
)

pytestmark = pytest.mark.process

STUCK_AFTER = 10.0  # liveness_bounds(1.0): max(3 x 1 s, 10 s)
REPLACE_AFTER = 20.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(port: int, service: str = "morphml.Worker") -> int | None:
    """The worker's grpc.health.v1 Check answer (None: no answer)."""
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=1).status
    except grpc.RpcError:
        return None


def children(pid: int) -> list[int]:
    """Child processes of `pid` (any of its threads may have started them)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return sorted(out)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(150)
def test_sigstopped_runner_turns_health_not_serving_and_its_trial_is_rerun_elsewhere_once(procs, tmp_path):
    # Budget 2, three workers: one stays idle, so the wedged runner's trial can go there.
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:sleepy", max_trials=2)
    port = free_port()
    procs.master(manifest, port, extra=["--heartbeat-interval", "1", "--missed-heartbeats", "3"])
    health_ports = {name: free_port() for name in ("wa", "wb", "wc")}
    workers = {name: procs.worker(port, name, extra=["--health-port", str(hp)], env={"MORPHML_TEST_SLEEP": "4"})
               for name, hp in health_ports.items()}
    victim, task_id, attempt = wait_for(lambda: running_worker(port), 40, "a running trial")
    assert attempt == 1
    victim_health = health_ports[victim]
    assert health(victim_health) == SERVING
    time.sleep(0.5)  # the lease has reached the runner
    [runner] = children(workers[victim].pid)
    os.kill(runner, signal.SIGSTOP)  # the runner only: the worker itself keeps heartbeating
    stopped_at = time.monotonic()
    try:
        # (a) NOT_SERVING once the runner has been silent past the bound, on both services
        wait_for(lambda: health(victim_health) == NOT_SERVING, STUCK_AFTER + 8, "the wedged worker's NOT_SERVING")
        detected_s = time.monotonic() - stopped_at
        assert health(victim_health, "") == NOT_SERVING
        print(f"\nrunner SIGSTOP -> NOT_SERVING {detected_s:.2f} s (bound {STUCK_AFTER:g} s)")
        # last beat at most one beat period (1 s) before the stop, one check period (1 s) late
        assert STUCK_AFTER - 1.5 <= detected_s <= STUCK_AFTER + 3.0, detected_s
        assert all(health(hp) == SERVING for name, hp in health_ports.items() if name != victim)
        st = status(port)
        assert not st.losses, "the master saw a loss: only the worker's liveness check should see this one"

        # (b) past the replacement bound the worker kills the runner and reports the trial failed;
        # the master retries it on another worker
        journal = tmp_path / "journal.db"
        relet = wait_for(lambda: [e for e in journal_events(journal, "leased")
                                  if e["task_id"] == task_id and e["attempt"] == 2],
                         REPLACE_AFTER + 15, "the wedged trial's re-lease")
        relet_s = time.monotonic() - stopped_at
        print(f"runner SIGSTOP -> trial re-leased {relet_s:.2f} s (replace after {REPLACE_AFTER:g} s)")
        assert relet[0]["worker_name"] != victim
        assert REPLACE_AFTER - 1.5 <= relet_s <= REPLACE_AFTER + 8.0, relet_s
        wait_for(lambda: not alive(runner), 10, "the wedged runner to be killed")
        # a new runner answers, and the worker is SERVING again
        wait_for(lambda: health(victim_health) == SERVING, 30, "SERVING after the runner was replaced")
        assert children(workers[victim].pid) and runner not in children(workers[victim].pid)
    finally:
        if alive(runner):
            os.kill(runner, signal.SIGCONT)
    st = wait_for(lambda: finished(status(port)) and status(port), 60, "the experiment to finish")
    assert st.phase == "Succeeded" and st.succeeded == 2
    assert_each_trial_once(journal, 2)
    task = journal_rows(journal, "SELECT finished_attempt, finished_by, retries_used FROM tasks WHERE task_id = ?",
                        (task_id,))[0]
    assert task[0] == 2 and task[1] != victim and task[2] == 1  # counted once, on another worker, one retry
    [(ok, kind, message)] = journal_rows(journal, "SELECT ok, failure_kind, failure_message FROM results"
                                                  " WHERE task_id = ? AND attempt = 1", (task_id,))
    assert not ok and kind == "timeout" and "trial runner 0" in message and "state T" in message, message
    assert not st.losses and st.retries == 1  # the worker itself was never lost


@pytest.mark.timeout(120)
def test_a_runner_training_longer_than_the_bounds_keeps_the_worker_serving(procs, tmp_path):
    # One trial that sleeps past both bounds (stuck 10 s, replace 20 s): its runner keeps beating.
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:sleepy", max_trials=1)
    port = free_port()
    procs.master(manifest, port, extra=["--heartbeat-interval", "1", "--missed-heartbeats", "3"])
    hp = free_port()
    procs.worker(port, "wa", extra=["--health-port", str(hp)], env={"MORPHML_TEST_SLEEP": str(REPLACE_AFTER + 4)})
    wait_for(lambda: running_worker(port), 40, "the trial to start")
    answers = []
    while not finished(status(port)):
        answers.append(health(hp))
        assert len(answers) < 1000, "the trial never finished"
        time.sleep(0.1)
    assert answers and all(a == SERVING for a in answers), sorted(set(answers))
    st = status(port)
    assert st.phase == "Succeeded" and st.succeeded == 1 and not st.losses and st.retries == 0
    assert journal_rows(tmp_path / "journal.db", "SELECT finished_attempt FROM tasks") == [(1,)]


@pytest.mark.timeout(120)
def test_a_stopped_runner_continued_before_the_replacement_bound_recovers_and_keeps_its_trial(procs, tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:sleepy", max_trials=1)
    port = free_port()
    procs.master(manifest, port, extra=["--heartbeat-interval", "1", "--missed-heartbeats", "3"])
    hp = free_port()
    # The trial (16 s of wall-clock sleep) outlasts the stop, so the worker is still there after it.
    worker = procs.worker(port, "wa", extra=["--health-port", str(hp)], env={"MORPHML_TEST_SLEEP": "16"})
    _, task_id, _ = wait_for(lambda: running_worker(port), 40, "the trial to start")
    time.sleep(0.5)
    [runner] = children(worker.pid)
    os.kill(runner, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        wait_for(lambda: health(hp) == NOT_SERVING, STUCK_AFTER + 8, "NOT_SERVING")
        assert time.monotonic() - stopped_at < REPLACE_AFTER - 4, "too late to test a recovery"
    finally:
        os.kill(runner, signal.SIGCONT)
    continued_at = time.monotonic()
    wait_for(lambda: health(hp) == SERVING, 5, "SERVING after SIGCONT")
    print(f"\nSIGCONT -> SERVING {time.monotonic() - continued_at:.2f} s")
    assert children(worker.pid) == [runner]  # the same runner, never replaced
    st = wait_for(lambda: finished(status(port)) and status(port), 30, "the experiment to finish")
    assert st.phase == "Succeeded" and st.retries == 0 and not st.losses
    assert journal_rows(tmp_path / "journal.db", "SELECT ok, attempt FROM results WHERE task_id = ?",
                        (task_id,)) == [(1, 1)]


@pytest.mark.timeout(150)
def test_a_runner_holding_the_gil_while_computing_is_busy_not_stuck(procs, tmp_path):
    # The trial's one long C call starves the runner's beat thread for longer than the bound;
    # its CPU time keeps growing, which the worker counts as progress.
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.liveness_evaluators:busy_holding_the_gil",
                              max_trials=1)
    port = free_port()
    procs.master(manifest, port, extra=["--heartbeat-interval", "1", "--missed-heartbeats", "3"])
    hp = free_port()
    procs.worker(port, "wa", extra=["--health-port", str(hp)], env={"MORPHML_TEST_GIL_SECONDS": "18"})
    wait_for(lambda: running_worker(port), 40, "the trial to start")
    answers = []
    while not finished(status(port)):
        answers.append(health(hp))
        assert len(answers) < 1500, "the trial never finished"
        time.sleep(0.1)
    st = status(port)
    assert st.phase == "Succeeded" and st.succeeded == 1 and st.retries == 0 and not st.losses
    [(metrics,)] = journal_rows(tmp_path / "journal.db", "SELECT metrics_json FROM tasks")
    held = json.loads(metrics)["gil_held_seconds"]
    print(f"\nGIL held {held:.1f} s in one call; health answers: {len(answers)}, all SERVING: "
          f"{all(a == SERVING for a in answers)}")
    assert held > STUCK_AFTER + 2, f"the GIL was held only {held:.1f} s: the case was not exercised"
    assert answers and all(a == SERVING for a in answers), sorted(set(answers))


@pytest.mark.timeout(150)
def test_a_worker_reported_gone_while_its_only_runner_is_wedged_registers_again_only_after_replacing_it(
        procs, tmp_path):
    # What the operator does on Kubernetes once the NOT_SERVING pod turns unready: WorkerGone. The
    # trial goes to another worker at once (pod_gone, no retry). The wedged worker must not register
    # again while it has no live runner (it would only take trials to queue behind the stopped one).
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:sleepy", max_trials=2)
    port = free_port()
    procs.master(manifest, port, extra=["--heartbeat-interval", "1", "--missed-heartbeats", "3"])
    health_ports = {name: free_port() for name in ("wa", "wb", "wc")}
    workers = {name: procs.worker(port, name, extra=["--health-port", str(hp)], env={"MORPHML_TEST_SLEEP": "4"})
               for name, hp in health_ports.items()}
    victim, task_id, _ = wait_for(lambda: running_worker(port), 40, "a running trial")
    time.sleep(0.5)
    [runner] = children(workers[victim].pid)
    os.kill(runner, signal.SIGSTOP)
    stopped_at = time.time()
    journal = tmp_path / "journal.db"
    try:
        wait_for(lambda: health(health_ports[victim]) == NOT_SERVING, STUCK_AFTER + 8, "NOT_SERVING")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            reply = pb_grpc.MasterStub(ch).WorkerGone(pb.WorkerGoneRequest(worker=victim, reason="pod not ready"),
                                                      metadata=token_metadata(TOKEN), timeout=5)
        assert [(r.task_id, r.attempt) for r in reply.requeued] == [(task_id, 1)]
        wait_for(lambda: [e for e in journal_events(journal, "leased") if e["task_id"] == task_id
                          and e["attempt"] == 2 and e["worker_name"] != victim], 5, "the re-lease elsewhere")
        wait_for(lambda: len([e for e in journal_events(journal, "worker_registered")
                              if e["worker_name"] == victim]) == 2, REPLACE_AFTER + 15, "the victim to register again")
    finally:
        if alive(runner):
            os.kill(runner, signal.SIGCONT)
    again = [e for e in journal_events(journal, "worker_registered") if e["worker_name"] == victim][1]
    print(f"\nrunner SIGSTOP -> registered again {again['ts'] - stopped_at:.1f} s (replace after {REPLACE_AFTER:g} s)")
    assert again["ts"] - stopped_at >= REPLACE_AFTER - 1.5
    st = wait_for(lambda: finished(status(port)) and status(port), 60, "the experiment to finish")
    assert st.phase == "Succeeded" and st.retries == 0
    assert_each_trial_once(journal, 2)
    assert journal_rows(journal, "SELECT finished_attempt, retries_used FROM tasks WHERE task_id = ?",
                        (task_id,)) == [(2, 0)]
    # The replaced runner's attempt had been given away: its failed result is recorded stale.
    stale = wait_for(lambda: journal_rows(journal, "SELECT disposition, failure_kind FROM results WHERE task_id = ?"
                                                   " AND attempt = 1", (task_id,)), 10, "the wedged attempt's result")
    assert stale == [("stale", "timeout")]


@pytest.mark.timeout(90)
def test_a_session_loop_blocked_on_a_lock_turns_health_not_serving_until_it_is_released(procs, tmp_path, caplog):
    # The worker runs in this process (so the test can wedge one of its threads) against a real
    # master process; its runner is a real child. The master waits for 2 workers before handing
    # out anything, so the worker idles with its session open, heartbeating, and its runner
    # never needs the lock. The master's heartbeat timeout (30 x 1 s) is longer than the test.
    import logging

    from morphml.distributed.worker import WorkerConfig, WorkerNode

    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:instant", max_trials=1)
    port = free_port()
    procs.master(manifest, port, extra=["--heartbeat-interval", "1", "--missed-heartbeats", "30", "--min-workers", "2"])
    hp = free_port()
    node = WorkerNode(WorkerConfig(master=f"127.0.0.1:{port}", token=TOKEN, name="inproc", health_port=hp,
                                   health_host="127.0.0.1"))
    caplog.set_level(logging.WARNING, logger="morphml.worker")
    node.start(block=False)
    try:
        wait_for(lambda: (st := status(port)) and any(w.worker_name == "inproc" and w.state != "registering"
                                                      for w in st.workers), 30, "the worker's session")
        assert health(hp) == SERVING
        node._lock.acquire()  # the heartbeat branch of the session loop takes it to list running trials
        blocked_at = time.monotonic()
        try:
            wait_for(lambda: health(hp) == NOT_SERVING, STUCK_AFTER + 8, "NOT_SERVING")
            blocked_s = time.monotonic() - blocked_at
        finally:
            node._lock.release()
        print(f"\nsession loop blocked -> NOT_SERVING {blocked_s:.2f} s (bound {STUCK_AFTER:g} s)")
        assert STUCK_AFTER - 1.5 <= blocked_s <= STUCK_AFTER + 3.0, blocked_s
        stuck = [r.getMessage() for r in caplog.records if "NOT_SERVING" in r.getMessage()]
        assert stuck and all(m.startswith("session made no progress") for m in stuck), stuck
        wait_for(lambda: health(hp) == SERVING, 5, "SERVING once the loop runs again")
        assert not status(port).losses  # the master never lost it: only the worker's own check saw it
    finally:
        node.drain("test over")
        node.wait(30)
