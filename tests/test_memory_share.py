"""A daemon holds its stage's share of the model, not the whole checkpoint."""

import json

import pytest

from clusterd.coordinator.peers import PeerHandle
from clusterd.wire import clusterd_pb2 as pb
from daemons import start_daemon


def rss_growth(peer: PeerHandle, model, start: int, end: int, warmup_model) -> tuple[int, int]:
    # Import the architecture's code first so only weights count.
    peer.load_shard(pb.StageSpec(model_path=str(warmup_model), start_layer=0, end_layer=1))
    peer.unload()
    before = peer.info().rss_bytes
    reply = peer.load_shard(pb.StageSpec(model_path=str(model), start_layer=start, end_layer=end))
    return peer.info().rss_bytes - before, reply.shard.weight_bytes


@pytest.mark.e2e
def test_resident_memory_is_the_stage_share(tmp_path, synthetic):
    model = synthetic("deepseek_v3", "small")
    warm = synthetic("deepseek_v3", "tiny")
    whole_d = start_daemon(tmp_path, "whole")
    part_d = start_daemon(tmp_path, "third")
    try:
        whole, part = PeerHandle(whole_d.address), PeerHandle(part_d.address)
        layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
        assert layers >= 12
        whole_growth, whole_bytes = rss_growth(whole, model, 0, layers, warm)
        part_growth, part_bytes = rss_growth(part, model, 4, 8, warm)
        files = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        # The whole model really is resident in the first daemon...
        assert whole_growth > 0.8 * whole_bytes
        assert whole_bytes > 0.9 * files
        # ...and the middle third holds about its share, far from the whole.
        assert part_bytes < 0.4 * whole_bytes
        assert part_growth < part_bytes * 1.3 + 8 * 2**20
        assert part_growth < 0.5 * whole_growth
    finally:
        whole_d.stop()
        part_d.stop()
