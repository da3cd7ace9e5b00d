"""What the last stage does with a trip's hidden state: choose each row's
tokens (sample, or verify its drafts), cut them at a stop token, max_tokens
or the context, propose the next drafts, and build what goes back to the
first stage and to the coordinators. Compute thread only."""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx

from clusterd.node.drafting import Outcome, judge
from clusterd.node.sampling import greedy_tokens, logprobs_of
from clusterd.node.sessions import Session
from clusterd.wire import clusterd_pb2 as pb


@dataclass(frozen=True)
class Settled:
    returns: list[tuple[pb.Row, list[int]]]  # continuing rows: the token, then drafts
    events: list[tuple[Session, pb.TokenEvent]]


def decide(stage, sessions: list[Session], h: mx.array, width: int,
           drafts: int) -> list[Outcome]:
    """Each row's tokens from this trip: sampled after its last position, or
    (a trip carrying drafts) the verdict on its drafts."""
    if not drafts:
        logits = stage.logits(h)  # [B, V]: each row's last position
        picks: list = [None] * len(sessions)
        greedy = [i for i, s in enumerate(sessions) if s.sampler.greedy]
        if greedy:
            g = greedy_tokens(logits if len(greedy) == len(sessions)
                              else logits[mx.array(greedy)])
            for j, i in enumerate(greedy):
                picks[i] = g[j:j + 1]
        for i, s in enumerate(sessions):
            if picks[i] is None:
                picks[i] = s.sampler.sample(logits[i:i + 1], (*s.prompt, *s.answer))
        return [Outcome([t], 0, 0, 0) for t in mx.concatenate(picks).tolist()]
    logits = stage.logits(h, last_only=False)  # [B, width, V]
    logprobs = logprobs_of(logits)
    out = []
    for i, s in enumerate(sessions):
        if s.sampler.has_processors:  # penalties: no drafts, the first position only
            t = s.sampler.sample(logits[i, :1], (*s.prompt, *s.answer)).item()
            out.append(Outcome([t], 0, 0, width - 1))
        else:
            out.append(judge(s.sampler, s.drafts, logprobs[i], width))
    return out


def settle(stage, sessions: list[Session], outcomes: list[Outcome], h: mx.array,
           context: int) -> Settled:
    now = time.monotonic()
    returns, events = [], []
    normed: list = []  # the main model's normed state (the MTP layer reads it), made once

    def hidden_of(i: int):
        def rows(n: int) -> mx.array:
            if not normed:
                normed.append(stage.normed(h))
            return normed[0][i, :n]
        return rows

    for i, (s, o) in enumerate(zip(sessions, outcomes)):
        index = len(s.answer)
        emitted, reason = [], ""
        for t in o.tokens:
            s.produced += 1
            if t in s.stop_ids:
                reason = "stop"
                break
            emitted.append(t)
            s.answer.append(t)
            if s.produced >= s.max_tokens:
                reason = "length"
                break
        position = s.length - o.trim  # where the next input token goes
        if not reason and position + 1 > context:
            reason = "length"
        if not reason:
            drafts: tuple[int, ...] = ()
            if s.drafts is not None:
                room = min(s.max_tokens - s.produced - 1, context - position - 1)
                s.drafts.propose(emitted, hidden_of(i), room, s.sampler)
                drafts = s.drafts.pending
            returns.append((pb.Row(session_id=s.session_id, position=position, trim=o.trim),
                            [emitted[-1], *drafts]))
        events.append((s, pb.TokenEvent(
            session_id=s.session_id, tokens=emitted, index=index, time=now,
            done=bool(reason), finish_reason=reason, drafted=o.drafted, accepted=o.accepted)))
    return Settled(returns, events)


def step_of(shard: str, group: int, rows: list[tuple[pb.Row, list[int]]]) -> pb.Activation:
    """Rows (each its token plus drafts) as one trip: every row as wide as the
    widest, padded with its own token (filler the verdict ignores)."""
    width = max((len(toks) for _, toks in rows), default=1)
    ids, drafts = [], []
    for _, toks in rows:
        padded = toks + [toks[0]] * (width - len(toks))
        ids += padded
        drafts += padded[1:]
    return pb.Activation(shard=shard, group=group, rows=[r for r, _ in rows], width=width,
                         tokens=pb.TokenIds(ids=ids), sample=True, drafts=width - 1,
                         draft_ids=drafts)
