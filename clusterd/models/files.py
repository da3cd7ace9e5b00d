"""Which files a stage needs, and whether a weight file is whole.

A stage needs the weight files that hold a tensor of its layers (plus the
embedding on the first stage, the final norm + head on the last), read from
model.safetensors.index.json, and every node needs the small files (config,
tokenizer, chat template). `tensor_wanted` is the one rule for "does this
stage hold this tensor": stage loading uses it too, so the files selected
here are exactly the files load_stage opens.

No mlx import here: the coordinator selects files before anything is loaded.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# mlx-lm's download patterns (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS) minus the
# weights: what every node needs besides its own weight files.
META_PATTERNS = ("*.json", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt",
                 "*.jsonl", "*.jinja")
WEIGHT_PATTERN = "model*.safetensors"
# A safetensors header is a few hundred KB even for R1; more is corruption.
MAX_HEADER_BYTES = 100 * 2**20
HASH_CHUNK = 8 * 2**20

_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class FileCheckError(ValueError):
    """A file that must not be loaded; the message names it and says why."""


# -- selection ------------------------------------------------------------------

def tensor_wanted(key: str, start: int, end: int, num_layers: int, tied: bool) -> bool:
    """Does the stage running layers [start, end) of num_layers hold tensor `key`?"""
    m = _LAYER_KEY.search(key)
    if m is not None:
        return start <= int(m.group(1)) < end
    first, last = start == 0, end == num_layers
    if "embed_tokens" in key:
        return first or (last and tied)
    if key.startswith("lm_head") or key.startswith("model.norm"):
        return last
    return False


def head_is_tied(config: Mapping, weight_map: Mapping[str, str]) -> bool:
    """Does the last stage use the embedding as its head? As mlx-lm decides:
    the model args' tie_word_embeddings (Qwen2 and Llama default to True,
    DeepSeek-V3 always has an lm_head); and a checkpoint without lm_head
    tensors can only work tied, so that counts too."""
    if config.get("model_type") == "deepseek_v3":
        tied = False
    else:
        tied = bool(config.get("tie_word_embeddings", True))
    return tied or not any(k.startswith("lm_head") for k in weight_map)


def read_weight_map(model_dir: Path) -> dict[str, str]:
    """Tensor name -> file, from the index; a single-file model maps '*' to it."""
    index = Path(model_dir) / INDEX_FILE
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (ValueError, KeyError, TypeError) as e:
            raise FileCheckError(f"{index} is not a valid safetensors index: {e}") from None
    if (Path(model_dir) / SINGLE_FILE).is_file():
        return {"*": SINGLE_FILE}
    raise FileCheckError(f"no {INDEX_FILE} or {SINGLE_FILE} in {model_dir}")


def stage_weight_files(weight_map: Mapping[str, str], config: Mapping, start: int,
                       end: int) -> list[str]:
    """The weight files layers [start, end) need (+ embedding / head files)."""
    num_layers = int(config["num_hidden_layers"])
    if not 0 <= start < end <= num_layers:
        raise ValueError(f"layer range [{start}, {end}) is outside the model's {num_layers} layers")
    if set(weight_map) == {"*"}:
        return sorted(set(weight_map.values()))
    tied = head_is_tied(config, weight_map)
    return sorted({f for k, f in weight_map.items()
                   if tensor_wanted(k, start, end, num_layers, tied)})


def is_meta_file(path: str) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in META_PATTERNS)


def meta_files(paths: Iterable[str]) -> list[str]:
    """The files of a listing every node needs (config, tokenizer, template, index)."""
    return sorted(p for p in paths if is_meta_file(p) and not p.startswith("."))


def stage_files(model_dir: Path, start: int, end: int, meta: Iterable[str] = ()) -> list[str]:
    """Everything a stage's node must hold: `meta` + its weight files."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    weights = stage_weight_files(read_weight_map(model_dir), config, start, end)
    return sorted(set(meta) | set(weights))


# -- verification ----------------------------------------------------------------

def check_safetensors(path: Path, expected_size: Optional[int] = None) -> int:
    """Raise FileCheckError unless the header parses and the file is exactly
    as long as the header says (so a truncated or padded file fails) and, when
    given, as long as its source said. Reads the header only. Returns the size."""
    name = Path(path).name
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise FileCheckError(f"{name} is truncated: {size} bytes, no safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise FileCheckError(f"{name} is corrupt or truncated: header length {n} "
                                     f"does not fit in {size} bytes")
            header = json.loads(f.read(n))
    except OSError as e:
        raise FileCheckError(f"{name} cannot be read: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError):
        raise FileCheckError(f"{name} is corrupt: its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise FileCheckError(f"{name} is corrupt: its safetensors header is not an object")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FileCheckError(f"{name} is corrupt: bad entry for tensor {key!r}") from None
        if not 0 <= begin <= stop:
            raise FileCheckError(f"{name} is corrupt: bad offsets for tensor {key!r}")
        end = max(end, stop)
    if size != 8 + n + end:
        what = "truncated" if size < 8 + n + end else "corrupt"
        raise FileCheckError(f"{name} is {what}: {size} bytes, its header needs {8 + n + end}")
    if expected_size is not None and size != expected_size:
        raise FileCheckError(f"{name} has {size} bytes, its source has {expected_size}")
    return size


def check_file(path: Path, expected_size: Optional[int] = None) -> int:
    """check_safetensors for weight files, a size check for the rest."""
    if str(path).endswith(".safetensors"):
        return check_safetensors(path, expected_size)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise FileCheckError(f"{Path(path).name} cannot be read: {e.strerror or e}") from None
    if expected_size is not None and size != expected_size:
        raise FileCheckError(f"{Path(path).name} has {size} bytes, its source has {expected_size}")
    return size


def check_stage_files(model_dir: Path, start: int, end: int) -> None:
    """Before a load: every weight file the stage opens is whole. Raises
    FileCheckError naming the first bad file."""
    model_dir = Path(model_dir).resolve()
    config = json.loads((model_dir / "config.json").read_text())
    for name in stage_weight_files(read_weight_map(model_dir), config, start, end):
        if not is_inside_name(name):
            raise FileCheckError(f"weight file {name!r} is outside the model directory")
        if not (model_dir / name).is_file():
            raise FileCheckError(f"weight file {name} is missing from {model_dir}")
        check_safetensors(model_dir / name)


def is_inside_name(name: str) -> bool:
    """A file name from an index that stays in the model folder. Judged by
    the name, not the resolved path: in the Hugging Face layout every file is
    a symlink into ../../blobs."""
    p = Path(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts


# -- hashing -------------------------------------------------------------------

def sha256_file(path: Path, *, prefix: Optional["hashlib._Hash"] = None) -> str:
    h = prefix or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Hashes:
    sha256: str
    git_sha1: str  # the blob id git (and the hub, for non-LFS files) names the content by


def hash_fd(fd: int) -> Hashes:
    """sha256 and git blob sha1 of an open file in one read (from its start,
    its position untouched)."""
    size = os.fstat(fd).st_size
    s256, s1 = hashlib.sha256(), hashlib.sha1(b"blob %d\x00" % size)
    offset = 0
    while chunk := os.pread(fd, HASH_CHUNK, offset):
        s256.update(chunk)
        s1.update(chunk)
        offset += len(chunk)
    return Hashes(s256.hexdigest(), s1.hexdigest())
