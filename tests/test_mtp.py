"""DeepSeek's multi-token-prediction layer: the synthetic original checkpoint is laid
out as R1's (FP8 e4m3, 128x128 block scales, its own shard), its conversion equals
mlx-lm's own dequantize + quantize bit for bit, weighs what the config predicts, loads
into a drafter whose KV cache follows the accepted positions, and every way it can fail
raises MtpUnavailable with the reason."""

import contextlib
import io
import json
import os
import shutil
import struct

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm import load
from mlx_lm.models import deepseek_v3
from mlx_lm.utils import quantize_model

from clusterd.models import mtp_convert
from clusterd.models.mtp import ONE_BY_ONE, MtpDrafter, load_main_embedding, load_module
from clusterd.models.mtp_files import (MtpSource, WEIGHTS_FILE, mtp_weight_bytes,
                                       original_shards)
from clusterd.models.store import ModelRef, ModelStore
from clusterd.models.synthetic_mtp import build_synthetic_original
from clusterd.speculative.drafts import DrafterUnavailable, MtpUnavailable
from clusterd.speculative.sampling import SamplingParams

SOURCE, REVISION = "deepseek-ai/DeepSeek-R1", "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def main_dir(synthetic):
    return synthetic("deepseek_v3", "tiny")


@pytest.fixture(scope="module")
def main_config(main_dir):
    return json.loads((main_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def original(main_dir):
    return build_synthetic_original("tiny", 0)


@pytest.fixture(scope="module")
def converted(original, main_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("mtp") / "conv"
    mtp_convert.convert(original, main_config, out, SOURCE, REVISION)
    return out


def _index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def test_the_synthetic_original_is_laid_out_like_r1s(original, main_config):
    config = json.loads((original / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    layer = config["num_hidden_layers"]
    index = _index(original)
    [shard] = original_shards(index, layer)
    # The MTP layer alone in its shard; the main layers (also in the index) elsewhere.
    assert {f for k, f in index.items() if not k.startswith(f"model.layers.{layer}.")} \
        and shard not in {f for k, f in index.items() if not k.startswith(f"model.layers.{layer}.")}
    assert index["model.layers.0.self_attn.o_proj.weight"] != shard
    header = _header(original / shard)
    p = f"model.layers.{layer}."
    for name in ("self_attn.q_a_proj", "self_attn.kv_b_proj", "mlp.experts.3.down_proj",
                 "mlp.shared_experts.up_proj", "eh_proj"):
        w, s = header[p + name + ".weight"], header[p + name + ".weight_scale_inv"]
        assert w["dtype"] == "F8_E4M3" and s["dtype"] == "F32"
        assert s["shape"] == [-(-w["shape"][0] // 128), -(-w["shape"][1] // 128)]
    partial = [e["shape"] for k, e in header.items() if k.endswith(".weight")
               and e["dtype"] == "F8_E4M3" and any(d % 128 for d in e["shape"])]
    assert partial, "no FP8 weight with a partial 128x128 block"
    for copy in ("embed_tokens.weight", "shared_head.head.weight", "enorm.weight"):
        assert header[p + copy]["dtype"] == "BF16"


def _e4m3(code: int) -> float:
    """e4m3fn by its definition: 1 sign, 4 exponent (bias 7), 3 mantissa bits; exponent
    0 subnormal; 0x7f / 0xff NaN; no infinities."""
    sign = -1.0 if code & 0x80 else 1.0
    exp, man = (code >> 3) & 0xF, code & 0x7
    if exp == 0xF and man == 0x7:
        return float("nan")
    if exp == 0:
        return sign * man / 8 * 2.0 ** -6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def test_fp8_bytes_are_e4m3_and_blocks_reconstruct_the_weights(original):
    decoded = mx.from_fp8(mx.arange(256).astype(mx.uint8), dtype=mx.float32).tolist()
    for code, value in enumerate(decoded):
        want = _e4m3(code)
        assert value == want or (value != value and want != want), hex(code)
    layer = json.loads((original / "config.json").read_text())["num_hidden_layers"]
    [shard] = original_shards(_index(original), layer)
    tensors = mx.load(str(original / shard))
    from clusterd.models.synthetic_init import _value
    from clusterd.models.synthetic_mtp import MTP_FILE_SEED_TAG
    name = f"model.layers.{layer}.self_attn.kv_a_proj_with_mqa.weight"  # 96 x 128: partial
    q, scale = tensors[name], tensors[name.replace("weight", "weight_scale_inv")]
    w = _value(0, MTP_FILE_SEED_TAG, name, tuple(q.shape), 128)
    back = mx.from_fp8(q, dtype=mx.float32) * mx.repeat(mx.repeat(scale, 128, 0), 128, 1)[:96, :128]
    # 3 mantissa bits: at most half a step, 2^-4 of the block's largest value.
    assert float(mx.abs(back - w).max()) <= float(mx.abs(w).max()) * 2 ** -4


def _bits(a: mx.array) -> mx.array:
    width = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32}[a.itemsize]
    return a.view(width) if mx.issubdtype(a.dtype, mx.floating) else a


def mlx_lm_route(original, main_config, layer):
    """The layer as mlx-lm's own code converts it when it is an ordinary layer: a model
    one layer deeper, its sanitize on the FP8 tensors, mlx_lm.convert's dtype cast and
    mlx_lm.utils.quantize_model. The MTP-only tensors ride along in a side module."""
    prefix = f"model.layers.{layer}."
    index = _index(original)
    tensors = {}
    for f in sorted({index[k] for k in index if k.startswith(prefix)}):
        tensors.update((k, v) for k, v in mx.load(str(original / f)).items()
                       if k.startswith(prefix))
    cfg = {k: v for k, v in main_config.items() if not k.startswith("quantization")}
    cfg["num_hidden_layers"] = layer + 1
    model = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(cfg))
    hidden = cfg["hidden_size"]
    model.extra = nn.Module()
    for norm in ("enorm", "hnorm"):
        setattr(model.extra, norm, nn.RMSNorm(hidden))
    model.extra.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
    model.extra.shared_head_norm = nn.RMSNorm(hidden)
    weights = model.sanitize(tensors)
    rename = {f"{prefix}enorm.weight": "extra.enorm.weight",
              f"{prefix}hnorm.weight": "extra.hnorm.weight",
              f"{prefix}eh_proj.weight": "extra.eh_proj.weight",
              f"{prefix}shared_head.norm.weight": "extra.shared_head_norm.weight"}
    model.load_weights([(rename.get(k, k), v) for k, v in weights.items()
                        if "embed_tokens" not in k and "shared_head.head" not in k], strict=False)
    dtype = getattr(mx, main_config["torch_dtype"])
    model.update(tree_map_with_path(
        lambda k, v: v.astype(dtype) if model.cast_predicate(k) and mx.issubdtype(
            v.dtype, mx.floating) else v, model.parameters()))
    q = main_config["quantization"]
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_model(model, cfg, q["group_size"], q["bits"])
    flat = dict(tree_flatten(model.parameters()))
    out = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    out = {("layer." + k): v for k, v in out.items()}
    out.update({k[len("extra."):].replace("shared_head_norm", "shared_head.norm"): v
                for k, v in flat.items() if k.startswith("extra.")})
    return out


def test_conversion_equals_mlx_lms_own_dequantize_and_quantize(original, main_config,
                                                               converted):
    layer = main_config["num_hidden_layers"]
    ours = mx.load(str(converted / WEIGHTS_FILE))
    theirs = mlx_lm_route(original, main_config, layer)
    assert sorted(ours) == sorted(theirs)
    assert any(k.endswith(".scales") for k in ours), "nothing was quantized"
    assert ours["layer.mlp.switch_mlp.down_proj.weight"].dtype == mx.uint32
    assert ours["layer.mlp.gate.weight"].dtype == mx.float32  # the router: not quantized
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert mx.array_equal(_bits(ours[k]), _bits(theirs[k])).item(), k


@pytest.mark.parametrize("quant", [{"bits": 8, "group_size": 32}, None],
                         ids=["8bit-g32", "unquantized"])
def test_converted_bytes_equal_the_configs_prediction(original, main_config, converted,
                                                      tmp_path, quant):
    on_disk = sum(v.nbytes for v in mx.load(str(converted / WEIGHTS_FILE)).values())
    assert on_disk == mtp_weight_bytes(main_config, main_config["quantization"])
    assert MtpSource.read(converted).weight_bytes == on_disk
    cfg = {k: v for k, v in main_config.items() if not k.startswith("quantization")}
    if quant is not None:
        cfg["quantization"] = quant
    mtp_convert.convert(original, cfg, tmp_path / "other", SOURCE, REVISION)
    other = sum(v.nbytes for v in mx.load(str(tmp_path / "other" / WEIGHTS_FILE)).values())
    assert other == mtp_weight_bytes(cfg, quant) != on_disk


@pytest.fixture(scope="module")
def drafter(main_dir, main_config, converted):
    model, _ = load(str(main_dir))
    return MtpDrafter.load(converted, main_config, load_main_embedding(main_dir), model.lm_head)


def _hidden(n, seed=0):
    return mx.random.normal((n, 128), key=mx.random.key(seed))


def test_one_call_equals_position_by_position(drafter):
    n = ONE_BY_ONE + 4  # a prompt's worth: fed as one chunk
    h, toks = _hidden(n), [(37 * i + 5) % 2048 for i in range(n)]
    whole = drafter.new_state()
    a = drafter.draft(whole, h, toks, k=1, params=SamplingParams(0.6),
                      key=mx.random.key(1))
    steps = drafter.new_state()
    for i in range(n - 3):
        drafter.extend(steps, h[i:i + 1], toks[i:i + 1])
    b = drafter.draft(steps, h[n - 3:], toks[n - 3:], k=1, params=SamplingParams(0.6),
                      key=mx.random.key(1))
    assert whole.offset == steps.offset == n
    assert a.tokens == b.tokens
    assert mx.allclose(a.logprobs, b.logprobs, atol=1e-4).item()


def test_chained_drafts_recycle_the_normed_output_and_are_dropped_next_call(drafter):
    h, toks = _hidden(4, 3), [11, 12, 13, 14]
    state = drafter.new_state()
    chain = drafter.draft(state, h, toks, k=3)
    assert len(chain.tokens) == 3 and chain.logprobs is None
    assert (state.offset, state.cache.offset) == (4, 6)  # two chained positions pending
    # By hand: the module's normed output is the next step's hidden state.
    module, cache = drafter.module, drafter.new_state().cache
    g = module(h[None], drafter.embed(mx.array([toks])), cache)[:, -1:]
    by_hand = []
    for _ in range(3):
        d = int(mx.argmax(drafter.head(g)[0, -1]).item())
        by_hand.append(d)
        g = module(g, drafter.embed(mx.array([[d]])), cache)
    assert list(chain.tokens) == by_hand
    # Next trip: accepted positions only; the chained ones are gone first.
    nxt = drafter.draft(state, _hidden(2, 4), [chain.tokens[0], 99], k=1)
    assert (state.offset, state.cache.offset) == (6, 6) and len(nxt.tokens) == 1
    fresh = drafter.new_state()
    drafter.extend(fresh, h, toks)
    assert drafter.draft(fresh, _hidden(2, 4), [chain.tokens[0], 99]).tokens == nxt.tokens
    state.rewind(3)
    assert state.offset == 3
    with pytest.raises(ValueError, match="rewind"):
        state.rewind(7)


def test_bad_calls_are_named(drafter):
    state = drafter.new_state()
    with pytest.raises(ValueError, match="3 hidden states need as many next tokens"):
        drafter.draft(state, _hidden(3), [1, 2])
    with pytest.raises(ValueError, match="needs the session's random key"):
        drafter.draft(state, _hidden(1), [1], params=SamplingParams(0.6))


def _copy_without(src, dst, drop=()):
    shutil.copytree(src, dst)
    for name in drop:
        os.remove(dst / name)
    return dst


def test_every_failure_is_an_mtp_unavailable_with_the_reason(original, main_config, tmp_path,
                                                             main_dir):
    layer = main_config["num_hidden_layers"]
    [shard] = original_shards(_index(original), layer)

    def fails(match, folder, config=main_config):
        with pytest.raises(MtpUnavailable, match=match) as e:
            mtp_convert.convert(folder, config, tmp_path / "out", SOURCE, REVISION)
        assert isinstance(e.value, DrafterUnavailable)

    fails(f"weight file {shard} is missing", _copy_without(original, tmp_path / "a", [shard]))
    cut = _copy_without(original, tmp_path / "b")
    os.truncate(cut / shard, (cut / shard).stat().st_size - 100)
    fails("cannot be read.*truncated", cut)
    none = _copy_without(original, tmp_path / "c")
    cfg = json.loads((none / "config.json").read_text())
    (none / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    fails("declares no multi-token-prediction layer", none)
    fails("has hidden_size=128, the model has 256", original, {**main_config, "hidden_size": 256})
    assert not (tmp_path / "out").exists(), "a failed conversion left a folder behind"

    with pytest.raises(MtpUnavailable, match="holds no converted MTP layer"):
        load_module(tmp_path, main_config)
    store = ModelStore(tmp_path / "store")
    with pytest.raises(MtpUnavailable, match="is not in this node's store"):
        mtp_convert.ensure_in_store(store, ModelRef("mlx-community/DeepSeek-R1-4bit"), main_config)
    with pytest.raises(MtpUnavailable, match="no original checkpoint is known"):
        mtp_convert.ensure_in_store(store, ModelRef("someone/some-model"), main_config)
    no_embed = _copy_without(main_dir, tmp_path / "d")
    for f in {f for k, f in _index(no_embed).items() if "embed_tokens" in k}:
        os.remove(no_embed / f)
    with pytest.raises(MtpUnavailable, match="embedding's weight file"):
        load_main_embedding(no_embed)


def test_a_node_converts_once_and_redoes_a_damaged_conversion(original, main_config, tmp_path):
    store = ModelStore(tmp_path / "store")
    store.import_folder(SOURCE, original, REVISION)
    main = ModelRef("mlx-community/DeepSeek-R1-4bit")
    out = mtp_convert.ensure_in_store(store, main, main_config)
    assert out.parent.parent == store.repo_dir(main.repo_id)  # beside the model's snapshots
    assert MtpSource.read(out).source_repo == SOURCE and MtpSource.read(out).revision == REVISION
    weights = out / WEIGHTS_FILE
    before = weights.stat()
    assert mtp_convert.ensure_in_store(store, main, main_config) == out
    after = weights.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    os.truncate(weights, before.st_size // 2)
    mtp_convert.ensure_in_store(store, main, main_config)
    assert weights.stat().st_size == before.st_size
