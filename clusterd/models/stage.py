"""A stage: the model's layers [start, end), plus the embedding on the first
stage and the final norm + head on the last.

The model classes, KV caches and masks are mlx-lm's own; this file only cuts
the model and runs the same operations mlx-lm's forward pass runs, so a
pipeline of stages computes exactly what one process computes.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import _get_classes, infer_quant_config, load_config

from clusterd.models.mla import absorbing
from clusterd.models.files import FileCheckError, check_safetensors, is_inside_name, tensor_wanted
from clusterd.models.watchdog import prefill_policy

# The only per-architecture fact a stage needs: DeepSeek's MLA attention takes
# its causal mask as an array (it adds rope scores to it), the others accept
# mlx's "causal" shortcut. Their layers are all called as layer(h, mask, cache).
MASK_AS_ARRAY = {"deepseek_v3": True, "qwen2": False, "llama": False}


class StageLoadError(ValueError):
    """The shard cannot be loaded; the message names the problem."""


@dataclass(frozen=True)
class StageBounds:
    start: int
    end: int
    num_layers: int

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.end == self.num_layers


class StageModel:
    """Runs layers [start, end) of a loaded mlx-lm model."""

    def __init__(self, model: nn.Module, config: dict, bounds: StageBounds, path: Path):
        self.model = model
        self.config = config
        self.bounds = bounds
        self.path = path
        self.model_type = config["model_type"]
        self.layers = model.model.layers[bounds.start : bounds.end]
        self.hidden_size = int(config["hidden_size"])
        self.vocab_size = int(config["vocab_size"])
        self._mask_as_array = MASK_AS_ARRAY[self.model_type]
        # DeepSeek's attention for a few positions at a time (verifying drafts).
        self._absorbed = absorbing(self.layers) if self.model_type == "deepseek_v3" else []
        self.weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        self.prefill_evals = prefill_policy(config, bounds.start, bounds.end)

    @property
    def activation_dtype(self) -> mx.Dtype:
        # The hidden state has the dtype of the norms' weights (never quantized).
        return self.layers[0].input_layernorm.weight.dtype

    def make_cache(self) -> list[Any]:
        # Every supported layer keeps a plain KV cache (load_stage refuses
        # sliding-window layers), which is also what mlx-lm makes for them.
        return [KVCache() for _ in self.layers]

    def forward(self, x: mx.array, cache: list[Any],
                after_layer: Optional[Callable[[mx.array], None]] = None,
                absorb_up_to: int = 1) -> mx.array:
        """Token ids (first stage) or a hidden state -> hidden state.
        `after_layer(h)` runs after each layer (to evaluate a long prompt
        chunk in pieces, and to stop between them). `absorb_up_to`: runs of
        up to this many positions attend in the latent space (models/mla.py)."""
        for attn in self._absorbed:
            attn.absorb_up_to = absorb_up_to
        h = self.model.model.embed_tokens(x) if self.bounds.first else x
        mask = create_attention_mask(h, cache[0], return_array=self._mask_as_array)
        # A prompt chunk is evaluated in pieces: by the caller's after_layer
        # (the executor: every layer, and a stop between them), else as the
        # Metal watchdog policy says (models/watchdog.py). Decode is one graph.
        k = (self.prefill_evals.layers_per_eval(h.shape[1], cache[0].offset)
             if after_layer is None and h.shape[1] > 1 else 0)
        for i, (layer, c) in enumerate(zip(self.layers, cache), 1):
            h = layer(h, mask, cache=c)
            if after_layer is not None:
                after_layer(h)
            elif k and i % k == 0 and i < len(self.layers):
                mx.eval(h)  # Metal kills a command buffer that runs too long
        return h

    def normed(self, h: mx.array) -> mx.array:
        """Last stage: the final norm's output, what the head reads."""
        return self.model.model.norm(h)

    def logits(self, h: mx.array, last_only: bool = True) -> mx.array:
        """Last stage: final norm + head, as mlx-lm runs them (on every
        position), then each row's last position ([B, V]) or all ([B, L, V])."""
        out = self.model.model.norm(h)
        if "lm_head" in self.model:
            logits = self.model.lm_head(out)
        else:
            logits = self.model.model.embed_tokens.as_linear(out)
        return logits[:, -1, :] if last_only else logits


def read_weight_index(path: Path) -> dict[str, str]:
    """Tensor name -> file name, from the index or the single weight file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (ValueError, KeyError) as e:
            raise StageLoadError(f"{index} is not a valid safetensors index: {e}") from e
    single = path / "model.safetensors"
    if single.is_file():
        return {k: single.name for k in _load_file(single)}
    raise StageLoadError(f"no model.safetensors.index.json or model.safetensors in {path}")


def _load_file(file: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(file))  # lazy: nothing is read until evaluated
    except Exception as e:  # mlx raises RuntimeError/ValueError for bad files
        raise StageLoadError(f"cannot read weight file {file.name}: {e}") from e


def _wanted(key: str, bounds: StageBounds, tied: bool) -> bool:
    # One rule, shared with the per-stage file selection (models/files.py).
    return tensor_wanted(key, bounds.start, bounds.end, bounds.num_layers, tied)


def read_config(path: Path) -> dict:
    if not path.is_dir():
        raise StageLoadError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise StageLoadError(f"{path} has no config.json")
    try:
        return load_config(path)
    except ValueError as e:
        raise StageLoadError(f"{path / 'config.json'} is not valid JSON: {e}") from e


class LoadCancelled(StageLoadError):
    """The load was stopped (the node is stopping, or its caller gave up)."""


def load_stage(path: Path, start: int, end: int, max_bytes: int | None = None,
               cancelled: Callable[[], bool] = lambda: False) -> StageModel:
    """Load only the tensors of layers [start, end) (+ embedding / head).

    With max_bytes, refuse before reading anything when the stage's weights
    would not fit (their sizes are known from the lazy arrays). The weights
    are read a layer at a time, checking `cancelled` in between."""
    path = Path(path).resolve()
    config = read_config(path)
    if config.get("model_type") not in MASK_AS_ARRAY:
        raise StageLoadError(
            f"architecture {config.get('model_type')!r} is not supported "
            f"(supported: {', '.join(sorted(MASK_AS_ARRAY))})"
        )
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if any(getattr(layer, "use_sliding", False) for layer in model.model.layers):
        raise StageLoadError("models with sliding-window attention layers are not supported")
    num_layers = len(model.model.layers)
    if not (0 <= start < end <= num_layers):
        raise StageLoadError(
            f"layer range [{start}, {end}) is outside the model's {num_layers} layers"
        )
    bounds = StageBounds(start, end, num_layers)
    tied = "lm_head" not in model

    index = read_weight_index(path)
    weights: dict[str, mx.array] = {}
    for file in sorted({f for k, f in index.items() if _wanted(k, bounds, tied)}):
        # By name: in the Hugging Face cache layout every file is a symlink to ../../blobs.
        if not is_inside_name(file):
            raise StageLoadError(f"weight file {file!r} is outside the model directory")
        if not (path / file).is_file():
            raise StageLoadError(f"weight file {file} is missing from {path}")
        try:  # never load a truncated or corrupt file: its header and size must agree
            check_safetensors(path / file)
        except FileCheckError as e:
            raise StageLoadError(str(e)) from None
        weights.update(
            (k, v) for k, v in _load_file(path / file).items() if _wanted(k, bounds, tied)
        )
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)

    _quantize_like_mlx_lm(model, config, weights)
    _cut(model, bounds, tied)
    model.eval()
    model.load_weights(list(weights.items()), strict=False)

    have = dict(tree_flatten(model.parameters()))
    missing = sorted(k for k in have if k not in weights)
    if missing:
        raise StageLoadError(
            f"the checkpoint lacks {len(missing)} tensors this stage needs, e.g. {missing[:3]}"
        )
    for k, v in have.items():
        if v.shape != weights[k].shape:
            raise StageLoadError(f"tensor {k} has shape {weights[k].shape}, expected {v.shape}")
    need = sum(v.nbytes for v in have.values())
    if max_bytes is not None and need > max_bytes:
        raise StageLoadError(
            f"layers [{start}, {end}) need {need / 2**30:.2f} GiB of weights but this node "
            f"has {max_bytes / 2**30:.2f} GiB usable"
        )
    for part in _parts(model):
        if cancelled():
            raise LoadCancelled("the load was cancelled")
        try:
            mx.eval(part.parameters())
        except Exception as e:
            raise StageLoadError(f"reading the weights failed (corrupt file?): {e}") from e
    mx.eval(model.parameters())  # anything not inside a part (nothing, for these models)
    return StageModel(model, config, bounds, path)


def _parts(model: nn.Module) -> list[nn.Module]:
    """The model in pieces of about one layer each, for a load in steps."""
    inner = model.model
    layers = [layer for layer in inner.layers if layer is not None]
    rest = [m for k, m in model.children().items() if k != "model" and isinstance(m, nn.Module)]
    rest += [m for k, m in inner.children().items() if k != "layers" and isinstance(m, nn.Module)]
    return layers + rest


def _quantize_like_mlx_lm(model: nn.Module, config: dict, weights: dict) -> None:
    """The same class predicate mlx-lm's load_model uses; modules whose
    weights this stage does not hold stay unquantized and are cut away."""
    quantization = config.get("quantization")
    if quantization is None:
        return

    def predicate(p: str, m: nn.Module):
        if p in quantization:
            return quantization[p]
        if not hasattr(m, "to_quantized") or f"{p}.scales" not in weights:
            return False
        return infer_quant_config(p, m, weights)

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def _cut(model: nn.Module, bounds: StageBounds, tied: bool) -> None:
    """Drop every module this stage does not run. The dropped parameters were
    never evaluated, so they never took memory."""
    inner = model.model
    # Keep list positions so tensor names (model.layers.N...) still match.
    inner.layers = [
        layer if bounds.start <= i < bounds.end else None
        for i, layer in enumerate(inner.layers[: bounds.end])
    ]
    if not (bounds.first or (bounds.last and tied)):
        inner.pop("embed_tokens")
    if not bounds.last:
        inner.pop("norm")
        if not tied:
            model.pop("lm_head")
