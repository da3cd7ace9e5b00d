"""Serving predictions: many sessions batched through the pipeline, and MTP drafts."""

import itertools
from fractions import Fraction

import pytest

from clusterd.models.catalog import load_config
from shard_planner.hardware import hypothetical_node, parse_node_arg
from shard_planner.model_spec import LayerSpec, Quantization, model_spec_from_config
from shard_planner.planner import plan
from shard_planner.serving import DECODE_COMPUTE_EFFICIENCY, predict_serving
from shard_planner.simulate import simulate

R1 = load_config("deepseek-r1")
R1_4BIT = model_spec_from_config(R1, Quantization(4, 32), name="deepseek-r1")
SESSIONS = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 64, 128, 256, 512]


def expected_distinct(experts, top_k, tokens):
    """E[distinct experts] when each token picks a uniformly random top-k subset: every
    combination of the tokens' choices, counted exactly."""
    subsets = list(itertools.combinations(range(experts), top_k))
    total = Fraction(0)
    for picks in itertools.product(subsets, repeat=tokens):
        total += len(set().union(*picks))
    return total / len(subsets) ** tokens


@pytest.mark.parametrize("experts,top_k,tokens", [(6, 2, 3), (5, 3, 2), (8, 1, 4), (4, 2, 1)])
def test_distinct_experts_read_by_a_batch_match_brute_force(experts, top_k, tokens):
    per_expert, shared = 1000, 777
    layer = LayerSpec(index=0, kind="moe", weight_bytes=shared + experts * per_expert,
                      active_bytes=shared + top_k * per_expert, params=0, active_params=0,
                      kv_bytes_per_token=0, experts=experts, top_k=top_k,
                      routed_bytes=experts * per_expert)
    want = shared + per_expert * expected_distinct(experts, top_k, tokens)
    assert layer.read_bytes(tokens) == pytest.approx(float(want), rel=1e-12)


def test_r1_layers_know_their_experts():
    moe = R1_4BIT.layers[10]
    assert (moe.experts, moe.top_k) == (256, 8)
    assert moe.weight_bytes - moe.routed_bytes + moe.routed_bytes // 256 * 8 == moe.active_bytes
    assert moe.read_bytes(1) == moe.active_bytes
    # Two tokens pick mostly different experts: nearly twice the routed bytes.
    assert 1.5 < moe.read_bytes(2) / moe.read_bytes(1) < 1.7
    assert moe.read_bytes(10_000) == pytest.approx(moe.weight_bytes, rel=1e-6)
    dense = R1_4BIT.layers[0]
    assert dense.experts == 0 and dense.read_bytes(64) == dense.active_bytes


@pytest.mark.parametrize("cluster", ["m2-ultra:192x3", "m4-pro:64x9", "m3-ultra:512"])
def test_aggregate_grows_with_sessions_then_saturates_and_per_stream_falls(cluster):
    p = plan(R1_4BIT, parse_node_arg(cluster))
    preds = [predict_serving(p, n) for n in SESSIONS]
    agg = [x.aggregate_tok_s for x in preds]
    per = [x.per_stream_tok_s for x in preds]
    single = simulate(p).decode_tok_s
    assert preds[0].aggregate_tok_s == pytest.approx(single, rel=1e-12)
    assert all(x.single_stream_tok_s == pytest.approx(single, rel=1e-12) for x in preds)
    for a, b in zip(agg, agg[1:]):
        assert b >= a * (1 - 1e-9)
    for a, b in zip(per, per[1:]):
        assert b <= a * (1 + 1e-9)
    for n, x in zip(SESSIONS, preds):
        assert x.aggregate_tok_s <= n * single * (1 + 1e-9)
        assert x.active <= n and x.groups * x.batch >= x.active
    assert agg[-1] > 2.5 * single  # batching serves several times one stream
    assert agg[-1] == pytest.approx(agg[-2], rel=1e-3)  # and saturates
    # Never more tokens than the GPUs compute: 2 x active parameters per token per stage.
    for st in p.stages:
        flops = 2 * sum(l.active_params for l in R1_4BIT.layers[st.start:st.end])
        cap = st.node.tflops * 1e12 * DECODE_COMPUTE_EFFICIENCY / flops
        assert agg[-1] <= cap


def test_a_pipeline_fills_with_one_session_per_stage():
    """Up to S sessions, each its own micro-batch, every stage works on one of them: the
    aggregate grows nearly linearly (the hops are the only overlap lost)."""
    p = plan(R1_4BIT, parse_node_arg("m4-pro:64x9"))
    one, four = predict_serving(p, 1), predict_serving(p, 4)
    assert four.groups == 4 and four.batch == 1
    assert four.aggregate_tok_s == pytest.approx(4 * one.aggregate_tok_s, rel=1e-9)


def test_longer_caches_cost_decode_time():
    p = plan(R1_4BIT, parse_node_arg("m3-ultra:512x2"), context=32768)
    short, long = predict_serving(p, 16, kv_tokens=1024), predict_serving(p, 16, kv_tokens=32768)
    assert long.aggregate_tok_s < short.aggregate_tok_s


def test_mtp_drafts_pay_for_the_extra_experts_they_read():
    p = plan(R1_4BIT, parse_node_arg("m2-ultra:192x3"), draft="mtp")
    assert p.draft == "mtp"
    base = predict_serving(p, 1)
    spec = predict_serving(p, 1, draft_tokens=1, acceptance=0.85)
    assert spec.tokens_per_trip == pytest.approx(1.85)
    # A 2-token trip reads the shared weights once but ~16 of 256 experts per layer, not 8.
    assert 1.4 < spec.trip_cost_ratio < 1.8
    assert spec.per_stream_tok_s == pytest.approx(
        base.single_stream_tok_s * 1.85 / spec.trip_cost_ratio, rel=1e-9)
    assert spec.per_stream_tok_s > base.per_stream_tok_s
    # A measured ratio replaces the model's: at 1.0 a trip yields 1 + a tokens for free.
    free = predict_serving(p, 1, draft_tokens=1, acceptance=0.9, trip_cost_ratio=1.0)
    assert free.per_stream_tok_s == pytest.approx(1.9 * base.single_stream_tok_s, rel=1e-9)
    # Drafts that are never kept only cost.
    assert predict_serving(p, 1, draft_tokens=1, acceptance=0.0).per_stream_tok_s \
        < base.per_stream_tok_s
    two = predict_serving(p, 1, draft_tokens=2, acceptance=0.8)
    assert two.tokens_per_trip == pytest.approx(1 + 0.8 + 0.64)


def test_drafts_need_the_mtp_module_in_the_plan():
    p = plan(R1_4BIT, parse_node_arg("m2-ultra:192x3"))
    with pytest.raises(ValueError, match="MTP"):
        predict_serving(p, 1, draft_tokens=1)
    with pytest.raises(ValueError):
        predict_serving(p, 0)
    assert predict_serving(plan(R1_4BIT, parse_node_arg("m4-pro:64x2")), 4) is None


def test_one_node_batches_all_sessions_in_one_step():
    p = plan(R1_4BIT, [hypothetical_node("m3-ultra", 512)])
    x = predict_serving(p, 8)
    assert (x.groups, x.batch, x.active) == (1, 8, 8)
    assert x.per_stream_tok_s < x.single_stream_tok_s < x.aggregate_tok_s
