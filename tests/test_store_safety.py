"""The model store against planted symlinks (real daemons): a link flipped
between a file inside and one outside never serves the outside one, a
folder link in a snapshot never redirects writes, one bad entry does not
hide the others, and long names get short, clear refusals."""

import os
import threading

import grpc
import pytest

from clusterd.coordinator.peers import PeerHandle
from clusterd.models.store import ModelRef, ModelStore, StoreError
from clusterd.wire import clusterd_pb2 as pb
from clusterd.wire import clusterd_pb2_grpc as rpc
from clusterd.wire.channel import open_channel
from daemons import start_daemon

REPO = "test-org/planted"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NO_HUB = "http://127.0.0.1:9"
INSIDE = b'{"inside": true}'
OUTSIDE = b"OUTSIDE THE STORE: must never be served"


def store_node(tmp, name):
    store = ModelStore(tmp / f"store-{name}")
    d = start_daemon(tmp, name, env={"HF_HUB_CACHE": str(store.root), "HF_ENDPOINT": NO_HUB,
                                     "HF_HUB_OFFLINE": "1"})
    return d, store


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planted")
    folder = tmp / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_bytes(INSIDE)
    (folder / "flip.json").write_bytes(INSIDE)
    (folder / "sub" / "tokenizer.json").write_bytes(b"{}")
    d, store = store_node(tmp, "planted")
    snap = store.import_folder(REPO, folder, COMMIT)
    secret = tmp / "outside.json"
    secret.write_bytes(OUTSIDE)
    yield d, store, snap, secret
    d.stop()


def fetch(stub, path: str):
    try:
        return b"".join(c.data for c in stub.FetchFile(
            pb.FetchFileRequest(model=REPO, path=path), timeout=10)), None
    except grpc.RpcError as e:
        return None, e


def test_a_flipping_symlink_never_serves_the_outside_file(planted):
    d, store, snap, secret = planted
    link = snap / "flip.json"
    inside_target = os.readlink(link)
    stop = threading.Event()

    def flip():
        n = 0
        while not stop.is_set():
            tmp = snap / f".flip.{n % 2}"
            os.symlink(str(secret) if n % 2 else inside_target, tmp)
            os.replace(tmp, link)
            n += 1
        os.symlink(inside_target, snap / ".flip.end")
        os.replace(snap / ".flip.end", link)

    flipper = threading.Thread(target=flip)
    flipper.start()
    stub = rpc.NodeStub(open_channel(d.address))
    seen = {"inside": 0, "refused": 0}
    try:
        for _ in range(3000):
            data, err = fetch(stub, "flip.json")
            assert data != OUTSIDE
            if err is None:
                assert data == INSIDE
                seen["inside"] += 1
            else:
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
                assert str(secret) not in err.details()
                seen["refused"] += 1
    finally:
        stop.set()
        flipper.join()
    assert seen["inside"] and seen["refused"]  # the race was really run


def test_one_bad_entry_is_skipped_not_fatal(planted):
    d, store, snap, secret = planted
    os.symlink(str(secret), snap / "leak.json")
    os.symlink("../../blobs/nothing-there", snap / "dangling.json")
    os.symlink("loop.json", snap / "loop.json")
    try:
        peer = PeerHandle(d.address)
        try:
            listed = {e.path for e in peer.list_files(REPO, with_sha256=True)}
            assert {"config.json", "sub/tokenizer.json"} <= listed
            assert not listed & {"leak.json", "dangling.json", "loop.json"}
            asked = {e.path for e in peer.list_files(REPO, ["leak.json", "config.json"])}
            assert asked == {"config.json"}
        finally:
            peer.close()
        assert "leak.json" in d.log() and "skipped" in d.log()
    finally:
        for name in ("leak.json", "dangling.json", "loop.json"):
            (snap / name).unlink()


def test_a_planted_folder_link_cannot_redirect_prepare_writes(planted, tmp_path):
    holder = planted[0]
    d, store = store_node(tmp_path, "victim")
    try:
        outside = tmp_path / "outside-dir"
        outside.mkdir()
        repo = store.repo_dir(REPO)
        (repo / "snapshots" / COMMIT).mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
        os.symlink(outside, repo / "snapshots" / COMMIT / "sub")
        peer = PeerHandle(d.address)
        try:
            progress = list(peer.prepare_files(pb.PrepareFilesRequest(
                model=REPO, paths=["sub/tokenizer.json"], peer_addresses=[holder.address])))
        finally:
            peer.close()
        errors = [p.error for p in progress if p.error]
        assert errors and not any(p.finished for p in progress)
        assert "sub/tokenizer.json" in errors[0]
        assert list(outside.iterdir()) == []  # nothing written through the link
        with pytest.raises(StoreError):  # and the link is refused, not followed
            store.file(ModelRef(REPO), "sub/tokenizer.json")
    finally:
        d.stop()


@pytest.mark.parametrize("model,path", [
    ("a" * 10_000, "config.json"),
    (REPO, "x" * 300),
    (REPO, "a/" * 3000 + "b"),
    (REPO, "../" * 50 + "etc/passwd"),
])
def test_long_or_hostile_names_get_short_clear_refusals(planted, model, path):
    d, store, snap, secret = planted
    stub = rpc.NodeStub(open_channel(d.address))
    for call in (lambda: stub.ListFiles(pb.ListFilesRequest(model=model, paths=[path]),
                                        timeout=10),
                 lambda: list(stub.FetchFile(pb.FetchFileRequest(model=model, path=path),
                                             timeout=10))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.PERMISSION_DENIED)
        details = e.value.details()
        assert len(details) < 300 and str(store.root) not in details
    assert rpc.NodeStub(open_channel(d.address)).Health(pb.HealthRequest(), timeout=5).state
