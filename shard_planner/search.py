"""The exact search for the best split: dynamic programs over (node, layer boundary).

Time is counted in integers (bytes x a per-node cost, hops on the same scale) so that equal
costs compare equal and the result is deterministic; ties go to the split whose fullest node
is least full. ``solve`` charges every hop the same; ``solve_pairs`` charges each hop by the
pair of nodes it joins (measured links), which needs the stage's predecessor node in the
state and the first node for the hop back.
"""

from __future__ import annotations

import math
from typing import Sequence

from shard_planner.hardware import NodeSpec
from shard_planner.stage_costs import StageCosts

__all__ = ["solve", "solve_pairs"]

Split = list[tuple[int, int, int]]  # (node index, start, end) per stage
Score = tuple[int, float]  # (time units, fullness of the fullest node)


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


def _single(costs: StageCosts, budgets: Sequence[int],
            per_byte: Sequence[int]) -> tuple[Score, int] | None:
    """The best plan of one stage (no hop at all)."""
    best = None
    L = costs.n
    for j, budget in enumerate(budgets):
        if budget > 0 and costs.need(0, L) <= budget:
            cand = (costs.active(0, L) * per_byte[j], costs.need(0, L) / budget)
            if best is None or cand < best[0]:
                best = (cand, j)
    return best


def solve(costs: StageCosts, nodes: Sequence[NodeSpec], budgets: Sequence[int],
          hop_s: float) -> Split | None:
    """The optimal split as (node index, start, end) triples, or None when none fits; every
    stage of a multi-stage plan costs one hop of ``hop_s``."""
    n, L = len(nodes), costs.n
    units = _time_units([nd.bandwidth for nd in nodes])
    per_byte, hop = ([0] * n, 0) if units is None else (units[0], round(hop_s * 1e9) * units[1])
    need_tab, active_tab = costs.need_tab, costs.active_tab
    # best[e]: (time, fullness) of the best split of layers [0, e) over the nodes seen so far.
    best: list[Score | None] = [(0, 0.0)] + [None] * L
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
    single = _single(costs, budgets, per_byte) if units is not None else None
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


def _from_first(costs: StageCosts, budgets: Sequence[int], per_byte: Sequence[int],
                hidden: Sequence[Sequence[int]], f: int
                ) -> tuple[list[list[Score | None]], list[list[tuple[int, int]]]]:
    """best[j][e]: the best split of layers [0, e) whose first stage is on node f and last
    on node j; back[j][e]: (node of the stage before, start of j's stage)."""
    n, L = len(budgets), costs.n
    need_tab, active_tab = costs.need_tab, costs.active_tab
    best: list[list[Score | None]] = [[None] * (L + 1) for _ in range(n)]
    back = [[(-1, 0)] * (L + 1) for _ in range(n)]
    for e in range(1, L + 1):
        if need_tab[0][e] > budgets[f]:
            break
        best[f][e] = (active_tab[0][e] * per_byte[f], need_tab[0][e] / budgets[f])
    for j in range(f + 1, n):
        budget = budgets[j]
        if budget <= 0:
            continue
        # arrive[s]: the best prefix [0, s) on nodes before j, plus its hop to j.
        arrive: list[Score | None] = [None] * (L + 1)
        src = [-1] * (L + 1)
        for jp in range(f, j):
            h, row = hidden[jp][j], best[jp]
            for s in range(1, L):
                prev = row[s]
                if prev is None:
                    continue
                cand = (prev[0] + h, prev[1])
                cur = arrive[s]
                if cur is None or cand < cur:
                    arrive[s], src[s] = cand, jp
        pb, row_j, back_j = per_byte[j], best[j], back[j]
        for e in range(2, L + 1):
            for s in range(e - 1, 0, -1):
                need = need_tab[s][e]
                if need > budget:
                    break
                a = arrive[s]
                if a is None:
                    continue
                cand = (a[0] + active_tab[s][e] * pb, max(a[1], need / budget))
                cur = row_j[e]
                if cur is None or cand < cur:
                    row_j[e], back_j[e] = cand, (src[s], s)
    return best, back


def solve_pairs(costs: StageCosts, nodes: Sequence[NodeSpec], budgets: Sequence[int],
                hidden_s: Sequence[Sequence[float]],
                token_s: Sequence[Sequence[float]]) -> Split | None:
    """The optimal split when a hop's cost depends on its nodes: ``hidden_s[a][b]`` is the
    hop from a stage on node a to the next on node b, ``token_s[a][b]`` the hop from the
    last stage on a back to the first on b."""
    n, L = len(nodes), costs.n
    units = _time_units([nd.bandwidth for nd in nodes])
    if units is None:  # a split by memory: hops do not enter the objective
        return solve(costs, nodes, budgets, 0.0)
    per_byte, scale = units
    hidden = [[round(hidden_s[a][b] * 1e9) * scale for b in range(n)] for a in range(n)]
    token = [[round(token_s[a][b] * 1e9) * scale for b in range(n)] for a in range(n)]
    found: tuple[Score, Split] | None = None
    for f in range(n):
        if budgets[f] <= 0 or costs.need_tab[0][1] > budgets[f]:
            continue
        best, back = _from_first(costs, budgets, per_byte, hidden, f)
        for j in range(f, n):
            b = best[j][L]
            if b is None:
                continue
            total = b if j == f else (b[0] + token[j][f], b[1])
            if found is not None and not total < found[0]:
                continue
            split, e, k = [], L, j
            while True:
                prev, s = back[k][e]
                split.append((k, s, e))
                if prev < 0:
                    break
                k, e = prev, s
            found = (total, split[::-1])
    return found[1] if found else None
