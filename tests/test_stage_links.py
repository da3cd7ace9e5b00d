"""The persistent links between stages (real daemons, raw sockets): a link
opens only with a ticket from an authenticated OpenLink, used once; framing
that is broken closes that link and nothing else; a frame that does not fit
the session fails that session with a clear error; with TLS the link is
TLS. The node stays up through all of it."""

import os
import socket
import struct
import subprocess

import pytest

from clusterd.coordinator.generation import Sampling
from clusterd.coordinator.peers import PeerHandle
from clusterd.coordinator.pipeline import Pipeline
from clusterd.coordinator.cluster import connect, load_ring, ranges_from_counts
from clusterd.local_cluster import LocalCluster, start_node
from clusterd.node.link import frame_bytes
from clusterd.wire import clusterd_pb2 as pb
from reference import mlx_lm_greedy


@pytest.fixture(scope="module")
def node(tmp_path_factory, synthetic):
    """One daemon holding a middle stage of the tiny model."""
    d = start_node(tmp_path_factory.mktemp("link"), "linked")
    p = PeerHandle(d.address)
    model = synthetic("deepseek_v3", "tiny")
    shard = p.load_shard(pb.StageSpec(model_path=str(model), start_layer=2, end_layer=4,
                                      shard="mid")).shard
    yield d, p, shard
    p.close()
    d.stop()


def hello_socket(port: int, ticket: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"".join(frame_bytes(pb.LinkHello(ticket=ticket))))
    return s


def closed_by_peer(s: socket.socket, timeout: float = 5.0) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_a_link_needs_a_ticket_that_works_once(node):
    d, p, shard = node
    port = p.info().link_port
    bogus = hello_socket(port, os.urandom(32))
    assert closed_by_peer(bogus)  # no ticket: refused at once
    reply = p._stub.OpenLink(pb.OpenLinkRequest(from_node="test"), timeout=5)
    assert reply.port == port
    first = hello_socket(port, reply.ticket)
    assert not closed_by_peer(first, timeout=0.5)  # accepted: the link stays open
    again = hello_socket(port, reply.ticket)
    assert closed_by_peer(again)  # a ticket works once
    first.close()
    assert p.health().state == "ready"
    assert "no valid ticket" in d.log()


def test_broken_framing_closes_that_link_and_only_it(node):
    d, p, shard = node
    port = p.info().link_port
    good = hello_socket(port, p._stub.OpenLink(pb.OpenLinkRequest(), timeout=5).ticket)
    bad = hello_socket(port, p._stub.OpenLink(pb.OpenLinkRequest(), timeout=5).ticket)
    bad.sendall(struct.pack(">I", 1 << 30))  # a header of 1 GiB
    assert closed_by_peer(bad)
    junk = hello_socket(port, p._stub.OpenLink(pb.OpenLinkRequest(), timeout=5).ticket)
    junk.sendall(struct.pack(">I", 7) + b"\xff" * 7)  # not an Activation
    assert closed_by_peer(junk)
    assert not closed_by_peer(good, timeout=0.5)
    good.close()
    assert p.health().state == "ready"
    assert "closed the link" in d.log()


def test_a_frame_that_does_not_fit_fails_its_session_with_the_reason(node):
    d, p, shard = node
    p.open_session(pb.OpenSessionRequest(session_id="framed", shard="mid", client_id="watch",
                                         next_address="127.0.0.1:1"))
    events = p.events("watch")
    link = hello_socket(p.info().link_port,
                        p._stub.OpenLink(pb.OpenLinkRequest(), timeout=5).ticket)
    act = pb.Activation(shard="mid", group=0, width=1, rows=[pb.Row(session_id="framed")])
    act.hidden.dtype, act.hidden.shape[:] = "float32", [1, 1, 7]  # the stage is wider
    act.hidden.raw_bytes = 4 * 7
    link.sendall(b"".join(frame_bytes(act, memoryview(bytes(4 * 7)))))
    ev = next(events)
    assert ev.session_id == "framed" and ev.finish_reason == "error"
    assert "expected [1, 1," in ev.error and "linked" in ev.error
    p.close_events("watch")
    link.close()
    assert p.health().state == "ready"


@pytest.fixture(scope="module")
def cluster_cert(tmp_path_factory):
    dirpath = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(dirpath / "key.pem"), "-out", str(dirpath / "cert.pem"),
                    "-subj", "/CN=clusterd", "-addext", "subjectAltName=DNS:clusterd"],
                   check=True, capture_output=True, timeout=60)
    return dirpath


def test_links_are_tls_when_the_cluster_is(tmp_path, synthetic, cluster_cert, monkeypatch):
    model = synthetic("deepseek_v3", "tiny")
    cert, key = cluster_cert / "cert.pem", cluster_cert / "key.pem"
    monkeypatch.setenv("CLUSTERD_TLS_CA", str(cert))  # this process's client side
    with LocalCluster(3, workdir=tmp_path, extra=["--tls-cert", str(cert),
                                                  "--tls-key", str(key)]) as cluster:
        stages = load_ring(model, connect(cluster.addresses), ranges_from_counts([2, 2, 2]))
        prompt = list(range(9, 30))
        tokens = list(Pipeline(stages).generate(prompt, 24, Sampling(temperature=0.0)))
        assert tokens == mlx_lm_greedy(model, prompt, 24, 2048)
        port = stages[1].peer.info().link_port
        plain = hello_socket(port, stages[1].peer._stub.OpenLink(
            pb.OpenLinkRequest(), timeout=5).ticket)
        assert closed_by_peer(plain)  # plaintext on a TLS link port: refused
