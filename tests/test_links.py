"""Measured links: the file `clusterd doctor` writes, and the hops the planner prices with it."""

import json

import pytest

from shard_planner.hardware import GiB, NodeSpec
from shard_planner.links import links_document, load_links, parse_links
from shard_planner.model_spec import LayerSpec, ModelSpec
from shard_planner.planner import plan
from shard_planner.simulate import simulate


def toy(n_layers=8, layer=GiB):
    layers = tuple(LayerSpec(index=i, kind="dense", weight_bytes=layer, active_bytes=layer,
                             params=layer, active_params=layer, kv_bytes_per_token=0)
                   for i in range(n_layers))
    return ModelSpec(name="toy", model_type="toy", hidden_size=4096, vocab_size=1000,
                     quantization=None, dtype="bfloat16", layers=layers, embed_bytes=0,
                     embed_params=0, head_bytes=0, head_params=0, tied_embeddings=False,
                     source="config")


def nodes(*names, usable_gib=6):
    return [NodeSpec(n, total_bytes=64 * GiB, usable_bytes=usable_gib * GiB, bandwidth_gbs=400,
                     reserve_bytes=0) for n in names]


def doc(*rows, when="2026-03-01T12:00:00Z"):
    return {"measured_at": when, "links": [
        {"from": a, "to": b, "rtt_ms": rtt, "throughput_mbps": mbps} for a, b, rtt, mbps in rows]}


def test_the_file_reads_into_link_specs(tmp_path):
    path = tmp_path / "links.json"
    path.write_text(json.dumps(doc(("a", "b", 0.5, 9400.0), ("b", "c", 4, 300))))
    m = load_links(path)
    assert m.measured_at == "2026-03-01T12:00:00Z"
    ab = m.pairs[("a", "b")]
    assert ab.latency_s == pytest.approx(0.25e-3) and ab.bandwidth_gbps == pytest.approx(9.4)
    assert "measured" in ab.source and "0.5 ms" in ab.source
    assert set(m.pairs) == {("a", "b"), ("b", "c")}
    # What links_document writes, load_links reads back.
    written = links_document([("a", "b", 0.5, 9400.0), ("b", "c", 4.0, 300.0)], m.measured_at)
    assert parse_links(written).pairs == m.pairs


@pytest.mark.parametrize("data,message", [
    ([], "JSON object"),
    ({"links": []}, "measured_at"),
    ({"measured_at": "t", "links": {}}, "'links' must be a list"),
    (doc(("a", "b", -1, 100)), r"links\[0\].*rtt_ms.*positive"),
    (doc(("a", "b", 1, "fast")), r"throughput_mbps.*number"),
    (doc(("a", "a", 1, 100)), "itself"),
    (doc(("a", "b", 1, 100), ("a", "b", 2, 100)), "measured twice"),
    ({"measured_at": "t", "links": [{"from": "a", "rtt_ms": 1, "throughput_mbps": 1}]},
     "node names"),
])
def test_bad_files_are_clear_errors(data, message):
    with pytest.raises(ValueError, match=message):
        parse_links(data)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_links(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_links(tmp_path / "bad.json")


def test_a_slow_measured_link_moves_the_split_off_that_pair():
    """Any two of three equal nodes hold the model; a slow a <-> b link makes the planner
    pick a pair of nodes that does not cross it."""
    spec, ring = toy(), nodes("a", "b", "c")
    preset = plan(spec, ring)
    assert [s.node.name for s in preset.stages] == ["a", "b"]
    assert [h.source for h in preset.hops] == ["preset", "preset"]
    slow = parse_links(doc(("a", "b", 40.0, 200.0))).pairs
    p = plan(spec, ring, links=slow)
    used = [s.node.name for s in p.stages]
    assert len(used) == 2 and set(used) != {"a", "b"}
    assert all(h.source == "preset" for h in p.hops)  # the chosen hops were not measured
    # The split that must cross the slow link (only a and b offered) is slower.
    forced = plan(spec, ring[:2], links=slow)
    assert [h.source for h in forced.hops] == ["measured", "measured (reverse direction)"]
    assert simulate(p).decode_tok_s > simulate(forced).decode_tok_s


def test_fast_measured_links_keep_the_split_and_are_used_per_hop():
    spec, ring = toy(), nodes("a", "b", "c")
    fast = parse_links(doc(("a", "b", 0.1, 40000.0))).pairs
    p = plan(spec, ring, links=fast)
    assert [s.node.name for s in p.stages] == ["a", "b"]
    # a -> b measured; b -> a back uses the same pair's measurement (a round trip).
    assert [(h.src, h.dst, h.source) for h in p.hops] == [
        ("a", "b", "measured"), ("b", "a", "measured (reverse direction)")]
    pred = simulate(p)
    assert "measured" in pred.link
    assert pred.decode_tok_s > simulate(plan(spec, ring)).decode_tok_s  # 0.05 ms, not 0.3


def test_measured_links_for_nodes_not_in_the_plan_change_nothing():
    spec, ring = toy(), nodes("a", "b", "c")
    other = parse_links(doc(("x", "y", 50.0, 10.0))).pairs
    assert [s.layers for s in plan(spec, ring, links=other).stages] == \
        [s.layers for s in plan(spec, ring).stages]
