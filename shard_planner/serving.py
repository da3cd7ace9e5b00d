"""Decode speed when serving: many sessions batched through the pipeline, and drafts.

The step model. One forward step of a stage over B sessions with q new tokens each reads
the stage's shared weights once, each routed expert that any of the B x q tokens uses once
(E * (1 - (1 - k/E)^(B q)) distinct experts of E with top-k routing, LayerSpec.read_bytes),
and each session's KV cache once; it computes 2 x active parameters per token plus decode
attention over the cache. Its time is the larger of the reads at the node's bandwidth x an
efficiency and the compute at the GPU's peak x an efficiency (a roofline).

The pipeline. Sessions decode in G micro-batches (as even as can be) that travel the ring
of S stages one after another, so with G >= S all stages work at once. A round, in which
each of them advances one trip, takes the longer of: the busiest stage's work on all G
micro-batches, and the slowest micro-batch's trip through every stage and hop (a session's
next token needs its last). Of N sessions the scheduler is taken to run the n <= N in the G
micro-batches that serve the most tokens (the others wait their turn, in rotation).
Aggregate tok/s = n x tokens per trip / round; per stream = aggregate / N.

Drafts. With MTP, a trip carries 1 + k tokens per session (the token and k drafts) and the
last stage runs the MTP module k times to draft the next ones; a draft is kept when every
draft before it was, each with probability a, so a trip yields 1 + a + ... + a^k tokens
(1 + a for k = 1). On a Mac the trip is bound by weight reads: the k extra tokens read the
same shared weights, but a MoE's extra tokens mostly pick other experts, so for R1 a
2-token trip reads about 1.6x the bytes of a 1-token trip (the ``trip_cost_ratio`` the
model derives; pass a measured one to override it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from shard_planner.costs import (
    DECODE_EFFICIENCY,
    DEFAULT_STACK_OVERHEAD_S,
    PREFILL_EFFICIENCY,
    TOKEN_HOP_BYTES,
    LinkSpec,
    get_link,
    hop_seconds,
)
from shard_planner.hardware import NodeSpec, find_chip
from shard_planner.model_spec import ModelSpec
from shard_planner.plans import DRAFT_MTP, Plan, StagePlan

__all__ = ["MTP_ACCEPTANCE", "ServingPrediction", "hop_links", "node_tflops", "predict_serving",
           "ring_hop_seconds", "stage_rates", "trip_seconds"]

# DeepSeek-V3's technical report: the MTP module's second token is accepted 85-90% of the
# time; the lower figure.
MTP_ACCEPTANCE = 0.85
# Fraction of GPU FP32 peak a batched decode step's matmuls reach: taken as prefill's
# (calibrated on mlx-lm prefill), an assumption until the bench measures batched decode.
DECODE_COMPUTE_EFFICIENCY = PREFILL_EFFICIENCY


@dataclass(frozen=True)
class ServingPrediction:
    sessions: int  # N decoding at once
    groups: int  # micro-batches travelling the ring
    batch: int  # sessions in the largest micro-batch
    active: int  # groups x batch sessions decode in a round; the others wait their turn
    draft_tokens: int  # k drafts per session per trip (0: none)
    acceptance: float | None  # per draft, when drafting
    tokens_per_trip: float  # expected tokens a session gains per trip
    trip_cost_ratio: float  # this trip's time / the same trip with one token per session
    round_ms: float  # time in which every session makes one trip
    aggregate_tok_s: float
    per_stream_tok_s: float
    single_stream_tok_s: float  # one session, no drafts: simulate()'s decode figure
    bound: str  # "stage": the busiest stage limits the round; "trip": one trip's latency
    kv_tokens: int  # tokens in each session's cache while decoding
    assumptions: tuple[str, ...] = ()


def node_tflops(node: NodeSpec) -> float | None:
    if node.tflops:
        return node.tflops
    chip = find_chip(node.chip or "")
    return chip.tflops if chip else None


def stage_rates(p: Plan, efficiency: float, compute_efficiency: float
                ) -> list[tuple[float, float | None]] | None:
    """(bytes/s, FLOP/s or None) each stage reaches; None when no bandwidth is known.
    Unknown bandwidths take the slowest known one, as the planner does."""
    known = [n.bandwidth for n in p.nodes if n.bandwidth]
    if not known:
        return None
    out: list[tuple[float, float | None]] = []
    for s in p.stages:
        tf = node_tflops(s.node)
        out.append(((s.node.bandwidth or min(known)) * 1e9 * efficiency,
                    tf * 1e12 * compute_efficiency if tf else None))
    return out


def hop_links(p: Plan, link: str | LinkSpec | None = None) -> list[LinkSpec]:
    """The link of each hop of ``p``'s ring: ``link`` for all when given, else the plan's
    (measured where measured, the preset elsewhere)."""
    if len(p.stages) < 2:
        return []
    if link is not None:
        return [get_link(link)] * len(p.stages)
    return [h.link for h in p.hops] or [p.link] * len(p.stages)


def _roofline(nbytes: float, flops: float, rate: tuple[float, float | None]) -> float:
    bw, fl = rate
    return max(nbytes / bw, flops / fl if fl else 0.0)


def _stage_s(spec: ModelSpec, st: StagePlan, rate: tuple[float, float | None], sessions: int,
             tokens: int, kv_tokens: int) -> float:
    """One forward step of ``sessions`` sessions x ``tokens`` new tokens on stage ``st``."""
    q = sessions * tokens
    nbytes, flops = 0.0, 0.0
    for layer in spec.layers[st.start:st.end]:
        kv = min(kv_tokens, layer.sliding_window) if layer.sliding_window else kv_tokens
        nbytes += layer.read_bytes(q) + sessions * kv * layer.kv_bytes_per_token
        flops += q * (2 * layer.active_params + kv * layer.decode_flops_per_key)
    if st.start == 0:
        nbytes += q * (spec.embed_bytes // spec.vocab_size)
    if st.end == spec.num_layers:
        nbytes += spec.head_bytes + (spec.embed_bytes if spec.tied_embeddings else 0)
        flops += 2 * q * spec.vocab_size * spec.hidden_size
    return _roofline(nbytes, flops, rate)


def _mtp_s(spec: ModelSpec, rate: tuple[float, float | None], sessions: int,
           kv_tokens: int) -> float:
    """One MTP draft step for ``sessions`` sessions on the last stage."""
    if spec.mtp is None:
        return 0.0
    layer = spec.mtp.layers[0]
    extra = spec.mtp_draft_bytes() - layer.active_bytes
    nbytes = (layer.read_bytes(sessions) + extra
              + sessions * kv_tokens * layer.kv_bytes_per_token)
    flops = sessions * (2 * layer.active_params + kv_tokens * layer.decode_flops_per_key
                        + 2 * spec.mtp.extra_params // len(spec.mtp.layers)
                        + 2 * spec.vocab_size * spec.hidden_size)
    return _roofline(nbytes, flops, rate)


def trip_seconds(p: Plan, rates: Sequence[tuple[float, float | None]], links: Sequence[LinkSpec],
                 sessions: int, tokens: int, kv_tokens: int, drafts: int,
                 overhead_s: float) -> tuple[list[float], float]:
    """(each stage's busy time, the trip's time) for one micro-batch of ``sessions``
    sessions carrying ``tokens`` tokens each, with ``drafts`` MTP steps on the last stage."""
    spec = p.model
    busy = [_stage_s(spec, st, r, sessions, tokens, kv_tokens) for st, r in zip(p.stages, rates)]
    if drafts:
        busy[-1] += drafts * _mtp_s(spec, rates[-1], sessions, kv_tokens)
    return busy, sum(busy) + ring_hop_seconds(spec, links, sessions * tokens, overhead_s)


def ring_hop_seconds(spec: ModelSpec, links: Sequence[LinkSpec], tokens: int,
                     overhead_s: float) -> float:
    """All hops of one trip carrying ``tokens`` tokens: hidden states forward, ids back."""
    if not links:
        return 0.0
    hidden = tokens * spec.hidden_size * spec.act_bytes
    return (sum(hop_seconds(lk, hidden, overhead_s) for lk in links[:-1])
            + hop_seconds(links[-1], TOKEN_HOP_BYTES * tokens, overhead_s))


def predict_serving(p: Plan, sessions: int = 1, *, link: str | LinkSpec | None = None,
                    efficiency: float = DECODE_EFFICIENCY,
                    compute_efficiency: float = DECODE_COMPUTE_EFFICIENCY,
                    kv_tokens: int | None = None, draft_tokens: int = 0,
                    acceptance: float = MTP_ACCEPTANCE, trip_cost_ratio: float | None = None,
                    stack_overhead_s: float = DEFAULT_STACK_OVERHEAD_S
                    ) -> ServingPrediction | None:
    """Aggregate and per-stream decode tok/s of ``sessions`` sessions on ``p`` (see the
    module docstring), with ``draft_tokens`` MTP drafts per trip when ``p`` planned the MTP
    module. ``kv_tokens``: tokens in each session's cache (default: the plan's context, at
    most 8192, as simulate's prompt). None when the plan does not fit or no bandwidth is
    known."""
    if sessions < 1 or draft_tokens < 0:
        raise ValueError("sessions must be at least 1 and draft_tokens at least 0")
    if draft_tokens and p.draft != DRAFT_MTP:
        raise ValueError("drafts are predicted for plans that hold the MTP module "
                         "(plan with draft='mtp' and room for it)")
    if not 0 <= acceptance <= 1:
        raise ValueError("acceptance must be in [0, 1]")
    if trip_cost_ratio is not None and trip_cost_ratio <= 0:
        raise ValueError("trip_cost_ratio must be positive")
    rates = stage_rates(p, efficiency, compute_efficiency)
    if not p.stages or rates is None:
        return None
    kv = min(p.context, 8192) if kv_tokens is None else kv_tokens
    links = hop_links(p, link)
    q = 1 + draft_tokens

    def trip(b: int) -> tuple[list[float], float, float]:
        """(stage busy times, trip time, ratio to a 1-token trip) for a micro-batch of b."""
        busy1, t1 = trip_seconds(p, rates, links, b, 1, kv, 0, stack_overhead_s)
        if not draft_tokens:
            return busy1, t1, 1.0
        if trip_cost_ratio is not None:
            return [x * trip_cost_ratio for x in busy1], t1 * trip_cost_ratio, trip_cost_ratio
        busy, t = trip_seconds(p, rates, links, b, q, kv, draft_tokens, stack_overhead_s)
        return busy, t, t / t1

    by_size: dict[int, tuple[list[float], float, float]] = {}

    def sized(b: int) -> tuple[list[float], float, float]:
        if b not in by_size:
            by_size[b] = trip(b)
        return by_size[b]

    def rounds(n: int, g: int) -> tuple[float, float, float]:
        """(round, busiest stage, longest trip) of n sessions in g micro-batches as even as
        can be: `extra` of small + 1 sessions, the rest of small."""
        small, extra = divmod(n, g)
        parts = [(sized(small + 1), extra)] if extra else []
        if g > extra:
            parts.append((sized(small), g - extra))
        busy = max(sum(k * t[0][i] for t, k in parts) for i in range(len(p.stages)))
        longest = max(t[1] for t, _ in parts)
        return max(busy, longest), busy, longest

    # The scheduler runs n <= N sessions (the others wait their turn) in g micro-batches,
    # as serves the most tokens. More micro-batches than fill the ring only re-read the
    # weights, so g stays at or below what one trip over the slowest stage fills.
    busy1, trip1, _ = sized(1)
    g_max = min(sessions, max(len(p.stages), math.ceil(trip1 / max(busy1))) + 1)
    # Equal rates (to a millionth of a token/s) go to fewer sessions, then fewer batches.
    best = max(((round(n / rounds(n, g)[0], 6), -n, -g) for g in range(1, g_max + 1)
                for n in range(g, sessions + 1)))
    active, groups = -best[1], -best[2]
    batch = -(-active // groups)
    round_s, stage_busy, longest = rounds(active, groups)
    per_trip = sum(acceptance ** i for i in range(q)) if draft_tokens else 1.0
    single = trip_seconds(p, rates, links, 1, 1, kv, 0, stack_overhead_s)[1]
    notes = [f"{groups} micro-batch(es) of up to {batch} session(s) travel the ring"
             + (f"; {sessions - active} session(s) wait their turn" if active < sessions else ""),
             f"each session's cache holds {kv} tokens",
             f"memory at {efficiency:.0%} of bandwidth, compute at {compute_efficiency:.0%} "
             "of FP32 peak (assumed as prefill's)"]
    if draft_tokens:
        ratio = "given" if trip_cost_ratio is not None else "from the step model"
        notes.append(f"{draft_tokens} MTP draft(s) per trip, each kept with probability "
                     f"{acceptance:g}; trip cost ratio {by_size[batch][2]:.2f} ({ratio})")
    return ServingPrediction(
        sessions=sessions, groups=groups, batch=batch, draft_tokens=draft_tokens,
        acceptance=acceptance if draft_tokens else None, tokens_per_trip=per_trip,
        trip_cost_ratio=by_size[batch][2], round_ms=round_s * 1e3,
        active=active, aggregate_tok_s=active * per_trip / round_s,
        per_stream_tok_s=active * per_trip / round_s / sessions,
        single_stream_tok_s=1 / single, bound="stage" if stage_busy >= longest else "trip",
        kv_tokens=kv, assumptions=tuple(notes),
    )
