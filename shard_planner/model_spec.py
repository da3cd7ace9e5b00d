"""Exact memory accounting of a model as mlx-lm lays it out after loading.

From config.json and a quantization, every decoder layer's weight bytes, the embedding, the
final norm + head, the KV-cache bytes per token and the bytes one decoded token reads (active
experts only). When the model's safetensors files are present their headers give the exact
sizes, and disagreements with config.json are reported in ``ModelSpec.notes``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Union

from shard_planner import architectures as arch
from shard_planner.architectures import Inventory, LayerShape, Module, UnsupportedModel
from shard_planner.quantization import DTYPE_BYTES, MODES, Quantization, parse_dtype
from shard_planner.safetensors import (
    HeaderError,
    TensorInfo,
    float_dtype,
    group_of,
    group_sizes,
    missing_tensors,
    read_header,
    size_text,
    weight_files,
)

__all__ = [
    "DTYPE_BYTES", "FROM_CONFIG", "HeaderError", "KV_STEP", "LayerSpec", "ModelSpec", "MtpSpec",
    "PREFILL_CHUNK", "Quantization", "UnsupportedModel", "model_spec_from_config",
    "model_spec_from_dir", "parse_dtype",
]

# mlx-lm's KVCache grows in steps of 256 tokens (mlx_lm/models/cache.py, KVCache.step).
KV_STEP = 256
# mlx-lm prefills in chunks of 2048 tokens (generate's prefill_step_size).
PREFILL_CHUNK = 2048
# Pass as ``quant`` to take the quantization from config.json (or none when it has none).
FROM_CONFIG = "config"

@dataclass(frozen=True)
class LayerSpec:
    index: int
    kind: str  # "dense" | "moe"
    weight_bytes: int
    active_bytes: int  # read per decoded token (shared weights + top-k experts)
    params: int
    active_params: int
    kv_bytes_per_token: int  # per session
    sliding_window: int | None = None
    # Prefill working memory in bytes: per (query, key) pair, per cached token, per query.
    ws_pair: int = 0
    ws_key: int = 0
    ws_query: int = 0
    flops_per_pair: int = 0  # prefill attention compute per (query, key) pair
    flops_per_key: int = 0  # per cached token per prefill chunk
    decode_flops_per_key: int = 0  # decode attention compute per cached token
    # Routed experts (MoE layers): how many, how many a token uses, and all their bytes.
    experts: int = 0
    top_k: int = 0
    routed_bytes: int = 0

    def read_bytes(self, tokens: float) -> float:
        """Bytes one forward step of ``tokens`` tokens reads from this layer's weights: the
        shared weights once, and each routed expert that any of the tokens uses once. With
        top-k routing spread evenly over E experts, B tokens touch E * (1 - (1 - k/E)^B)
        distinct experts on average (k for one token)."""
        if not self.experts or tokens <= 1:
            return float(self.active_bytes)
        k, e = self.top_k, self.experts
        distinct = e * (1 - math.pow(1 - k / e, tokens))
        return self.active_bytes + self.routed_bytes / e * (distinct - k)


@dataclass(frozen=True)
class MtpSpec:
    """DeepSeek's multi-token-prediction module(s), as the original checkpoint holds them
    (mlx-lm drops them): a decoder layer each, plus enorm, hnorm, eh_proj and the
    shared_head norm, quantized like the main layers. Their head is the main model's
    lm_head, and their input embedding the main model's embed_tokens."""

    layers: tuple[LayerSpec, ...]
    extra_bytes: int  # enorm, hnorm, eh_proj, shared_head.norm of every module
    extra_params: int

    @property
    def weight_bytes(self) -> int:
        return sum(l.weight_bytes for l in self.layers) + self.extra_bytes

    @property
    def params(self) -> int:
        return sum(l.params for l in self.layers) + self.extra_params

    @property
    def kv_bytes_per_token(self) -> int:
        return sum(l.kv_bytes_per_token for l in self.layers)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_type: str
    hidden_size: int
    vocab_size: int
    quantization: Quantization | None  # None: unquantized, in ``dtype``
    dtype: str  # unquantized tensors, scales/biases, activations and KV cache
    layers: tuple[LayerSpec, ...]
    embed_bytes: int
    embed_params: int
    head_bytes: int  # final norm + lm_head (only the norm when the head is the embedding)
    head_params: int
    tied_embeddings: bool
    source: str  # "config" or "safetensors"
    notes: tuple[str, ...] = ()
    mtp: MtpSpec | None = None  # present when config.json has num_nextn_predict_layers >= 1
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def act_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def quant_label(self) -> str:
        return self.quantization.label if self.quantization else self.dtype

    @property
    def total_weight_bytes(self) -> int:
        return sum(l.weight_bytes for l in self.layers) + self.embed_bytes + self.head_bytes

    @property
    def params(self) -> int:
        return sum(l.params for l in self.layers) + self.embed_params + self.head_params

    @property
    def active_params(self) -> int:
        """All parameters but the routed experts a token does not use (the usual "37B
        activated" convention, which counts the whole embedding; the bytes a token reads,
        ``active_bytes_per_token``, count only its embedding row)."""
        return sum(l.active_params for l in self.layers) + self.embed_params + self.head_params

    @property
    def active_bytes_per_token(self) -> int:
        return self.stage_active_bytes(0, self.num_layers)

    @property
    def kv_bytes_per_token(self) -> int:
        return sum(l.kv_bytes_per_token for l in self.layers)

    def _check(self, start: int, end: int) -> None:
        if not 0 <= start < end <= self.num_layers:
            raise ValueError(f"layer range [{start}, {end}) is not inside [0, {self.num_layers})")

    def stage_weight_bytes(self, start: int, end: int) -> int:
        """Layers [start, end) plus the embedding on the first stage and the final norm +
        head on the last (with tied embeddings the last stage needs the embedding too)."""
        self._check(start, end)
        total = sum(l.weight_bytes for l in self.layers[start:end])
        if start == 0 or (end == self.num_layers and self.tied_embeddings):
            total += self.embed_bytes
        if end == self.num_layers:
            total += self.head_bytes
        return total

    def stage_active_bytes(self, start: int, end: int) -> int:
        """Bytes stage [start, end) reads per decoded token."""
        self._check(start, end)
        total = sum(l.active_bytes for l in self.layers[start:end])
        if start == 0:
            total += self.embed_bytes // self.vocab_size  # one embedding row
        if end == self.num_layers:
            total += self.head_bytes + (self.embed_bytes if self.tied_embeddings else 0)
        return total

    def mtp_stage_bytes(self, start: int) -> int:
        """Weight bytes the last stage [start, num_layers) adds to hold the MTP module: its
        layers and projections, and a copy of the embedding unless the stage holds it
        already (it is the first stage, or the head is the embedding). 0 without MTP."""
        if self.mtp is None:
            return 0
        self._check(start, self.num_layers)
        copy = start > 0 and not self.tied_embeddings
        return self.mtp.weight_bytes + (self.embed_bytes if copy else 0)

    def mtp_draft_bytes(self) -> int:
        """Bytes one MTP draft step reads: one module's layer (its top-k experts), its
        projections, an embedding row and the shared head once more."""
        if self.mtp is None:
            return 0
        per_module = self.mtp.extra_bytes // len(self.mtp.layers)
        head = self.head_bytes + (self.embed_bytes if self.tied_embeddings else 0)
        return self.mtp.layers[0].active_bytes + per_module + self.embed_bytes // self.vocab_size + head

    def stage_params(self, start: int, end: int) -> int:
        self._check(start, end)
        total = sum(l.params for l in self.layers[start:end])
        if start == 0 or (end == self.num_layers and self.tied_embeddings):
            total += self.embed_params
        return total + (self.head_params if end == self.num_layers else 0)

    @staticmethod
    def cache_tokens(context: int, window: int | None = None) -> int:
        """Tokens a KV cache allocates for ``context`` tokens (it grows in KV_STEP steps)."""
        tokens = -(-max(context, 0) // KV_STEP) * KV_STEP
        return min(tokens, window) if window else tokens

    def kv_bytes(self, start: int, end: int, context: int, sessions: int = 1) -> int:
        self._check(start, end)
        return sessions * sum(
            l.kv_bytes_per_token * self.cache_tokens(context, l.sliding_window)
            for l in self.layers[start:end]
        )

    def workspace_bytes(self, start: int, end: int, context: int, chunk: int = PREFILL_CHUNK) -> int:
        """Estimated peak transient memory of a prefill chunk in stage [start, end): layers run
        one after another, so the largest layer's need counts, plus one layer's cache copy
        while the cache grows. An estimate, unlike the weight and KV bytes."""
        self._check(start, end)
        q = min(chunk, max(context, 1))
        k = self.cache_tokens(context)
        return max(
            q * k * l.ws_pair + k * l.ws_key + q * l.ws_query + k * l.kv_bytes_per_token
            for l in self.layers[start:end]
        )

    def with_quantization(self, quant: Quantization | None, dtype: str | None = None) -> "ModelSpec":
        """The same model at another quantization (computed from config.json)."""
        return model_spec_from_config(self.config, quant, dtype=dtype or self.dtype, name=self.name)


# ---------------------------------------------------------------------------------------
# Accounting from config.json


QuantLike = Union[Quantization, None, str]


def _module_quant(mod: Module, path: str, default: Quantization | None,
                  overrides: Mapping[str, Any]) -> Quantization | None:
    if not mod.quantizable:
        return None
    if path in overrides:  # per-module entries, as mlx-lm's load_model honours them
        o = overrides[path]
        if isinstance(o, Mapping):
            return Quantization.from_config({**_quant_dict(default), **o})
        return default if o else None
    if default is None or mod.shape[-1] % default.group_size:
        return None  # mlx-lm's quantize_model skips axes the group size does not divide
    return default


def _quant_dict(q: Quantization | None) -> dict[str, Any]:
    return {"bits": q.bits, "group_size": q.group_size, "mode": q.mode} if q else {}


def module_bytes(mod: Module, quant: Quantization | None, dtype: str) -> int:
    fbytes = DTYPE_BYTES[dtype]
    rows = math.prod(mod.shape[:-1])
    cols = mod.shape[-1]
    bias = mod.bias * fbytes
    if quant is None:
        return rows * cols * DTYPE_BYTES[mod.dtype or dtype] + bias
    # mx.quantize packs bits into uint32 words and keeps one scale (+ bias) per group.
    _, _, scale_bytes, has_bias = MODES[quant.mode]
    groups = rows * (cols // quant.group_size)
    per_group = (scale_bytes or fbytes) * (2 if has_bias else 1)
    return rows * (cols * quant.bits // 32) * 4 + groups * per_group + bias


def _modules_bytes(mods: tuple[Module, ...], prefix: str, q: Quantization | None, dtype: str,
                   overrides: Mapping[str, Any], top_k: int = 0) -> tuple[int, int, int, int, int]:
    """-> (bytes, active bytes, params, active params, routed-expert bytes)."""
    b = ab = p = ap = rb = 0
    for m in mods:
        mb = module_bytes(m, _module_quant(m, prefix + m.path, q, overrides), dtype)
        mp = math.prod(m.shape) + m.bias
        b, p = b + mb, p + mp
        if m.experts:
            ab += mb // m.experts * top_k
            ap += mp // m.experts * top_k
            rb += mb
        else:
            ab, ap = ab + mb, ap + mp
    return b, ab, p, ap, rb


def _default_dtype(config: Mapping[str, Any]) -> str:
    # mlx_lm.convert casts to config.json's torch_dtype; real checkpoints are bf16.
    return parse_dtype(str(config.get("torch_dtype", ""))) or "bfloat16"


def _config_quant(config: Mapping[str, Any]) -> Quantization | None:
    block = config.get("quantization")
    return Quantization.from_config(block) if isinstance(block, Mapping) else None


def _layer_spec(i: int, shape: LayerShape, q: Quantization | None, dtype: str,
                overrides: Mapping[str, Any]) -> LayerSpec:
    act = DTYPE_BYTES[dtype]
    b, ab, p, ap, rb = _modules_bytes(shape.modules, f"model.layers.{i}.", q, dtype, overrides,
                                      shape.top_k)
    experts = max((m.experts for m in shape.modules), default=0)
    return LayerSpec(
        index=i, kind=shape.kind, weight_bytes=b, active_bytes=ab, params=p,
        active_params=ap, kv_bytes_per_token=shape.kv_values_per_token * act,
        sliding_window=shape.sliding_window, ws_pair=shape.score_values_per_pair * act,
        ws_key=shape.values_per_key * act, ws_query=shape.values_per_query * act,
        flops_per_pair=shape.flops_per_pair, flops_per_key=shape.flops_per_key,
        decode_flops_per_key=shape.decode_flops_per_key, experts=experts,
        top_k=shape.top_k if experts else 0, routed_bytes=rb,
    )


def _mtp_spec(inv: Inventory, q: Quantization | None, dtype: str,
              overrides: Mapping[str, Any]) -> MtpSpec | None:
    if not inv.mtp:
        return None
    n = len(inv.layers)
    layers, extra_b, extra_p = [], 0, 0
    for j, m in enumerate(inv.mtp):
        layers.append(_layer_spec(n + j, m.layer, q, dtype, overrides))
        b, _, p, _, _ = _modules_bytes(m.extra, f"model.layers.{n + j}.", q, dtype, overrides)
        extra_b, extra_p = extra_b + b, extra_p + p
    return MtpSpec(tuple(layers), extra_b, extra_p)


def _build(inv: Inventory, config: Mapping[str, Any], q: Quantization | None, dtype: str,
           overrides: Mapping[str, Any], name: str, notes: list[str]) -> ModelSpec:
    layers = [_layer_spec(i, shape, q, dtype, overrides) for i, shape in enumerate(inv.layers)]
    eb, _, ep, _, _ = _modules_bytes(inv.embed, "", q, dtype, overrides)
    hb, _, hp, _, _ = _modules_bytes(inv.head, "", q, dtype, overrides)
    if inv.dropped_layers:
        notes.append(
            f"{inv.dropped_layers} multi-token-prediction layer(s) in the checkpoint are not "
            "loaded by mlx-lm; counted apart, on the last stage only with --draft mtp"
        )
    return ModelSpec(
        name=name, model_type=inv.model_type, hidden_size=inv.hidden_size,
        vocab_size=inv.vocab_size, quantization=q, dtype=dtype, layers=tuple(layers),
        embed_bytes=eb, embed_params=ep, head_bytes=hb, head_params=hp,
        tied_embeddings=inv.tied_embeddings, source="config", notes=tuple(notes),
        mtp=_mtp_spec(inv, q, dtype, overrides),
        config=MappingProxyType(json.loads(json.dumps(dict(config)))),
    )


def model_spec_from_config(config: Mapping[str, Any], quant: QuantLike = FROM_CONFIG, *,
                           dtype: str | None = None, name: str | None = None) -> ModelSpec:
    """Bytes of the model config.json describes. ``quant``: FROM_CONFIG (its ``quantization``
    block, or unquantized without one), None (unquantized) or a Quantization. ``dtype``: of
    unquantized tensors, scales/biases and activations (default: torch_dtype, else bf16)."""
    notes: list[str] = []
    overrides: Mapping[str, Any] = {}
    if quant == FROM_CONFIG:
        q = _config_quant(config)
        block = config.get("quantization")
        if isinstance(block, Mapping):
            overrides = {k: v for k, v in block.items() if k not in ("bits", "group_size", "mode")}
        elif isinstance(config.get("quantization_config"), Mapping):
            method = config["quantization_config"].get("quant_method", "?")
            if method == "fp8":  # DeepSeek's sanitize dequantizes fp8 blocks when loading
                notes.append(f"the checkpoint is fp8; mlx-lm loads it as "
                             f"{dtype or _default_dtype(config)}")
            else:
                notes.append(f"{method} quantization is not modelled: counted unquantized")
    elif quant is None or isinstance(quant, Quantization):
        q = quant
    else:
        raise TypeError(f"quant must be a Quantization, None or FROM_CONFIG, not {quant!r}")
    dt = parse_dtype(dtype) if dtype else _default_dtype(config)
    if dt is None:
        raise ValueError(f"unknown dtype {dtype!r}: use bfloat16, float16 or float32")
    inv = arch.inventory(config)
    label = name or str(config.get("_name_or_path") or config.get("model_type"))
    return _build(inv, config, q, dt, overrides, label, notes)


# ---------------------------------------------------------------------------------------
# Accounting from the weight files' headers


def _apply_headers(spec: ModelSpec, tensors: list[TensorInfo],
                   missing: tuple[list[str], list[str]]) -> ModelSpec:
    notes = list(spec.notes)
    sizes, expert = group_sizes(tensors, spec.num_layers, notes)
    # Parts with tensors in files that are not there yet: only config.json can size them.
    incomplete = {group_of(t) for t in missing[1]}
    diffs: list[str] = []
    absent: list[str] = []

    def pick(key: tuple[str, int], label: str, from_config: int) -> int:
        if key not in sizes or key in incomplete:
            absent.append(label)
            return from_config
        if sizes[key] != from_config:
            diffs.append(f"{label}: config {size_text(from_config)}, "
                         f"files {size_text(sizes[key])}")
        return sizes[key]

    layers = []
    for l in spec.layers:
        b = pick(("layer", l.index), f"layer {l.index}", l.weight_bytes)
        if ("layer", l.index) in sizes and ("layer", l.index) not in incomplete:
            e = expert.get(l.index, 0)
            n_exp = int(spec.config.get("n_routed_experts") or 0)
            top_k = int(spec.config.get("num_experts_per_tok") or 0)
            active = b - e + (e // n_exp * top_k if n_exp and e else 0)
            l = replace(l, weight_bytes=b, active_bytes=active, routed_bytes=e)
        layers.append(l)
    embed = pick(("embed", -1), "embedding", spec.embed_bytes)
    head = pick(("head", -1), "final norm + head", spec.head_bytes)
    if diffs:
        notes.append(f"config.json and the weight files disagree on {len(diffs)} part(s) "
                     f"(e.g. {'; '.join(diffs[:3])}); using the files")
    if absent:
        why = f" (missing files: {', '.join(missing[0][:3])})" if missing[0] else ""
        notes.append(f"not in the weight files{why}: {', '.join(absent[:4])}"
                     f"{' ...' if len(absent) > 4 else ''}; sizes from config.json")
    return replace(spec, layers=tuple(layers), embed_bytes=embed, head_bytes=head,
                   source="safetensors", notes=tuple(notes))


def model_spec_from_dir(path: str | Path, quant: QuantLike = FROM_CONFIG, *,
                        dtype: str | None = None, name: str | None = None,
                        use_headers: bool = True) -> ModelSpec:
    """Accounting of a local model folder: config.json, and the safetensors headers when the
    weight files are there (only when planning the folder's own quantization)."""
    root = Path(path)
    cfg_path = root / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{root} has no config.json") from None
    except ValueError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} is not a JSON object")
    files = weight_files(root) if use_headers else []
    tensors: list[TensorInfo] = []
    for f in files:
        tensors += read_header(f)
    header_dtype = float_dtype(tensors)
    spec = model_spec_from_config(config, quant, dtype=dtype or header_dtype, name=name or root.name)
    if not tensors:
        return spec
    if quant != FROM_CONFIG:
        return replace(spec, notes=spec.notes + (
            f"sizes are for {spec.quant_label} computed from config.json, not the weight "
            "files as stored",))
    if any(t.dtype.startswith("float8") or t.name.endswith("_scale_inv") for t in tensors):
        return replace(spec, notes=spec.notes + (
            "weight files are fp8; mlx-lm dequantizes them when loading, sizes from config.json",))
    return _apply_headers(spec, tensors, missing_tensors(root))
