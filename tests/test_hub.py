"""Fetching from the hub, against a local stand-in for its HTTP endpoints
(HF_ENDPOINT; these machines cannot reach the real hub): only the stage's
files are requested, each once per cluster, downloads resume, bad bytes are
refused; and `clusterd run deepseek-r1 --quant 4bit` / `clusterd pull` end to end."""

import collections
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from clusterd.coordinator.peers import PeerError, PeerHandle
from clusterd.models.files import meta_files, stage_files
from clusterd.models.store import ModelRef, ModelStore
from clusterd.wire import clusterd_pb2 as pb
from daemons import start_daemon
from hubstub import HubStandIn, sha, write_safetensors
from reference import mlx_lm_greedy

REPO = "mlx-community/DeepSeek-R1-4bit"  # what `deepseek-r1 --quant 4bit` resolves to
COMMIT = "feedfacefeedfacefeedfacefeedfacefeedface"
BIG = "test-org/big-shard"
BIG_COMMIT = "b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1"
BIG_FILE = "model-00001-of-00001.safetensors"
NO_HUB = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def hub(model, tmp_path_factory):
    big = tmp_path_factory.mktemp("big")
    (big / "config.json").write_text("{}")
    write_safetensors(big / BIG_FILE, 24 * 2**20)
    with HubStandIn() as h:
        h.add_repo(REPO, model, COMMIT)
        h.add_repo(BIG, big, BIG_COMMIT)
        yield h


def hub_node(tmp, name, url):
    store = ModelStore(tmp / f"store-{name}")
    d = start_daemon(tmp, name, env={"HF_HUB_CACHE": str(store.root), "HF_ENDPOINT": url})
    return d, store


def prepare(address, model, paths, peers=(), allow_hub=True):
    p = PeerHandle(address)
    try:
        return list(p.prepare_files(pb.PrepareFilesRequest(
            model=model, paths=paths, peer_addresses=list(peers), allow_hub=allow_hub)))
    finally:
        p.close()


def split_files(model, start, end):
    return stage_files(model, start, end, meta_files(p.name for p in model.iterdir()))


def test_node_fetches_only_its_stage_files_once(hub, model, tmp_path):
    d, store = hub_node(tmp_path, "n", hub.url)
    try:
        want = split_files(model, 3, 6)
        hub.clear()
        events = prepare(d.address, REPO, want)
        assert events[-1].finished, events[-1].error
        assert hub.files_asked() == set(want), "the hub saw requests for other files"
        fetched = collections.Counter(e.file for e in hub.content_requests())
        assert set(fetched) == set(want) and set(fetched.values()) == {1}
        ref = ModelRef(REPO)
        assert sorted(store.files(ref)) == want
        for name in want:
            assert sha(store.file(ref, name)) == sha(model / name)
        # The Hugging Face cache layout, as hf_hub_download leaves it.
        assert (store.repo_dir(REPO) / "refs" / "main").read_text() == COMMIT
        assert store.snapshot(ref).name == COMMIT
        weight = next(w for w in want if w.endswith(".safetensors"))
        assert store.file(ref, weight).resolve().name == sha(model / weight)
        from huggingface_hub import try_to_load_from_cache
        assert try_to_load_from_cache(REPO, "config.json", cache_dir=store.root) is not None

        hub.clear()
        again = prepare(d.address, REPO, want)
        assert again[-1].finished and {e.source for e in again if e.path} == {"local"}
        assert hub.log == [], "a node holding its files does not call the hub"
    finally:
        d.stop()


def test_dropped_connection_resumes_with_a_range_request(hub, tmp_path):
    d, store = hub_node(tmp_path, "n", hub.url)
    try:
        hub.clear()
        hub.faults.cut_after[BIG_FILE] = 15 * 2**20
        events = prepare(d.address, BIG, [BIG_FILE])
        assert events[-1].finished, events[-1].error
        gets = [e for e in hub.content_requests() if e.file == BIG_FILE]
        assert gets[0].range is None and len(gets) == 2
        start = int(gets[1].range.split("=")[1].split("-")[0])
        assert start > 0, "the retry asked for the rest, not the whole file"
        size = 24 * 2**20 + 0
        assert gets[1].sent <= size - start + 1024
        assert sha(store.file(ModelRef(BIG), BIG_FILE)) == hub.repos[BIG].files[BIG_FILE].sha256
    finally:
        d.stop()


def test_killed_node_resumes_from_its_partial_download(hub, tmp_path):
    d, store = hub_node(tmp_path, "n", hub.url)
    digest = hub.repos[BIG].files[BIG_FILE].sha256
    partial = store.partial_path(BIG, digest)
    hub.faults.bytes_per_s[BIG_FILE] = 6 * 2**20
    try:
        threading.Thread(target=lambda: _ignore(prepare, d.address, BIG, [BIG_FILE]),
                         daemon=True).start()
        deadline = time.monotonic() + 30
        while not (partial.exists() and partial.stat().st_size >= 10 * 2**20):
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.05)
        d.proc.kill()  # as a crash or a power cut would
        d.proc.wait()
    finally:
        hub.faults.bytes_per_s.pop(BIG_FILE, None)
        d.stop()
    kept = partial.stat().st_size
    assert store.file(ModelRef(BIG), BIG_FILE) is None
    d, store = hub_node(tmp_path, "n", hub.url)
    try:
        hub.clear()
        events = prepare(d.address, BIG, [BIG_FILE])
        assert events[-1].finished, events[-1].error
        [get] = [e for e in hub.content_requests() if e.file == BIG_FILE]
        assert get.range == f"bytes={kept}-", "the restarted node asks only for the rest"
        assert sha(store.file(ModelRef(BIG), BIG_FILE)) == digest
        assert not partial.exists()
    finally:
        d.stop()


def _ignore(fn, *args):
    try:
        fn(*args)
    except PeerError:
        pass


def test_bytes_that_do_not_match_the_hub_hash_are_refused(hub, model, tmp_path):
    d, store = hub_node(tmp_path, "n", hub.url)
    name = "model-00002-of-00006.safetensors"
    hub.faults.corrupt.add(name)
    try:
        events = prepare(d.address, REPO, [name])
        assert not events[-1].finished
        assert name in events[-1].error and "published hash" in events[-1].error
        assert store.file(ModelRef(REPO), name) is None
        assert not list(store.repo_dir(REPO).glob("blobs/*.incomplete"))
        hub.faults.corrupt.discard(name)
        assert prepare(d.address, REPO, [name])[-1].finished
        assert sha(store.file(ModelRef(REPO), name)) == sha(model / name)
    finally:
        hub.faults.corrupt.discard(name)
        d.stop()


def test_no_route_to_the_hub_names_the_missing_files(tmp_path):
    d, _ = hub_node(tmp_path, "offline", NO_HUB)
    try:
        events = prepare(d.address, REPO, ["config.json", "model-00001-of-00006.safetensors"])
        err = events[-1].error
        assert not events[-1].finished
        assert "offline" in err and "model-00001-of-00006.safetensors" in err
        assert "cannot reach the Hugging Face hub" in err
    finally:
        d.stop()


# -- the commands ----------------------------------------------------------------

def clusterd(args, env, input=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "clusterd", *args], capture_output=True,
                          text=True, timeout=timeout, input=input,
                          env={**os.environ, **env})


def test_run_by_name_fetches_once_per_cluster_then_starts_without_transfer(hub, model,
                                                                           tmp_path):
    from mlx_lm.utils import load_tokenizer

    nodes = [hub_node(tmp_path, f"mac{i}", hub.url) for i in range(2)]
    env = {"HF_HUB_CACHE": str(tmp_path / "coordinator-store"), "HF_ENDPOINT": hub.url}
    args = ["run", "deepseek-r1", "--quant", "4bit", *sum((["--peer", d.address]
                                                           for d, _ in nodes), []),
            "--prompt", "Why is the sky blue?", "--max-tokens", "12", "--temp", "0"]
    try:
        hub.clear()
        out = clusterd([*args, "--json", "--yes"], env)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        tok = load_tokenizer(model)
        prompt = tok.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}],
                                         add_generation_prompt=True)
        assert report["tokens"] == mlx_lm_greedy(model, prompt, 12, 2048,
                                                 stop_ids=tuple(tok.eos_token_ids))
        fetched = collections.Counter(e.file for e in hub.content_requests())
        assert set(fetched.values()) == {1}, f"a file came from the hub twice: {fetched}"
        layers = {st["node"]: st["layers"] for st in report["stages"]}
        for d, store in nodes:  # exactly its stage's files; nothing on a node the plan left out
            want = split_files(model, *layers[d.name]) if d.name in layers else []
            assert sorted(store.files(ModelRef(REPO))) == want

        hub.clear()
        again = clusterd(args, env)
        assert again.returncode == 0, again.stderr
        assert hub.log == [], "a cluster that has everything does not call the hub"
        assert "nothing from the hub, nothing between nodes" in again.stderr
        assert "12 tokens at" in again.stderr
    finally:
        for d, _ in nodes:
            d.stop()


def test_pull_asks_before_a_large_download(hub, tmp_path):
    d, store = hub_node(tmp_path, "mac", hub.url)
    env = {"HF_HUB_CACHE": str(tmp_path / "coordinator-store"), "HF_ENDPOINT": hub.url}
    args = ["pull", "deepseek-r1", "--quant", "4bit", "--peer", d.address, "--ask-above", "100K"]
    try:
        hub.clear()
        no = clusterd(args, env, input="n\n")
        assert no.returncode != 0
        assert "Download" in no.stderr and "--yes" in no.stderr
        assert not [e for e in hub.content_requests() if e.file.endswith(".safetensors")]
        yes = clusterd([*args, "--yes"], env)
        assert yes.returncode == 0, yes.stderr
        assert "layers [0, 6) ready" in yes.stderr
        assert any(w.endswith(".safetensors") for w in store.files(ModelRef(REPO)))
    finally:
        d.stop()


def test_without_hub_or_holder_the_error_says_what_is_missing_where(model, tmp_path):
    (a, astore), (b, _) = hub_node(tmp_path, "mac-a", NO_HUB), hub_node(tmp_path, "mac-b", NO_HUB)
    partial = tmp_path / "first-half"
    partial.mkdir()
    for name in split_files(model, 0, 3):
        shutil.copy(model / name, partial / name)
    astore.import_folder(REPO, partial, COMMIT)
    env = {"HF_HUB_CACHE": str(tmp_path / "coordinator-store"), "HF_ENDPOINT": NO_HUB}
    try:
        out = clusterd(["pull", REPO, "--peer", a.address, "--peer", b.address,
                        "--split", "3,3"], env)
        assert out.returncode != 0
        lacking = [f for f in split_files(model, 3, 6) if not (partial / f).exists()]
        assert lacking
        assert f"node mac-b lacks {lacking[0]}" in out.stderr
        assert "mac-a lacks" not in out.stderr
        assert "cannot reach the Hugging Face hub" in out.stderr
        assert f"huggingface-cli download {REPO}" in out.stderr
    finally:
        a.stop()
        b.stop()
