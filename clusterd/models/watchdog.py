"""Metal-safe prefill: how many layers one command buffer may hold.

MLX builds one lazy graph per forward pass, and Metal runs it as one long
command buffer; macOS kills GPU work that runs for more than a few seconds
(exo reports a 5 s command-buffer timeout during pipeline prefill, mlx-swift-lm
about 2 s on DeepSeek). A 2048-token prefill chunk through a stage of R1
layers is far more than that, so on Metal the stage evaluates every k layers
while prefilling. Decode steps (one token) stay one graph: they are short and
every extra sync costs decode speed.

The policy estimates a layer's GPU time for a chunk the way the planner's
simulator does (compute at the chip's FP32 peak times an efficiency, or its
weight reads at the memory bandwidth, whichever is longer) and keeps each
command buffer under WATCHDOG_BUDGET_S. On the CPU backend there is no
watchdog and it does nothing, unless CLUSTERD_PREFILL_EVAL_LAYERS forces k
(how tests and benchmarks run the same code path on Linux).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

# Well under the 2-5 s that macOS allows, since the estimate can be off by 2x
# (a Mac mini under thermal load, an unknown kernel's efficiency).
WATCHDOG_BUDGET_S = 1.0
# The simulator's calibrated prefill efficiency, halved: a pessimistic estimate
# is what keeps the buffers short.
EFFICIENCY = 0.12
FORCE_ENV = "CLUSTERD_PREFILL_EVAL_LAYERS"


@dataclass(frozen=True)
class Backend:
    """What the node computes on: Metal (a Mac's GPU) or the CPU."""

    metal: bool
    device_info: Mapping[str, Any]

    @property
    def chip(self) -> str:
        return str(self.device_info.get("device_name", "") or "")


def current_backend() -> Backend:
    import mlx.core as mx

    try:
        metal = mx.metal.is_available() and mx.default_device() == mx.gpu
        return Backend(bool(metal), dict(mx.metal.device_info()) if metal else {})
    except (AttributeError, RuntimeError):  # an mlx without the metal module
        return Backend(False, {})


@dataclass(frozen=True)
class LayerCost:
    """A layer's prefill work, from shard_planner's accounting of the model."""

    active_params: int
    flops_per_pair: int   # attention, per (query, key) pair
    flops_per_key: int    # per cached token per chunk
    weight_bytes: int
    active_bytes: int


@dataclass(frozen=True)
class PrefillEvalPolicy:
    layers: tuple[LayerCost, ...]
    metal: bool
    tflops: Optional[float] = None       # the GPU's FP32 peak; None unknown
    bandwidth_gbs: Optional[float] = None
    forced: Optional[int] = None         # FORCE_ENV: every k layers, any backend
    budget_s: float = WATCHDOG_BUDGET_S

    def layer_seconds(self, layer: LayerCost, tokens: int, offset: int) -> float:
        pairs = tokens * offset + tokens * (tokens + 1) // 2  # causal (query, key) pairs
        flops = (2 * layer.active_params * tokens + layer.flops_per_pair * pairs
                 + layer.flops_per_key * (offset + tokens))
        compute = flops / (self.tflops * 1e12 * EFFICIENCY)
        reads = (min(layer.weight_bytes, layer.active_bytes * tokens)
                 / (self.bandwidth_gbs * 1e9 * EFFICIENCY)) if self.bandwidth_gbs else 0.0
        return max(compute, reads)

    def layers_per_eval(self, tokens: int, offset: int = 0) -> Optional[int]:
        """Evaluate after every k layers for a chunk of `tokens` starting at
        position `offset`; None: the whole stage as one graph."""
        if tokens <= 1 or not self.layers:
            return None
        if self.forced:
            return self.forced
        if not self.metal:
            return None
        if not self.tflops:
            return 1  # an unknown chip: the safe choice
        worst = max(self.layer_seconds(l, tokens, offset) for l in self.layers)
        if worst * len(self.layers) <= self.budget_s:
            return None
        return max(1, int(self.budget_s // worst))


def _forced(env: Mapping[str, str]) -> Optional[int]:
    text = env.get(FORCE_ENV, "").strip()
    if not text:
        return None
    try:
        k = int(text)
    except ValueError:
        raise ValueError(f"${FORCE_ENV}={text!r}: give a number of layers, e.g. 1") from None
    if k < 1:
        raise ValueError(f"${FORCE_ENV}={text!r}: must be at least 1")
    return k


def layer_costs(config: Mapping[str, Any], start: int, end: int) -> tuple[LayerCost, ...]:
    from shard_planner.model_spec import model_spec_from_config

    spec = model_spec_from_config(config)
    return tuple(LayerCost(l.active_params, l.flops_per_pair, l.flops_per_key, l.weight_bytes,
                           l.active_bytes) for l in spec.layers[start:end])


def prefill_policy(config: Mapping[str, Any], start: int, end: int,
                   backend: Optional[Backend] = None,
                   env: Mapping[str, str] = os.environ) -> PrefillEvalPolicy:
    """The policy for a stage of layers [start, end) on this machine."""
    from shard_planner.hardware import find_chip

    forced = _forced(env)
    backend = backend if backend is not None else current_backend()
    if not backend.metal and forced is None:
        # Nothing to decide on the CPU: skip the model accounting.
        return PrefillEvalPolicy(layers=tuple([LayerCost(0, 0, 0, 0, 0)] * (end - start)),
                                 metal=False)
    chip = find_chip(backend.chip) if backend.chip else None
    memory = int(backend.device_info.get("memory_size", 0) or 0)
    try:
        costs = layer_costs(config, start, end)
    except Exception:  # an architecture the planner does not model: every layer, to be safe
        costs, chip = tuple([LayerCost(0, 0, 0, 0, 0)] * (end - start)), None
    return PrefillEvalPolicy(
        layers=costs, metal=backend.metal,
        tflops=chip.tflops if chip else None,
        bandwidth_gbs=chip.bandwidth_for(round(memory / 2**30) if memory else None) if chip else None,
        forced=forced)

