"""Drafts on the last stage: what a session proposes to verify on its next
trip, and the verdict on what it proposed last time.

A trip of width w = 1 + K carries, per row, the token the last stage chose
plus the drafts it proposed (padded to the trip's K with filler the verdict
ignores). Verification (clusterd/speculative/verify.py) accepts a prefix of
the row's real drafts plus one token of the target's own; every stage then
drops the K - accepted positions that followed (the row's `trim`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx

from clusterd.speculative.ngram import PromptLookup
from clusterd.speculative.verify import verify

# Prompt lookup proposes only on a match of at least this many tokens: a
# single-token match is mostly noise, and every wrong draft costs a position.
LOOKUP_MIN_MATCH = 2


@dataclass(frozen=True)
class Outcome:
    """What one row's trip gave: the tokens to emit, drafts verified, accepted."""

    tokens: list[int]
    drafted: int
    accepted: int
    trim: int  # positions every stage drops before the row's next trip


class SessionDrafts:
    """One session's drafting: prompt lookup over its prompt and answer."""

    def __init__(self, k: int, prompt: Sequence[int]):
        self.k = k
        self._lookup = PromptLookup(prompt, min_n=LOOKUP_MIN_MATCH, max_n=4)
        self.pending: tuple[int, ...] = ()  # drafts sent with the last return

    def emitted(self, tokens: Sequence[int]) -> None:
        self._lookup.extend(tokens)

    def propose(self, limit: int) -> tuple[int, ...]:
        self.pending = tuple(self._lookup.propose(min(self.k, limit))) if limit > 0 else ()
        return self.pending


def judge(sampler, drafts: Optional[SessionDrafts], logprobs: mx.array, width: int) -> Outcome:
    """Verify one row of a trip of `width` positions ([width, V] log-probabilities)."""
    real = drafts.pending if drafts is not None else ()
    params = sampler.params
    verdict = verify(logprobs[: len(real) + 1], real, params,
                     key=None if params.greedy else sampler.key)
    if verdict.key is not None and not params.greedy:
        sampler.key = verdict.key
    return Outcome(verdict.emitted(real), len(real), verdict.accepted,
                   trim=(width - 1) - verdict.accepted)
