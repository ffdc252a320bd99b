"""Process tests: wrong tokens, garbage and oversized messages against a real master process;
the master keeps serving and the experiment still finishes."""

from __future__ import annotations

import os
import queue

import grpc
import pytest

from morphml.distributed.auth import token_metadata
from morphml.distributed.proto import worker_pb2 as pb
from morphml.distributed.proto import worker_pb2_grpc as pb_grpc
from proc_helpers import TOKEN, finished, free_port, health_ok, journal_results, status, wait_for, write_manifest

pytestmark = pytest.mark.process


@pytest.mark.timeout(60)
def test_worker_with_wrong_token_is_refused_with_a_clear_message(procs, tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", max_trials=1)
    port = free_port()
    procs.master(manifest, port)
    bad = tmp_path / "bad-token"
    bad.write_text("not-the-token")
    worker = procs.worker(port, "intruder", token_file=bad)
    assert worker.wait(timeout=30) == 2
    log = worker.log_path.read_text()
    assert "UNAUTHENTICATED" in log and "invalid token" in log and "--token-file" in log
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.MasterStub(ch).GetStatus(pb.StatusRequest(), timeout=5)  # no token at all
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "missing token" in err.value.details()
    assert status(port).workers == []  # the intruder never registered


@pytest.mark.timeout(60)
def test_worker_without_any_token_fails_naming_the_flag_and_variable(procs, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MORPHML_TOKEN"}
    procs.env = env
    proc = procs.spawn(["worker", "--master", "127.0.0.1:1"], "notoken.log")
    assert proc.wait(timeout=30) == 2
    assert "pass --token-file FILE or set MORPHML_TOKEN" in proc.log_path.read_text()


@pytest.mark.timeout(90)
def test_garbage_and_oversized_messages_are_rejected_and_the_master_carries_on(procs, tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", max_trials=3)
    port = free_port()
    procs.master(manifest, port)
    md = token_metadata(TOKEN)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        raw = ch.unary_unary("/morphml.Master/ReportResult", request_serializer=lambda b: b,
                             response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:  # not a protobuf at all
            raw(b"\xff\xfe garbage \x00\x01\x02" * 10, metadata=md, timeout=5)
        # grpc.aio answers an undecodable request UNKNOWN, naming the message type and the cause.
        assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNKNOWN)
        assert "morphml.TrialResult" in err.value.details() and "corrupt" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # 20 MiB, over the 16 MiB limit
            raw(b"\x0a" + b"\x00" * (20 * 1024 * 1024), metadata=md, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        stub = pb_grpc.MasterStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.ReportResult(pb.TrialResult(lease=pb.LeaseRef(task_id="t000001", attempt=1), ok=False,
                                             failure_kind="cosmic-rays"), metadata=md, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "allowed exception" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.ReportResult(pb.TrialResult(lease=pb.LeaseRef(task_id="t000001", attempt=1), ok=True,
                                             metrics_json="{not json"), metadata=md, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "metrics_json" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Register(pb.RegisterRequest(worker_name="", slots=1), metadata=md, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "worker_name" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # a stream that does not start with hello
            list(stub.Connect(iter([pb.WorkerMessage(heartbeat=pb.Heartbeat(sequence=1))]), metadata=md, timeout=5))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hello" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Connect(iter([pb.WorkerMessage(hello=pb.Hello(worker_id="nobody/99"))]), metadata=md, timeout=5))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        ack = stub.ReportResult(pb.TrialResult(lease=pb.LeaseRef(task_id="t999999", attempt=1), ok=True,
                                               metrics_json='{"val_accuracy": 1.0}'), metadata=md, timeout=5)
        assert ack.disposition == "unknown"  # recorded, never counted
    assert health_ok(f"127.0.0.1:{port}") and health_ok(f"127.0.0.1:{port}", "morphml.Master")
    procs.worker(port, "honest")
    st = wait_for(lambda: finished(s := status(port)) and s, 60, "the experiment to finish")
    assert st.phase == "Succeeded" and st.succeeded == 3 and st.best.metric < 1.0


@pytest.mark.timeout(90)
def test_result_for_a_lease_the_caller_never_held_is_refused_even_with_the_token(procs, tmp_path):
    """The token admits a process; only the lease's key lets it finish that trial."""
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:sleepy", max_trials=2)
    port = free_port()
    journal = tmp_path / "journal.db"
    procs.master(manifest, port, journal=journal)
    procs.worker(port, "honest", env=dict(procs.env, MORPHML_TEST_SLEEP="3"))
    running = wait_for(lambda: [r for w in status(port).workers for r in w.running], 30, "a trial running")
    lease = running[0]
    md = token_metadata(TOKEN)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.MasterStub(ch)
        for key in ("", "f" * 32):
            forged = pb.TrialResult(worker_id="rogue/1", worker_name="rogue", ok=True,
                                    metrics_json='{"val_accuracy": 1.0}',
                                    lease=pb.LeaseRef(task_id=lease.task_id, attempt=lease.attempt), lease_key=key)
            with pytest.raises(grpc.RpcError) as err:
                stub.ReportResult(forged, metadata=md, timeout=5)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert lease.task_id in err.value.details() and "lease_key" in err.value.details()
    st = status(port)
    assert st.succeeded == 0 and st.best.metric < 1.0
    st = wait_for(lambda: finished(s := status(port)) and s, 60, "the experiment to finish")
    assert st.phase == "Succeeded" and st.succeeded == 2 and st.best.metric < 1.0  # the honest results counted
    refused = [(r["worker_name"], r["disposition"]) for r in journal_results(journal, "refused")]
    assert refused == [("rogue", "refused")] * 2


@pytest.mark.timeout(90)
def test_results_on_the_session_stream_are_acknowledged_one_by_one_and_bad_ones_refused(procs, tmp_path):
    """A hand-driven session: one ResultBatch carrying the caller's own result, a forged one for
    another worker's lease, a malformed one and one for a task that does not exist. Each gets
    its own ack (accepted, refused, invalid, unknown); only the first counts, and the master
    serves on."""
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:sleepy", max_trials=3)
    port = free_port()
    journal = tmp_path / "journal.db"
    procs.master(manifest, port, journal=journal)
    procs.worker(port, "honest", env=dict(procs.env, MORPHML_TEST_SLEEP="3"))
    honest = wait_for(lambda: [r for w in status(port).workers for r in w.running], 30, "a trial running")[0]
    md = token_metadata(TOKEN)
    outgoing: queue.Queue = queue.Queue()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.MasterStub(ch)
        me = stub.Register(pb.RegisterRequest(worker_name="hand", slots=1), metadata=md, timeout=5).worker_id
        outgoing.put(pb.WorkerMessage(hello=pb.Hello(worker_id=me)))
        stream = stub.Connect(iter(outgoing.get, None), metadata=md, timeout=30)
        first = next(stream)
        assert first.WhichOneof("kind") == "leases" and len(first.leases.leases) == 1
        mine = first.leases.leases[0]
        batch = pb.WorkerMessage()
        batch.results.results.add(lease=pb.LeaseRef(task_id=mine.task_id, attempt=mine.attempt), ok=True,
                                  metrics_json='{"val_accuracy": 0.5}', worker_name="hand", lease_key=mine.lease_key)
        batch.results.results.add(lease=pb.LeaseRef(task_id=honest.task_id, attempt=honest.attempt), ok=True,
                                  metrics_json='{"val_accuracy": 1.0}', worker_name="hand", lease_key="f" * 32)
        batch.results.results.add(lease=pb.LeaseRef(task_id=mine.task_id, attempt=mine.attempt), ok=False,
                                  failure_kind="cosmic-rays", worker_name="hand")
        batch.results.results.add(lease=pb.LeaseRef(task_id="t999999", attempt=1), ok=True,
                                  metrics_json='{"val_accuracy": 1.0}', worker_name="hand", lease_key="0" * 32)
        outgoing.put(batch)
        acks = []
        for msg in stream:
            acks.extend(msg.acks)
            if len(acks) >= 4:
                break
        outgoing.put(None)
        stream.cancel()
    assert [(a.lease.task_id, a.disposition) for a in acks] == [
        (mine.task_id, "accepted"), (honest.task_id, "refused"), (mine.task_id, "invalid"), ("t999999", "unknown")]
    assert "lease_key does not match" in acks[1].detail and "allowed exception" in acks[2].detail
    st = wait_for(lambda: finished(s := status(port)) and s, 60, "the experiment to finish")
    assert st.phase == "Succeeded" and st.succeeded == 3 and st.best.metric < 1.0
    rows = [(r["task_id"], r["worker_name"], r["disposition"]) for r in journal_results(journal)
            if r["worker_name"] == "hand"]  # in arrival order
    assert rows == [(mine.task_id, "hand", "accepted"), (honest.task_id, "hand", "refused"),
                    ("t999999", "hand", "unknown")]
