"""Sampling on the last stage, one session's row at a time or all greedy
rows at once, with mlx-lm's own filters and logits processors applied in
mlx-lm's order (processors on logits, then log-softmax, then top-p, min-p,
top-k, then a categorical draw at the temperature).

Each seeded session draws from its own key (split once per draw, as MLX's
global generator does after `mx.random.seed`), so its tokens equal mlx-lm's
with the same seed, however many other sessions share the node."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from clusterd.wire import clusterd_pb2 as pb


def logprobs_of(logits: mx.array) -> mx.array:
    """mlx-lm's normalisation, row by row over the last axis."""
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


class RowSampler:
    def __init__(self, params: pb.SamplingParams, context: int):
        self.temperature = float(params.temperature)
        self.top_p = float(params.top_p)
        self.top_k = int(params.top_k)
        self.min_p = float(params.min_p)
        self._seed: Optional[int] = int(params.seed) if params.has_seed else None
        self._key: Optional[mx.array] = None
        # Penalties look at every token of the session, as far as its context goes.
        self._processors = make_logits_processors(
            repetition_penalty=params.repetition_penalty or None,
            repetition_context_size=context,
            presence_penalty=params.presence_penalty or None,
            presence_context_size=context,
            frequency_penalty=params.frequency_penalty or None,
            frequency_context_size=context,
        )

    @property
    def greedy(self) -> bool:
        """Argmax with no processors: rows like this sample together."""
        return self.temperature == 0 and not self._processors

    @property
    def has_processors(self) -> bool:
        return bool(self._processors)

    def _next_key(self) -> mx.array:
        if self._key is None:
            seed = self._seed if self._seed is not None else int.from_bytes(os.urandom(8), "little")
            self._key = mx.random.key(seed)
        self._key, sub = mx.random.split(self._key)
        return sub

    def filtered(self, logits: mx.array, context: Sequence[int]) -> mx.array:
        """Log-probabilities [1, V] after processors and filters: the
        distribution the draw is made from (before the temperature)."""
        if self._processors:
            tokens = mx.array(list(context), dtype=mx.int32)
            for processor in self._processors:
                logits = processor(tokens, logits)
        logprobs = logprobs_of(logits)
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p > 0:
            logprobs = apply_min_p(logprobs, self.min_p)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        return logprobs

    def sample(self, logits: mx.array, context: Sequence[int]) -> mx.array:
        """One token id (shape [1]) from one row's logits [1, V]."""
        logprobs = self.filtered(logits, context)
        if self.temperature == 0:
            return mx.argmax(logprobs, axis=-1)
        return mx.random.categorical(logprobs * (1.0 / self.temperature), key=self._next_key())


def greedy_tokens(logits: mx.array) -> mx.array:
    """Argmax of each row of [B, V], as mlx-lm picks it (from log-probabilities)."""
    return mx.argmax(logprobs_of(logits), axis=-1)
