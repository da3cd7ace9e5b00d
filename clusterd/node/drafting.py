"""Drafts on the last stage: what a session proposes to verify on its next
trip, and the verdict on what it proposed last time.

A trip of width w = 1 + K carries, per row, the token the last stage chose
plus the drafts it proposed (padded to the trip's K with filler the verdict
ignores). Verification (clusterd/speculative/verify.py) accepts a prefix of
the row's real drafts plus one token of the target's own; every stage then
drops the K - accepted positions that followed (the row's `trim`).

Two drafters: prompt lookup (any model), and the model's own MTP layer
(DeepSeek-V3/R1), which reads the main model's normed hidden state at every
accepted position and keeps a KV cache of its own per session."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import mlx.core as mx

from clusterd.speculative.ngram import PromptLookup
from clusterd.speculative.verify import verify

# Prompt lookup proposes only on a match of at least this many tokens: a
# single-token match is mostly noise, and every wrong draft costs a position.
LOOKUP_MIN_MATCH = 2

Hidden = Callable[[int], mx.array]  # n -> the row's normed hidden state at its first n positions


@dataclass(frozen=True)
class Outcome:
    """What one row's trip gave: the tokens to emit, drafts verified, accepted."""

    tokens: list[int]
    drafted: int
    accepted: int
    trim: int  # positions every stage drops before the row's next trip


class LookupDrafts:
    """Prompt lookup over the session's prompt and answer."""

    kind = "ngram"

    def __init__(self, k: int, prompt: Sequence[int]):
        self.k = k
        self._lookup = PromptLookup(prompt, min_n=LOOKUP_MIN_MATCH, max_n=4)
        self.pending: tuple[int, ...] = ()  # drafts sent with the last return
        self.pending_q: Optional[mx.array] = None  # their proposal log-probs (None: one-hot)

    def feed(self, hidden: mx.array, next_tokens: Sequence[int]) -> None:
        """A prompt chunk went by (the lookup knows the prompt already)."""

    def propose(self, emitted: Sequence[int], hidden: Hidden, limit: int, sampler) -> None:
        self._lookup.extend(emitted)
        self.pending = tuple(self._lookup.propose(min(self.k, limit))) if limit > 0 else ()


class MtpDrafts:
    """The MTP layer: drafts from the main model's state and the token after it."""

    kind = "mtp"

    def __init__(self, k: int, drafter):
        self.k = k
        self._drafter = drafter  # clusterd.models.mtp.MtpDrafter
        self._state = drafter.new_state()
        self.pending: tuple[int, ...] = ()
        self.pending_q: Optional[mx.array] = None

    def feed(self, hidden: mx.array, next_tokens: Sequence[int]) -> None:
        self._drafter.extend(self._state, hidden, list(next_tokens))

    def propose(self, emitted: Sequence[int], hidden: Hidden, limit: int, sampler) -> None:
        h = hidden(len(emitted))  # the accepted positions, each followed by an emitted token
        k = min(self.k, limit)
        params = sampler.params
        draft = self._drafter.draft(self._state, h, list(emitted), k=max(k, 0), params=params,
                                    key=None if params.greedy else sampler.key)
        if draft.key is not None and not params.greedy:
            sampler.key = draft.key
        self.pending, self.pending_q = tuple(draft.tokens), draft.logprobs


def judge(sampler, drafts, logprobs: mx.array, width: int) -> Outcome:
    """Verify one row of a trip of `width` positions ([width, V] log-probabilities)."""
    real = drafts.pending if drafts is not None else ()
    q = drafts.pending_q if drafts is not None and real else None
    params = sampler.params
    verdict = verify(logprobs[: len(real) + 1], real, params,
                     key=None if params.greedy else sampler.key,
                     draft_logprobs=None if q is None else q[: len(real)])
    if verdict.key is not None and not params.greedy:
        sampler.key = verdict.key
    return Outcome(verdict.emitted(real), len(real), verdict.accepted,
                   trim=(width - 1) - verdict.accepted)
