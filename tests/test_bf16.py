"""bf16 end to end: a synthetic model in mlx-community R1's dtype layout
(4-bit weights, bf16 norms, scales and biases, the router's correction bias in
float32) through 1, 2 and 3 real daemons equals single-process mlx-lm token
for token, and the hidden state crosses each hop as bf16, untouched."""

import json
import struct

import grpc
import mlx.core as mx
import pytest

from clusterd.coordinator.cluster import connect, load_ring, ranges_from_counts
from clusterd.coordinator.pipeline import Pipeline, Sampling
from clusterd.models.stage import load_stage, read_config
from clusterd.wire import clusterd_pb2 as pb
from clusterd.wire.tensors import from_wire, to_wire
from reference import mlx_lm_greedy

# bf16 activations make the CPU's quantized matmul ~10x slower: few tokens.
NEW_TOKENS = 12
CHUNK = 8
PROMPTS = {"few-tokens": [17, 300, 42, 9, 1000],
           "multi-chunk": [(i * 37 + 11) % 1500 + 2 for i in range(20)]}


@pytest.fixture(scope="module")
def bf16_model(synthetic):
    return synthetic("deepseek_v3", "tiny", dtype="bfloat16")


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def test_dtype_layout_is_mlx_community_r1s(bf16_model):
    config = read_config(bf16_model)
    assert config["torch_dtype"] == "bfloat16"
    assert config["quantization"]["bits"] == 4
    dtypes: dict[str, set[str]] = {}
    for shard in bf16_model.glob("*.safetensors"):
        for name, t in _header(shard).items():
            if name == "__metadata__":
                continue
            if name.endswith((".scales", ".biases")):
                kind = "scales/biases"
            elif "norm" in name:
                kind = "norms"
            elif name.endswith("e_score_correction_bias"):
                kind = "correction bias"
            elif name.endswith(".weight") and t["dtype"] == "U32":
                kind = "quantized weights"
            else:
                kind = "other " + name.rsplit(".", 2)[-2]
            dtypes.setdefault(kind, set()).add(t["dtype"])
    assert dtypes["scales/biases"] == {"BF16"}
    assert dtypes["norms"] == {"BF16"}
    assert dtypes["quantized weights"] == {"U32"}
    assert dtypes["correction bias"] == {"F32"}  # mlx_lm.convert keeps it float32
    # The router gate (a raw weight, never quantized) is bf16 as well.
    assert dtypes["other gate"] == {"BF16"}


def test_a_bf16_hop_is_the_hidden_state_bytes(bf16_model):
    """2 bytes x hidden per position, the same bits on both sides."""
    stage = load_stage(bf16_model, 0, 2)
    assert stage.activation_dtype == mx.bfloat16
    tokens = mx.array(PROMPTS["few-tokens"], dtype=mx.int32)[None]
    h = stage.forward(tokens, stage.make_cache())
    mx.eval(h)
    assert h.dtype == mx.bfloat16
    wire = to_wire(h)
    assert wire.dtype == "bfloat16"
    assert len(wire.data) == 2 * stage.hidden_size * tokens.shape[1] == h.nbytes
    back = from_wire(wire)
    assert back.dtype == mx.bfloat16
    assert bytes(memoryview(back.view(mx.uint16))) == bytes(memoryview(h.view(mx.uint16)))


@pytest.mark.parametrize("counts", [[6], [3, 3], [1, 5], [2, 3, 1], [1, 1, 4]],
                         ids=lambda c: "+".join(map(str, c)))
@pytest.mark.parametrize("prompt_name", list(PROMPTS))
def test_bf16_pipeline_matches_mlx_lm(three_nodes, bf16_model, counts, prompt_name):
    prompt = PROMPTS[prompt_name]
    nodes = connect(three_nodes.addresses[: len(counts)])
    try:
        stages = load_ring(bf16_model, nodes, ranges_from_counts(counts))
        tokens = list(Pipeline(stages, prefill_step_size=CHUNK).generate(
            prompt, NEW_TOKENS, Sampling(temperature=0.0), stop_ids=[1]))
    finally:
        for n in nodes:
            n.peer.close()
    expected = mlx_lm_greedy(bf16_model, prompt, NEW_TOKENS, CHUNK, stop_ids=(1,))
    assert len(expected) == NEW_TOKENS
    assert tokens == expected


def test_a_bf16_stage_takes_bf16_and_refuses_float32(three_nodes, bf16_model):
    """A middle stage accepts the 2-byte hidden state as it comes, and names
    the dtype it expects for anything else (no silent conversion)."""
    nodes = connect(three_nodes.addresses[:3])
    try:
        stages = load_ring(bf16_model, nodes, ranges_from_counts([2, 2, 2]))
        middle = stages[1].peer
        shard = stages[1].shard
        middle.open_session(pb.OpenSessionRequest(session_id="bf16-hop", shard=shard,
                                                  client_id="t",
                                                  next_address=stages[2].peer.address))
        stages[2].peer.open_session(pb.OpenSessionRequest(
            session_id="bf16-hop", shard=shard, client_id="t",
            next_address=stages[0].peer.address, max_tokens=1))
        hidden = read_config(bf16_model)["hidden_size"]
        h = mx.zeros((1, 3, hidden), dtype=mx.bfloat16)
        act = pb.Activation(shard=shard, rows=[pb.Row(session_id="bf16-hop")], width=3)
        to_wire(h, out=act.hidden)
        assert len(act.hidden.data) == 2 * hidden * 3
        middle.forward(act)  # accepted
        bad = pb.Activation(shard=shard, rows=[pb.Row(session_id="bf16-hop", position=3)],
                            width=3)
        to_wire(h.astype(mx.float32), out=bad.hidden)
        with pytest.raises(Exception) as e:
            middle.forward(bad)
        assert getattr(e.value, "code", None) == grpc.StatusCode.INVALID_ARGUMENT
        assert "expected bfloat16" in str(e.value)
        for st in stages[1:]:
            st.peer.end_session("bf16-hop")
    finally:
        for n in nodes:
            n.peer.close()
