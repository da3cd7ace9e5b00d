"""Exact verification of drafted tokens against the target model's distributions.

A trip runs the target on the session's next token plus k drafts, so the last stage has
log-probabilities at k+1 positions: row i is the target's distribution for the token
after draft i (row 0: after the token already emitted). Given the k drafts and the
drafter's proposal distributions q (None: a deterministic draft, q = one-hot):

- greedy (temperature 0): drafts are accepted while each equals the row's argmax; the
  target's own token is the argmax of the row after the last accepted draft;
- sampling: standard speculative sampling (Leviathan et al. 2023, Chen et al. 2023). p is
  exactly the distribution mlx-lm's sampler draws from (sampling.py). Draft d at row i is
  accepted with probability min(1, p(d) / q(d)); at the first rejection the target's token
  is drawn from the normalized residual max(0, p - q); when all k are accepted it is drawn
  from p at row k. Every emitted token is then distributed exactly as mlx-lm's sampler
  would have drawn it without speculation, whatever the drafter proposes.

Random numbers come from the session's key: one split for the target's token (so with no
drafts this is exactly mlx-lm's seeded draw), and one more, for the acceptance uniforms,
only when there are drafts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx

from clusterd.speculative.sampling import (SamplingParams, draw, draw_from, next_key,
                                           probabilities)


class VerifyError(ValueError):
    """Inputs that do not describe a trip; the message says what is wrong."""


@dataclass(frozen=True)
class Verdict:
    accepted: int  # drafts accepted, 0..k
    token: int  # the target's own token after them
    key: Optional[mx.array]  # the session's key for its next draw (unchanged when greedy)

    def emitted(self, drafts: Sequence[int]) -> list[int]:
        """The tokens this trip adds to the output, in order."""
        return [int(d) for d in drafts[: self.accepted]] + [self.token]


def verify(target_logprobs: mx.array, drafts: Sequence[int], params: SamplingParams,
           key: Optional[mx.array] = None,
           draft_logprobs: Optional[mx.array] = None) -> Verdict:
    """One session. target_logprobs: [k+1, V] log-probabilities (as the last stage's
    head gives them); drafts: k token ids; draft_logprobs: [k, V] log-probabilities the
    drafts were drawn from, or None for deterministic drafts. key: the session's key,
    needed when params samples."""
    if target_logprobs.ndim != 2:
        raise VerifyError(f"target_logprobs must be [k+1, vocab], not {tuple(target_logprobs.shape)}")
    return verify_batch(target_logprobs[None], [drafts], params, [key],
                        None if draft_logprobs is None else [draft_logprobs])[0]


def verify_batch(target_logprobs: mx.array, drafts: Sequence[Sequence[int]],
                 params: SamplingParams, keys: Sequence[Optional[mx.array]],
                 draft_logprobs: Optional[Sequence[Optional[mx.array]]] = None) -> list[Verdict]:
    """B sessions sharing sampling parameters. target_logprobs: [B, K+1, V]; row b has
    len(drafts[b]) <= K drafts and uses target rows 0..len(drafts[b]) (the rest is
    padding). Each row's result equals verify() on that row alone."""
    batch, vocab = _check(target_logprobs, drafts, keys, draft_logprobs)
    qs = list(draft_logprobs) if draft_logprobs is not None else [None] * batch
    if params.greedy:
        return _greedy(target_logprobs, drafts, keys)
    p = probabilities(target_logprobs, params)  # [B, K+1, V] float32
    keep, subs, ratios = [], [], []
    for b in range(batch):
        if keys[b] is None:
            raise VerifyError(f"row {b}: sampling at temperature {params.temperature} needs the "
                              "session's random key")
        key, sub = next_key(keys[b])
        k = len(drafts[b])
        if k:
            key, ukey = next_key(key)
            d = mx.array([int(t) for t in drafts[b]])
            p_d = mx.take_along_axis(p[b, :k], d[:, None], axis=-1)[:, 0]
            q_d = (mx.ones((k,)) if qs[b] is None else
                   mx.exp(mx.take_along_axis(qs[b].astype(mx.float32), d[:, None], axis=-1)[:, 0]))
            # u < p/q, written so that q(d) = 0 (a drafter's inconsistency) accepts.
            ratios.append(mx.random.uniform(shape=(k,), key=ukey) * q_d < p_d)
        else:
            ratios.append(mx.array([], dtype=mx.bool_))
        keep.append(key)
        subs.append(sub)
    mx.eval(ratios)
    accepted = [_first_false(r.tolist()) for r in ratios]
    tokens = []
    for b in range(batch):
        a, k = accepted[b], len(drafts[b])
        if a == k:  # every draft accepted: the target's bonus token, as the plain sampler
            tokens.append(draw(target_logprobs[b, k:k + 1], params, subs[b])[0])
        else:
            q = None if qs[b] is None else qs[b][a]
            tokens.append(draw_from(_residual(p[b, a], q, int(drafts[b][a]), vocab), subs[b]))
    mx.eval(tokens)
    return [Verdict(accepted[b], int(tokens[b].item()), keep[b]) for b in range(batch)]


def _greedy(target_logprobs, drafts, keys) -> list[Verdict]:
    best = mx.argmax(target_logprobs, axis=-1).tolist()  # [B][K+1]
    out = []
    for b, row in enumerate(best):
        a = _first_false([int(d) == row[i] for i, d in enumerate(drafts[b])])
        out.append(Verdict(a, int(row[a]), keys[b]))
    return out


def _residual(p: mx.array, q_logprobs: Optional[mx.array], draft: int, vocab: int) -> mx.array:
    """max(0, p - q) normalized; q one-hot on the draft when the draft was deterministic.
    A residual of zero mass (p == q, where rejection cannot happen) falls back to p."""
    if q_logprobs is None:
        r = mx.where(mx.arange(vocab) == draft, 0.0, p)
    else:
        r = mx.maximum(p - mx.exp(q_logprobs.astype(mx.float32)), 0.0)
    mass = r.sum()
    return mx.where(mass > 0, r / mx.maximum(mass, 1e-30), p)[None]


def _first_false(flags: list) -> int:
    for i, ok in enumerate(flags):
        if not ok:
            return i
    return len(flags)


def _check(target, drafts, keys, draft_logprobs) -> tuple[int, int]:
    if target.ndim != 3:
        raise VerifyError(f"target_logprobs must be [batch, k+1, vocab], not {tuple(target.shape)}")
    batch, rows, vocab = target.shape
    if len(drafts) != batch or len(keys) != batch:
        raise VerifyError(f"{batch} target rows but {len(drafts)} draft lists and {len(keys)} keys")
    if draft_logprobs is not None and len(draft_logprobs) != batch:
        raise VerifyError(f"{batch} target rows but {len(draft_logprobs)} proposal arrays")
    for b, ds in enumerate(drafts):
        if len(ds) + 1 > rows:
            raise VerifyError(f"row {b}: {len(ds)} drafts need {len(ds) + 1} target positions, "
                              f"got {rows}")
        bad = [int(d) for d in ds if not 0 <= int(d) < vocab]
        if bad:
            raise VerifyError(f"row {b}: draft token(s) {bad[:3]} outside the vocabulary of {vocab}")
        q = draft_logprobs[b] if draft_logprobs is not None else None
        if q is not None and tuple(q.shape) != (len(ds), vocab):
            raise VerifyError(f"row {b}: proposal log-probs must be [{len(ds)}, {vocab}], "
                              f"not {tuple(q.shape)}")
    return batch, vocab
