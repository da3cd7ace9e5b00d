"""Converting the original checkpoint's MTP layer to the model's quantization, once per node.

The original stores weights as FP8 e4m3 with 128x128 block scales (weight_scale_inv).
mlx-lm's deepseek_v3 `Model.sanitize` knows how to dequantize them, stack the routed
experts into switch_mlp and split kv_b_proj into embed_q / unembed_out, but only for
layers below num_hidden_layers, and it drops layer 61. So the MTP layer's tensors are
renamed to layer 0 and handed to sanitize; then, as mlx_lm.convert does, cast to the
model's torch_dtype (except what the model's cast_predicate keeps) and quantized like
mlx-lm's quantize_model (every module with to_quantized whose input axis the group size
divides; the router stays as it is).

The routed experts go through sanitize and quantization one at a time: R1's 256 experts
dequantized at once would take ~22 GB in bf16; this way the transient memory is one
dequantized expert plus one projection's quantized experts (~2.4 GB at 4 bits) on top of
the converted layer itself (7.3 GB for R1 at 4-bit, group 32). Affine quantization groups
along each row, so quantizing experts apart and stacking is bit-identical to quantizing
the stack (the tests compare with mlx-lm's own route).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.convert import MODEL_CONVERSION_DTYPES
from mlx_lm.models.deepseek_v3 import Model, ModelArgs
from mlx_lm.models.switch_layers import SwitchLinear

from clusterd.models.files import FileCheckError, check_safetensors, read_weight_map
from clusterd.models.mtp import MtpModule, parameter_bytes
from clusterd.models.mtp_files import (SOURCE_FILE, WEIGHTS_FILE, MtpSource, converted_tensor,
                                       layer_prefix, mtp_layer_index, original_shards,
                                       quantization_block, store_conversion_dir)
from clusterd.models.store import ModelRef, ModelStore
from clusterd.speculative.drafts import MtpUnavailable

# Config fields the MTP layer's shapes depend on: the original and the converted model
# must agree on them (a V3 MTP layer cannot serve an R1 conversion of another size).
_SHAPE_FIELDS = ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads",
                 "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                 "v_head_dim", "moe_intermediate_size", "n_routed_experts", "n_shared_experts")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(.+)$")
_TOP_LEVEL = ("enorm.", "hnorm.", "eh_proj.", "shared_head.")
_SLOT = layer_prefix(0)  # the in-range index sanitize sees


def ensure_in_store(store: ModelStore, main: ModelRef, main_config: dict,
                    original: Optional[ModelRef] = None) -> Path:
    """The folder with the converted MTP layer for `main` (a repository of the node's
    store), converting it from the original checkpoint in the same store if this node
    has not already. MtpUnavailable when the original's files are not here."""
    if original is None:
        from clusterd.models.catalog import original_repo

        repo = original_repo(main.repo_id)
        if repo is None:
            raise MtpUnavailable(f"no original checkpoint is known for {main.repo_id}, so its "
                                 "multi-token-prediction layer cannot be had")
        original = ModelRef(repo)
    snap = store.snapshot(original)
    if snap is None:
        raise MtpUnavailable(f"{original} is not in this node's store: its multi-token-"
                             "prediction files were not fetched onto this node")
    out = store_conversion_dir(store, main.repo_id, original.repo_id, snap.name, main_config)
    return ensure_converted(snap, main_config, out, original.repo_id, snap.name)


def ensure_converted(original_dir: Path, main_config: dict, out_dir: Path, source_repo: str,
                     revision: str) -> Path:
    """out_dir when it already holds this conversion, else convert into it."""
    have = MtpSource.read(out_dir)
    if have is not None and _matches(have, original_dir, main_config, source_repo, revision):
        try:
            check_safetensors(Path(out_dir) / WEIGHTS_FILE)
            return Path(out_dir)
        except FileCheckError:
            pass  # a damaged conversion is made again
    convert(original_dir, main_config, out_dir, source_repo, revision)
    return Path(out_dir)


def _matches(have: MtpSource, original_dir, main_config, source_repo, revision) -> bool:
    try:
        files = {f: (Path(original_dir) / f).stat().st_size for f in have.files}
    except OSError:
        files = None
    return (have.source_repo == source_repo and have.revision == revision
            and have.quantization == quantization_block(main_config)
            and have.dtype == main_config.get("torch_dtype") and files == have.files)


def convert(original_dir: Path, main_config: dict, out_dir: Path, source_repo: str,
            revision: str) -> MtpSource:
    """Convert the MTP layer of the original checkpoint in original_dir for the model whose
    (mlx-lm) config.json is main_config; write out_dir/mtp.safetensors + mtp.json,
    atomically. MtpUnavailable, naming the problem, when it cannot."""
    original_dir, out_dir = Path(original_dir), Path(out_dir)
    try:
        config = json.loads((original_dir / "config.json").read_text())
        weight_map = read_weight_map(original_dir)
    except (OSError, ValueError, FileCheckError) as e:
        raise MtpUnavailable(f"cannot read the original checkpoint in {original_dir}: {e}") from None
    layer = mtp_layer_index(config)
    for field in _SHAPE_FIELDS:
        if config.get(field) != main_config.get(field):
            raise MtpUnavailable(f"the original checkpoint ({source_repo}) has {field}="
                                 f"{config.get(field)}, the model has {main_config.get(field)}")
    shards = original_shards(weight_map, layer)
    tensors = _load(original_dir, shards, [k for k in weight_map if converted_tensor(k, layer)])
    try:
        module = _convert(tensors, layer, main_config)
        weights = dict(tree_flatten(module.parameters()))
        tmp = out_dir.parent / f".partial-{out_dir.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
    except MtpUnavailable:
        raise
    except Exception as e:  # mlx raises RuntimeError/ValueError on bad tensors
        raise MtpUnavailable(f"converting the MTP layer of {source_repo} failed: "
                             f"{type(e).__name__}: {e}") from None
    source = MtpSource(source_repo, revision, layer,
                       {f: (original_dir / f).stat().st_size for f in shards},
                       quantization_block(main_config), main_config.get("torch_dtype"),
                       parameter_bytes(module))
    source.write(tmp)
    _publish(tmp, out_dir)
    return source


def _publish(tmp: Path, out_dir: Path) -> None:
    # Readers see the old conversion or the whole new one, never a part.
    old = out_dir.with_name(f".old-{out_dir.name}-{os.getpid()}")
    if out_dir.exists():
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not (out_dir / SOURCE_FILE).is_file():  # not a concurrent converter's result
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _load(folder: Path, shards: list[str], names: list[str]) -> dict[str, mx.array]:
    wanted = set(names)
    out: dict[str, mx.array] = {}
    for name in shards:
        path = folder / name
        if not path.is_file():
            raise MtpUnavailable(f"the MTP layer's weight file {name} is missing from {folder}")
        try:
            check_safetensors(path)
            out.update((k, v) for k, v in mx.load(str(path)).items() if k in wanted)
        except (FileCheckError, RuntimeError, ValueError) as e:
            raise MtpUnavailable(f"the MTP layer's weight file {name} cannot be read: {e}") from None
    missing = sorted(wanted - set(out))
    if missing:
        raise MtpUnavailable(f"the index names {len(missing)} MTP tensors its files lack, "
                             f"e.g. {missing[:3]}")
    return out


def _convert(tensors: dict[str, mx.array], layer: int, main_config: dict) -> MtpModule:
    sanitizer = Model(ModelArgs.from_dict({**main_config, "num_hidden_layers": 1,
                                           "n_routed_experts": 1}))
    cast = _caster(sanitizer, main_config)
    quant = quantization_block(main_config)
    prefix = layer_prefix(layer)
    experts: dict[int, dict[str, mx.array]] = {}
    rest: dict[str, mx.array] = {}
    for k, v in tensors.items():
        name = k[len(prefix):]
        if m := _EXPERT.match(name):
            experts.setdefault(int(m[1]), {})[f"mlp.experts.0.{m[2]}.{m[3]}"] = v
        else:
            rest[name] = v
    module = MtpModule(ModelArgs.from_dict(main_config), layer)
    expected = dict(tree_flatten(module.parameters()))
    plain = {_module_path(k): cast(_module_path(k), v) for k, v in _sanitized(sanitizer, rest).items()}
    need = {k for k in expected if ".switch_mlp." not in k}
    if need - set(plain) or set(plain) - need:
        raise MtpUnavailable(f"the MTP layer's tensors do not match the model: missing "
                             f"{sorted(need - set(plain))[:3]}, unexpected {sorted(set(plain) - need)[:3]}")
    for k, v in plain.items():
        if v.shape != expected[k].shape:
            raise MtpUnavailable(f"MTP tensor {k} has shape {v.shape}, expected {expected[k].shape}")
    stacked = _experts(sanitizer, experts, module, cast, quant, int(main_config["n_routed_experts"]))
    module.load_weights(list(plain.items()), strict=False)
    if quant is not None:
        group = quant["group_size"]
        nn.quantize(module, group, quant["bits"], mode=quant["mode"],
                    class_predicate=lambda p, m: _quantizes(m, group))
    module.load_weights(list(stacked.items()), strict=False)
    mx.eval(module.parameters())
    return module


def _experts(sanitizer, experts, module, cast, quant, count) -> dict[str, mx.array]:
    """The routed experts, each dequantized and quantized alone, stacked as switch_mlp;
    one projection at a time, so the transient memory is one projection's experts."""
    if sorted(experts) != list(range(count)):
        raise MtpUnavailable(f"the MTP layer has experts {sorted(experts)[:3]}... of "
                             f"{len(experts)}, the model has {count}")
    stacked: dict[str, mx.array] = {}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        target = module.layer.mlp.switch_mlp[proj]
        quantized = quant is not None and _quantizes(target, quant["group_size"])
        parts: dict[str, list[mx.array]] = {}
        for e in range(count):
            mine = {k: v for k, v in experts[e].items() if f".{proj}." in k}
            [(k, w)] = _sanitized(sanitizer, mine).items()
            path = _module_path(k)  # layer.mlp.switch_mlp.<proj>.weight, shape (1, out, in)
            w = cast(path, w)
            if quantized:
                one = SwitchLinear(w.shape[2], w.shape[1], 1, bias=False)
                one.weight = w
                q = one.to_quantized(quant["group_size"], quant["bits"], mode=quant["mode"])
                pieces = {f"{path.removesuffix('.weight')}.{n}": a
                          for n, a in tree_flatten(q.parameters())}
            else:
                pieces = {path: w}
            mx.eval(list(pieces.values()))
            for n, a in pieces.items():
                parts.setdefault(n, []).append(a)
        for n in list(parts):
            stacked[n] = mx.concatenate(parts.pop(n), axis=0)
            mx.eval(stacked[n])
    return stacked


def _sanitized(sanitizer: Model, tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    # In-range layer 0, as sanitize expects; the MTP-only tensors pass through it
    # (dequantized like the rest when they carry a weight_scale_inv).
    out = sanitizer.sanitize({_SLOT + k: v for k, v in tensors.items()})
    return {k[len(_SLOT):]: v for k, v in out.items()}


def _module_path(name: str) -> str:
    return name if name.startswith(_TOP_LEVEL) else "layer." + name


def _quantizes(module: nn.Module, group_size: int) -> bool:
    # mlx-lm's quantize_model: a to_quantized method and a divisible input axis.
    return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0


def _caster(model: Model, main_config: dict):
    # mlx_lm.convert: floating parameters to config.json's torch_dtype, except what the
    # model's cast_predicate keeps (DeepSeek's router correction bias stays float32).
    name = main_config.get("torch_dtype")
    dtype = getattr(mx, name) if name in MODEL_CONVERSION_DTYPES else None
    keep = getattr(model, "cast_predicate", lambda _: True)

    def cast(path: str, v: mx.array) -> mx.array:
        if dtype is not None and keep(path) and mx.issubdtype(v.dtype, mx.floating):
            return v.astype(dtype)
        return v

    return cast
