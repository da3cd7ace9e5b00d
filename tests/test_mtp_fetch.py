"""The MTP layer end to end, offline: the hub stand-in serves the synthetic model as
mlx-community/DeepSeek-R1-4bit and its original checkpoint as deepseek-ai/DeepSeek-R1;
real node daemons fetch through PrepareFiles only the original's MTP shard (plus the
embedding file of the converted model), the node's store converts it once, a drafter
loads from it, and a second run transfers nothing."""

import collections
import json

import mlx.core as mx
import pytest
from mlx_lm import load

from clusterd.coordinator.cluster import connect
from clusterd.coordinator.prepare import ClusterFiles, Reporter
from clusterd.models import mtp_convert
from clusterd.models.mtp import MtpDrafter, load_main_embedding
from clusterd.models.mtp_files import WEIGHTS_FILE, embedding_files, original_shards
from clusterd.models.store import ModelRef, ModelStore
from clusterd.models.synthetic_mtp import build_synthetic_original
from clusterd.node.hub import Hub
from clusterd.speculative.drafts import MtpUnavailable
from clusterd.speculative.fetch import fetch_mtp
from daemons import start_daemon
from hubstub import HubStandIn

MAIN = ModelRef("mlx-community/DeepSeek-R1-4bit")
ORIGINAL = "deepseek-ai/DeepSeek-R1"
MAIN_COMMIT = "a" * 40
ORIGINAL_COMMIT = "b" * 40


@pytest.fixture(scope="module")
def original(model):
    return build_synthetic_original("tiny", 0)


@pytest.fixture(scope="module")
def hub(model, original):
    with HubStandIn() as h:
        h.add_repo(MAIN.repo_id, model, MAIN_COMMIT)
        h.add_repo(ORIGINAL, original, ORIGINAL_COMMIT)
        yield h


@pytest.fixture
def cluster(hub, tmp_path):
    stores = [ModelStore(tmp_path / f"store-{i}") for i in range(2)]
    daemons = [start_daemon(tmp_path, f"mac{i}", env={"HF_HUB_CACHE": str(s.root),
                                                      "HF_ENDPOINT": hub.url})
               for i, s in enumerate(stores)]
    nodes = connect([d.address for d in daemons])
    try:
        yield nodes, stores, ModelStore(tmp_path / "coordinator")
    finally:
        for n in nodes:
            n.peer.close()
        for d in daemons:
            d.stop()


def _index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def test_only_the_mtp_shard_is_fetched_converted_once_and_reused(hub, cluster, model, original):
    nodes, stores, coordinator = cluster
    main_meta = ClusterFiles(MAIN, nodes, Reporter(show=False), store=coordinator,
                             hub=Hub(hub.url)).metadata()
    config = json.loads((main_meta / "config.json").read_text())
    [shard] = original_shards(_index(original), config["num_hidden_layers"])
    embed = embedding_files(_index(model))
    hub.clear()

    got = fetch_mtp(MAIN, main_meta, nodes[0], nodes[1:], store=coordinator, hub=Hub(hub.url),
                    yes=True)
    assert got.shards == (shard,) and got.embedding == tuple(embed)
    weights = collections.Counter(e.file for e in hub.content_requests()
                                  if e.file.endswith(".safetensors"))
    assert weights == collections.Counter({shard: 1, **{f: 1 for f in embed}}), weights
    assert not {e.file for e in hub.log if e.file and e.file.endswith(".safetensors")} - \
        {shard, *embed}, "a main-layer shard of the original was asked for"
    last, other = stores
    held = set(last.files(ModelRef(ORIGINAL)))
    assert shard in held and not any(f.endswith(".safetensors") and f != shard for f in held)
    assert set(embed) <= set(last.files(MAIN))
    assert list(other.files(ModelRef(ORIGINAL))) == [], "the other node got files it does not need"

    # On the last node: convert from its store, load the drafter, draft.
    out = mtp_convert.ensure_in_store(last, MAIN, config)
    main_model, _ = load(str(model))
    drafter = MtpDrafter.load(out, config, load_main_embedding(last.snapshot(MAIN)),
                              main_model.lm_head)
    h = mx.random.normal((3, config["hidden_size"]), key=mx.random.key(0))
    tokens = drafter.draft(drafter.new_state(), h, [3, 4, 5], k=2).tokens
    # The same as from a conversion of the original folder itself.
    direct = mtp_convert.convert(original, config, out.parent / "direct", ORIGINAL,
                                 ORIGINAL_COMMIT)
    assert direct.weight_bytes == (out / WEIGHTS_FILE).stat().st_size - _header_bytes(out)
    ref = MtpDrafter.load(out.parent / "direct", config, drafter.embed, drafter.head)
    assert ref.draft(ref.new_state(), h, [3, 4, 5], k=2).tokens == tokens

    stamp = (out / WEIGHTS_FILE).stat().st_mtime_ns
    hub.clear()
    again = fetch_mtp(MAIN, main_meta, nodes[0], nodes[1:], store=coordinator,
                      hub=Hub(hub.url), yes=True)
    assert again == got
    assert hub.log == [], "a cluster that holds the MTP files does not call the hub"
    assert mtp_convert.ensure_in_store(last, MAIN, config) == out
    assert (out / WEIGHTS_FILE).stat().st_mtime_ns == stamp, "converted twice"


def _header_bytes(folder):
    with open(folder / WEIGHTS_FILE, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_a_declined_download_or_an_unknown_model_is_an_mtp_unavailable(hub, cluster):
    nodes, _, coordinator = cluster
    main_meta = ClusterFiles(MAIN, nodes, Reporter(show=False), store=coordinator,
                             hub=Hub(hub.url)).metadata()
    hub.clear()
    asked = []
    with pytest.raises(MtpUnavailable, match="not downloading"):
        fetch_mtp(MAIN, main_meta, nodes[0], store=coordinator, hub=Hub(hub.url),
                  ask_above=1000, confirm=lambda text: asked.append(text) or False)
    assert asked and "multi-token-prediction" in asked[0]
    assert not [e for e in hub.content_requests() if e.file.endswith(".safetensors")]
    with pytest.raises(MtpUnavailable, match="no original checkpoint is known"):
        fetch_mtp(ModelRef("someone/their-model"), main_meta, nodes[0], store=coordinator,
                  hub=Hub(hub.url))
