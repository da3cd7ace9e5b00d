"""Several models on the same nodes: the main model (R1) as plan() places it, and extra ones
(a distill beside it) where there is room.

Each extra model, in the order given, goes to the first of these that holds it: nodes of its
own (no model there yet) at the current limits, then beside stages already placed at the
current limits (a node's memory is shared: each model has its own weights, KV cache, prompt
cache and prefill workspace there, the node's reserve and headroom count once), then the
same two with raised wired limits. Within each, the split is the planner's (fastest, fewest
hops). ``AlsoModel(node=...)`` forces one node. Deterministic: the same input always gives
the same placement, and every placement says why it went there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

from shard_planner.advice import fits_where, lower_quantizations
from shard_planner.hardware import MiB, NodeSpec
from shard_planner.links import ring_hops
from shard_planner.model_spec import ModelSpec
from shard_planner.costs import DECODE_EFFICIENCY, DEFAULT_STACK_OVERHEAD_S
from shard_planner.planner import (
    DOES_NOT_FIT,
    FITS,
    FITS_WIRED,
    Plan,
    StageCosts,
    budget_bytes,
    gib,
    plan,
    search_split,
    stage_plans,
    wired_mb,
)
from shard_planner.search import Split

__all__ = ["AlsoModel", "ModelLayout", "MultiPlan", "NodeUse", "Placement", "plan_many"]

_RANK = {FITS: 0, FITS_WIRED: 1, DOES_NOT_FIT: 2}


@dataclass(frozen=True)
class AlsoModel:
    """An extra model; context, sessions and prompt cache default to the main model's."""

    spec: ModelSpec
    node: str | None = None  # forced: a node's name, or its 1-based position in the ring
    context: int | None = None
    sessions: int | None = None
    prompt_cache_tokens: int | None = None


@dataclass(frozen=True)
class Placement:
    plan: Plan  # this model's stages; node_index refers to MultiPlan.nodes
    role: str  # "main" or "also"
    why: tuple[str, ...]  # where it went and why
    forced_node: str | None = None

    @property
    def name(self) -> str:
        return self.plan.model.name


@dataclass(frozen=True)
class NodeUse:
    """One node's memory with every model's stages on it."""

    node: NodeSpec
    node_index: int
    stages: tuple[tuple[str, int, int], ...]  # (model, start, end)
    need_bytes: int  # all stages' needs plus the node's reserve once
    usable_bytes: int  # the limit the plan relies on (raised when wired_limit_mb is set)
    headroom_bytes: int
    wired_limit_mb: int | None = None

    @property
    def free_bytes(self) -> int:
        return self.usable_bytes - self.headroom_bytes - self.need_bytes

    @property
    def sysctl(self) -> str | None:
        return (None if self.wired_limit_mb is None
                else f"sudo sysctl iogpu.wired_limit_mb={self.wired_limit_mb}")


@dataclass(frozen=True)
class ModelLayout:
    """What a coordinator loads: per stage, the node (index into MultiPlan.nodes) and layers."""

    model: str
    stages: tuple[tuple[int, int, int], ...]  # (node index, start, end)


@dataclass(frozen=True)
class MultiPlan:
    verdict: str  # the worst of the models' verdicts, with node limits over all models
    nodes: tuple[NodeSpec, ...]
    models: tuple[Placement, ...]  # the main model first
    loads: tuple[NodeUse, ...]  # every node, in ring order
    advice: tuple[str, ...] = ()

    @property
    def main(self) -> Plan:
        return self.models[0].plan

    @property
    def fits(self) -> bool:
        return self.verdict != DOES_NOT_FIT

    def layout(self) -> tuple[ModelLayout, ...]:
        return tuple(ModelLayout(m.name, tuple((s.node_index, s.start, s.end)
                                               for s in m.plan.stages))
                     for m in self.models if m.plan.stages)

    @property
    def wired_limit_commands(self) -> tuple[tuple[str, str], ...]:
        return tuple((u.node.name, u.sysctl) for u in self.loads if u.sysctl)


def _node_index(nodes: Sequence[NodeSpec], ref: str) -> int:
    for j, nd in enumerate(nodes):
        if nd.name == ref:
            return j
    if ref.isdigit() and 1 <= int(ref) <= len(nodes):
        return int(ref) - 1
    names = ", ".join(nd.name for nd in nodes)
    raise ValueError(f"no node {ref!r} to place a model on (nodes: {names}; or 1 to {len(nodes)})")


class _Memory:
    """What each node has left as models are placed, at the current and raised limits."""

    def __init__(self, nodes: Sequence[NodeSpec], headroom: float) -> None:
        self.nodes, self.headroom = nodes, headroom
        self.now = [budget_bytes(nd, nd.usable_bytes, headroom) for nd in nodes]
        self.raised = [budget_bytes(nd, nd.raisable_bytes, headroom) for nd in nodes]
        self.used = [0] * len(nodes)  # stage needs, the reserve excluded
        self.stages: list[list[tuple[str, int, int]]] = [[] for _ in nodes]

    def add(self, model: str, costs: StageCosts, split: Split) -> None:
        for j, s, e in split:
            self.used[j] += costs.need(s, e)
            self.stages[j].append((model, s, e))

    def left(self, raised: bool) -> list[int]:
        return [b - u for b, u in zip(self.raised if raised else self.now, self.used)]

    def use(self, j: int) -> NodeUse:
        nd, need = self.nodes[j], self.used[j]
        usable, mb = nd.usable_bytes, None
        if need > self.now[j]:
            mb = wired_mb(nd, need, self.headroom, nd.raisable_bytes)
            usable = mb * MiB
        return NodeUse(nd, j, tuple(self.stages[j]), need + (nd.reserve if need else 0),
                       usable, math.floor(usable * self.headroom), mb)


Search = Callable[[StageCosts, Sequence[int]], Optional[Split]]


def _place(search: Search, mem: _Memory, costs: StageCosts, forced: int | None
           ) -> tuple[Split | None, str, bool]:
    """-> (split, "own" | "beside" | "forced", raised limits needed)."""
    n = len(mem.nodes)
    for raised in (False, True):
        left = mem.left(raised)
        if forced is not None:
            budgets = [left[j] if j == forced else 0 for j in range(n)]
            if (split := search(costs, budgets)) is not None:
                return split, "forced", raised
            continue
        own = [left[j] if not mem.stages[j] else 0 for j in range(n)]
        if any(own) and (split := search(costs, own)) is not None:
            return split, "own", raised
        if (split := search(costs, left)) is not None:
            return split, "beside", raised
    return None, "", False


def _why(name: str, how: str, raised: bool, split: Split, mem: _Memory,
         costs: StageCosts, forced_ref: str | None) -> list[str]:
    names = [mem.nodes[j].name for j, _, _ in split]
    out = []
    if how == "forced":
        out.append(f"{name} on {names[0]}, as asked ({name}@{forced_ref}).")
    elif how == "own":
        out.append(f"{name} on {', '.join(names)}: a node of its own (no other model there), "
                   "the fastest split among the free nodes.")
    else:
        free = [nd.name for j, nd in enumerate(mem.nodes) if not mem.stages[j]]
        reason = (f"the free node(s) {', '.join(free)} cannot hold it" if free
                  else "every node already holds a model")
        out.append(f"{name} on {', '.join(names)}, beside the stages there: {reason}.")
    left = mem.left(raised)
    for j, s, e in split:
        others = [f"{m} {a}-{b}" for m, a, b in mem.stages[j]]
        if others:
            limit = " (its wired limit raised as far as is safe)" if raised else ""
            out.append(f"  {mem.nodes[j].name} has {gib(left[j])} left{limit} beside "
                       f"{', '.join(others)};"
                       f" layers {s}-{e} need {gib(costs.need(s, e))}. Both models share its "
                       "memory bandwidth when they run at once.")
    if raised:
        out.append("  Only with the wired limit raised on its node(s); see the commands below.")
    return out


def _does_not_fit(name: str, spec: ModelSpec, mem: _Memory, costs: StageCosts,
                  forced: int | None, variant: Callable[..., StageCosts]) -> list[str]:
    """Why an extra model fits nowhere, and what would make it fit (each checked)."""
    left = mem.left(True)
    where = range(len(mem.nodes)) if forced is None else [forced]
    most = max(where, key=lambda j: (left[j], -j))
    smallest = min(costs.need_tab[i][i + 1] for i in range(costs.n))
    whole = costs.need(0, costs.n)
    place = (f"on {mem.nodes[forced].name}" if forced is not None else "anywhere")
    limits = (", with every wired limit raised as far as is safe"
              if mem.raised != mem.now else "")
    out = [f"{name} does not fit {place}: it needs {gib(whole)} on one node ({gib(smallest)} for "
           f"its smallest layer in a split); the most room left is {gib(max(left[most], 0))} "
           f"on {mem.nodes[most].name}{limits}."]
    budgets_now = mem.left(False) if forced is None else [
        b if j == forced else 0 for j, b in enumerate(mem.left(False))]
    budgets_raised = left if forced is None else [b if j == forced else 0 for j, b in enumerate(left)]
    for q, alt in lower_quantizations(spec):
        fit = fits_where(variant(spec=alt), budgets_now, budgets_raised)
        if fit:
            out.append(f"Lower quantization of {name}: {q.bits}-bit, group {q.group_size} "
                       f"({gib(alt.total_weight_bytes)}) fits {fit}.")
            break
    fit = fits_where(variant(context=costs.context // 2 or 1), budgets_now, budgets_raised)
    if costs.context > 1 and fit:
        out.append(f"Half the context for {name} ({costs.context // 2} tokens) fits {fit}.")
    empty = max(range(len(mem.nodes)), key=lambda j: (mem.raised[j], -j))
    nd = mem.nodes[empty]
    if fits_where(costs, [mem.now[empty]], [mem.raised[empty]]):
        out.append(f"A node of its own like {nd.name} ({nd.chip or 'same memory'}) would hold it.")
    return out


def _with_node_limits(pl: Placement, loads: Sequence[NodeUse]) -> Placement:
    """Stages on a node whose limit must be raised for all its models together rely on
    that raised limit (and the model's verdict says so)."""
    stages = []
    for st in pl.plan.stages:
        u = loads[st.node_index]
        if u.wired_limit_mb is not None and st.wired_limit_mb != u.wired_limit_mb:
            st = replace(st, usable_bytes=u.usable_bytes, wired_limit_mb=u.wired_limit_mb,
                         headroom_bytes=u.headroom_bytes if st.headroom_bytes else 0)
        stages.append(st)
    p = pl.plan
    verdict = FITS_WIRED if p.verdict == FITS and any(s.wired_limit_mb for s in stages) else p.verdict
    return replace(pl, plan=replace(p, stages=tuple(stages), verdict=verdict))


def plan_many(main: ModelSpec, nodes: Sequence[NodeSpec], also: Sequence[AlsoModel],
              context: int = 4096, sessions: int = 1, **plan_args: Any) -> MultiPlan:
    """Plan ``main`` over ``nodes`` as plan() does (``plan_args`` are plan()'s keywords), then
    each of ``also`` in order where there is room (see the module docstring)."""
    names = [main.name] + [a.spec.name for a in also]
    if len(set(names)) != len(names):
        raise ValueError(f"each model may be placed once: {', '.join(names)}")
    first = plan(main, nodes, context, sessions, **plan_args)
    order = first.nodes
    forced = [None if a.node is None else _node_index(order, a.node) for a in also]
    placements = [Placement(first, "main", (f"{main.name}: planned as alone on these nodes.",))]
    mem = _Memory(order, first.headroom)
    overhead = plan_args.get("stack_overhead_s", DEFAULT_STACK_OVERHEAD_S)
    efficiency = plan_args.get("efficiency", DECODE_EFFICIENCY)

    def search(c: StageCosts, budgets: Sequence[int]) -> Split | None:
        return search_split(c, order, budgets, first.link, first.links, overhead, efficiency)

    main_costs = StageCosts(main, context, sessions, first.prefill_chunk,
                            first.prompt_cache_tokens, mtp=first.draft == "mtp")
    mem.add(main.name, main_costs, [(s.node_index, s.start, s.end) for s in first.stages])
    advice: list[str] = []
    for a, j0 in zip(also, forced):
        ctx, ses = a.context or context, a.sessions or sessions
        pc = ctx if a.prompt_cache_tokens is None else a.prompt_cache_tokens
        costs = StageCosts(a.spec, ctx, ses, first.prefill_chunk, pc)

        def variant(spec: ModelSpec | None = None, context: int | None = None) -> StageCosts:
            c = context or ctx
            return StageCosts(spec or a.spec, c, ses, first.prefill_chunk,
                              c if a.prompt_cache_tokens is None else pc)

        base = Plan(DOES_NOT_FIT, a.spec, order, (), (), ctx, ses, first.objective, first.link,
                    first.headroom, (), 0, first.prefill_chunk, pc, None, (), first.links)
        if not first.fits:
            why: tuple[str, ...] = (f"{a.spec.name} is not placed: the main model does not fit.",)
            placements.append(Placement(base, "also", why, a.node))
            continue
        split, how, raised = _place(search, mem, costs, j0)
        if split is None:
            why = tuple(_does_not_fit(a.spec.name, a.spec, mem, costs, j0, variant))
            placements.append(Placement(replace(base, advice=why), "also", why, a.node))
            continue
        why = tuple(_why(a.spec.name, how, raised, split, mem, costs, a.node))
        shared = {j for j, _, _ in split if mem.stages[j]}
        mem.add(a.spec.name, costs, split)
        stages = tuple(
            replace(st, reserve_bytes=0, headroom_bytes=0) if st.node_index in shared else st
            for st in stage_plans(costs, order, split, raised, first.headroom))
        hops = ring_hops([st.node.name for st in stages], first.links, first.link)
        used = {st.node_index for st in stages}
        p = replace(base, verdict=FITS_WIRED if raised else FITS, stages=stages, advice=why,
                    hops=hops, left_out=tuple(nd.name for j, nd in enumerate(order)
                                              if j not in used))
        placements.append(Placement(p, "also", why, a.node))
    loads = tuple(mem.use(j) for j in range(len(order)))
    placements = [_with_node_limits(pl, loads) for pl in placements]
    verdict = max((pl.plan.verdict for pl in placements), key=_RANK.__getitem__)
    if any(u.wired_limit_mb for u in loads):
        advice.append("Fits only with the GPU wired limit raised (until the next reboot); run on")
        advice += [f"  {u.node.name}: {u.sysctl}   (usable now {u.node.usable_bytes // MiB} MB)"
                   for u in loads if u.sysctl]
    return MultiPlan(verdict, order, tuple(placements), loads, tuple(advice))
