"""Read safetensors headers (never tensor data) to get exact tensor sizes, grouped by the
part of the model they belong to.

A safetensors file starts with an 8-byte little-endian header length and a JSON header
mapping tensor names to dtype, shape and byte offsets; reading it costs one small read per
file, even for the 5 GB shards of a 390 GB checkpoint.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

# A header is a few hundred KB even for checkpoints with thousands of tensors; anything
# larger is a corrupt or hostile file, not a model.
MAX_HEADER_BYTES = 100 * 2**20

# safetensors dtype tag -> mlx dtype name
DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3", "F8_E5M2": "float8_e5m2",
}


class HeaderError(ValueError):
    """A weight file whose header cannot be read."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # mlx dtype name
    shape: tuple[int, ...]
    nbytes: int
    file: str


def read_header(path: Path) -> list[TensorInfo]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise HeaderError(f"{path.name}: shorter than a safetensors header")
            (size,) = struct.unpack("<Q", raw)
            if size > MAX_HEADER_BYTES:
                raise HeaderError(f"{path.name}: header of {size} bytes is not plausible")
            text = f.read(size)
    except OSError as e:
        raise HeaderError(f"{path.name}: {e.strerror or e}") from None
    if len(text) != size:
        raise HeaderError(f"{path.name}: truncated header")
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HeaderError(f"{path.name}: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{path.name}: header is not a JSON object")
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            shape = tuple(int(d) for d in entry["shape"])
            dtype = DTYPES.get(entry["dtype"], str(entry["dtype"]).lower())
            nbytes = int(end) - int(begin)
        except (KeyError, TypeError, ValueError):
            raise HeaderError(f"{path.name}: malformed entry for {name!r}") from None
        if nbytes < 0:
            raise HeaderError(f"{path.name}: negative size for {name!r}")
        out.append(TensorInfo(name, dtype, shape, nbytes, path.name))
    return out


def weight_files(model_dir: Path) -> list[Path]:
    """The files mlx-lm loads: ``model*.safetensors`` (same glob as mlx_lm.utils.load_model)."""
    return sorted(model_dir.glob("model*.safetensors"))


def missing_tensors(model_dir: Path) -> tuple[list[str], list[str]]:
    """(files the index names that are not on disk, tensors stored in them): a partial download."""
    index = model_dir / "model.safetensors.index.json"
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (OSError, ValueError, AttributeError):
        return [], []
    if not isinstance(weight_map, dict):
        return [], []
    gone = {str(f) for f in weight_map.values() if not (model_dir / str(f)).exists()}
    return sorted(gone), sorted(t for t, f in weight_map.items() if str(f) in gone)


def group_of(name: str) -> tuple[str, int]:
    """Which part of the model a tensor belongs to: ("layer", i), ("embed", -1), ("head", -1)."""
    if name.startswith("model.layers."):
        idx = name.split(".")[2]
        return ("layer", int(idx)) if idx.isdigit() else ("other", -1)
    if name.startswith("model.embed_tokens."):
        return "embed", -1
    if name.startswith(("model.norm.", "lm_head.")):
        return "head", -1
    return "other", -1


def is_expert(name: str) -> bool:
    return ".switch_mlp." in name or ".mlp.experts." in name


def size_text(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n:,} bytes"


def group_sizes(tensors: list[TensorInfo], num_layers: int, notes: list[str]
                ) -> tuple[dict[tuple[str, int], int], dict[int, int]]:
    """Bytes per part of the model ("embed", "head", ("layer", i)) and routed-expert bytes
    per layer; what is not counted goes to ``notes``."""
    sizes: dict[tuple[str, int], int] = {}
    expert: dict[int, int] = {}
    dropped: set[int] = set()
    others = []
    for t in tensors:
        if "rotary_emb.inv_freq" in t.name:
            continue  # mlx-lm's sanitize drops these
        key = group_of(t.name)
        if key[0] == "layer" and key[1] >= num_layers:
            dropped.add(key[1])  # DeepSeek's MTP layer: mlx-lm's sanitize drops it
            continue
        if key[0] == "other":
            others.append(t.name)
            continue
        sizes[key] = sizes.get(key, 0) + t.nbytes
        if key[0] == "layer" and is_expert(t.name):
            expert[key[1]] = expert.get(key[1], 0) + t.nbytes
    if dropped:
        notes.append(f"weight files hold layer(s) {sorted(dropped)} beyond num_hidden_layers; "
                     "mlx-lm does not load them, not counted")
    if others:
        notes.append(f"{len(others)} tensor(s) outside the language model not counted "
                     f"(e.g. {others[0]})")
    return sizes, expert


def float_dtype(tensors: list[TensorInfo]) -> str | None:
    """The model's float dtype, from a tensor mlx never quantizes (the final norm)."""
    for t in tensors:
        if t.name == "model.norm.weight" and t.dtype in ("bfloat16", "float16", "float32"):
            return t.dtype
    return None
