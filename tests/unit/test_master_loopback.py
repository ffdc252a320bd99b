"""A master bound to its pod IP also answers on 127.0.0.1 (same port), because a port-forward
(`morphml results`, `kubectl port-forward`) arrives through the container runtime, which dials
localhost inside the pod's network namespace; where 127.0.0.1:port is taken it starts anyway."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import grpc
import pytest

from morphml.distributed.master import MasterServer
from morphml.distributed.proto import worker_pb2 as pb
from morphml.distributed.proto import worker_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).parent))
from test_leases_coordinator import make

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]
TOKEN = "loopback-test-token"


def status_on(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.MasterStub(channel).GetStatus(pb.StatusRequest(), timeout=5,
                                                      metadata=(("authorization", f"Bearer {TOKEN}"),))
    return reply.phase


def test_a_master_on_a_pod_ip_answers_on_loopback_too(tmp_path):
    coord, _ = make(tmp_path, max_trials=1)
    server = MasterServer(coord, port=0, host="127.0.7.9", token=TOKEN)  # stands in for the pod IP
    server.start()
    try:
        assert server.loopback_port == server.port
        assert status_on(f"127.0.7.9:{server.port}") == status_on(f"127.0.0.1:{server.port}") != ""
    finally:
        server.stop(0)
        coord.journal.close()


def test_a_taken_loopback_port_does_not_stop_the_master(tmp_path):
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    coord, _ = make(tmp_path, max_trials=1)
    server = MasterServer(coord, port=port, host="127.0.7.10", token=TOKEN)
    try:
        server.start()
        assert server.port == port and server.loopback_port is None
        assert status_on(f"127.0.7.10:{port}")
    finally:
        server.stop(0)
        coord.journal.close()
        taken.close()
