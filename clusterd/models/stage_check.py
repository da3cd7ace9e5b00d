"""Everything about a LoadShard request that can be checked without loading
it, checked before the node lets go of the shard it holds: the folder, a
config with sane, bounded sizes (a crafted one fails here in milliseconds,
before mlx-lm builds a model from it), the stage's weight files present with
good headers, and their tensors' bytes (from the safetensors headers) within
the node's usable memory.

Reads only small files and file headers; allocates nothing per layer.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from clusterd.messages import quoted
from clusterd.models.files import (INDEX_FILE, FileCheckError, check_safetensors, head_is_tied,
                                   is_inside_name, tensor_wanted)
from clusterd.models.stage import MASK_AS_ARRAY, StageLoadError
from shard_planner.safetensors import HeaderError, read_header

MAX_CONFIG_BYTES = 1 * 2**20
MAX_INDEX_BYTES = 64 * 2**20  # R1's index is ~10 MB
MAX_WEIGHT_FILES = 10_000

# Generous bounds (R1, the largest supported model, is well inside each):
# config values past them are not a model, and building one from them would
# take minutes and gigabytes before failing.
_INT_BOUNDS = {
    "num_hidden_layers": (1, 1024),
    "hidden_size": (1, 65_536),
    "intermediate_size": (1, 1 << 20),
    "moe_intermediate_size": (1, 1 << 20),
    "vocab_size": (1, 1 << 21),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (1, 4096),
    "kv_lora_rank": (1, 65_536),
    "q_lora_rank": (1, 65_536),
    "qk_rope_head_dim": (1, 4096),
    "qk_nope_head_dim": (1, 4096),
    "v_head_dim": (1, 4096),
    "n_routed_experts": (1, 4096),
    "n_shared_experts": (0, 256),
    "num_experts_per_tok": (1, 4096),
    "n_group": (1, 4096),
    "topk_group": (1, 4096),
    "first_k_dense_replace": (0, 1024),
    "moe_layer_freq": (1, 1024),
    "max_position_embeddings": (1, 1 << 24),
}
_FLOATS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor")
_REQUIRED = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size",
             "num_attention_heads")
_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_QUANT_BITS = {2, 3, 4, 5, 6, 8}
_QUANT_GROUPS = {32, 64, 128}


@dataclass(frozen=True)
class StageCheck:
    """A request that passed: what load_stage will open, and what it costs."""

    path: Path
    start: int
    end: int
    num_layers: int
    weight_files: tuple[str, ...]
    weight_bytes: int


def _fail(text: str) -> StageLoadError:
    return StageLoadError(text)


def _read_json(file: Path, limit: int, what: str) -> Any:
    try:
        size = file.stat().st_size
        if size > limit:
            raise _fail(f"{what} is {size} bytes; a real one is far below {limit}")
        return json.loads(file.read_bytes())
    except OSError as e:
        raise _fail(f"{what} cannot be read ({e.strerror or 'error'})") from None
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise _fail(f"{what} is not valid JSON") from None


def check_config(config: Any) -> dict:
    """The config, or StageLoadError naming the first value out of bounds."""
    if not isinstance(config, dict):
        raise _fail("config.json is not a JSON object")
    for key in _REQUIRED:
        if key not in config:
            raise _fail(f"config.json has no {key}")
    if config["model_type"] not in MASK_AS_ARRAY:
        raise _fail(f"architecture {quoted(config['model_type'])} is not supported "
                    f"(supported: {', '.join(sorted(MASK_AS_ARRAY))})")
    for key, (low, high) in _INT_BOUNDS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(f"config.json: {key} must be a whole number, not {quoted(value, 40)}")
        if not low <= value <= high:
            raise _fail(f"config.json: {key} = {value} is outside [{low}, {high}]")
    for key in _FLOATS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0:
            raise _fail(f"config.json: {key} must be a finite number >= 0")
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or 1
    if kv > heads:
        raise _fail(f"config.json: num_key_value_heads ({kv}) exceeds num_attention_heads "
                    f"({heads})")
    routed = config.get("n_routed_experts")
    if routed and (config.get("num_experts_per_tok") or 1) > routed:
        raise _fail("config.json: num_experts_per_tok exceeds n_routed_experts")
    quant = config.get("quantization")
    if quant is not None:
        if not isinstance(quant, dict) or quant.get("bits") not in _QUANT_BITS \
                or quant.get("group_size") not in _QUANT_GROUPS:
            raise _fail("config.json: quantization needs bits in 2-8 and group_size 32, 64 "
                        "or 128")
    return config


def _weight_map(path: Path) -> dict[str, str]:
    index = path / INDEX_FILE
    if index.is_file():
        data = _read_json(index, MAX_INDEX_BYTES, INDEX_FILE)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise _fail(f"{INDEX_FILE} has no weight_map of tensor names to file names")
        if len(set(weight_map.values())) > MAX_WEIGHT_FILES:
            raise _fail(f"{INDEX_FILE} names more than {MAX_WEIGHT_FILES} weight files")
        return weight_map
    single = path / "model.safetensors"
    if single.is_file():
        try:
            return {t.name: single.name for t in read_header(single)}
        except HeaderError as e:
            raise _fail(str(e)) from None
    raise _fail(f"no {INDEX_FILE} or model.safetensors in the model folder")


def check_stage(path: Path, start: int, end: int, usable_bytes: Optional[int]) -> StageCheck:
    """Raise StageLoadError naming the problem, or say what the load will take."""
    path = Path(path)
    try:
        exists = path.is_dir()
        path = path.resolve() if exists else path
    except OSError as e:  # a name too long, a loop of links
        raise _fail(f"model directory {quoted(str(path), 200)} cannot be used "
                    f"({e.strerror or 'error'})") from None
    if not exists:
        raise _fail(f"model directory {quoted(str(path), 200)} does not exist")
    if not (path / "config.json").is_file():
        raise _fail(f"{quoted(str(path), 200)} has no config.json")
    config = check_config(_read_json(path / "config.json", MAX_CONFIG_BYTES, "config.json"))
    num_layers = config["num_hidden_layers"]
    if not 0 <= start < end <= num_layers:
        raise _fail(f"layer range [{start}, {end}) is outside the model's {num_layers} layers")
    weight_map = _weight_map(path)
    tied = head_is_tied(config, weight_map)
    wanted = {k: f for k, f in weight_map.items()
              if tensor_wanted(k, start, end, num_layers, tied)}
    files = sorted(set(wanted.values()))
    total = 0
    for name in files:
        if not is_inside_name(name):
            raise _fail(f"weight file {quoted(name)} is outside the model directory")
        file = path / name
        if not file.is_file():
            raise _fail(f"weight file {quoted(name)} is missing from the model folder")
        try:
            check_safetensors(file)
            total += sum(t.nbytes for t in read_header(file) if t.name in wanted)
        except (FileCheckError, HeaderError) as e:
            raise _fail(str(e)) from None
    held = {int(m.group(1)) for k in wanted if (m := _LAYER_KEY.search(k))}
    absent = [i for i in range(start, end) if i not in held]
    if absent:
        raise _fail(f"the checkpoint has no tensors for layer {absent[0]} "
                    f"({len(absent)} of layers [{start}, {end}) have none)")
    if usable_bytes is not None and total > usable_bytes:
        raise _fail(f"layers [{start}, {end}) need {total / 2**30:.2f} GiB of weights but this "
                    f"node has {usable_bytes / 2**30:.2f} GiB usable")
    return StageCheck(path, start, end, num_layers, tuple(files), total)
