"""The Probe RPC between real daemons: a node calls another over its own
channel (with the cluster secret) and reports what it saw."""

import secrets

import grpc
import pytest

from clusterd.home import clusterd_home
from clusterd.local_cluster import start_node
from clusterd.node.clock import CLOCK_OFFSET_ENV
from clusterd.security import SECRET_ENV, load_secret
from clusterd.wire import clusterd_pb2 as pb
from clusterd.wire import clusterd_pb2_grpc as rpc
from clusterd.wire.channel import open_channel


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    mine = {SECRET_ENV: load_secret(clusterd_home(), create=True)}
    started = {}
    try:
        started["a"] = start_node(tmp, "pa", env=mine)
        started["b"] = start_node(tmp, "pb", env=mine)
        started["stranger"] = start_node(tmp, "ps", env={SECRET_ENV: secrets.token_hex(20)})
        started["late"] = start_node(tmp, "pl", env={**mine, CLOCK_OFFSET_ENV: "60"})
        started["skewed"] = start_node(tmp, "pk", env={**mine, CLOCK_OFFSET_ENV: "-600"})
        yield started
    finally:
        for n in started.values():
            n.stop()


def stub(address):
    return rpc.NodeStub(open_channel(address))


def probe(frm, to, **kw):
    req = pb.ProbeRequest(address=to, payload_bytes=kw.get("payload", 14336),
                          rounds=kw.get("rounds", 20), timeout_seconds=kw.get("timeout", 10))
    return stub(frm).Probe(req, timeout=30)


def test_probe_of_a_neighbour(nodes):
    a, b = nodes["a"].address, nodes["b"].address
    reply = probe(a, b)
    info = stub(b).Info(pb.InfoRequest(), timeout=5)
    assert reply.reachable and reply.error == ""
    assert reply.node_id == info.node_id and reply.boot_id == info.boot_id != ""
    assert reply.protocol_version == info.protocol_version
    assert 0 < reply.rtt_p50_ms <= reply.rtt_p99_ms
    assert reply.throughput_mbps > 0
    assert reply.local_address == "127.0.0.1" and not reply.tls
    assert abs(reply.clock_offset_s) < 5


def test_bigger_payloads_move_more_bytes_per_second(nodes):
    a, b = nodes["a"].address, nodes["b"].address
    small = probe(a, b, payload=1024, rounds=10)
    big = probe(a, b, payload=8 * 2**20, rounds=5)
    assert big.reachable and big.throughput_mbps > small.throughput_mbps


def test_probe_of_a_closed_port(nodes, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reply = probe(nodes["a"].address, f"127.0.0.1:{port}")
    assert not reply.reachable and reply.error_code == "UNAVAILABLE"
    assert f"127.0.0.1:{port}" in reply.error and "unreachable" in reply.error


def test_probe_of_a_node_with_another_secret(nodes):
    reply = probe(nodes["a"].address, nodes["stranger"].address)
    assert not reply.reachable and reply.error_code == "UNAUTHENTICATED"
    assert "cluster secret wrong" in reply.error and nodes["stranger"].address in reply.error


def test_the_fake_clock_shows_as_offset_then_as_refusal(nodes):
    late = probe(nodes["a"].address, nodes["late"].address)
    assert late.reachable and 55 < late.clock_offset_s < 65
    skewed = probe(nodes["a"].address, nodes["skewed"].address)
    assert not skewed.reachable and skewed.error_code == "UNAUTHENTICATED"
    assert "expired" in skewed.error and "differ by 600 s" in skewed.error


@pytest.mark.parametrize("request_kw, text", [
    ({"address": "nowhere"}, "expected HOST:PORT"),
    ({"address": "127.0.0.1:1", "payload_bytes": 65 * 2**20}, "payload_bytes"),
    ({"address": "127.0.0.1:1", "rounds": 5000}, "rounds"),
])
def test_bad_probe_requests_are_refused_by_name(nodes, request_kw, text):
    with pytest.raises(grpc.RpcError) as e:
        stub(nodes["a"].address).Probe(pb.ProbeRequest(**request_kw), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in e.value.details()
    assert stub(nodes["a"].address).Health(pb.HealthRequest(), timeout=5).state == "idle"
