"""Synthetic models: layout, determinism, caching, and that mlx-lm runs them sensibly."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from clusterd.models import synthetic
from clusterd.models.synthetic import PRESETS, build_synthetic_model, synthetic_config
from clusterd.models.synthetic_tokenizer import ASSISTANT, BOS, EOS, THINK_END, THINK_START, USER

ARCHS = ("deepseek_v3", "qwen2", "llama")
SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def tiny(root) -> dict[str, Path]:
    return {arch: build_synthetic_model(arch, "tiny", seed=0, root=root) for arch in ARCHS}


@pytest.fixture(scope="module")
def loaded(tiny):
    import mlx_lm

    return {arch: mlx_lm.load(str(path)) for arch, path in tiny.items()}


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _shards(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if SHARD_RE.fullmatch(p.name))


# --- config and presets --------------------------------------------------------------


def test_presets_cover_archs_and_quantizable_dims():
    for preset in ("tiny", "small", "bench"):
        for arch in ARCHS:
            c = synthetic_config(arch, preset)
            assert c["model_type"] == arch
            assert c["torch_dtype"] == "float32"
            assert c["vocab_size"] % 64 == 0 and c["hidden_size"] % 64 == 0
            assert c["intermediate_size"] % 64 == 0
    ds = synthetic_config("deepseek_v3", "tiny")
    assert ds["q_lora_rank"] and ds["first_k_dense_replace"] >= 1
    assert ds["n_group"] > 1 and ds["topk_group"] > 1
    assert ds["topk_method"] == "noaux_tc" and ds["scoring_func"] == "sigmoid"
    assert ds["rope_scaling"]["type"] == "yarn"
    for k in ("qk_nope_head_dim", "kv_lora_rank", "moe_intermediate_size", "q_lora_rank"):
        assert ds[k] % 64 == 0, k
    assert synthetic_config("deepseek_v3", "small")["num_hidden_layers"] >= 8
    assert synthetic_config("deepseek_v3", "bench")["num_hidden_layers"] >= 12
    assert synthetic_config("llama", "tiny", num_layers=2)["num_hidden_layers"] == 2
    with pytest.raises(TypeError):
        PRESETS["tiny"]["llama"] = {}  # read-only
    with pytest.raises(ValueError):
        synthetic_config("gpt2", "tiny")
    with pytest.raises(ValueError):
        synthetic_config("llama", "huge")


def test_default_root_follows_clusterd_home(monkeypatch, tmp_path):
    monkeypatch.setenv("CLUSTERD_HOME", str(tmp_path))
    assert synthetic.default_root() == tmp_path / "models" / "synthetic"
    monkeypatch.delenv("CLUSTERD_HOME")
    assert synthetic.default_root() == Path.home() / ".cache" / "clusterd" / "synthetic"


# --- layout ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_like_mlx_community(tiny, arch):
    path = tiny[arch]
    config = json.loads((path / "config.json").read_text())
    q = {"group_size": 64, "bits": 4, "mode": "affine"}
    assert config["quantization"] == q and config["quantization_config"] == q
    assert config["model_type"] == arch
    assert config["architectures"] == [synthetic.ARCHS[arch].architecture]
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    assert config["torch_dtype"] == "float32" and config["max_position_embeddings"] > 0
    assert config["tie_word_embeddings"] is False
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"):
        assert (path / name).is_file()

    shards = _shards(path)
    assert len(shards) >= 3
    assert [int(SHARD_RE.fullmatch(p.name)[1]) for p in shards] == list(range(1, len(shards) + 1))
    assert {int(SHARD_RE.fullmatch(p.name)[2]) for p in shards} == {len(shards)}

    index = json.loads((path / "model.safetensors.index.json").read_text())
    in_files = {}
    total = 0
    for p in shards:
        header = _header(p)
        assert header.pop("__metadata__") == {"format": "mlx"}
        for k, info in header.items():
            in_files[k] = p.name
            assert info["dtype"] in ("F32", "U32")  # float32 model, packed 4-bit weights
            total += info["data_offsets"][1] - info["data_offsets"][0]
    assert index["weight_map"] == in_files
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == total

    files_per_layer: dict[int, set[str]] = {}
    for k, f in in_files.items():
        if m := re.match(r"model\.layers\.(\d+)\.", k):
            files_per_layer.setdefault(int(m[1]), set()).add(f)
    assert len(files_per_layer) == config["num_hidden_layers"]
    assert any(len(fs) > 1 for fs in files_per_layer.values()), "no layer straddles two files"

    # Every projection is quantized, the way mlx-community models are; only norms, the
    # router and additive biases stay float.
    for k in in_files:
        if k.endswith(".weight") and not k.endswith(("norm.weight", "mlp.gate.weight")):
            base = k[: -len(".weight")]
            assert f"{base}.scales" in in_files and f"{base}.biases" in in_files, k
    if arch == "deepseek_v3":
        for part in ("embed_q", "unembed_out", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa"):
            assert f"model.layers.1.self_attn.{part}.scales" in in_files
        assert "model.layers.1.mlp.switch_mlp.gate_proj.scales" in in_files
        assert "model.layers.1.mlp.shared_experts.down_proj.scales" in in_files
        assert "model.layers.0.mlp.gate_proj.scales" in in_files  # dense first layer
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in in_files
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in in_files


# --- determinism and cache -------------------------------------------------------------


def test_same_seed_is_byte_identical_other_seed_differs(tiny, tmp_path):
    a = tiny["deepseek_v3"]
    b = build_synthetic_model("deepseek_v3", "tiny", seed=0, root=tmp_path / "b")
    c = build_synthetic_model("deepseek_v3", "tiny", seed=1, root=tmp_path / "c")
    assert a.name == b.name and b.name != c.name
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    differ = [p.name for p in _shards(a) if p.read_bytes() != (c / p.name).read_bytes()]
    assert len(differ) == len(_shards(a))


def test_cache_hit_does_not_rebuild(tiny, root, monkeypatch):
    path = tiny["llama"]
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}

    def fail(*a, **k):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(synthetic, "_write_model", fail)
    assert build_synthetic_model("llama", "tiny", seed=0, root=root) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before
    assert not list(root.glob(".partial-*"))


def test_overrides_change_the_cache_key_and_the_model(tmp_path):
    path = build_synthetic_model("qwen2", "tiny", seed=0, root=tmp_path, num_layers=2,
                                 shard_bytes=200_000)
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and "-L2-" in path.name
    assert all(p.stat().st_size <= 200_000 + 4096 for p in _shards(path))


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(path, *a, **k):
        (path / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(synthetic, "_write_model", boom)
    with pytest.raises(RuntimeError):
        build_synthetic_model("llama", "tiny", root=tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- tokenizer -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template_and_special_ids(loaded, arch):
    _, tok = loaded[arch]
    msgs = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == f"{BOS}{USER}hi{ASSISTANT}{THINK_START}\n"
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) else ids
    assert ids[0] == 0 and ids.count(0) == 1
    assert ids[-3:] == [tok.convert_tokens_to_ids(t) for t in (ASSISTANT, THINK_START)] + [
        tok.encode("\n", add_special_tokens=False)[0]
    ]
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.convert_ids_to_tokens([0, 1]) == [BOS, EOS]
    assert 1 in tok.eos_token_ids
    assert tok.has_thinking and tok.think_end == THINK_END


def test_plain_text_round_trips(loaded):
    _, tok = loaded["deepseek_v3"]
    text = "Hello, world!\n  def f(x): return x ** 2  # ü, 你好, emoji 🙂\n\tend"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.encode(text)[0] == 0  # BOS prepended, as R1's tokenizer does


@pytest.mark.parametrize("arch", ARCHS)
def test_vocab_is_padded_so_every_id_decodes(loaded, tiny, arch):
    model, tok = loaded[arch]
    vocab = json.loads((tiny[arch] / "config.json").read_text())["vocab_size"]
    assert len(tok) == vocab == model.model.embed_tokens.weight.shape[0]
    assert tok.decode([vocab - 1])
    detok = tok.detokenizer
    detok.reset()
    for i in (vocab - 1, vocab - 2, 5):
        detok.add_token(i)
    detok.finalize()
    assert "place" in detok.text


# --- behaviour under mlx-lm ------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_is_varied_and_finite(loaded, arch):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    model, tok = loaded[arch]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Why is the sky blue?"}], add_generation_prompt=True
    )
    prompt = prompt["input_ids"] if isinstance(prompt, dict) else prompt
    tokens = []
    for (t, logprobs), _ in zip(generate_step(mx.array(prompt), model, max_tokens=32), range(32)):
        assert mx.isfinite(logprobs).all().item()
        tokens.append(int(t))
    assert len(tokens) == 32
    assert len(set(tokens)) >= 8, tokens


def test_routing_is_not_degenerate(loaded, tiny):
    import mlx.core as mx
    import mlx.nn as nn

    model, tok = loaded["deepseek_v3"]
    config = json.loads((tiny["deepseek_v3"] / "config.json").read_text())
    n_exp, n_group, topk_group = config["n_routed_experts"], config["n_group"], config["topk_group"]
    chosen: dict[int, list] = {}

    class Recorder(nn.Module):
        # Wraps mlx-lm's own MoEGate and keeps what it picked.
        def __init__(self, gate, sink):
            super().__init__()
            self.gate = gate
            self._sink = sink

        def __call__(self, x):
            inds, scores = self.gate(x)
            self._sink(inds)
            return inds, scores

    moe = [i for i, layer in enumerate(model.layers) if hasattr(layer.mlp, "switch_mlp")]
    assert moe and moe[0] == config["first_k_dense_replace"]
    originals = {i: model.layers[i].mlp.gate for i in moe}
    try:
        for i in moe:
            model.layers[i].mlp.gate = Recorder(originals[i], chosen.setdefault(i, []).append)
        text = " ".join(synthetic_tokenizer_corpus().split()[:120])
        ids = tok.encode(text)[:64]
        assert len(ids) == 64
        mx.eval(model(mx.array(ids)[None]))
    finally:
        for i in moe:
            model.layers[i].mlp.gate = originals[i]

    per_group = n_exp // n_group
    for i in moe:
        inds = chosen[i][0].reshape(-1, config["num_experts_per_tok"]).tolist()
        used = {e for row in inds for e in row}
        assert len(used) >= n_exp // 2, (i, sorted(used))
        # Grouped routing is in play: each token's experts come from topk_group groups.
        assert all(len({e // per_group for e in row}) <= topk_group for row in inds)
        assert len({tuple(sorted(r)) for r in inds}) > 8


def synthetic_tokenizer_corpus() -> str:
    from clusterd.models.synthetic_tokenizer import CORPUS

    return CORPUS
