"""Bad requests get clear errors and the daemon stays up (real daemons)."""

import json
import shutil
import socket
import threading
import time

import grpc
import pytest

from clusterd.coordinator.peers import PeerError, PeerHandle
from clusterd.wire import clusterd_pb2 as pb
from daemons import start_daemon


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("node"), "solo")
    yield d
    d.stop()


def stage(path, start, end, **limits):
    return pb.StageSpec(model_path=str(path), start_layer=start, end_layer=end,
                        limits=pb.ShardLimits(**limits) if limits else None)


def chunk(shard, sid, position=0, tokens=None, hidden=None, width=None):
    """A prompt chunk of one session, as the coordinator sends it."""
    act = pb.Activation(shard=shard, rows=[pb.Row(session_id=sid, position=position)])
    if tokens is not None:
        act.tokens.ids[:] = tokens
        act.width = width or len(tokens)
    if hidden is not None:
        act.hidden.CopyFrom(hidden)
        act.width = width or (hidden.shape[1] if len(hidden.shape) > 1 else 1)
    return act


def open_req(shard, sid, **kw):
    return pb.OpenSessionRequest(session_id=sid, shard=shard, next_address="127.0.0.1:1",
                                 max_tokens=kw.pop("max_tokens", 8), client_id="test", **kw)


def refused(fn, code: grpc.StatusCode) -> str:
    with pytest.raises(PeerError) as e:
        fn()
    assert e.value.code == code, str(e.value)
    return str(e.value)


def assert_alive(peer):
    assert peer.health().state in ("idle", "ready")


def test_missing_model_directory(peer, tmp_path):
    msg = refused(lambda: peer.load_shard(stage(tmp_path / "nope", 0, 1)),
                  grpc.StatusCode.INVALID_ARGUMENT)
    assert "does not exist" in msg and "nope" in msg
    assert_alive(peer)


def test_layer_range_outside_model(peer, model):
    msg = refused(lambda: peer.load_shard(stage(model, 2, 99)), grpc.StatusCode.INVALID_ARGUMENT)
    assert "[2, 99)" in msg and "outside" in msg
    refused(lambda: peer.load_shard(stage(model, 3, 3)), grpc.StatusCode.INVALID_ARGUMENT)
    assert_alive(peer)


def test_unknown_session_and_shard(peer, model):
    shard = peer.load_shard(stage(model, 0, 2)).shard.shard
    msg = refused(lambda: peer.forward(chunk(shard, "ghost", tokens=[1])),
                  grpc.StatusCode.NOT_FOUND)
    assert "ghost" in msg
    msg = refused(lambda: peer.forward(chunk("no-such-model", "ghost", tokens=[1])),
                  grpc.StatusCode.FAILED_PRECONDITION)
    assert "no shard 'no-such-model'" in msg and shard[:20] in msg
    refused(lambda: peer.open_session(open_req("no-such-model", "x")),
            grpc.StatusCode.FAILED_PRECONDITION)
    assert_alive(peer)


def test_tensor_length_must_match_shape_and_dtype(peer, model):
    shard = peer.load_shard(stage(model, 2, 4)).shard.shard  # a middle stage: hidden states
    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    peer.open_session(open_req(shard, "s1"))
    short = pb.Tensor(data=b"\0" * (4 * hidden - 4), dtype="float32", shape=[1, 1, hidden])
    msg = refused(lambda: peer.forward(chunk(shard, "s1", hidden=short)),
                  grpc.StatusCode.INVALID_ARGUMENT)
    assert f"needs {4 * hidden}" in msg
    wrong_width = pb.Tensor(data=b"\0" * 4 * 7, dtype="float32", shape=[1, 1, 7])
    assert f"expected [1, 1, {hidden}]" in refused(
        lambda: peer.forward(chunk(shard, "s1", hidden=wrong_width)),
        grpc.StatusCode.INVALID_ARGUMENT)
    odd_dtype = pb.Tensor(data=b"\0" * 8 * hidden, dtype="complex64", shape=[1, 1, hidden])
    assert "dtype" in refused(
        lambda: peer.forward(chunk(shard, "s1", hidden=odd_dtype)),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert "hidden state" in refused(lambda: peer.forward(chunk(shard, "s1", tokens=[3])),
                                     grpc.StatusCode.INVALID_ARGUMENT)
    peer.end_session("s1")
    assert_alive(peer)


def test_token_ids_outside_vocabulary(peer, model):
    shard = peer.load_shard(stage(model, 0, 2)).shard.shard
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    peer.open_session(open_req(shard, "s2"))
    msg = refused(lambda: peer.forward(chunk(shard, "s2", tokens=[vocab])),
                  grpc.StatusCode.INVALID_ARGUMENT)
    assert "outside the vocabulary" in msg
    msg = refused(lambda: peer.open_session(open_req(shard, "s3", prompt=[1, vocab])),
                  grpc.StatusCode.INVALID_ARGUMENT)
    assert "outside the vocabulary" in msg
    peer.end_session("s2")


def test_second_load_while_loading_is_refused(peer, synthetic):
    big = synthetic("deepseek_v3", "small")
    errors = []

    def load(start):
        try:
            peer.load_shard(stage(big, start, start + 4))
        except PeerError as e:
            errors.append(e)

    # Overlap is certain only while the first load runs; retry a few times,
    # each time with another range (the shard already held loads at once).
    for attempt in range(6):
        errors.clear()
        first = threading.Thread(target=load, args=(4 * (attempt % 2),))
        first.start()
        while peer.health().state != "loading" and first.is_alive():
            time.sleep(0.001)
        load(8)
        first.join()
        if errors:
            break
    assert errors, "no load ever overlapped another"
    assert errors[0].code == grpc.StatusCode.FAILED_PRECONDITION
    assert "already in progress" in str(errors[0])
    assert_alive(peer)


def test_corrupt_weight_file_fails_cleanly_and_node_stays_usable(peer, model, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(model, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    first_file = index["weight_map"]["model.embed_tokens.weight"]
    data = (bad / first_file).read_bytes()
    (bad / first_file).write_bytes(data[: len(data) // 2])  # truncated
    before = [s.shard for s in peer.info().shards]
    msg = refused(lambda: peer.load_shard(stage(bad, 0, 2)), grpc.StatusCode.INVALID_ARGUMENT)
    assert first_file in msg or "corrupt" in msg
    # Refused before what was held was touched: it is all still there.
    assert [s.shard for s in peer.info().shards] == before
    assert peer.load_shard(stage(model, 0, 2)).shard.end_layer == 2


def test_weight_file_outside_model_folder_is_refused(peer, model, tmp_path):
    evil = tmp_path / "evil"
    shutil.copytree(model, evil)
    index = json.loads((evil / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.embed_tokens.weight"] = "../corrupt/x.safetensors"
    (evil / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = refused(lambda: peer.load_shard(stage(evil, 0, 2)), grpc.StatusCode.INVALID_ARGUMENT)
    assert "outside the model directory" in msg
    assert_alive(peer)


def test_memory_limit_is_enforced(tmp_path, model):
    d = start_daemon(tmp_path, "small-node", extra=["--memory-limit", "64K"])
    try:
        p = PeerHandle(d.address)
        assert p.info().usable_memory_bytes == 64 * 1024
        with pytest.raises(PeerError) as e:
            p.load_shard(stage(model, 0, 6))
        # Refused on the weights alone, or on weights + KV + workspace: either names the room.
        assert e.value.code in (grpc.StatusCode.INVALID_ARGUMENT,
                                grpc.StatusCode.RESOURCE_EXHAUSTED), str(e.value)
        assert "usable" in str(e.value)
        assert_alive(p)
        p.close()
    finally:
        d.stop()


def test_sigterm_releases_port_quickly(tmp_path):
    d = start_daemon(tmp_path, "short-lived")
    port = int(d.address.rsplit(":", 1)[1])
    t0 = time.monotonic()
    assert d.stop(timeout=10) == 0
    assert time.monotonic() - t0 < 5
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_clusterd_down_stops_this_macs_daemons(tmp_path):
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    env = {"CLUSTERD_HOME": str(home)}
    nodes = [start_daemon(tmp_path, f"down{i}", env=env) for i in range(2)]
    out = subprocess.run([sys.executable, "-m", "clusterd", "down"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    for n in nodes:
        assert n.proc.wait(10) == 0
        assert f"stopped the node at 127.0.0.1:{n.address.rsplit(':', 1)[1]}" in out.stdout
    again = subprocess.run([sys.executable, "-m", "clusterd", "down"], capture_output=True,
                           text=True, timeout=60, env={**os.environ, **env})
    assert "No clusterd daemon is running" in again.stdout


def test_loading_the_same_shard_again_keeps_it_and_its_sessions(peer, model):
    first = peer.load_shard(stage(model, 0, 2))
    peer.open_session(open_req(first.shard.shard, "kept"))
    again = peer.load_shard(stage(model, 0, 2))
    assert again.shard.shard == first.shard.shard and again.shard.end_layer == 2
    assert [s.session_id for s in peer.info().sessions] == ["kept"]
    other = peer.load_shard(stage(model, 0, 3))  # a different range is a real reload
    assert other.shard.end_layer == 3 and not peer.info().sessions
