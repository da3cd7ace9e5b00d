"""Every RPC of a live daemon, fed malformed and hostile requests made from
the proto's descriptors (tests/proto_fuzz.py), with and without a loaded
shard: after each one the daemon answers Health within its deadline, and
every error has a status and a clear message (never UNKNOWN, never
Python's text)."""

import grpc
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from clusterd.coordinator.peers import PeerHandle
from clusterd.wire import clusterd_pb2 as pb
from clusterd.wire.channel import open_channel
from daemons import start_daemon
from proto_fuzz import Fuzz, loopback_addresses, stays_on_loopback

METHODS = list(pb.DESCRIPTOR.services_by_name["Node"].methods)
FUZZED = [m for m in METHODS if m.name != "Shutdown"]  # Shutdown has its own test below
SESSION = "fuzz-s"
EXAMPLES = 15  # per call and state: ~400 calls in all


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("fuzz"), "fuzzed", env={
        # Nothing leaves this machine: no hub, and every address fuzzed is loopback.
        "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_CACHE": str(tmp_path_factory.mktemp("fuzz-store"))})
    yield d
    d.stop()


@pytest.fixture(scope="module")
def link(daemon):
    channel = open_channel(daemon.address)
    peer = PeerHandle(daemon.address)
    yield channel, peer
    peer.close()
    channel.close()


def fuzz_for(daemon, model) -> Fuzz:
    port = int(daemon.address.rsplit(":", 1)[1])
    return Fuzz(ports=[port], special={
        "session_id": st.one_of(st.text(max_size=8), st.just(SESSION)),
        "model_path": st.one_of(st.just(str(model)), st.text(max_size=30),
                                st.sampled_from(["/", "/etc", "/" + "a" * 5000, "."])),
        "start_layer": st.one_of(st.integers(0, 7), st.just(2**32 - 1)),
        "end_layer": st.one_of(st.integers(0, 7), st.just(2**32 - 1)),
    })


def allowed_addresses(daemon) -> set[str]:
    port = int(daemon.address.rsplit(":", 1)[1])
    return set(loopback_addresses([port]))


def settle(peer, model, loaded: bool) -> None:
    """Put the node in the state under test (earlier examples may have changed it)."""
    info = peer.info()
    if not loaded:
        if info.has_shard:
            peer.unload()
        return
    if not any(x.shard == "fuzz" and (x.start_layer, x.end_layer) == (0, 6)
               for x in info.shards):
        peer.unload()  # an earlier example may have loaded other shards beside it
        peer.load_shard(pb.StageSpec(model_path=str(model), start_layer=0, end_layer=6,
                                     shard="fuzz"))
        info = peer.info()
    if SESSION not in [s.session_id for s in info.sessions]:
        peer.open_session(pb.OpenSessionRequest(session_id=SESSION, next_address="127.0.0.1:1",
                                                max_tokens=2, shard="fuzz", client_id="fuzz"))


def send(channel, method, body: bytes):
    """One call with raw bytes as its body: (status, details)."""
    path = f"/clusterd.v1.Node/{method.name}"
    reply = getattr(pb, method.output_type.name).FromString
    try:
        if method.server_streaming:
            call = channel.unary_stream(path, response_deserializer=reply)
            for _ in call(body, timeout=2):
                pass
        else:
            channel.unary_unary(path, response_deserializer=reply)(body, timeout=5)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def check_answer(method, code, details) -> None:
    assert code != grpc.StatusCode.UNKNOWN, (method.name, details)
    if code == grpc.StatusCode.OK:
        return
    assert details, (method.name, code)
    assert len(details) < 2000, (method.name, len(details))
    for python in ("Traceback", "Exception calling application", "Error(", "Exception("):
        assert python not in details, (method.name, details)


@pytest.mark.parametrize("loaded", [False, True], ids=["no-shard", "shard"])
@pytest.mark.parametrize("method", FUZZED, ids=[m.name for m in FUZZED])
def test_hostile_requests_to_every_rpc(daemon, model, link, method, loaded):
    channel, peer = link
    fuzz = fuzz_for(daemon, model)
    allowed = allowed_addresses(daemon)

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=fuzz.body(method.input_type))
    def one(body):
        assume(stays_on_loopback(method.input_type, body, allowed))
        settle(peer, model, loaded)
        code, details = send(channel, method, body)
        check_answer(method, code, details)
        assert peer.health(timeout=5).state in ("idle", "ready", "loading")

    one()


def test_shutdown_with_a_bad_body_is_refused_then_a_good_one_stops(tmp_path):
    d = start_daemon(tmp_path, "fuzz-stop")
    channel = open_channel(d.address)
    try:
        shutdown = next(m for m in METHODS if m.name == "Shutdown")
        for body in (b"\xff\xff\xff", b"\x0a\xff", b"\x08"):
            code, details = send(channel, shutdown, body)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in details
        peer = PeerHandle(d.address)
        assert peer.health().state == "idle"
        peer.shutdown()
        peer.close()
        assert d.proc.wait(15) == 0
    finally:
        channel.close()
        d.stop()
