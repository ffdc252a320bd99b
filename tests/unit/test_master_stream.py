"""The master's session-stream packing: what one wake-up of a worker's outbox turns into."""

from __future__ import annotations

import queue

import pytest

from morphml.distributed.coordinator import END_OF_STREAM, LeaseMessage, ShutdownMessage
from morphml.distributed.master import AckMessage, BadResult, pack_outbox, result_report
from morphml.distributed.proto import worker_pb2 as pb

pytestmark = pytest.mark.unit


def lease(n: int) -> LeaseMessage:
    return LeaseMessage(f"t{n:06d}", 1, '{"nodes": []}', "{}", n, lease_key=f"k{n}")


def ack(n: int) -> AckMessage:
    return AckMessage([pb.ResultAck(disposition="accepted", lease=pb.LeaseRef(task_id=f"t{n:06d}", attempt=1))])


def test_everything_queued_goes_out_as_one_message_with_leases_in_order_and_acks_riding_along():
    box = queue.Queue()
    for item in (ack(1), lease(3), ack(2)):
        box.put(item)
    messages, ended = pack_outbox(lease(2), box)
    assert not ended and len(messages) == 1 and box.empty()
    (msg,) = messages
    assert [(x.task_id, x.seed, x.lease_key) for x in msg.leases.leases] == [("t000002", 2, "k2"), ("t000003", 3, "k3")]
    assert [a.lease.task_id for a in msg.acks] == ["t000001", "t000002"]


def test_a_shutdown_follows_the_batch_and_acks_alone_need_no_kind():
    box = queue.Queue()
    box.put(ShutdownMessage("experiment succeeded"))
    messages, ended = pack_outbox(ack(7), box)
    assert not ended and [m.WhichOneof("kind") for m in messages] == [None, "shutdown"]
    assert messages[0].acks[0].lease.task_id == "t000007" and messages[1].shutdown.reason == "experiment succeeded"


def test_end_of_stream_ends_the_session_and_nothing_after_it_is_sent():
    box = queue.Queue()
    box.put(END_OF_STREAM)
    box.put(lease(9))
    messages, ended = pack_outbox(lease(8), box)
    assert ended and [x.task_id for m in messages for x in m.leases.leases] == ["t000008"]
    assert pack_outbox(END_OF_STREAM, queue.Queue()) == ([], True)


@pytest.mark.parametrize("result, error", [
    (pb.TrialResult(ok=True, metrics_json="{}"), "lease.task_id must be set"),
    (pb.TrialResult(lease=pb.LeaseRef(task_id="t1", attempt=0), ok=True), "lease.attempt must be >= 1"),
    (pb.TrialResult(lease=pb.LeaseRef(task_id="t1", attempt=1), ok=True, metrics_json="{nope"),
     "metrics_json is not JSON"),
    (pb.TrialResult(lease=pb.LeaseRef(task_id="t1", attempt=1), ok=False, failure_kind="gremlins"),
     "failure_kind='gremlins'; allowed exception"),
])
def test_a_malformed_result_is_named(result, error):
    with pytest.raises(BadResult, match=error.replace("(", r"\(").replace("[", r"\[")):
        result_report(result)


def test_a_good_result_becomes_a_report_with_its_key():
    report = result_report(pb.TrialResult(lease=pb.LeaseRef(task_id="t1", attempt=2), ok=True, lease_key="abc",
                                          metrics_json='{"val_accuracy": 0.9}', worker_name="w", duration_seconds=1.5))
    assert (report.task_id, report.attempt, report.ok, report.metrics, report.lease_key, report.worker_name,
            report.duration) == ("t1", 2, True, {"val_accuracy": 0.9}, "abc", "w", 1.5)
