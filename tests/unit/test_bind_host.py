"""Servers listen on the pod's own IP when $POD_IP is set (pods sharing one host must not
collide on 50051/50052), and on every address otherwise."""

import pytest

from morphml.distributed.master import default_bind_host

pytestmark = pytest.mark.unit


def test_without_pod_ip_servers_listen_on_every_address(monkeypatch):
    monkeypatch.delenv("POD_IP", raising=False)
    assert default_bind_host() == "[::]"


def test_pod_ip_v4_is_the_bind_host(monkeypatch):
    monkeypatch.setenv("POD_IP", "127.0.3.7")
    assert default_bind_host() == "127.0.3.7"


def test_pod_ip_v6_is_bracketed_for_grpc(monkeypatch):
    monkeypatch.setenv("POD_IP", "fd00::12")
    assert default_bind_host() == "[fd00::12]"


def test_two_servers_on_one_port_coexist_on_different_pod_ips(monkeypatch):
    from concurrent import futures

    import grpc

    servers = []
    try:
        for ip in ("127.0.9.1", "127.0.9.2"):
            monkeypatch.setenv("POD_IP", ip)
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
            wanted_port = servers[0][1] if servers else 0
            port = server.add_insecure_port(f"{default_bind_host()}:{wanted_port}")
            assert port, f"could not listen on {ip}"
            server.start()
            servers.append((server, port))
        assert servers[0][1] == servers[1][1]
    finally:
        for server, _ in servers:
            server.stop(0)
