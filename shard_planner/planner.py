"""Split a model's layers into contiguous stages over nodes, by memory and bandwidth.

Stage i of a plan runs on a node that comes after stage i-1's node in the order given (the
ring order the user chose); nodes may be left out. A stage holds layers [start, end), the
embedding when start == 0 and the final norm + head when end == num_layers (and, with MTP
drafts, the MTP module on the last stage), and must fit:

    weights + KV cache (context x sessions) + prompt cache + prefill workspace + reserve
        <= usable - headroom

Among the splits that fit, the plan minimizes predicted decode time per token, which is
sum(bytes the stage reads per token / node bandwidth) + one hop per stage (search.py). Each
hop costs the preset link, or the measured link between its two nodes when measurements are
given. Ties go to the split whose fullest node is least full. When no node's bandwidth is
known the plan minimizes that fullness alone (a split by memory), and so uses every node
that can hold a layer.
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import MappingProxyType
from typing import Sequence

from shard_planner.advice import advice_for
from shard_planner.costs import (
    DECODE_EFFICIENCY,
    DEFAULT_LINK,
    DEFAULT_STACK_OVERHEAD_S,
    TOKEN_HOP_BYTES,
    LinkSpec,
    get_link,
    hop_seconds,
)
from shard_planner.hardware import GiB, MiB, NodeSpec
from shard_planner.links import PairLinks, hop_link, ring_hops
from shard_planner.model_spec import PREFILL_CHUNK, ModelSpec
from shard_planner.plans import (
    DEFAULT_HEADROOM,
    DOES_NOT_FIT,
    DRAFT_LOOKUP,
    DRAFT_MTP,
    FITS,
    FITS_WIRED,
    NO_MTP_ROOM,
    Plan,
    StagePlan,
)
from shard_planner.search import Split, solve, solve_pairs
from shard_planner.stage_costs import StageCosts, budget_bytes, feasible, placeable

__all__ = ["DEFAULT_HEADROOM", "DOES_NOT_FIT", "FITS", "FITS_WIRED", "Plan", "StageCosts",
           "StagePlan", "budget_bytes", "feasible", "gib", "pair_hop_seconds", "placeable", "plan",
           "search_split", "solve", "solve_pairs", "stage_plans", "wired_mb"]

DRAFTS = (DRAFT_MTP,)


def wired_mb(node: NodeSpec, need: int, headroom: float, cap: int) -> int:
    """Smallest wired limit (in MB, as sysctl takes it) that holds ``need``: rounded up to a
    whole GiB when that stays within ``cap``."""
    mb = max(1, math.floor((need + node.reserve) / (1 - headroom) / MiB) - 1)
    while budget_bytes(node, mb * MiB, headroom) < need:
        mb += 1
    whole = -(-mb // 1024) * 1024
    return whole if whole * MiB <= cap else mb


def stage_plans(costs: StageCosts, nodes: Sequence[NodeSpec], split: Split, raised: bool,
                headroom: float) -> tuple[StagePlan, ...]:
    """The StagePlans of ``split``; with ``raised``, the wired limit of each node whose
    stage does not fit its current limit is raised as little as will do."""
    out = []
    for j, s, e in split:
        node = nodes[j]
        need = costs.need(s, e)
        usable, mb = node.usable_bytes, None
        if raised and need > budget_bytes(node, node.usable_bytes, headroom):
            mb = wired_mb(node, need, headroom, node.raisable_bytes)
            usable = mb * MiB
        out.append(StagePlan(
            node=node, node_index=j, start=s, end=e, weight_bytes=costs.weight(s, e),
            kv_bytes=costs.kv(s, e), workspace_bytes=costs.workspace(s, e),
            reserve_bytes=node.reserve, headroom_bytes=math.floor(usable * headroom),
            usable_bytes=usable, current_usable_bytes=node.usable_bytes,
            active_bytes=costs.active(s, e), wired_limit_mb=mb,
            prompt_cache_bytes=costs.prompt_cache(s, e), mtp_bytes=costs.mtp_weight(s, e),
            mtp_kv_bytes=costs.mtp_kv(s, e),
        ))
    return tuple(out)


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def pair_hop_seconds(spec: ModelSpec, order: Sequence[NodeSpec], links: PairLinks,
                     preset: LinkSpec, overhead_s: float = DEFAULT_STACK_OVERHEAD_S,
                     efficiency: float = DECODE_EFFICIENCY
                     ) -> tuple[list[list[float]], list[list[float]]]:
    """Seconds of a hidden-state hop and of the token hop back, for every ordered pair of
    nodes, scaled like the memory times the search ranks (at full bandwidth)."""
    hidden_bytes = spec.hidden_size * spec.act_bytes
    names = [nd.name for nd in order]
    links_of = [[hop_link(links, a, b, preset).link for b in names] for a in names]
    return ([[hop_seconds(lk, hidden_bytes, overhead_s) * efficiency for lk in row]
             for row in links_of],
            [[hop_seconds(lk, TOKEN_HOP_BYTES, overhead_s) * efficiency for lk in row]
             for row in links_of])


def search_split(costs: StageCosts, order: Sequence[NodeSpec], budgets: Sequence[int],
                 link: LinkSpec, links: PairLinks,
                 stack_overhead_s: float = DEFAULT_STACK_OVERHEAD_S,
                 efficiency: float = DECODE_EFFICIENCY) -> Split | None:
    """The fastest split of ``costs`` over ``order`` within ``budgets``: every hop costs
    ``link``, or the measured link of its pair of nodes when ``links`` has any."""
    if links:
        return solve_pairs(costs, order, budgets, *pair_hop_seconds(
            costs.spec, order, links, link, stack_overhead_s, efficiency))
    hidden = costs.spec.hidden_size * costs.spec.act_bytes
    return solve(costs, order, budgets, hop_seconds(link, hidden, stack_overhead_s) * efficiency)


def _check(nodes: Sequence[NodeSpec], context: int, sessions: int, prefill_chunk: int,
           prompt_cache_tokens: int, headroom: float, efficiency: float,
           draft: str | None) -> None:
    if not nodes:
        raise ValueError("no nodes to plan on")
    if context < 1 or sessions < 1 or prefill_chunk < 1:
        raise ValueError("context, sessions and prefill_chunk must be at least 1")
    if prompt_cache_tokens < 0:
        raise ValueError("prompt_cache_tokens must be 0 or more")
    if not 0 <= headroom < 1:
        raise ValueError("headroom must be a fraction in [0, 1)")
    if not 0 < efficiency <= 1:
        raise ValueError("efficiency must be in (0, 1]")
    if draft is not None and draft not in DRAFTS:
        raise ValueError(f"unknown draft {draft!r} (known: {', '.join(DRAFTS)})")
    names = [nd.name for nd in nodes]
    if len(set(names)) != len(names):
        raise ValueError(f"node names must be unique: {', '.join(names)}")


def plan(spec: ModelSpec, nodes: Sequence[NodeSpec], context: int = 4096, sessions: int = 1,
         *, link: str | LinkSpec = DEFAULT_LINK, headroom: float = DEFAULT_HEADROOM,
         reorder: bool = False, efficiency: float = DECODE_EFFICIENCY,
         stack_overhead_s: float = DEFAULT_STACK_OVERHEAD_S, prefill_chunk: int = PREFILL_CHUNK,
         advise: bool = True, prompt_cache_tokens: int | None = None,
         draft: str | None = None, links: PairLinks | None = None) -> Plan:
    """Plan ``spec`` over ``nodes`` (pipeline order = the order given, unless ``reorder``
    puts the fastest nodes first) for ``sessions`` sessions of ``context`` tokens each,
    prefilled ``prefill_chunk`` tokens at a time, with a prompt cache of
    ``prompt_cache_tokens`` tokens per stage (default: one context). ``draft="mtp"`` also
    places the MTP module on the last stage when there is room. ``links`` maps (from node
    name, to node name) to a measured LinkSpec; other hops cost the ``link`` preset."""
    pc = context if prompt_cache_tokens is None else prompt_cache_tokens
    _check(nodes, context, sessions, prefill_chunk, pc, headroom, efficiency, draft)
    order = list(nodes)
    if reorder:
        order.sort(key=lambda nd: (-(nd.bandwidth or 0), -nd.usable_bytes, nd.name))
    lk = get_link(link)
    measured: PairLinks = MappingProxyType(dict(links or {}))

    def search(c: StageCosts, budgets: Sequence[int]) -> Split | None:
        return search_split(c, order, budgets, lk, measured, stack_overhead_s, efficiency)

    now = [budget_bytes(nd, nd.usable_bytes, headroom) for nd in order]
    raised = [budget_bytes(nd, nd.raisable_bytes, headroom) for nd in order]
    want_mtp = draft == DRAFT_MTP and spec.mtp is not None
    costs = StageCosts(spec, context, sessions, prefill_chunk, pc, mtp=want_mtp)
    if want_mtp and not feasible(costs, raised):
        costs, want_mtp = StageCosts(spec, context, sessions, prefill_chunk, pc), False
    split = search(costs, now)
    verdict = FITS
    stages: tuple[StagePlan, ...] = ()
    if split is not None:
        stages = stage_plans(costs, order, split, False, headroom)
    elif raised != now and (split := search(costs, raised)) is not None:
        verdict = FITS_WIRED
        stages = stage_plans(costs, order, split, True, headroom)
    else:
        verdict = DOES_NOT_FIT
    used = {s.node_index for s in stages}
    left_out = tuple(nd.name for j, nd in enumerate(order) if j not in used) if stages else ()
    objective = "time" if any(nd.bandwidth for nd in order) else "memory"
    drafts = None if draft is None else (DRAFT_MTP if want_mtp else DRAFT_LOOKUP)
    hops = ring_hops([s.node.name for s in stages], measured, lk)
    result = Plan(verdict, spec, tuple(order), stages, (), context, sessions, objective, lk,
                  headroom, left_out, 0, prefill_chunk, pc, drafts, hops, measured)
    if not advise:
        return result
    adv, short = advice_for(result, costs, now, raised)
    if draft is not None and not want_mtp:
        why = (f"{NO_MTP_ROOM} (the MTP module needs {gib(spec.mtp_stage_bytes(1))} of "
               "weights there, with its embedding copy)" if spec.mtp is not None else
               f"{spec.name} has no MTP layer; drafts fall back to prompt lookup")
        adv = (why,) + adv
    return replace(result, advice=adv, shortfall_bytes=short)
