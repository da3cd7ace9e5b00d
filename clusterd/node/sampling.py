"""Sampling on the last stage: one session's row, or all greedy rows at once,
with mlx-lm's own filters and logits processors in mlx-lm's order
(processors on logits, then log-softmax, then the sampler: see
clusterd/speculative/sampling.py, which verification shares).

Each session draws from its own key (split once per draw, as MLX's global
generator does after `mx.random.seed`), so its tokens equal mlx-lm's with
the same seed, however many other sessions share the node."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

from clusterd.speculative.sampling import SamplingParams, draw, next_key
from clusterd.wire import clusterd_pb2 as pb


def logprobs_of(logits: mx.array) -> mx.array:
    """mlx-lm's normalisation, row by row over the last axis."""
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


class RowSampler:
    def __init__(self, sp: pb.SamplingParams, context: int):
        self.params = SamplingParams(temperature=float(sp.temperature), top_p=float(sp.top_p),
                                     min_p=float(sp.min_p), top_k=int(sp.top_k))
        self._seed: Optional[int] = int(sp.seed) if sp.has_seed else None
        self._key: Optional[mx.array] = None
        # Penalties look at every token of the session, as far as its context goes.
        self._processors = make_logits_processors(
            repetition_penalty=sp.repetition_penalty or None,
            repetition_context_size=context,
            presence_penalty=sp.presence_penalty or None,
            presence_context_size=context,
            frequency_penalty=sp.frequency_penalty or None,
            frequency_context_size=context,
        )

    @property
    def greedy(self) -> bool:
        """Argmax with no processors: rows like this sample together."""
        return self.params.greedy and not self._processors

    @property
    def has_processors(self) -> bool:
        return bool(self._processors)

    @property
    def key(self) -> mx.array:
        """The session's key (made from its seed, or at random, on first use)."""
        if self._key is None:
            seed = self._seed if self._seed is not None else int.from_bytes(os.urandom(8), "little")
            self._key = mx.random.key(seed)
        return self._key

    @key.setter
    def key(self, value: mx.array) -> None:
        self._key = value

    def sample(self, logits: mx.array, context: Sequence[int]) -> mx.array:
        """One token id (shape [1]) from one row's logits [1, V]."""
        if self._processors:
            tokens = mx.array(list(context), dtype=mx.int32)
            for processor in self._processors:
                logits = processor(tokens, logits)
        if self.params.greedy:
            return draw(logprobs_of(logits), self.params, None)
        self.key, sub = next_key(self.key)
        return draw(logprobs_of(logits), self.params, sub)


def greedy_tokens(logits: mx.array) -> mx.array:
    """Argmax of each row of [B, V], as mlx-lm picks it (from log-probabilities)."""
    return mx.argmax(logprobs_of(logits), axis=-1)
