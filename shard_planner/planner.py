"""Split a model's layers into contiguous stages over nodes, by memory and bandwidth.

Stage i of a plan runs on a node that comes after stage i-1's node in the order given (the
ring order the user chose); nodes may be left out. A stage holds layers [start, end), the
embedding when start == 0 and the final norm + head when end == num_layers, and must fit:

    weights + KV cache (context x sessions) + prefill workspace + reserve <= usable - headroom

Among the splits that fit, the plan minimizes predicted decode time per token, which is
sum(bytes the stage reads per token / node bandwidth) + one hop per stage. The search is an
exact dynamic program over (node, layer boundary), in integer arithmetic so that equal costs
compare equal and the result is deterministic. Ties go to the split whose fullest node is
least full. When no node's bandwidth is known the plan minimizes that fullness alone (a split
by memory), and so uses every node that can hold a layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from shard_planner.costs import (
    DECODE_EFFICIENCY,
    DEFAULT_LINK,
    DEFAULT_STACK_OVERHEAD_S,
    LinkSpec,
    get_link,
    hop_seconds,
)
from shard_planner.hardware import GiB, MiB, NodeSpec
from shard_planner.model_spec import PREFILL_CHUNK, ModelSpec

__all__ = ["DEFAULT_HEADROOM", "Plan", "StagePlan", "StageCosts", "plan", "solve"]

FITS = "fits"
FITS_WIRED = "fits-with-wired-limit"
DOES_NOT_FIT = "does-not-fit"
# Share of usable memory a plan leaves free: Metal must never hit the wired limit, and a
# kernel panic was reported at about 93% wired (exo #1972).
DEFAULT_HEADROOM = 0.05


def budget_bytes(node: NodeSpec, usable: int, headroom: float) -> int:
    """What a stage may use on ``node`` when its usable memory is ``usable``."""
    return usable - node.reserve - math.floor(usable * headroom)


@dataclass(frozen=True)
class StagePlan:
    node: NodeSpec
    node_index: int  # position in the node list given to plan()
    start: int
    end: int  # layers [start, end)
    weight_bytes: int
    kv_bytes: int
    workspace_bytes: int  # prefill transients (an estimate)
    reserve_bytes: int
    headroom_bytes: int
    usable_bytes: int  # usable memory the plan relies on (the raised limit, if one is needed)
    current_usable_bytes: int  # usable memory the node reports now
    active_bytes: int  # bytes read per decoded token
    wired_limit_mb: int | None = None  # `sudo sysctl iogpu.wired_limit_mb=N` when not None

    @property
    def layers(self) -> tuple[int, int]:
        return (self.start, self.end)

    @property
    def need_bytes(self) -> int:
        """Everything the stage holds, headroom excluded."""
        return self.weight_bytes + self.kv_bytes + self.workspace_bytes + self.reserve_bytes

    @property
    def sysctl(self) -> str | None:
        if self.wired_limit_mb is None:
            return None
        return f"sudo sysctl iogpu.wired_limit_mb={self.wired_limit_mb}"


@dataclass(frozen=True)
class Plan:
    verdict: str  # "fits" | "fits-with-wired-limit" | "does-not-fit"
    model: ModelSpec
    nodes: tuple[NodeSpec, ...]
    stages: tuple[StagePlan, ...]  # empty when it does not fit
    advice: tuple[str, ...]
    context: int
    sessions: int
    objective: str  # "time" or "memory"
    link: LinkSpec
    headroom: float
    left_out: tuple[str, ...] = ()
    shortfall_bytes: int = 0  # with every wired limit raised as far as is safe
    prefill_chunk: int = PREFILL_CHUNK  # tokens per prefill step the workspace is sized for

    @property
    def total_weight_bytes(self) -> int:
        return self.model.total_weight_bytes

    @property
    def fits(self) -> bool:
        return self.verdict != DOES_NOT_FIT

    @property
    def notes(self) -> tuple[str, ...]:
        return self.model.notes

    @property
    def wired_limit_commands(self) -> tuple[tuple[str, str], ...]:
        return tuple((s.node.name, s.sysctl) for s in self.stages if s.sysctl)


class StageCosts:
    """Prefix sums over layers so a stage's bytes are O(1) to evaluate."""

    def __init__(self, spec: ModelSpec, context: int, sessions: int,
                 chunk: int = PREFILL_CHUNK) -> None:
        self.spec, self.n = spec, spec.num_layers
        self.context, self.sessions, self.chunk = context, sessions, chunk
        self.w = [0]
        self.a = [0]
        self.k = [0]
        for i, layer in enumerate(spec.layers):
            self.w.append(self.w[-1] + layer.weight_bytes)
            self.a.append(self.a[-1] + layer.active_bytes)
            self.k.append(self.k[-1] + spec.kv_bytes(i, i + 1, context, sessions))
        ws = [spec.workspace_bytes(i, i + 1, context, chunk) for i in range(self.n)]
        # ws_max[s][e - s - 1]: the largest layer workspace in [s, e).
        self.ws_max: list[list[int]] = []
        for s in range(self.n):
            row, m = [], 0
            for e in range(s, self.n):
                m = max(m, ws[e])
                row.append(m)
            self.ws_max.append(row)
        self.head = spec.head_bytes + (spec.embed_bytes if spec.tied_embeddings else 0)
        self.embed_row = spec.embed_bytes // spec.vocab_size
        # Tables the search reads in its inner loop: need_tab[s][e], active_tab[s][e].
        self.need_tab = [[0] * (self.n + 1) for _ in range(self.n)]
        self.active_tab = [[0] * (self.n + 1) for _ in range(self.n)]
        for s in range(self.n):
            for e in range(s + 1, self.n + 1):
                self.need_tab[s][e] = self.need(s, e)
                self.active_tab[s][e] = self.active(s, e)

    def weight(self, s: int, e: int) -> int:
        w = self.w[e] - self.w[s]
        if s == 0:
            w += self.spec.embed_bytes
        if e == self.n:
            w += self.spec.head_bytes
            if self.spec.tied_embeddings and s > 0:
                w += self.spec.embed_bytes
        return w

    def kv(self, s: int, e: int) -> int:
        return self.k[e] - self.k[s]

    def workspace(self, s: int, e: int) -> int:
        return self.ws_max[s][e - s - 1]

    def need(self, s: int, e: int) -> int:
        return self.weight(s, e) + self.kv(s, e) + self.workspace(s, e)

    def active(self, s: int, e: int) -> int:
        return (self.a[e] - self.a[s] + (self.embed_row if s == 0 else 0)
                + (self.head if e == self.n else 0))


def _time_units(bandwidths: Sequence[float | None]) -> tuple[list[int], int] | None:
    """Integer cost per byte for each node (1/bandwidth on a common scale) and the scale, or
    None when no bandwidth is known. Unknown bandwidths take the slowest known one."""
    known = [b for b in bandwidths if b]
    if not known:
        return None
    mbps = [max(1, round((b or min(known)) * 1000)) for b in bandwidths]  # MB/s
    lcm = math.lcm(*mbps)
    # bytes / (MB/s * 1e6) seconds == bytes * 1000 * (lcm / mbps) units of 1e-9 / lcm s
    return [1000 * (lcm // m) for m in mbps], lcm


def solve(costs: StageCosts, nodes: Sequence[NodeSpec], budgets: Sequence[int],
          hop_s: float) -> list[tuple[int, int, int]] | None:
    """The optimal split as (node index, start, end) triples, or None when none fits."""
    n, L = len(nodes), costs.n
    units = _time_units([nd.bandwidth for nd in nodes])
    per_byte, hop = ([0] * n, 0) if units is None else (units[0], round(hop_s * 1e9) * units[1])
    need_tab, active_tab = costs.need_tab, costs.active_tab
    # best[e]: (time, fullness) of the best split of layers [0, e) over the nodes seen so far.
    best: list[tuple[int, float] | None] = [(0, 0.0)] + [None] * L
    choice: list[list[int]] = []  # choice[j][e]: start of node j's stage ending at e, or -1
    for j in range(n):
        budget = budgets[j]
        new = list(best)
        pick = [-1] * (L + 1)
        pb = per_byte[j]
        if budget > 0:
            for e in range(1, L + 1):
                for s in range(e - 1, -1, -1):
                    need = need_tab[s][e]
                    if need > budget:
                        break  # need only grows as the stage grows
                    prev = best[s]
                    if prev is None:
                        continue
                    cand = (prev[0] + active_tab[s][e] * pb + hop, max(prev[1], need / budget))
                    cur = new[e]
                    if cur is None or cand < cur:
                        new[e], pick[e] = cand, s
        best = new
        choice.append(pick)
    # A plan of one stage has no hop at all; the DP charged it one, so compare exactly.
    single = None
    if units is not None:
        for j in range(n):
            if budgets[j] > 0 and costs.need(0, L) <= budgets[j]:
                cand = (costs.active(0, L) * per_byte[j], costs.need(0, L) / budgets[j])
                if single is None or cand < single[0]:
                    single = (cand, j)
    if best[L] is None and single is None:
        return None
    last = best[L]
    if single is not None and (last is None or single[0] <= last):
        return [(single[1], 0, L)]
    out, e = [], L
    for j in range(n - 1, -1, -1):
        s = choice[j][e]
        if s >= 0:
            out.append((j, s, e))
            e = s
        if e == 0:
            break
    return out[::-1]


def placeable(costs: StageCosts, budgets: Sequence[int]) -> int:
    """How many leading layers the nodes hold in order, each taking as many as it can."""
    s = 0
    for budget in budgets:
        e = s
        while e < costs.n and costs.need_tab[s][e + 1] <= budget:
            e += 1
        s = e
    return s


def feasible(costs: StageCosts, budgets: Sequence[int]) -> bool:
    """Whether any split fits: greedy placement is optimal for feasibility because a
    stage's need only grows with its range."""
    return placeable(costs, budgets) == costs.n


def _wired_mb(node: NodeSpec, need: int, headroom: float, cap: int) -> int:
    """Smallest wired limit (in MB, as sysctl takes it) that holds ``need``: rounded up to a
    whole GiB when that stays within ``cap``."""
    mb = max(1, math.floor((need + node.reserve) / (1 - headroom) / MiB) - 1)
    while budget_bytes(node, mb * MiB, headroom) < need:
        mb += 1
    whole = -(-mb // 1024) * 1024
    return whole if whole * MiB <= cap else mb


def _stages(costs: StageCosts, nodes: Sequence[NodeSpec], split: list[tuple[int, int, int]],
            raised: bool, headroom: float) -> tuple[StagePlan, ...]:
    out = []
    for j, s, e in split:
        node = nodes[j]
        need = costs.need(s, e)
        usable, mb = node.usable_bytes, None
        if raised and need > budget_bytes(node, node.usable_bytes, headroom):
            mb = _wired_mb(node, need, headroom, node.raisable_bytes)
            usable = mb * MiB
        out.append(StagePlan(
            node=node, node_index=j, start=s, end=e, weight_bytes=costs.weight(s, e),
            kv_bytes=costs.kv(s, e), workspace_bytes=costs.workspace(s, e),
            reserve_bytes=node.reserve, headroom_bytes=math.floor(usable * headroom),
            usable_bytes=usable, current_usable_bytes=node.usable_bytes,
            active_bytes=costs.active(s, e), wired_limit_mb=mb,
        ))
    return tuple(out)


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def plan(spec: ModelSpec, nodes: Sequence[NodeSpec], context: int = 4096, sessions: int = 1,
         *, link: str | LinkSpec = DEFAULT_LINK, headroom: float = DEFAULT_HEADROOM,
         reorder: bool = False, efficiency: float = DECODE_EFFICIENCY,
         stack_overhead_s: float = DEFAULT_STACK_OVERHEAD_S, prefill_chunk: int = PREFILL_CHUNK,
         advise: bool = True) -> Plan:
    """Plan ``spec`` over ``nodes`` (pipeline order = the order given, unless ``reorder``
    puts the fastest nodes first) for ``sessions`` sessions of ``context`` tokens each,
    prefilled ``prefill_chunk`` tokens at a time."""
    from shard_planner.advice import advice_for  # advice re-plans variants of this input

    if not nodes:
        raise ValueError("no nodes to plan on")
    if context < 1 or sessions < 1 or prefill_chunk < 1:
        raise ValueError("context, sessions and prefill_chunk must be at least 1")
    if not 0 <= headroom < 1:
        raise ValueError("headroom must be a fraction in [0, 1)")
    if not 0 < efficiency <= 1:
        raise ValueError("efficiency must be in (0, 1]")
    order = list(nodes)
    if reorder:
        order.sort(key=lambda nd: (-(nd.bandwidth or 0), -nd.usable_bytes, nd.name))
    lk = get_link(link)
    # The planner ranks splits by memory time at full bandwidth, so scale the hop alike.
    hop_s = hop_seconds(lk, spec.hidden_size * spec.act_bytes, stack_overhead_s) * efficiency
    costs = StageCosts(spec, context, sessions, prefill_chunk)
    now = [budget_bytes(nd, nd.usable_bytes, headroom) for nd in order]
    raised = [budget_bytes(nd, nd.raisable_bytes, headroom) for nd in order]
    split = solve(costs, order, now, hop_s)
    verdict = FITS
    stages: tuple[StagePlan, ...] = ()
    if split is not None:
        stages = _stages(costs, order, split, False, headroom)
    elif raised != now and (split := solve(costs, order, raised, hop_s)) is not None:
        verdict = FITS_WIRED
        stages = _stages(costs, order, split, True, headroom)
    else:
        verdict = DOES_NOT_FIT
    used = {s.node_index for s in stages}
    left_out = tuple(nd.name for j, nd in enumerate(order) if j not in used) if stages else ()
    objective = "time" if any(nd.bandwidth for nd in order) else "memory"
    draft = Plan(verdict, spec, tuple(order), stages, (), context, sessions, objective, lk,
                 headroom, left_out, 0, prefill_chunk)
    if not advise:
        return draft
    adv, short = advice_for(draft, costs, now, raised)
    return Plan(verdict, spec, tuple(order), stages, adv, context, sessions, objective, lk,
                headroom, left_out, short, prefill_chunk)
