"""The synthetic DeepSeek-V3 model's "original checkpoint", laid out as deepseek-ai
publishes R1: config.json with an FP8 `quantization_config` and
`num_nextn_predict_layers: 1`, and the multi-token-prediction layer model.layers.<N>
(N = num_hidden_layers) in its own shard, every linear weight in FP8 e4m3 with 128x128
`weight_scale_inv` blocks (partial blocks at the edges: most of the synthetic widths are
not multiples of 128), experts unstacked, kv_b_proj whole, embedding and head copies in
bf16. The main layers are in other shards of the same index, unquantized bf16 under
mlx-lm's names: the same seeded weights the synthetic mlx model was quantized from.

mx has no fp8 dtype, so the file is written here byte by byte: mx.to_fp8 encodes e4m3
into uint8 and the safetensors header names the dtype F8_E4M3, which mx.load reads back
as uint8 (what mlx-lm's sanitize passes to mx.from_fp8).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path
from typing import Optional

from clusterd.models.files import INDEX_FILE, meta_files
from clusterd.models.synthetic import (FORMAT_VERSION, build_synthetic_model, default_root,
                                       publish, synthetic_config)

BLOCK = 128
FP8_MAX = 448.0  # largest finite e4m3 value
MTP_FILE_SEED_TAG = "deepseek_v3_mtp"  # MTP weights draw from their own seeded keys
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [BLOCK, BLOCK]}


def build_synthetic_original(preset: str = "tiny", seed: int = 0, root: Optional[Path] = None,
                             *, num_layers: Optional[int] = None) -> Path:
    """Build (or find in the cache) the original-checkpoint folder of the synthetic
    DeepSeek-V3 model build_synthetic_model("deepseek_v3", preset, seed) makes."""
    root = Path(root) if root is not None else default_root()
    config = _original_config(preset, num_layers)
    key = json.dumps([FORMAT_VERSION, preset, seed, num_layers, config], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    layers = f"-L{num_layers}" if num_layers is not None else ""
    final = root / f"deepseek_v3-original-{preset}{layers}-s{seed}-{digest}"
    if (final / "config.json").is_file():
        return final
    main_dir = build_synthetic_model("deepseek_v3", preset, seed, root, num_layers=num_layers)
    return publish(final, lambda tmp: _write(tmp, config, seed, main_dir))


def _original_config(preset: str, num_layers: Optional[int]) -> dict:
    config = synthetic_config("deepseek_v3", preset, num_layers=num_layers)
    config.update(num_nextn_predict_layers=1, quantization_config=dict(FP8_QUANTIZATION_CONFIG),
                  torch_dtype="bfloat16")
    return config


def _write(folder: Path, config: dict, seed: int, main_dir: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import deepseek_v3

    from clusterd.models.synthetic_init import init_weights

    model = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(config))
    init_weights(model, seed, config)
    main = {k: (v if "e_score_correction_bias" in k else v.astype(mx.bfloat16))
            for k, v in tree_flatten(model.parameters())}
    del model
    layer = int(config["num_hidden_layers"])
    mtp = _mtp_tensors(config, seed, layer, main["model.embed_tokens.weight"],
                       main["lm_head.weight"])
    # Main layers split in two shards, the MTP layer alone in the third.
    names = sorted(main)
    half = len(names) // 2
    shards = [{k: main[k] for k in names[:half]}, {k: main[k] for k in names[half:]}, mtp]
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(folder / name, tensors)
        weight_map.update({k: name for k in tensors})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in meta_files(p.name for p in main_dir.iterdir()):
        if name not in ("config.json", INDEX_FILE):
            shutil.copyfile(main_dir / name, folder / name)


def _mtp_tensors(config: dict, seed: int, layer: int, embed, head) -> dict:
    """model.layers.<layer>.* as the original stores them."""
    import mlx.core as mx

    from clusterd.models.synthetic_init import _value

    c = config
    hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    nope, rope, v = int(c["qk_nope_head_dim"]), int(c["qk_rope_head_dim"]), int(c["v_head_dim"])
    q_lora, kv_lora = int(c["q_lora_rank"]), int(c["kv_lora_rank"])
    experts, inter = int(c["n_routed_experts"]), int(c["moe_intermediate_size"])
    shared = inter * int(c["n_shared_experts"])
    linear = {  # name -> (out, in); all stored in FP8 with block scales
        "self_attn.q_a_proj": (q_lora, hidden),
        "self_attn.q_b_proj": (heads * (nope + rope), q_lora),
        "self_attn.kv_a_proj_with_mqa": (kv_lora + rope, hidden),
        "self_attn.kv_b_proj": (heads * (nope + v), kv_lora),
        "self_attn.o_proj": (hidden, heads * v),
        "mlp.shared_experts.gate_proj": (shared, hidden),
        "mlp.shared_experts.up_proj": (shared, hidden),
        "mlp.shared_experts.down_proj": (hidden, shared),
        "eh_proj": (hidden, 2 * hidden),
    }
    for e in range(experts):
        linear.update({f"mlp.experts.{e}.gate_proj": (inter, hidden),
                       f"mlp.experts.{e}.up_proj": (inter, hidden),
                       f"mlp.experts.{e}.down_proj": (hidden, inter)})
    norms = {"self_attn.q_a_layernorm": q_lora, "self_attn.kv_a_layernorm": kv_lora,
             "input_layernorm": hidden, "post_attention_layernorm": hidden,
             "enorm": hidden, "hnorm": hidden, "shared_head.norm": hidden}
    prefix = f"model.layers.{layer}."

    def value(name, shape):
        return _value(seed, MTP_FILE_SEED_TAG, prefix + name, shape, hidden)

    out = {}
    for name, shape in linear.items():
        w, scale = fp8_blocks(value(name + ".weight", shape))
        out[prefix + name + ".weight"] = w
        out[prefix + name + ".weight_scale_inv"] = scale
    for name, dims in norms.items():
        out[prefix + name + ".weight"] = value(name + ".weight", (dims,)).astype(mx.bfloat16)
    out[prefix + "mlp.gate.weight"] = value("mlp.gate.weight", (experts, hidden)).astype(mx.bfloat16)
    out[prefix + "mlp.gate.e_score_correction_bias"] = value("mlp.gate.e_score_correction_bias",
                                                              (experts,))
    # The copies the original carries (equal to the main model's embedding and head).
    out[prefix + "embed_tokens.weight"] = embed
    out[prefix + "shared_head.head.weight"] = head
    return out


def fp8_blocks(w):
    """(e4m3 bytes as uint8 [out, in], float32 scales [ceil(out/128), ceil(in/128)]) with
    w ~= from_fp8(bytes) * scale per 128x128 block, as DeepSeek's FP8 checkpoints store it."""
    import mlx.core as mx

    m, n = w.shape
    pm, pn = -m % BLOCK, -n % BLOCK
    blocks = mx.pad(w.astype(mx.float32), ((0, pm), (0, pn))).reshape(
        (m + pm) // BLOCK, BLOCK, (n + pn) // BLOCK, BLOCK)
    amax = mx.abs(blocks).max(axis=(1, 3))
    scale = mx.where(amax > 0, amax / FP8_MAX, 1.0).astype(mx.float32)
    q = mx.to_fp8(blocks / scale[:, None, :, None]).reshape(m + pm, n + pn)[:m, :n]
    return mx.contiguous(q), scale


_DTYPE_TAGS = {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}


def write_safetensors(path: Path, tensors: dict) -> int:
    """Write tensors (uint8 arrays as F8_E4M3: the only uint8 tensors here are fp8)
    to a safetensors file; returns the bytes of tensor data."""
    import mlx.core as mx
    import numpy as np

    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        a = tensors[name]
        if a.dtype == mx.uint8:
            tag, data = "F8_E4M3", np.array(a).tobytes()
        elif a.dtype == mx.bfloat16:  # numpy has no bf16: its raw 16-bit words
            tag, data = "BF16", np.array(a.view(mx.uint16)).tobytes()
        else:
            tag, data = _DTYPE_TAGS[str(a.dtype).split(".")[-1]], np.array(a).tobytes()
        header[name] = {"dtype": tag, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for data in blobs:
            f.write(data)
    return offset
