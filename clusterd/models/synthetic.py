"""Seeded random-weight models of real architectures, saved like mlx-community repos.

The model is mlx-lm's own class (DeepSeek-V3/R1, Qwen2, Llama) with seeded random float32
weights (or, with dtype="bfloat16", cast to bf16 as mlx_lm.convert casts R1: every float
tensor but the router's float32 correction bias), quantized with mlx-lm's `quantize_model`
(affine, group 64, 4 bits by default; scales and biases then in the model's dtype) and
written as `config.json` (with `quantization`), several `model-0000i-of-0000N.safetensors`
shards + `model.safetensors.index.json`, and R1 tokenizer files. Builds are cached on disk
and published by an atomic rename, so a killed build never leaves a usable-looking half.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

FORMAT_VERSION = 1

# progress(phase, done, total): phases are "init", "write" (bytes) and "done".
Progress = Callable[[str, int, int], None]

# Shards per model when shard_bytes is not given: enough that stages must pick files,
# and a layer straddles two files (see _plan_shards).
DEFAULT_SHARDS = 5


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    architecture: str
    base_config: Mapping[str, object]


# Fields as in the published configs (R1, R1-Distill-Qwen-7B, R1-Distill-Llama-8B); sizes
# come from the presets. BOS/EOS are the R1 ids our tokenizer uses for every arch.
_COMMON = MappingProxyType({
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "use_cache": True,
})

ARCHS: Mapping[str, ArchSpec] = MappingProxyType(
    {
        "deepseek_v3": ArchSpec(
            "deepseek_v3",
            "DeepseekV3ForCausalLM",
            MappingProxyType(
                {
                    **_COMMON,
                    "attention_bias": False,
                    "attention_dropout": 0.0,
                    "ep_size": 1,
                    "moe_layer_freq": 1,
                    "n_shared_experts": 1,
                    "norm_topk_prob": True,
                    # No multi-token-prediction layer is written, so none is declared.
                    "num_nextn_predict_layers": 0,
                    "rms_norm_eps": 1e-6,
                    "rope_theta": 10000,
                    "routed_scaling_factor": 2.5,
                    "scoring_func": "sigmoid",
                    "topk_method": "noaux_tc",
                    # R1's yarn, scaled down: 40x over 4096 -> 4x over 1024.
                    "rope_scaling": MappingProxyType({
                        "beta_fast": 32,
                        "beta_slow": 1,
                        "factor": 4,
                        "mscale": 1.0,
                        "mscale_all_dim": 1.0,
                        "original_max_position_embeddings": 1024,
                        "type": "yarn",
                    }),
                    "max_position_embeddings": 4096,
                }
            ),
        ),
        "qwen2": ArchSpec(
            "qwen2",
            "Qwen2ForCausalLM",
            MappingProxyType(
                {
                    **_COMMON,
                    "attention_dropout": 0.0,
                    "max_position_embeddings": 131072,
                    "rms_norm_eps": 1e-6,
                    "rope_theta": 10000,
                    "sliding_window": 4096,
                    "use_mrope": False,
                    "use_sliding_window": False,
                }
            ),
        ),
        "llama": ArchSpec(
            "llama",
            "LlamaForCausalLM",
            MappingProxyType(
                {
                    **_COMMON,
                    "attention_bias": False,
                    "attention_dropout": 0.0,
                    "max_position_embeddings": 131072,
                    "mlp_bias": False,
                    "pretraining_tp": 1,
                    "rms_norm_eps": 1e-5,
                    "rope_scaling": MappingProxyType({
                        "factor": 8.0,
                        "high_freq_factor": 4.0,
                        "low_freq_factor": 1.0,
                        "original_max_position_embeddings": 8192,
                        "rope_type": "llama3",
                    }),
                    "rope_theta": 500000.0,
                }
            ),
        ),
    }
)


def _mla(hidden, heads, q_lora, kv_lora, inter, moe_inter, experts, per_tok, layers, dense, vocab):
    # Every quantized input dim (hidden, q_lora, kv_lora, qk_nope, heads*v, intermediates)
    # is a multiple of 64 so that all of them, MultiLinear included, get quantized.
    return MappingProxyType({
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "q_lora_rank": q_lora,
        "kv_lora_rank": kv_lora,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "intermediate_size": inter,
        "moe_intermediate_size": moe_inter,
        "n_routed_experts": experts,
        "num_experts_per_tok": per_tok,
        "n_group": 4,
        "topk_group": 2,
        "num_hidden_layers": layers,
        "first_k_dense_replace": dense,
        "vocab_size": vocab,
    })


def _dense(hidden, heads, kv_heads, inter, layers, vocab):
    return MappingProxyType({
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
    })


PRESETS: Mapping[str, Mapping[str, Mapping[str, object]]] = MappingProxyType(
    {
        # A few MB: unit and end-to-end tests.
        "tiny": MappingProxyType(
            {
                "deepseek_v3": _mla(128, 4, 64, 64, 256, 64, 16, 4, 6, 1, 2048),
                "qwen2": _dense(128, 4, 2, 256, 4, 2048),
                "llama": _dense(128, 4, 2, 256, 4, 2048),
            }
        ),
        # Tens of MB: a stage with a third of the layers is clearly lighter than all.
        "small": MappingProxyType(
            {
                "deepseek_v3": _mla(512, 8, 256, 128, 1024, 256, 16, 4, 12, 1, 4096),
                "qwen2": _dense(512, 8, 2, 1536, 12, 4096),
                "llama": _dense(512, 8, 2, 1536, 12, 4096),
            }
        ),
        # A few hundred MB: benchmarks.
        "bench": MappingProxyType(
            {
                "deepseek_v3": _mla(1024, 16, 384, 256, 2048, 256, 32, 4, 16, 2, 8192),
                "qwen2": _dense(1536, 12, 2, 4096, 16, 8192),
                "llama": _dense(1536, 12, 4, 4096, 16, 8192),
            }
        ),
    }
)


DTYPES = ("float32", "bfloat16")


def synthetic_config(arch: str, preset: str, *, num_layers: int | None = None,
                     dtype: str = "float32") -> dict:
    """The unquantized Hugging Face style config of a synthetic model."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    if preset not in PRESETS or arch not in PRESETS[preset]:
        raise ValueError(f"unknown preset {preset!r} for {arch}; choose from {sorted(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {list(DTYPES)}")
    spec = ARCHS[arch]
    config = _thaw({**spec.base_config, **PRESETS[preset][arch], "torch_dtype": dtype})
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        config["num_hidden_layers"] = num_layers
    config["model_type"] = spec.model_type
    config["architectures"] = [spec.architecture]
    return config


def _thaw(value):
    # The tables are read-only views; callers get plain, independent dicts.
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    return value


def default_root() -> Path:
    home = os.environ.get("CLUSTERD_HOME")
    if home:
        return Path(home) / "models" / "synthetic"
    return Path.home() / ".cache" / "clusterd" / "synthetic"


def _cache_name(config, arch, preset, seed, num_layers, shard_bytes, bits, group_size) -> str:
    # The dtype is in the config (torch_dtype), hence in the key; bf16 builds say so by name.
    from .synthetic_tokenizer import CORPUS

    # The full config and the corpus are in the key too, so editing a preset or the
    # tokenizer corpus can never serve a stale build.
    key = json.dumps(
        [FORMAT_VERSION, arch, preset, seed, num_layers, shard_bytes, bits, group_size,
         config, hashlib.sha256(CORPUS.encode()).hexdigest()],
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    layers = f"-L{num_layers}" if num_layers is not None else ""
    dtype = "-bf16" if config["torch_dtype"] == "bfloat16" else ""
    return f"{arch}-{preset}{layers}{dtype}-s{seed}-q{bits}g{group_size}-{digest}"


def build_synthetic_model(
    arch: str,
    preset: str = "tiny",
    seed: int = 0,
    root: Path | None = None,
    *,
    num_layers: int | None = None,
    shard_bytes: int | None = None,
    bits: int = 4,
    group_size: int = 64,
    dtype: str = "float32",
    progress: Progress | None = None,
) -> Path:
    """Build (or find in the cache) a synthetic model directory and return its path.
    dtype "bfloat16" gives mlx-community's layout (bf16 norms, scales and biases);
    the CPU backend's quantized matmul is about 10x slower with bf16 activations."""
    config = synthetic_config(arch, preset, num_layers=num_layers, dtype=dtype)
    if shard_bytes is not None and shard_bytes <= 0:
        raise ValueError("shard_bytes must be positive")
    root = Path(root) if root is not None else default_root()
    final = root / _cache_name(
        config, arch, preset, seed, num_layers, shard_bytes, bits, group_size
    )
    config["clusterd_synthetic"] = {
        "arch": arch,
        "preset": preset,
        "seed": seed,
        "format_version": FORMAT_VERSION,
    }
    if (final / "config.json").is_file():
        return final
    publish(final, lambda tmp: _write_model(tmp, config, seed, shard_bytes, bits, group_size,
                                            progress))
    if progress is not None:
        progress("done", 1, 1)
    return final


def publish(final: Path, write: Callable[[Path], None]) -> Path:
    """Build a model folder with `write(tmp)` in a private folder beside `final`, then
    publish it by an atomic rename (a killed build leaves no usable-looking half). A
    folder another process published first is kept: the same key, the same bytes."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(root, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".partial-{final.name}-{os.getpid()}-", dir=root))
    try:
        # mkdtemp makes it private; a published model is an ordinary readable directory.
        tmp.chmod(0o755)
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_dead_partials(root: Path, name: str) -> None:
    # Leftovers of killed builds of this model; a live builder's pid is still running.
    for p in root.glob(f".partial-{name}-*"):
        try:
            pid = int(p.name[len(f".partial-{name}-") :].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def stderr_progress(phase: str, done: int, total: int) -> None:
    """A ready-made progress callback for CLIs and benchmarks."""
    if phase == "write":
        mb = f"{done / 2**20:.0f}/{total / 2**20:.0f} MB"
        print(f"\rsynthetic model: writing {mb}", end="", file=sys.stderr)
        if done >= total:
            print(file=sys.stderr)
    elif phase == "init":
        print("synthetic model: initializing weights", file=sys.stderr)


def _write_model(path, config, seed, shard_bytes, bits, group_size, progress) -> None:
    # mlx is imported here, not at module level: listing presets must not need it.
    import importlib

    from mlx.utils import tree_flatten
    from mlx_lm.utils import get_total_parameters, quantize_model, save_config

    from .synthetic_init import init_weights
    from .synthetic_tokenizer import write_tokenizer_files

    if progress is not None:
        progress("init", 0, 1)
    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    init_weights(model, seed, config)
    _cast(model, config["torch_dtype"])
    # quantize_model prints a bits-per-weight line on stdout; keep stdout clean for CLIs.
    with contextlib.redirect_stdout(io.StringIO()):
        model, config = quantize_model(model, config, group_size, bits, mode="affine")
    weights = dict(tree_flatten(model.parameters()))
    total_params = get_total_parameters(model)
    # The weights dict is now the only owner, so each written shard can be freed.
    del model
    _save_shards(path, weights, total_params, shard_bytes, progress)
    save_config(config, path / "config.json")
    write_tokenizer_files(
        path, config["vocab_size"], min(16384, config["max_position_embeddings"])
    )


def _cast(model, dtype_name: str) -> None:
    """Cast as mlx_lm.convert does for a config's torch_dtype: every floating
    parameter the model's cast_predicate allows (DeepSeek keeps its router's
    correction bias in float32)."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path

    dtype = getattr(mx, dtype_name)
    keep = getattr(model, "cast_predicate", lambda _: True)
    model.update(tree_map_with_path(
        lambda k, v: v.astype(dtype) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v,
        model.parameters()))


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
        return int(parts[2])
    return None


def _split(weights: dict, limit: int) -> list[list[str]]:
    # mlx-lm's make_shards, with a byte limit instead of whole gigabytes.
    shards: list[list[str]] = []
    size = 0
    for k, v in weights.items():
        if not shards or size + v.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += v.nbytes
    return shards


def _straddles(shards: list[list[str]]) -> bool:
    owners: dict[int, set[int]] = {}
    for i, names in enumerate(shards):
        for n in names:
            if (layer := _layer_of(n)) is not None:
                owners.setdefault(layer, set()).add(i)
    return any(len(s) > 1 for s in owners.values())


def _plan_shards(weights: dict, shard_bytes: int | None) -> list[list[str]]:
    total = sum(v.nbytes for v in weights.values())
    if shard_bytes is not None:
        return _split(weights, shard_bytes)
    limit = -(-total // DEFAULT_SHARDS)
    for _ in range(20):
        shards = _split(weights, limit)
        # Stage file selection must cope with a layer spread over two files; make sure
        # every default build has one (shrinking the limit moves the boundaries).
        if _straddles(shards):
            return shards
        limit = limit * 15 // 16
    return shards


def _save_shards(path: Path, weights: dict, total_params: int, shard_bytes, progress) -> None:
    import mlx.core as mx

    shards = _plan_shards(weights, shard_bytes)
    n = len(shards)
    fmt = "model-{:05d}-of-{:05d}.safetensors" if n > 1 else "model.safetensors"
    total = sum(v.nbytes for v in weights.values())
    index = {
        "metadata": {"total_size": total, "total_parameters": total_params},
        "weight_map": {},
    }
    done = 0
    for i, names in enumerate(shards):
        name = fmt.format(i + 1, n)
        shard = {k: weights.pop(k) for k in names}
        # Evaluating one shard at a time bounds peak memory by a shard's float32 sources.
        mx.save_safetensors(str(path / name), shard, metadata={"format": "mlx"})
        for k in names:
            index["weight_map"][k] = name
        done += sum(v.nbytes for v in shard.values())
        del shard
        if progress is not None:
            progress("write", done, total)
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=4)
