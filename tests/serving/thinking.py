"""A synthetic R1 that ends its reasoning: a copy of a synthetic model whose
output head scores `</think>` like the token greedy decoding picks after a
few steps, scaled up, so greedy decoding emits `</think>` there and goes on
with an answer. Both clusterd and mlx-lm run the copy, so the reference
stays exact."""

import json
import shutil
from pathlib import Path

import mlx.core as mx

from clusterd.models.synthetic_tokenizer import THINK_END


def head_files(model: Path) -> dict[str, list[str]]:
    weight_map = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    files: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        if key.startswith("lm_head."):
            files.setdefault(name, []).append(key)
    return files


def make_thinking(model: Path, out: Path, like_token: int, think_end: int,
                  scale: float = 1.5) -> Path:
    """Copy `model` to `out` with row `think_end` of the (quantized) head set
    to `scale` x row `like_token`: wherever greedy decoding would pick
    `like_token` with a positive score, it picks `</think>` instead."""
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model, tmp)
    for name, keys in head_files(model).items():
        arrays = mx.load(str(model / name))
        for key in keys:
            a = arrays[key]
            row = a[like_token]
            if key != "lm_head.weight":  # scales and biases carry the scale
                row = row * scale
            arrays[key] = mx.concatenate([a[:think_end], row[None], a[think_end + 1:]])
        mx.save_safetensors(str(tmp / name), arrays, metadata={"format": "mlx"})
    tmp.rename(out)
    return out


def think_end_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(THINK_END)
