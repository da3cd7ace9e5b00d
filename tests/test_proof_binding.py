"""A proof is good once, on one node, in one start of it (real daemons):
captured on one node it is refused by another and by the same node after a
restart; clients learn the node's identity from Hello and follow restarts."""

import os

import grpc
import pytest

from clusterd.coordinator.peers import PeerHandle
from clusterd.proofs import PROOF_HEADER, STALE_PHRASE, NodeIdentity, make_proof
from clusterd.wire import clusterd_pb2 as pb
from clusterd.wire import clusterd_pb2_grpc as rpc
from clusterd.wire.channel import hello, open_channel
from daemons import start_daemon

SECRET = os.environ["CLUSTERD_SECRET"]


def identity(address: str) -> NodeIdentity:
    channel = grpc.insecure_channel(address)
    try:
        reply = hello(channel)
    finally:
        channel.close()
    return NodeIdentity(reply.node_id, reply.boot_id)


def call_with(address: str, method: str, request, proof: str):
    """A call carrying exactly `proof` (as a captured one would be replayed)."""
    channel = grpc.insecure_channel(address)
    reply_type = {"Health": pb.HealthReply, "LoadShard": pb.LoadShardReply}[method]
    stub = channel.unary_unary(f"/clusterd.v1.Node/{method}",
                               request_serializer=type(request).SerializeToString,
                               response_deserializer=reply_type.FromString)
    try:
        return stub(request, timeout=10, metadata=[(PROOF_HEADER, proof)])
    finally:
        channel.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    nodes = [start_daemon(root, f"bind{i}") for i in range(2)]
    yield nodes
    for n in nodes:
        n.stop()


def test_hello_is_public_and_boot_ids_agree_everywhere(pair):
    a = pair[0]
    ident = identity(a.address)
    assert len(ident.boot_id) == 32 and ident.node_id
    peer = PeerHandle(a.address)
    try:
        assert peer.health().boot_id == ident.boot_id
        info = peer.info()
        assert (info.node_id, info.boot_id) == (ident.node_id, ident.boot_id)
    finally:
        peer.close()


def test_a_proof_for_one_node_is_refused_by_another(pair, synthetic):
    a, b = pair
    ident_a = identity(a.address)
    model = synthetic("deepseek_v3", "tiny")
    # The attacker's LoadShard, signed for node A, sent to node B.
    body = pb.LoadShardRequest(stage=pb.StageSpec(model_path=str(model), start_layer=0,
                                                  end_layer=2))
    proof = make_proof(SECRET, "/clusterd.v1.Node/LoadShard", ident_a)
    with pytest.raises(grpc.RpcError) as e:
        call_with(b.address, "LoadShard", body, proof)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert STALE_PHRASE in e.value.details() and "Hello" in e.value.details()
    assert SECRET not in e.value.details() and ident_a.boot_id not in e.value.details()
    peer_b = PeerHandle(b.address)
    try:
        assert not peer_b.info().has_shard
    finally:
        peer_b.close()
    # The proof was good for A, once.
    health = make_proof(SECRET, "/clusterd.v1.Node/Health", ident_a)
    with pytest.raises(grpc.RpcError) as e:
        call_with(b.address, "Health", pb.HealthRequest(), health)
    assert STALE_PHRASE in e.value.details()
    assert call_with(a.address, "Health", pb.HealthRequest(), health).state == "idle"
    with pytest.raises(grpc.RpcError) as e:
        call_with(a.address, "Health", pb.HealthRequest(), health)
    assert "replayed" in e.value.details()


def test_a_proof_from_before_a_restart_is_refused_and_clients_follow(tmp_path):
    first = start_daemon(tmp_path, "restarts")
    port = first.address.rsplit(":", 1)[1]
    peer = PeerHandle(first.address)
    stub = rpc.NodeStub(open_channel(first.address))
    try:
        before = identity(first.address)
        captured = make_proof(SECRET, "/clusterd.v1.Node/Health", before)
        assert call_with(first.address, "Health", pb.HealthRequest(), captured).state == "idle"
        assert peer.health().boot_id == before.boot_id
        fetch = pb.FetchFileRequest(model="org/none", path="x.json")
        with pytest.raises(grpc.RpcError) as e:
            list(stub.FetchFile(fetch, timeout=10))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND  # bound to the first start
        assert first.stop() == 0
        second = start_daemon(tmp_path, "restarts", extra=["--port", port])
        try:
            after = identity(second.address)
            assert after.node_id == before.node_id  # the same node, a new start of it
            assert after.boot_id != before.boot_id
            with pytest.raises(grpc.RpcError) as e:
                call_with(second.address, "Health", pb.HealthRequest(), captured)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert STALE_PHRASE in e.value.details()
            # Channels made before the restart learn the new boot and go on,
            # unary and streaming calls alike.
            assert peer.health().boot_id == after.boot_id
            with pytest.raises(grpc.RpcError) as e:
                list(stub.FetchFile(fetch, timeout=10))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            second.stop()
    finally:
        peer.close()
