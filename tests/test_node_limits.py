"""Every limit a node enforces comes from the plan it was loaded for
(ShardLimits): sessions, session ids, positions per activation, context,
max_tokens, numeric ranges, memory. Each is refused before anything is
computed, with the numbers, and the daemon goes on. Control calls answer at
once while a long prompt is being computed. Real daemons."""

import math
import threading
import time

import grpc
import pytest

from clusterd.coordinator.peers import PeerError, PeerHandle
from clusterd.wire import clusterd_pb2 as pb
from daemons import start_daemon

CONTEXT = 256


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("node"), "limited")
    yield d
    d.stop()


@pytest.fixture(scope="module")
def peer(node):
    p = PeerHandle(node.address)
    yield p
    p.close()


@pytest.fixture(scope="module")
def shard(peer, synthetic):
    """The whole tiny model on one node (first and last stage): 2 sessions of 256 tokens."""
    model = synthetic("deepseek_v3", "tiny")
    reply = peer.load_shard(pb.StageSpec(
        model_path=str(model), start_layer=0, end_layer=6, shard="tiny",
        limits=pb.ShardLimits(context=CONTEXT, max_sessions=2, prefill_step=64)))
    return reply.shard


def refused(fn, code) -> str:
    with pytest.raises(PeerError) as e:
        fn()
    assert e.value.code == code, str(e.value)
    return str(e.value)


def req(sid, **kw):
    kw.setdefault("max_tokens", 8)
    return pb.OpenSessionRequest(session_id=sid, shard="tiny", client_id="limits", **kw)


def test_the_shard_reports_its_limits(shard):
    assert shard.limits.context == CONTEXT and shard.limits.max_sessions == 2
    assert shard.limits.prefill_step == 64 and shard.kv_bytes_per_token > 0


def test_sessions_per_shard_are_capped_by_the_plan(peer, shard):
    peer.open_session(req("a"))
    peer.open_session(req("b"))
    msg = refused(lambda: peer.open_session(req("c")), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "2 sessions" in msg and "--sessions 2" in msg
    assert "already open" in refused(lambda: peer.open_session(req("a")),
                                     grpc.StatusCode.ALREADY_EXISTS)
    peer.end_session("a")
    peer.open_session(req("c"))  # room again
    for sid in ("b", "c"):
        peer.end_session(sid)


@pytest.mark.parametrize("sid", ["", "x" * 129, "y" * (1 << 20)])
def test_session_ids_are_bounded(peer, shard, sid):
    msg = refused(lambda: peer.open_session(req(sid)), grpc.StatusCode.INVALID_ARGUMENT)
    assert "1-128 characters" in msg and len(msg) < 400
    assert not peer.info().sessions


@pytest.mark.parametrize("field,value,text", [
    ("max_tokens", 0, "at least 1"),
    ("max_tokens", 2**32 - 1, f"at most {CONTEXT - 3} new tokens fit"),
    ("timeout_seconds", math.nan, "timeout_seconds"),
    ("timeout_seconds", math.inf, "timeout_seconds"),
    ("timeout_seconds", -1.0, "timeout_seconds"),
])
def test_session_numbers_are_range_checked(peer, shard, field, value, text):
    r = req("n", prompt=[5, 6, 7], **{field: value})
    assert text in refused(lambda: peer.open_session(r), grpc.StatusCode.INVALID_ARGUMENT)


@pytest.mark.parametrize("field,value", [
    ("temperature", math.nan), ("temperature", 1e30), ("temperature", -0.5),
    ("top_p", 2.0), ("top_p", -1.0), ("top_p", math.inf), ("min_p", math.nan),
    ("presence_penalty", 5.0), ("repetition_penalty", math.nan),
])
def test_sampling_numbers_are_range_checked(peer, shard, field, value):
    r = req("s", sampling=pb.SamplingParams(**{field: value}))
    assert field in refused(lambda: peer.open_session(r), grpc.StatusCode.INVALID_ARGUMENT)


def test_a_prompt_past_the_context_is_refused(peer, shard):
    r = req("long", prompt=list(range(2, 2 + CONTEXT + 1)), max_tokens=1)
    msg = refused(lambda: peer.open_session(r), grpc.StatusCode.INVALID_ARGUMENT)
    assert f"context of {CONTEXT}" in msg


def chunk(sid, ids, position=0, sample=False):
    return pb.Activation(shard="tiny", rows=[pb.Row(session_id=sid, position=position)],
                         width=len(ids), tokens=pb.TokenIds(ids=ids), sample=sample)


def test_activations_are_bounded_by_the_prefill_step_and_context(peer, shard):
    peer.open_session(req("f", prompt=[5] * 10))
    rss = peer.info().rss_bytes
    # 16,384 positions in one 64 KB request: refused before any compute.
    msg = refused(lambda: peer.forward(chunk("f", [5] * 16384)), grpc.StatusCode.INVALID_ARGUMENT)
    assert "64 positions" in msg
    msg = refused(lambda: peer.forward(chunk("f", [5] * 8, position=CONTEXT - 4)),
                  grpc.StatusCode.INVALID_ARGUMENT)
    assert f"context of {CONTEXT}" in msg
    assert peer.info().rss_bytes < rss + 50 * 2**20
    peer.end_session("f")


def test_a_shard_that_would_not_fit_is_refused_with_the_numbers(tmp_path, synthetic):
    model = synthetic("deepseek_v3", "tiny")
    d = start_daemon(tmp_path, "small-mem", extra=["--memory-limit", "16M"])
    p = PeerHandle(d.address)
    try:
        spec = pb.StageSpec(model_path=str(model), start_layer=0, end_layer=6, shard="t",
                            limits=pb.ShardLimits(context=256, max_sessions=1, prefill_step=64))
        p.load_shard(spec)  # these limits fit
        spec.limits.CopyFrom(pb.ShardLimits(context=1 << 20, max_sessions=64))
        msg = refused(lambda: p.load_shard(spec), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "KV for 64 sessions of 1048576 tokens" in msg and "GiB usable" in msg
        assert [s.shard for s in p.info().shards] == ["t"]  # refused before touching it
        assert p.health().state in ("idle", "ready")
    finally:
        p.close()
        d.stop()


def test_control_calls_answer_while_a_long_prompt_computes(tmp_path, synthetic):
    """A prompt of many chunks keeps the compute thread busy for seconds;
    Health, Info, OpenSession, EndSession and Unload of another shard answer
    at once all the while."""
    model = synthetic("deepseek_v3", "small")
    d = start_daemon(tmp_path, "busy")
    p = PeerHandle(d.address)
    try:
        for name in ("busy", "other"):
            p.load_shard(pb.StageSpec(model_path=str(model), start_layer=0, end_layer=4,
                                      shard=name, limits=pb.ShardLimits(
                                          context=4096, max_sessions=2, prefill_step=1024)))
        p.open_session(pb.OpenSessionRequest(session_id="long", shard="busy",
                                             next_address="127.0.0.1:1", client_id="c"))
        for pos in (0, 1024, 2048):  # queued: seconds of compute
            p.forward(pb.Activation(shard="busy", rows=[pb.Row(session_id="long", position=pos)],
                                    width=1024, tokens=pb.TokenIds(ids=[7] * 1024)))
        times = {}

        def timed(name, fn):
            t0 = time.monotonic()
            fn()
            times[name] = time.monotonic() - t0

        timed("health", p.health)
        timed("info", p.info)
        timed("open", lambda: p.open_session(pb.OpenSessionRequest(
            session_id="quick", shard="busy", next_address="127.0.0.1:1", client_id="c")))
        timed("end", lambda: p.end_session("quick"))
        timed("unload", lambda: p.unload("other"))
        busy_for = 0.0
        t0 = time.monotonic()
        while any(s.session_id == "long" and s.tokens < 3072 for s in p.info().sessions):
            time.sleep(0.1)
            busy_for = time.monotonic() - t0
        assert busy_for > 1.0, "the prompt was too short to show anything"
        assert max(times.values()) < busy_for / 2, times
    finally:
        p.close()
        d.stop()


def test_many_sessions_of_one_coordinator_share_one_event_stream(peer, tmp_path, synthetic):
    """70 sessions (what a busy coordinator opens) are one stream, not 70."""
    model = synthetic("deepseek_v3", "tiny")
    p = peer
    p.load_shard(pb.StageSpec(model_path=str(model), start_layer=0, end_layer=6, shard="many",
                              limits=pb.ShardLimits(context=64, max_sessions=70)))
    for i in range(70):
        p.open_session(pb.OpenSessionRequest(session_id=f"m{i}", shard="many", max_tokens=2,
                                             client_id="busy-coordinator", prompt=[5, 6]))
    got: list[pb.TokenEvent] = []
    done = threading.Event()

    def listen():
        for ev in p.events("busy-coordinator"):
            got.append(ev)
            if sum(e.done for e in got) == 70:
                done.set()
                return

    threading.Thread(target=listen, daemon=True).start()
    for i in range(70):
        p.forward(pb.Activation(shard="many", rows=[pb.Row(session_id=f"m{i}")], width=1,
                                tokens=pb.TokenIds(ids=[5 + i % 3]), sample=True))
    assert p.health().state == "ready"
    assert done.wait(60)
    assert {e.session_id for e in got} == {f"m{i}" for i in range(70)}
    p.close_events("busy-coordinator")
    p.unload("many")
