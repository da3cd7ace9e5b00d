"""A node under hostile and heavy callers (real daemons): refusals cost no
worker thread and no body, calls are bounded per address, the refusal log
cannot be flooded, oversize messages are refused, keepalive holds."""

import threading
import time

import grpc
import psutil
import pytest

from clusterd.coordinator.peers import PeerError, PeerHandle
from clusterd.wire import clusterd_pb2 as pb
from clusterd.wire.channel import MAX_MESSAGE_BYTES, open_channel
from daemons import start_daemon

HEALTH = "/clusterd.v1.Node/Health"
LOAD = "/clusterd.v1.Node/LoadShard"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("limits"), "limits",
                     extra=["--max-calls-per-peer", "8"])
    yield d
    d.stop()


def rss(node) -> int:
    return psutil.Process(node.pid).memory_info().rss


class Held:
    """Request iterators that send nothing until released: a caller that
    sends headers and never its body."""

    def __init__(self):
        self.release = threading.Event()

    def stream(self):
        self.release.wait(60)
        yield from ()


def raw_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])


def test_headers_only_strangers_hold_no_thread(node):
    held = Held()
    channel = raw_channel(node.address)
    call = channel.stream_unary(HEALTH)
    calls = [call.future(held.stream(), timeout=30) for _ in range(96)]
    try:
        for c in calls:  # every one refused without its body ever coming
            assert c.exception(timeout=20).code() == grpc.StatusCode.UNAUTHENTICATED
        peer = PeerHandle(node.address)
        try:
            t0 = time.monotonic()
            assert peer.health(timeout=5).state == "idle"
            assert time.monotonic() - t0 < 5
        finally:
            peer.close()
    finally:
        held.release.set()
        channel.close()


def test_unauthenticated_bodies_are_never_read(node):
    body = b"\x01" * (60 * 2**20)  # under the message cap: only the refusal stops it
    before = rss(node)
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss(node))

    sampler = threading.Thread(target=sample)
    sampler.start()
    channels = [raw_channel(node.address) for _ in range(8)]
    try:
        futures = [c.unary_unary(LOAD).future(body, timeout=60) for c in channels]
        for f in futures:
            assert f.exception(timeout=60).code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        done.set()
        sampler.join()
        for c in channels:
            c.close()
    # 8 x 60 MiB read would be ~480 MiB; a refusal from the headers reads
    # at most what is in flight in the connection window.
    assert peak[0] - before < 100 * 2**20, (before, peak[0])


def test_oversize_messages_are_refused_even_with_the_secret(node):
    channel = open_channel(node.address)
    try:
        call = channel.unary_unary(LOAD, response_deserializer=pb.LoadShardReply.FromString)
        with pytest.raises(grpc.RpcError) as e:
            call(b"\x00" * (MAX_MESSAGE_BYTES + 1), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        channel.close()
    peer = PeerHandle(node.address)
    try:
        assert peer.health().state == "idle"
    finally:
        peer.close()


def test_calls_per_address_are_bounded(node):
    held = Held()
    channel = open_channel(node.address)  # signed calls, whose bodies never come
    call = channel.stream_unary(HEALTH, response_deserializer=pb.HealthReply.FromString)
    holding = [call.future(held.stream(), timeout=60) for _ in range(8)]
    peer = PeerHandle(node.address)
    try:
        deadline = time.monotonic() + 60  # a loaded machine may take its time to open them
        message = ""
        while time.monotonic() < deadline:  # until the held calls have all arrived
            try:
                peer.health()
            except PeerError as e:
                assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                message = str(e)
                break
            time.sleep(0.1)
        assert "at most 8 per address" in message and "busy" in message
        held.release.set()
        for f in holding:  # they end, and say why: no request came
            assert f.exception(timeout=10).code() == grpc.StatusCode.INVALID_ARGUMENT
        assert peer.health().state == "idle"  # the slots are free again
    finally:
        held.release.set()
        peer.close()
        channel.close()


def test_refusal_log_is_limited_per_address(node):
    before = node.log().count("refused /clusterd.v1.Node/Info")
    for _ in range(30):  # each on a new connection, so a new source port
        channel = raw_channel(node.address)
        with pytest.raises(grpc.RpcError):
            channel.unary_unary("/clusterd.v1.Node/Info")(b"", timeout=5)
        channel.close()
    time.sleep(0.5)
    assert node.log().count("refused /clusterd.v1.Node/Info") - before <= 1


def test_an_idle_stream_outlives_many_keepalive_pings(tmp_path, synthetic, monkeypatch):
    """Clients and server agree: a client's pings at its interval are
    welcome. Intervals scaled down from 10 s to 1 s on both sides; a node
    left at 10 s shows the old clash (pings more often than the node allows
    end the connection, and the stream with it)."""
    monkeypatch.setenv("CLUSTERD_KEEPALIVE_S", "1")
    model = synthetic("deepseek_v3", "tiny")
    agreeing = start_daemon(tmp_path, "idle", env={"CLUSTERD_KEEPALIVE_S": "1"})
    slower = start_daemon(tmp_path, "idle-10s", env={"CLUSTERD_KEEPALIVE_S": "10"})
    try:
        alive, failed, held = _idle_stream(agreeing, model, "idle-ok", 20.0)  # 20 pings
        assert alive and not failed
        assert "idle-ok" in held  # the stream kept its session
        alive, failed, held = _idle_stream(slower, model, "clash", 15.0)
        assert not alive and failed and failed[0].code() == grpc.StatusCode.UNAVAILABLE
    finally:
        agreeing.stop()
        slower.stop()


def _idle_stream(node, model, session: str, seconds: float):
    """Hold an Events stream with no traffic for `seconds`: (still open, the
    error that ended it if any, the node's sessions at the end: a closed
    stream ends its coordinator's sessions)."""
    peer = PeerHandle(node.address)
    channel = open_channel(node.address)
    try:
        shard = peer.load_shard(pb.StageSpec(model_path=str(model), start_layer=0,
                                             end_layer=2)).shard.shard
        peer.open_session(pb.OpenSessionRequest(session_id=session, next_address="127.0.0.1:1",
                                                shard=shard, client_id=session))
        call = channel.unary_stream("/clusterd.v1.Node/Events",
                                    request_serializer=pb.EventsRequest.SerializeToString,
                                    response_deserializer=pb.TokenEvent.FromString)
        stream = call(pb.EventsRequest(client_id=session))
        failed: list = []
        reader = threading.Thread(target=lambda: failed.extend(_drain(stream)))
        reader.start()
        reader.join(seconds)
        alive = reader.is_alive()
        held = [s.session_id for s in peer.info().sessions]
        stream.cancel()
        reader.join(5)
        return alive, failed, held
    finally:
        channel.close()
        peer.close()


def _drain(stream) -> list:
    try:
        for _ in stream:
            pass
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            return [e]
    return []
