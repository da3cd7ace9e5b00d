"""DeepSeek-V3/R1's multi-token-prediction (MTP) layer as files: which files of the
original checkpoint hold it, which files of the converted model hold the embedding it
shares, what the converted layer weighs, and where a node keeps its conversion.

The original checkpoint (deepseek-ai/DeepSeek-R1, ...) stores the MTP module as one more
layer, model.layers.<num_hidden_layers>, with `num_nextn_predict_layers: 1` in its config:
a decoder layer plus enorm, hnorm, eh_proj, shared_head.norm, and copies of the embedding
(embed_tokens) and head (shared_head.head) that equal the main model's. mlx-lm drops the
layer when it converts, so mlx-community repositories lack it.

No mlx import here: the coordinator selects files and the planner counts bytes with it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from shard_planner.architectures import Module, deepseek_v3
from shard_planner.model_spec import Quantization, module_bytes, parse_dtype

from clusterd.models.store import ModelStore
from clusterd.speculative.drafts import MtpUnavailable

MTP_DIR = "clusterd-mtp"  # beside snapshots/ in the main model's store folder
WEIGHTS_FILE = "mtp.safetensors"
SOURCE_FILE = "mtp.json"
FORMAT = 1
# Tensors of the MTP layer that duplicate the main model's: never converted, the
# drafter uses the main model's (quantized) embedding and head instead.
SHARED_COPIES = ("embed_tokens.", "shared_head.head.")
EMBED_PREFIX = "model.embed_tokens."


def mtp_layer_index(config: Mapping[str, Any]) -> int:
    """The checkpoint index of the (first) MTP layer, or MtpUnavailable."""
    if config.get("model_type") != "deepseek_v3":
        raise MtpUnavailable(f"{config.get('model_type')!r} models have no multi-token-prediction "
                             "layer (only DeepSeek-V3 / R1 do)")
    if int(config.get("num_nextn_predict_layers") or 0) < 1:
        raise MtpUnavailable("the checkpoint's config.json declares no multi-token-prediction "
                             "layer (num_nextn_predict_layers is 0 or absent)")
    return int(config["num_hidden_layers"])


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def original_shards(weight_map: Mapping[str, str], layer: int) -> list[str]:
    """The weight files of the original checkpoint that hold a tensor of the MTP layer."""
    prefix = layer_prefix(layer)
    files = sorted({f for k, f in weight_map.items() if k.startswith(prefix)})
    if not files:
        raise MtpUnavailable(f"the checkpoint's index lists no {prefix}* tensors")
    return files


def converted_tensor(name: str, layer: int) -> bool:
    """Is this original tensor part of what gets converted (not a shared copy)?"""
    rest = name[len(layer_prefix(layer)):] if name.startswith(layer_prefix(layer)) else None
    return rest is not None and not rest.startswith(SHARED_COPIES)


def embedding_files(weight_map: Mapping[str, str]) -> list[str]:
    """The converted model's files holding the embedding: the last stage needs a copy
    (DeepSeek's head is not tied, so its stage files do not include it)."""
    files = sorted({f for k, f in weight_map.items() if k.startswith(EMBED_PREFIX)})
    if not files:
        raise MtpUnavailable("the model's index lists no model.embed_tokens tensors")
    return files


def _quantization(q: Union[Quantization, Mapping[str, Any], None]) -> Optional[Quantization]:
    if q is None or isinstance(q, Quantization):
        return q
    return Quantization.from_config(q)


def mtp_weight_bytes(config: Mapping[str, Any],
                     quantization: Union[Quantization, Mapping[str, Any], None]) -> int:
    """Bytes of the converted MTP module (mtp.safetensors' tensors) for a model with this
    config.json, quantized as given (None: unquantized in the config's torch_dtype).
    Excludes the embedding copy the last stage also needs (see embedding_files)."""
    layer = mtp_layer_index({**config, "num_nextn_predict_layers": 1})
    hidden = int(config["hidden_size"])
    q = _quantization(quantization)
    # The MTP layer is an ordinary MoE decoder layer at index num_hidden_layers.
    shape = deepseek_v3({**config, "num_hidden_layers": layer + 1}).layers[layer]
    extra = (Module("enorm", (hidden,), False), Module("hnorm", (hidden,), False),
             Module("eh_proj", (hidden, 2 * hidden), True),
             Module("shared_head.norm", (hidden,), False))
    dtype = parse_dtype(str(config.get("torch_dtype", ""))) or "bfloat16"
    total = 0
    for m in shape.modules + extra:
        # As mlx-lm's quantize_model: modules with to_quantized whose input axis the
        # group size divides.
        mq = q if q is not None and m.quantizable and m.shape[-1] % q.group_size == 0 else None
        total += module_bytes(m, mq, dtype)
    return total


@dataclass(frozen=True)
class MtpSource:
    """mtp.json: where a conversion came from and how it was made."""

    source_repo: str
    revision: str
    layer: int
    files: dict[str, int]  # original shard -> size in bytes
    quantization: Optional[dict[str, Any]]  # bits, group_size, mode; None: unquantized
    dtype: Optional[str]
    weight_bytes: int
    format: int = FORMAT

    def write(self, folder: Path) -> None:
        (Path(folder) / SOURCE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, folder: Path) -> Optional["MtpSource"]:
        """The folder's record, or None when it has none or an unreadable one."""
        try:
            data = json.loads((Path(folder) / SOURCE_FILE).read_text())
            if data.get("format") != FORMAT:
                return None
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None


def quantization_block(main_config: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The converted model's quantization as the MTP layer is quantized with it."""
    block = main_config.get("quantization")
    if not isinstance(block, Mapping):
        return None
    return {"bits": int(block["bits"]), "group_size": int(block["group_size"]),
            "mode": str(block.get("mode", "affine"))}


def conversion_name(source_repo: str, revision: str, main_config: Mapping[str, Any]) -> str:
    """One folder per (original checkpoint, quantization, dtype)."""
    q = quantization_block(main_config)
    if q is None:
        quant = "unquantized"
    else:
        quant = f"q{q['bits']}g{q['group_size']}" + ("" if q["mode"] == "affine" else q["mode"])
    dtype = str(main_config.get("torch_dtype") or "asis")
    return f"{source_repo.replace('/', '--')}-{revision[:12]}-{quant}-{dtype}"


def store_conversion_dir(store: ModelStore, main_repo: str, source_repo: str, revision: str,
                         main_config: Mapping[str, Any]) -> Path:
    """Where a node keeps the conversion for a model of its store: beside the model's
    snapshots, so removing the model removes it, and huggingface_hub ignores it."""
    return store.repo_dir(main_repo) / MTP_DIR / conversion_name(source_repo, revision,
                                                                 main_config)
