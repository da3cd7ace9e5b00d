"""Model accounting checked against mlx-lm itself.

The cross-checks build each model with mlx-lm's own class from its config, cast and quantize
it the way mlx_lm.convert does (mlx_lm.utils.quantize_model, same predicate), all lazily, and
compare the nbytes mlx reports with shard_planner's numbers. Nothing is evaluated: the 671B
model never allocates its weights.
"""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.models import deepseek_v3, llama, qwen2
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model, quantize_model

from clusterd.models.catalog import load_config
from shard_planner.model_spec import (
    FROM_CONFIG, Quantization, UnsupportedModel, model_spec_from_config, model_spec_from_dir,
    parse_dtype,
)
from shard_planner.safetensors import HeaderError

R1 = load_config("deepseek-r1")

# Representative shapes of the R1 distills' families, inline (built lazily: size is free).
QWEN2_32B_LIKE = {
    "model_type": "qwen2", "hidden_size": 5120, "num_hidden_layers": 64,
    "intermediate_size": 27648, "num_attention_heads": 40, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5, "vocab_size": 152064, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
QWEN2_TIED_1_5B_LIKE = {
    "model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28,
    "intermediate_size": 8960, "num_attention_heads": 12, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6, "vocab_size": 151936, "tie_word_embeddings": True,
}
LLAMA_70B_LIKE = {
    "model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80,
    "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5, "vocab_size": 128256, "tie_word_embeddings": False,
}
# head_dim given explicitly, tie_word_embeddings left to mlx-lm's default (True), and an
# intermediate size no group size divides, so mlx-lm leaves down_proj unquantized.
LLAMA_ODD = {
    "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 4, "head_dim": 128,
    "intermediate_size": 5000, "num_attention_heads": 16, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-5, "vocab_size": 32000, "attention_bias": True,
}
CLASSES = {"deepseek_v3": deepseek_v3, "qwen2": qwen2, "llama": llama}


def nbytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def lazy_mlx_model(config, quant, dtype="bfloat16", predicate=None):
    """mlx-lm's model built, cast and quantized lazily, as mlx_lm.convert would."""
    mod = CLASSES[config["model_type"]]
    model = mod.Model(mod.ModelArgs.from_dict(config))
    cast = getattr(model, "cast_predicate", lambda _: True)
    dt = getattr(mx, dtype)
    model.update(tree_map_with_path(
        lambda k, v: v.astype(dt) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v,
        model.parameters()))
    qconfig = dict(config)
    if quant is not None:
        model, qconfig = quantize_model(model, qconfig, quant.group_size, quant.bits,
                                        mode=quant.mode, quant_predicate=predicate)
    return model, qconfig


def head_bytes(model) -> int:
    lm_head = getattr(model, "lm_head", None)
    return nbytes(model.model.norm) + (nbytes(lm_head) if lm_head is not None else 0)


def assert_same_as_mlx(spec, model):
    assert [l.weight_bytes for l in spec.layers] == [nbytes(l) for l in model.model.layers]
    assert spec.embed_bytes == nbytes(model.model.embed_tokens)
    assert spec.head_bytes == head_bytes(model)
    assert spec.total_weight_bytes == nbytes(model)


@pytest.mark.parametrize("quant", [Quantization(4, 32), Quantization(3, 64), Quantization(8, 64),
                                   None])
def test_r1_bytes_match_mlx_lm_without_allocating(quant):
    mx.reset_peak_memory()
    model, _ = lazy_mlx_model(R1, quant)
    spec = model_spec_from_config(R1, quant)
    assert_same_as_mlx(spec, model)
    # Stage sums are the mlx sums of the same modules.
    assert spec.stage_weight_bytes(0, 20) == nbytes(model.model.embed_tokens) + sum(
        nbytes(l) for l in model.model.layers[:20])
    assert spec.stage_weight_bytes(40, 61) == head_bytes(model) + sum(
        nbytes(l) for l in model.model.layers[40:])
    # Lazy all the way: far less than one layer was ever allocated.
    assert mx.get_peak_memory() < 64 * 2**20


def test_r1_active_bytes_and_params_match_mlx_lm():
    q = Quantization(4, 32)
    model, _ = lazy_mlx_model(R1, q)
    spec = model_spec_from_config(R1, q)
    top_k, experts = R1["num_experts_per_tok"], R1["n_routed_experts"]
    for layer, ours in zip(model.model.layers, spec.layers):
        switch = getattr(layer.mlp, "switch_mlp", None)
        routed = nbytes(switch) if switch is not None else 0
        assert ours.active_bytes == nbytes(layer) - routed + routed // experts * top_k
    plain, _ = lazy_mlx_model(R1, None)
    assert spec.params == sum(v.size for _, v in tree_flatten(plain.parameters()))
    # Reference figures (apple-silicon.md): 671,026,419,200 without the MTP layer, ~37.5B active.
    assert spec.params == 671_026_419_200
    assert abs(spec.active_params / 1e9 - 37.5) < 0.1
    assert any("multi-token" in n for n in spec.notes)


@pytest.mark.parametrize("config", [QWEN2_32B_LIKE, QWEN2_TIED_1_5B_LIKE, LLAMA_70B_LIKE, LLAMA_ODD],
                         ids=["qwen2", "qwen2-tied", "llama", "llama-odd"])
@pytest.mark.parametrize("quant", [Quantization(4, 64), Quantization(3, 32), None],
                         ids=["4bit-g64", "3bit-g32", "bf16"])
def test_dense_models_match_mlx_lm(config, quant):
    model, _ = lazy_mlx_model(config, quant)
    spec = model_spec_from_config(config, quant)
    assert_same_as_mlx(spec, model)
    assert spec.tied_embeddings == (getattr(model, "lm_head", None) is None)
    if spec.tied_embeddings:
        # The last stage computes logits with the embedding, so it holds it too.
        assert spec.stage_weight_bytes(2, spec.num_layers) == sum(
            nbytes(l) for l in model.model.layers[2:]) + nbytes(model.model.embed_tokens) \
            + head_bytes(model)


def test_other_modes_and_per_module_overrides_match_mlx_lm():
    model, _ = lazy_mlx_model(QWEN2_32B_LIKE, Quantization(4, 32, "mxfp4"))
    assert_same_as_mlx(model_spec_from_config(QWEN2_32B_LIKE, Quantization(4, 32, "mxfp4")), model)
    # A mixed quantization as mlx_lm.convert records it in config.json, read back.
    mixed = lambda path, m: {"bits": 8, "group_size": 64} if "down_proj" in path else True  # noqa: E731
    model, qconfig = lazy_mlx_model(LLAMA_70B_LIKE, Quantization(4, 64), predicate=mixed)
    assert any(k.endswith("down_proj") for k in qconfig["quantization"])
    spec = model_spec_from_config(qconfig, FROM_CONFIG, dtype="bfloat16")
    assert_same_as_mlx(spec, model)


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2", "llama"])
def test_kv_cache_bytes_match_mlx_lm_after_a_forward_pass(arch):
    """The one test that evaluates: a tiny float32 model, 300 tokens through mlx-lm's cache."""
    tiny = {
        "deepseek_v3": {"model_type": "deepseek_v3", "hidden_size": 64, "num_hidden_layers": 2,
                        "intermediate_size": 128, "moe_intermediate_size": 32,
                        "num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": 32,
                        "kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32,
                        "v_head_dim": 32, "n_routed_experts": 4, "n_shared_experts": 1,
                        "num_experts_per_tok": 2, "first_k_dense_replace": 1, "vocab_size": 256,
                        "rms_norm_eps": 1e-6},
        "qwen2": {**QWEN2_TIED_1_5B_LIKE, "hidden_size": 64, "num_hidden_layers": 2,
                  "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 256},
        "llama": {**LLAMA_ODD, "hidden_size": 64, "num_hidden_layers": 2, "head_dim": 32,
                  "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "vocab_size": 256},
    }[arch]
    mod = CLASSES[arch]
    model = mod.Model(mod.ModelArgs.from_dict(tiny))
    cache = make_prompt_cache(model)
    tokens = 300
    mx.eval(model(mx.zeros((1, tokens), dtype=mx.int32), cache=cache))
    spec = model_spec_from_config(tiny, None, dtype="float32")
    for i, c in enumerate(cache):
        assert spec.kv_bytes(i, i + 1, tokens) == c.keys.nbytes + c.values.nbytes
    assert spec.kv_bytes(0, 2, tokens, sessions=3) == 3 * sum(c.nbytes for c in cache)


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2", "llama"])
def test_headers_of_a_saved_model_match_what_mlx_lm_loads(synthetic, arch):
    path = synthetic(arch, shard_bytes=1 << 18)
    assert len(list(path.glob("model*.safetensors"))) > 1
    spec = model_spec_from_dir(path)
    model, _ = load_model(path, lazy=True)
    assert spec.source == "safetensors" and spec.notes == ()
    assert spec.dtype == "float32"  # synthetic CPU models are float32; read from the files
    assert_same_as_mlx(spec, model)


def test_config_and_files_that_disagree_are_reported(synthetic, tmp_path):
    src = synthetic("qwen2")
    model = tmp_path / "m"
    shutil.copytree(src, model)
    config = json.loads((model / "config.json").read_text())
    config["quantization"]["bits"] = 8  # the files are 4-bit
    (model / "config.json").write_text(json.dumps(config))
    spec = model_spec_from_dir(model)
    files = model_spec_from_dir(src)
    assert any("disagree" in n for n in spec.notes)
    assert spec.total_weight_bytes == files.total_weight_bytes  # the files win
    # Planning another quantization ignores the files and says so.
    other = model_spec_from_dir(src, Quantization(8, 64))
    assert other.source == "config" and other.total_weight_bytes > files.total_weight_bytes


def test_partial_download_and_extra_layers_are_reported(synthetic, tmp_path):
    src = synthetic("deepseek_v3", shard_bytes=1 << 18)
    model = tmp_path / "m"
    shutil.copytree(src, model)
    files = sorted(model.glob("model-*.safetensors"))
    files[-1].unlink()
    spec = model_spec_from_dir(model)
    full = model_spec_from_dir(src)
    assert any("missing files" in n for n in spec.notes)
    # What is missing is taken from config.json, so the total is still the whole model.
    assert spec.total_weight_bytes == full.total_weight_bytes
    # A checkpoint layer past num_hidden_layers (DeepSeek's MTP layer) is not counted.
    n = full.num_layers
    mx.save_safetensors(str(model / "model-extra.safetensors"),
                        {f"model.layers.{n}.input_layernorm.weight": mx.zeros((128,))})
    spec = model_spec_from_dir(model)
    assert any("beyond num_hidden_layers" in n for n in spec.notes)


def test_corrupt_header_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_TIED_1_5B_LIKE))
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(HeaderError, match="model.safetensors"):
        model_spec_from_dir(tmp_path)


def test_unsupported_architecture_and_bad_quantizations():
    with pytest.raises(UnsupportedModel, match="gpt_oss"):
        model_spec_from_config({"model_type": "gpt_oss"}, None)
    with pytest.raises(ValueError):
        Quantization(7, 64)
    with pytest.raises(ValueError):
        Quantization(4, 48)
    with pytest.raises(ValueError):
        Quantization.parse("fourbit")


@pytest.mark.parametrize("text,expected", [
    ("4bit", Quantization(4, 64)), ("4-bit", Quantization(4, 64)), ("q3", Quantization(3, 64)),
    ("4bit-g32", Quantization(4, 32)), ("8bit-gs128", Quantization(8, 128)),
    ("4bit-mxfp4", Quantization(4, 32, "mxfp4")),
])
def test_quantization_parsing(text, expected):
    assert Quantization.parse(text) == expected
    assert Quantization.parse(expected.label) == expected


def test_dtype_parsing():
    assert parse_dtype("bf16") == "bfloat16" and parse_dtype("FP32") == "float32"
    assert parse_dtype("4bit") is None


def test_workspace_grows_with_context_and_kv_with_sessions():
    spec = model_spec_from_config(R1, Quantization(4, 32))
    assert spec.workspace_bytes(3, 10, 32768) > spec.workspace_bytes(3, 10, 4096) > 0
    assert spec.kv_bytes(0, 61, 4096, 4) == 4 * spec.kv_bytes(0, 61, 4096)
    # MLA keeps 512 latent + 64 rope values per layer and token: 1,152 bytes in bf16.
    assert spec.layers[0].kv_bytes_per_token == 1152
    assert spec.kv_bytes(0, 1, 1) == spec.kv_bytes(0, 1, 256)  # the cache grows by 256 tokens


def test_mla_prefill_workspace_estimate_is_close_to_what_mlx_allocates():
    """The workspace is an estimate; for MLA (pe_scores dominate) it must be the right size."""
    cfg = {"model_type": "deepseek_v3", "hidden_size": 256, "num_hidden_layers": 2,
           "intermediate_size": 512, "moe_intermediate_size": 64, "num_attention_heads": 16,
           "num_key_value_heads": 16, "q_lora_rank": 64, "kv_lora_rank": 64,
           "qk_rope_head_dim": 32, "qk_nope_head_dim": 64, "v_head_dim": 64,
           "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
           "first_k_dense_replace": 1, "vocab_size": 256, "rms_norm_eps": 1e-6}
    model = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    cache = make_prompt_cache(model)
    chunk = mx.zeros((1, 512), dtype=mx.int32)
    mx.eval(model(chunk, cache=cache))
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(model(chunk, cache=cache))  # the second chunk attends to 1024 cached tokens
    measured = mx.get_peak_memory() - base
    estimate = model_spec_from_config(cfg, None, dtype="float32").workspace_bytes(0, 2, 1024, 512)
    assert 0.7 * measured < estimate < 1.3 * measured


class MtpModule(nn.Module):
    """DeepSeek-V3's multi-token-prediction module as the original checkpoint lays out
    model.layers.61 (mlx-lm drops it): one decoder layer from mlx-lm's own class, the two
    input norms, the projection of [embedding; hidden] and the shared head's norm. Its
    head and embedding are the main model's."""

    def __init__(self, config, layer_idx):
        super().__init__()
        args = deepseek_v3.ModelArgs.from_dict(config)
        h = args.hidden_size
        self.layer = deepseek_v3.DeepseekV3DecoderLayer(args, layer_idx)
        self.enorm, self.hnorm = nn.RMSNorm(h), nn.RMSNorm(h)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.shared_head_norm = nn.RMSNorm(h)


def test_r1_mtp_layer_counts_682_6b_with_the_main_model():
    """apple-silicon.md: 671,026,419,200 parameters without the MTP layer, 682,636,487,424
    with it; from the shipped config."""
    assert R1["num_nextn_predict_layers"] == 1
    spec = model_spec_from_config(R1, None)
    assert spec.params == 671_026_419_200
    assert spec.params + spec.mtp.params == 682_636_487_424
    mtp = MtpModule(R1, R1["num_hidden_layers"])
    assert spec.mtp.params == sum(v.size for _, v in tree_flatten(mtp.parameters()))
    # Distills and configs without num_nextn_predict_layers have none.
    assert model_spec_from_config(QWEN2_32B_LIKE, None).mtp is None
    assert model_spec_from_config({**R1, "num_nextn_predict_layers": 0}, None).mtp is None


@pytest.mark.parametrize("quant", [Quantization(4, 32), Quantization(3, 64)])
def test_r1_mtp_bytes_match_mlx_quantized_like_the_main_layers(quant):
    mtp = MtpModule(R1, R1["num_hidden_layers"])
    cast = lambda k: "e_score_correction_bias" not in k  # noqa: E731 (the model's cast_predicate)
    mtp.update(tree_map_with_path(
        lambda k, v: v.astype(mx.bfloat16) if cast(k) and mx.issubdtype(v.dtype, mx.floating)
        else v, mtp.parameters()))
    quantize_model(mtp, {}, quant.group_size, quant.bits)
    spec = model_spec_from_config(R1, quant)
    assert spec.mtp.layers[0].weight_bytes == nbytes(mtp.layer)
    assert spec.mtp.weight_bytes == nbytes(mtp)
    # The MTP layer is an MoE layer like layer 60, at the same size.
    assert spec.mtp.layers[0].weight_bytes == spec.layers[60].weight_bytes
    # The last stage also holds a copy of the embedding for it, unless it is the first stage.
    assert spec.mtp_stage_bytes(40) == nbytes(mtp) + spec.embed_bytes
    assert spec.mtp_stage_bytes(0) == nbytes(mtp)
    assert spec.mtp.kv_bytes_per_token == 1152  # one layer of MLA latent + rope key, bf16
