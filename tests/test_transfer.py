"""Weight files node to node, between real daemons over real gRPC: a node gets
exactly its stage's files from another, byte-identical; an interrupted
transfer resumes; corruption on the serving side is caught by the receiver;
paths outside the store and callers without the secret are refused."""

import json
import os
import threading
import time

import grpc
import pytest

from clusterd.coordinator.cluster import connect, load_ring
from clusterd.coordinator.pipeline import GenerationStats, Pipeline, Sampling
from clusterd.coordinator.peers import PeerError, PeerHandle
from clusterd.models.files import meta_files, stage_files
from clusterd.models.store import ModelRef, ModelStore
from clusterd.node.transfer import fetch_from_peer, list_offers
from clusterd.security import ClientSecurity, TlsFiles
from clusterd.wire import clusterd_pb2 as pb
from clusterd.wire import clusterd_pb2_grpc as rpc
from clusterd.wire.channel import open_channel
from daemons import start_daemon
from hubstub import sha, write_safetensors
from reference import mlx_lm_greedy

REPO = "test-org/tiny-r1"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NO_HUB = "http://127.0.0.1:9"  # nothing listens: a node must never reach a real hub here


def node_with_store(tmp, name):
    store = ModelStore(tmp / f"store-{name}")
    d = start_daemon(tmp, name, env={"HF_HUB_CACHE": str(store.root), "HF_ENDPOINT": NO_HUB})
    return d, store


@pytest.fixture(scope="module")
def model(synthetic):
    return synthetic("deepseek_v3", "tiny")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, model):
    """holder (the whole model in its store), empty, and spare (a second holder)."""
    tmp = tmp_path_factory.mktemp("transfer")
    started = []
    try:
        out = {}
        for name in ("holder", "empty", "spare"):
            d, store = node_with_store(tmp, name)
            started.append(d)
            out[name] = (d, store)
        out["holder"][1].import_folder(REPO, model, COMMIT)
        out["spare"][1].import_folder(REPO, model, COMMIT)
        yield out
    finally:
        for d in started:
            d.stop()


@pytest.fixture
def fresh(tmp_path):
    """A node with an empty store, for one test."""
    d, store = node_with_store(tmp_path, "fresh")
    yield d, store
    d.stop()


def prepare(address, paths, peers, allow_hub=False):
    p = PeerHandle(address)
    try:
        return list(p.prepare_files(pb.PrepareFilesRequest(
            model=REPO, paths=paths, peer_addresses=peers, allow_hub=allow_hub)))
    finally:
        p.close()


def split_files(model, start, end):
    return stage_files(model, start, end, meta_files(p.name for p in model.iterdir()))


def test_second_node_gets_exactly_its_stage_files_and_runs(nodes, model):
    (holder, _), (empty, estore) = nodes["holder"], nodes["empty"]
    n = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    want = split_files(model, 3, n)
    assert len(want) < len(list(model.iterdir())), "the stage must not need every file"
    events = prepare(empty.address, want, [holder.address])
    assert events[-1].finished and not events[-1].error
    assert {e.source for e in events if e.path} == {f"peer {holder.address}"}
    got = sorted(estore.files(ModelRef(REPO)))
    assert got == want, "exactly the stage's files, nothing more"
    for name in want:
        assert sha(estore.file(ModelRef(REPO), name)) == sha(model / name)
    # Both nodes load their stage by repository id and generate what mlx-lm generates.
    ring = connect([holder.address, empty.address])
    stages = load_ring(None, ring, [(0, 3), (3, n)], model_id=REPO)
    prompt = [5, 17, 300]
    tokens = list(Pipeline(stages, prefill_step_size=16).generate(
        prompt, 12, Sampling(temperature=0.0), stop_ids=[1], stats=GenerationStats()))
    assert tokens == mlx_lm_greedy(model, prompt, 12, 16, stop_ids=(1,))
    for node in ring:
        node.peer.unload()
        node.peer.close()

    again = prepare(empty.address, want, [holder.address])
    assert again[-1].finished
    assert {e.source for e in again if e.path} == {"local"}, "nothing is transferred twice"


def test_load_by_id_needs_the_model_in_the_store(fresh):
    d, _ = fresh
    p = PeerHandle(d.address)
    with pytest.raises(PeerError) as e:
        p.load_shard(pb.StageSpec(model_id=REPO, start_layer=0, end_layer=1))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "clusterd pull" in str(e.value) and REPO in str(e.value)
    p.close()


def test_several_holders_share_the_load(nodes, fresh, model):
    d, store = fresh
    want = split_files(model, 0, 6)
    holders = [nodes["holder"][0].address, nodes["spare"][0].address]
    events = prepare(d.address, want, holders)
    assert events[-1].finished, events[-1].error
    final = {}
    for e in events:
        if e.path and e.done_bytes == e.total_bytes:
            final[e.path] = e.source
    used = set(final.values())
    assert used == {f"peer {a}" for a in holders}, f"one holder did all the work: {used}"


def test_interrupted_transfer_resumes(nodes, tmp_path, model):
    holder, _ = nodes["holder"]
    store = ModelStore(tmp_path / "store")
    ref = ModelRef(REPO)
    channel = open_channel(holder.address)
    stub = rpc.NodeStub(channel)
    name = max((p.name for p in model.glob("*.safetensors")), key=lambda n: (model / n).stat().st_size)
    [offer] = list_offers(stub, ref, [name])
    assert offer.sha256 == sha(model / name)
    commit = store.writable_snapshot(ref, COMMIT)

    class Stop(Exception):
        pass

    seen = []

    def stop_midway(n):
        seen.append(n)
        if sum(seen) > offer.size // 2:
            raise Stop()

    with pytest.raises(Stop):
        fetch_from_peer(store, ref, commit, stub, holder.address, offer, stop_midway,
                        chunk_bytes=64 * 1024)
    partial = store.partial_path(REPO, offer.sha256)
    kept = partial.stat().st_size
    assert offer.size // 2 < kept < offer.size
    assert store.file(ref, name) is None, "a partial file is never in the snapshot"

    resumed = []
    fetch_from_peer(store, ref, commit, stub, holder.address, offer, resumed.append,
                    chunk_bytes=64 * 1024)
    assert resumed[0] == kept, "starts from what it already had"
    assert sum(resumed[1:]) == offer.size - kept, "and asks only for the rest"
    assert sha(store.file(ref, name)) == offer.sha256
    assert not partial.exists()
    channel.close()


def test_bad_partial_is_discarded_and_fetched_whole(nodes, fresh, model):
    d, store = fresh
    name = "model-00002-of-00006.safetensors"
    digest = sha(model / name)
    partial = store.partial_path(REPO, digest)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\x00" * 1000)  # left by a crash, with wrong bytes
    events = prepare(d.address, [name, "config.json"], [nodes["holder"][0].address])
    assert events[-1].finished, events[-1].error
    assert sha(store.file(ModelRef(REPO), name)) == digest


def test_corrupt_copy_on_the_serving_node_is_caught(nodes, fresh, model):
    (holder, hstore), (spare, _) = nodes["holder"], nodes["spare"]
    d, store = fresh
    name = "model-00003-of-00006.safetensors"
    blob = hstore.file(ModelRef(REPO), name).resolve()
    original = blob.read_bytes()
    bad = bytearray(original)
    bad[len(bad) // 2] ^= 0xFF  # same size, valid header: only the hash can tell
    blob.write_bytes(bytes(bad))
    try:
        events = prepare(d.address, [name], [holder.address])
        assert not events[-1].finished
        err = events[-1].error
        assert name in err and "corrupt" in err and holder.address in err
        assert store.file(ModelRef(REPO), name) is None, "nothing unverified is installed"
        assert not list(store.repo_dir(REPO).glob("blobs/*.incomplete"))
        # With a good copy elsewhere the receiver gets that one instead.
        events = prepare(d.address, [name], [holder.address, spare.address])
        assert events[-1].finished, events[-1].error
        assert sha(store.file(ModelRef(REPO), name)) == sha(model / name)
    finally:
        blob.write_bytes(original)


def test_truncated_file_is_never_loaded_and_is_fetched_again(nodes, fresh, model):
    d, store = fresh
    want = split_files(model, 0, 2)
    assert prepare(d.address, want, [nodes["holder"][0].address])[-1].finished
    victim = [w for w in want if w.endswith(".safetensors")][0]
    blob = store.file(ModelRef(REPO), victim).resolve()
    blob.write_bytes(blob.read_bytes()[:-100])
    p = PeerHandle(d.address)
    with pytest.raises(PeerError) as e:
        p.load_shard(pb.StageSpec(model_id=REPO, start_layer=0, end_layer=2))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert victim in str(e.value) and "truncated" in str(e.value)
    events = prepare(d.address, want, [nodes["holder"][0].address])
    assert events[-1].finished
    assert [e.source for e in events if e.path == victim][-1].startswith("peer ")
    assert p.load_shard(pb.StageSpec(model_id=REPO, start_layer=0, end_layer=2)).shard.end_layer == 2
    p.close()


@pytest.mark.parametrize("path", ["../../../../etc/hostname", "/etc/hostname", "a/../../x",
                                  "config.json/../../refs/main"])
def test_paths_outside_the_model_are_refused(nodes, path):
    holder, _ = nodes["holder"]
    stub = rpc.NodeStub(open_channel(holder.address))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.FetchFile(pb.FetchFileRequest(model=REPO, path=path), timeout=10))
    assert e.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(grpc.RpcError):
        stub.ListFiles(pb.ListFilesRequest(model=REPO, paths=[path]), timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.FetchFile(pb.FetchFileRequest(model="../../etc", path="hostname"), timeout=10))
    assert e.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)


def test_symlink_out_of_the_store_is_not_served(nodes):
    holder, hstore = nodes["holder"]
    planted = hstore.snapshot(ModelRef(REPO)) / "planted.json"
    os.symlink("/etc/hostname", planted)
    try:
        stub = rpc.NodeStub(open_channel(holder.address))
        with pytest.raises(grpc.RpcError) as e:
            list(stub.FetchFile(pb.FetchFileRequest(model=REPO, path="planted.json"), timeout=10))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "outside the model store" in e.value.details()
    finally:
        planted.unlink()


def test_without_the_secret_nothing_is_served(nodes):
    holder, _ = nodes["holder"]
    wrong = ClientSecurity("not-the-cluster-secret-0123456789", TlsFiles())
    channel = open_channel(holder.address, security=wrong)
    stub = rpc.NodeStub(channel)
    received = []
    with pytest.raises(grpc.RpcError) as e:
        for chunk in stub.FetchFile(pb.FetchFileRequest(model=REPO, path="config.json"),
                                    timeout=10):
            received.append(chunk)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert received == []
    with pytest.raises(grpc.RpcError) as e:
        stub.ListFiles(pb.ListFilesRequest(model=REPO), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()


def test_missing_files_are_named_with_their_node(nodes, fresh):
    d, _ = fresh
    events = prepare(d.address, ["config.json", "model-00009-of-00009.safetensors"],
                     [nodes["holder"][0].address])
    err = events[-1].error
    assert not events[-1].finished
    assert "fresh" in err and "model-00009-of-00009.safetensors" in err
    assert "hub was not allowed" in err


def test_two_fetchers_sharing_one_store_fetch_a_file_once(nodes, tmp_path, model):
    """A coordinator and a node on one Mac share the Hugging Face cache: the
    second fetcher waits for the first and links its file instead of writing
    the same partial file at the same time."""
    holder, _ = nodes["holder"]
    store = ModelStore(tmp_path / "shared")
    ref = ModelRef(REPO)
    channel = open_channel(holder.address)
    stub = rpc.NodeStub(channel)
    name = "model-00001-of-00006.safetensors"
    [offer] = list_offers(stub, ref, [name])
    commit = store.writable_snapshot(ref, COMMIT)
    first_chunk, release = threading.Event(), threading.Event()
    streamed = {"a": [], "b": []}

    def slow(n):  # the first fetcher holds its lock until the second is waiting
        streamed["a"].append(n)
        first_chunk.set()
        release.wait(10)

    a = threading.Thread(target=fetch_from_peer, args=(store, ref, commit, stub, holder.address,
                                                       offer, slow), kwargs={"chunk_bytes": 65536})
    a.start()
    assert first_chunk.wait(10)
    b = threading.Thread(target=fetch_from_peer, args=(store, ref, commit, stub, holder.address,
                                                       offer, streamed["b"].append))
    b.start()
    b.join(0.5)
    assert b.is_alive(), "the second fetcher must wait, not write the same partial"
    release.set()
    a.join(20)
    b.join(20)
    assert streamed["b"] == [offer.size], "the second one found the file complete"
    assert sha(store.file(ref, name)) == offer.sha256
    channel.close()


def test_transfer_cut_by_a_dying_node_resumes_from_another(tmp_path):
    """Daemons only: the serving node is killed mid-file; the receiving node
    keeps its partial file and later takes the rest, and only the rest, from
    another node holding the same file."""
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text("{}")
    name = "model-00001-of-00001.safetensors"
    write_safetensors(big / name, 96 * 2**20)
    digest = sha(big / name)
    (a, astore), (b, bstore) = node_with_store(tmp_path, "a"), node_with_store(tmp_path, "b")
    r, rstore = node_with_store(tmp_path, "r")
    try:
        astore.import_folder(REPO, big, COMMIT)
        bstore.import_folder(REPO, big, COMMIT)
        partial = rstore.partial_path(REPO, digest)
        result = []
        t = threading.Thread(target=lambda: result.append(prepare(r.address, [name],
                                                                  [a.address])))
        t.start()
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size >= 8 * 2**20):
            assert time.monotonic() < deadline and t.is_alive(), "no transfer"
            time.sleep(0.002)
        a.proc.kill()  # the serving Mac loses power
        a.proc.wait()
        t.join(60)
        assert not result[0][-1].finished and name in result[0][-1].error
        kept = partial.stat().st_size
        assert 0 < kept < 96 * 2**20
        events = prepare(r.address, [name], [b.address])
        assert events[-1].finished, events[-1].error
        assert f"resuming {name} from {b.address} at byte {kept}" in r.log()
        assert sha(rstore.file(ModelRef(REPO), name)) == digest
    finally:
        for d in (a, b, r):
            d.stop()
