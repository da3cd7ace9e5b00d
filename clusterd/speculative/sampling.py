"""The distribution mlx-lm's sampler draws from, and its draw, with an explicit key.

`mlx_lm.sample_utils.make_sampler(temp, top_p, min_p, min_tokens_to_keep, top_k)` applies
its filters to the log-probabilities in this order: top-p, min-p, (XTC), top-k -- each
masks tokens to -inf, *before* any temperature -- and then draws
`mx.random.categorical(logprobs * (1 / temp))` from the global random state. Here the
same filters (mlx-lm's own functions, called in the same order and under the same
conditions) and the same draw, but with a key the caller owns: per session, so a seeded
session is reproducible whatever other sessions do. `mx.random.seed(s)` followed by
sampler calls equals `key = mx.random.key(s)` followed, per draw, by
`key, sub = mx.random.split(key)` and a draw with `sub` (`next_key` below).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


class SamplingError(ValueError):
    """Sampling parameters that cannot be verified exactly; the message says which."""


@dataclass(frozen=True)
class SamplingParams:
    """make_sampler's parameters. temperature 0 is greedy (argmax, filters unused).

    XTC is not offered: mlx-lm's apply_xtc draws from the global random state inside
    the filter, so no per-session key can reproduce it."""

    temperature: float = 0.0
    top_p: float = 0.0
    min_p: float = 0.0
    min_tokens_to_keep: int = 1
    top_k: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise SamplingError(f"temperature must be >= 0, not {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise SamplingError(f"top_p must be in [0, 1], not {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise SamplingError(f"min_p must be in [0, 1], not {self.min_p}")
        if self.min_tokens_to_keep < 1:
            raise SamplingError(f"min_tokens_to_keep must be >= 1, not {self.min_tokens_to_keep}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0, not {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered(logprobs: mx.array, params: SamplingParams) -> mx.array:
    """make_sampler's filter chain: the same functions, order and conditions."""
    if 0 < params.top_p < 1.0:
        logprobs = apply_top_p(logprobs, params.top_p)
    if params.min_p != 0.0:
        logprobs = apply_min_p(logprobs, params.min_p, params.min_tokens_to_keep)
    if params.top_k > 0:
        logprobs = apply_top_k(logprobs, params.top_k)
    return logprobs


def probabilities(logprobs: mx.array, params: SamplingParams) -> mx.array:
    """The distribution the sampler draws from, as float32 probabilities along the last
    axis: softmax(filtered(logprobs) / temp), or one-hot on the argmax when greedy."""
    if params.greedy:
        top = mx.argmax(logprobs, axis=-1, keepdims=True)
        vocab = mx.arange(logprobs.shape[-1])
        return (vocab == top).astype(mx.float32)
    return mx.softmax(filtered(logprobs, params).astype(mx.float32) * (1.0 / params.temperature),
                      axis=-1)


def next_key(key: mx.array) -> tuple[mx.array, mx.array]:
    """(key to keep, key to draw with): what one draw of mlx-lm's sampler does to the
    global random state."""
    key, sub = mx.random.split(key)
    return key, sub


@partial(mx.compile)
def _categorical(logits: mx.array, temp: float, key: mx.array) -> mx.array:
    # categorical_sampling's expression, with the key as an input instead of the state.
    return mx.random.categorical(logits * (1.0 / temp), key=key)


def draw(logprobs: mx.array, params: SamplingParams, key: mx.array | None) -> mx.array:
    """One token per row, exactly as `make_sampler(...)(logprobs)` draws it with the
    random state at `key` (the key of the draw, i.e. the second half of a split)."""
    if params.greedy:
        return mx.argmax(logprobs, axis=-1)
    if key is None:
        raise SamplingError("sampling at temperature > 0 needs a random key")
    return _categorical(filtered(logprobs, params), params.temperature, key)


def draw_from(probs: mx.array, key: mx.array) -> mx.array:
    """One token per row from explicit probabilities (a normalized residual)."""
    return mx.random.categorical(mx.log(probs), key=key)
