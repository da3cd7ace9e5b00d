"""The tensors of each supported architecture, as mlx-lm lays the model out after loading.

Each function mirrors one mlx-lm model class (``mlx_lm/models/<type>.py``), including its
``ModelArgs`` defaults for keys a config.json may leave out, so the accounting matches what
``mlx_lm.load`` builds. Only shapes are described here; bytes are computed in model_spec.
tests/test_model_spec.py checks every function against the real mlx-lm class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class Module:
    """One mlx module's parameters.

    ``quantizable``: the module has ``to_quantized`` (Linear, Embedding, SwitchLinear,
    MultiLinear); its weight's last axis is the input axis that gets quantized.
    ``experts``: > 0 for routed experts stacked on axis 0 (``switch_mlp``).
    ``dtype``: fixed dtype for tensors mlx-lm never casts (the router's correction bias).
    """

    path: str
    shape: tuple[int, ...]
    quantizable: bool
    bias: int = 0
    experts: int = 0
    dtype: str | None = None


@dataclass(frozen=True)
class LayerShape:
    """The modules of one decoder layer plus what its KV cache and prefill need."""

    modules: tuple[Module, ...]
    kind: str  # "dense" | "moe"
    kv_values_per_token: int  # values (not bytes) the layer's cache keeps per token
    top_k: int = 0
    # Prefill working memory, in values of the activation dtype (see ModelSpec.workspace_bytes).
    score_values_per_pair: int = 0  # materialized per (query, key) pair
    values_per_key: int = 0  # per cached token, rebuilt for every prefill chunk
    values_per_query: int = 0  # per token of the chunk
    sliding_window: int | None = None
    # Prefill compute beyond 2 x active params per token: per (query, key) pair, and per
    # cached token for every chunk (MLA re-expands its latent cache).
    flops_per_pair: int = 0
    flops_per_key: int = 0
    decode_flops_per_key: int = 0  # decode attention compute per cached token


@dataclass(frozen=True)
class MtpShape:
    """A multi-token-prediction module: a decoder layer and the modules around it."""

    layer: LayerShape
    extra: tuple[Module, ...]


@dataclass(frozen=True)
class Inventory:
    model_type: str  # mlx-lm module name after remapping
    hidden_size: int
    vocab_size: int
    embed: tuple[Module, ...]
    head: tuple[Module, ...]  # final norm + lm_head (lm_head absent when tied)
    layers: tuple[LayerShape, ...]
    tied_embeddings: bool
    dropped_layers: int = 0  # checkpoint layers mlx-lm drops (DeepSeek's MTP layer)
    mtp: tuple[MtpShape, ...] = ()  # those layers, for planning drafts


# Same remapping as mlx_lm.utils.MODEL_REMAPPING for the types handled here.
REMAP = {"mistral": "llama", "kimi_k2": "deepseek_v3", "joyai_llm_flash": "deepseek_v3"}


class UnsupportedModel(ValueError):
    """config.json names an architecture the planner has no inventory for."""


def _linear(path: str, out_dims: int, in_dims: int, bias: bool = False) -> Module:
    return Module(path, (out_dims, in_dims), True, out_dims if bias else 0)


def _norm(path: str, dims: int) -> Module:
    return Module(path, (dims,), False)


def _mlp(prefix: str, hidden: int, inter: int, bias: bool = False) -> list[Module]:
    return [
        _linear(f"{prefix}.gate_proj", inter, hidden, bias),
        _linear(f"{prefix}.down_proj", hidden, inter, bias),
        _linear(f"{prefix}.up_proj", inter, hidden, bias),
    ]


def _top(cfg: Mapping[str, Any], tied: bool) -> tuple[tuple[Module, ...], tuple[Module, ...]]:
    hidden, vocab = int(cfg["hidden_size"]), int(cfg["vocab_size"])
    embed = (Module("model.embed_tokens", (vocab, hidden), True),)
    head = [_norm("model.norm", hidden)]
    if not tied:
        head.append(_linear("lm_head", vocab, hidden))
    return embed, tuple(head)


def _deepseek_layer(cfg: Mapping[str, Any], i: int) -> LayerShape:
    """Decoder layer ``i`` of mlx_lm.models.deepseek_v3: MLA with kv_b_proj split into
    embed_q / unembed_out, routed experts stacked in switch_mlp, router unquantized."""
    g = cfg.get
    hidden = int(cfg["hidden_size"])
    heads = int(g("num_attention_heads", 32))
    q_lora = g("q_lora_rank", 1536)
    kv_lora = int(g("kv_lora_rank", 512))
    rope = int(g("qk_rope_head_dim", 64))
    nope = int(g("qk_nope_head_dim", 128))
    v_dim = int(g("v_head_dim", 128))
    att_bias = bool(g("attention_bias", False))
    n_routed = g("n_routed_experts")
    n_shared = g("n_shared_experts")
    moe_inter = int(g("moe_intermediate_size", 1407))
    inter = int(g("intermediate_size", 11008))
    top_k = int(g("num_experts_per_tok", 1))
    first_dense = int(g("first_k_dense_replace", 0))
    freq = int(g("moe_layer_freq", 1))
    q_head = nope + rope
    attn: list[Module] = []
    if q_lora is None:
        attn.append(_linear("self_attn.q_proj", heads * q_head, hidden))
    else:
        attn += [
            _linear("self_attn.q_a_proj", int(q_lora), hidden, att_bias),
            _norm("self_attn.q_a_layernorm", int(q_lora)),
            _linear("self_attn.q_b_proj", heads * q_head, int(q_lora)),
        ]
    attn += [
        _linear("self_attn.kv_a_proj_with_mqa", kv_lora + rope, hidden, att_bias),
        _norm("self_attn.kv_a_layernorm", kv_lora),
        # MultiLinear weights are (heads, out, in); mlx quantizes the last axis.
        Module("self_attn.embed_q", (heads, kv_lora, nope), True),
        Module("self_attn.unembed_out", (heads, v_dim, kv_lora), True),
        _linear("self_attn.o_proj", hidden, heads * v_dim, att_bias),
    ]
    norms = [_norm("input_layernorm", hidden), _norm("post_attention_layernorm", hidden)]
    moe = n_routed is not None and i >= first_dense and i % freq == 0
    if n_routed is not None and moe:
        e = int(n_routed)
        mlp = [
            Module("mlp.switch_mlp.gate_proj", (e, moe_inter, hidden), True, experts=e),
            Module("mlp.switch_mlp.up_proj", (e, moe_inter, hidden), True, experts=e),
            Module("mlp.switch_mlp.down_proj", (e, hidden, moe_inter), True, experts=e),
            # MoEGate keeps a raw weight (no to_quantized) and a float32 correction
            # bias that mlx-lm's cast_predicate never casts.
            Module("mlp.gate", (e, hidden), False),
            Module("mlp.gate.e_score_correction_bias", (e,), False, dtype="float32"),
        ]
        shared_inter = 0
        if n_shared is not None:
            shared_inter = moe_inter * int(n_shared)
            mlp += _mlp("mlp.shared_experts", hidden, shared_inter)
        mlp_width = top_k * (2 * moe_inter + hidden) + 2 * shared_inter
    else:
        mlp = _mlp("mlp", hidden, inter)
        mlp_width = 2 * inter
    return LayerShape(
        modules=tuple(attn + mlp + norms),
        kind="moe" if moe else "dense",
        # The MLA cache keeps the compressed latent and the rope key per token.
        kv_values_per_token=kv_lora + rope,
        top_k=top_k if moe else 0,
        # Prefill (L > 1) materializes pe_scores (heads x L x total) and its masked
        # copy (mx.where) at once, and expands the whole latent cache into per-head
        # keys and values for every chunk.
        score_values_per_pair=2 * heads,
        values_per_key=heads * (nope + v_dim),
        values_per_query=4 * hidden + heads * q_head + mlp_width,
        flops_per_pair=2 * heads * (q_head + v_dim),
        flops_per_key=2 * heads * kv_lora * (nope + v_dim),
        # Decode (L == 1) attends in the latent space: rope scores, latent scores and the
        # latent output, per head and cached token.
        decode_flops_per_key=2 * heads * (rope + 2 * kv_lora),
    )


def deepseek_v3(cfg: Mapping[str, Any]) -> Inventory:
    """mlx_lm.models.deepseek_v3 (DeepSeek-V3 and R1), and the multi-token-prediction
    module of the original checkpoints (``model.layers.{num_hidden_layers}``), which
    mlx-lm's sanitize drops: one more decoder layer plus enorm, hnorm, eh_proj and the
    shared_head norm (its head and the embedding are the main model's)."""
    hidden = int(cfg["hidden_size"])
    n = int(cfg["num_hidden_layers"])
    layers = tuple(_deepseek_layer(cfg, i) for i in range(n))
    nextn = int(cfg.get("num_nextn_predict_layers", 0) or 0)
    mtp = tuple(
        MtpShape(_deepseek_layer(cfg, i), (
            _norm("enorm", hidden), _norm("hnorm", hidden),
            _linear("eh_proj", hidden, 2 * hidden), _norm("shared_head.norm", hidden),
        ))
        for i in range(n, n + nextn)
    )
    embed, head = _top(cfg, tied=False)  # DeepSeek-V3 always has its own lm_head
    return Inventory(
        "deepseek_v3", hidden, int(cfg["vocab_size"]), embed, head, layers, False,
        dropped_layers=nextn, mtp=mtp,
    )


def _gqa_layer(
    cfg: Mapping[str, Any], head_dim: int, qkv_bias: bool, o_bias: bool, mlp_bias: bool,
    window: int | None,
) -> LayerShape:
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    inter = int(cfg["intermediate_size"])
    mods = [
        _linear("self_attn.q_proj", heads * head_dim, hidden, qkv_bias),
        _linear("self_attn.k_proj", kv_heads * head_dim, hidden, qkv_bias),
        _linear("self_attn.v_proj", kv_heads * head_dim, hidden, qkv_bias),
        _linear("self_attn.o_proj", hidden, heads * head_dim, o_bias),
        *_mlp("mlp", hidden, inter, mlp_bias),
        _norm("input_layernorm", hidden),
        _norm("post_attention_layernorm", hidden),
    ]
    return LayerShape(
        modules=tuple(mods),
        kind="dense",
        kv_values_per_token=2 * kv_heads * head_dim,
        # Metal's fused attention never materializes the score matrix here.
        values_per_query=4 * hidden + (heads + 2 * kv_heads) * head_dim + 2 * inter,
        sliding_window=window,
        flops_per_pair=4 * heads * head_dim,
        decode_flops_per_key=4 * heads * head_dim,
    )


def llama(cfg: Mapping[str, Any]) -> Inventory:
    """mlx_lm.models.llama (Llama, Mistral, R1-Distill-Llama). tie_word_embeddings
    defaults to True there, as in mlx-lm's ModelArgs."""
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    att_bias = bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    n = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types") or ["full_attention"] * n
    window = cfg.get("sliding_window")
    layers = tuple(
        _gqa_layer(cfg, head_dim, att_bias, att_bias, mlp_bias,
                   int(window) if t == "sliding_attention" and window else None)
        for t in types
    )
    tied = bool(cfg.get("tie_word_embeddings", True))
    embed, head = _top(cfg, tied)
    return Inventory("llama", int(cfg["hidden_size"]), int(cfg["vocab_size"]), embed, head,
                     layers, tied)


def qwen2(cfg: Mapping[str, Any]) -> Inventory:
    """mlx_lm.models.qwen2 (Qwen2/2.5, R1-Distill-Qwen): q/k/v with bias, o_proj without,
    head_dim = hidden / heads (the class ignores a head_dim key)."""
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg["hidden_size"]) // heads
    layer = _gqa_layer(cfg, head_dim, True, False, False, None)
    tied = bool(cfg.get("tie_word_embeddings", True))
    embed, head = _top(cfg, tied)
    return Inventory("qwen2", int(cfg["hidden_size"]), int(cfg["vocab_size"]), embed, head,
                     (layer,) * int(cfg["num_hidden_layers"]), tied)


ARCHITECTURES = {"deepseek_v3": deepseek_v3, "llama": llama, "qwen2": qwen2}


def inventory(cfg: Mapping[str, Any]) -> Inventory:
    model_type = str(cfg.get("model_type", ""))
    arch = ARCHITECTURES.get(REMAP.get(model_type, model_type))
    if arch is None:
        known = ", ".join(sorted(set(ARCHITECTURES) | set(REMAP)))
        raise UnsupportedModel(
            f"model_type {model_type!r} is not modelled by the planner (known: {known})"
        )
    try:
        return arch(cfg)
    except KeyError as e:
        raise UnsupportedModel(f"config.json of a {model_type} model lacks {e}") from None
