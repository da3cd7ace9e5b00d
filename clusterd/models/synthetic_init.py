"""Seeded random weights for synthetic models.

Each tensor gets its own random key derived from (seed, parameter name), so a tensor's
values do not depend on the order or number of the others: the same seed gives the same
bytes, and a model with fewer layers shares its first layers' weights with a deeper one.
"""

from __future__ import annotations

import hashlib
import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten


def _key(seed: int, name: str) -> mx.array:
    # name is "<model_type>/<parameter path>": archs do not share weights by accident.
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return mx.random.key(int.from_bytes(digest[:8], "little"))


def _value(seed: int, arch: str, name: str, shape: tuple[int, ...], hidden: int) -> mx.array:
    noise = mx.random.normal(shape, dtype=mx.float32, key=_key(seed, f"{arch}/{name}"))
    if name.endswith("norm.weight"):
        # RMSNorm gains near 1, not exactly 1, so they are not all the same bytes.
        return 1.0 + 0.05 * noise
    if name.endswith("e_score_correction_bias"):
        # Small next to the sigmoid scores' spread: it nudges selection, as in R1,
        # without pinning every token to the same experts.
        return 0.05 * noise
    if name.endswith(".bias"):
        return 0.1 * noise
    if name.endswith("embed_tokens.weight"):
        return noise
    if name.endswith(".mlp.gate.weight"):
        # Router logits ~ N(0, 1) on a normed hidden state: sigmoid scores spread
        # well over (0, 1), so routing depends on the token.
        return noise / math.sqrt(hidden)
    # Linear, SwitchLinear and MultiLinear weights are (..., out, in): keep the output
    # variance of each projection near its input's.
    return noise / math.sqrt(shape[-1])


def init_weights(model: nn.Module, seed: int, config: dict) -> None:
    hidden = int(config["hidden_size"])
    arch = str(config["model_type"])
    params = tree_flatten(model.parameters())
    model.update(
        tree_unflatten([(n, _value(seed, arch, n, tuple(v.shape), hidden)) for n, v in params])
    )
