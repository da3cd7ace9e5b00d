"""What a stage of a split needs and reads, as O(1) table look-ups, and whether any split fits.

Shared by the search (planner, search) and the advice, which re-checks variants of a plan's
input; both import it, it imports neither.
"""

from __future__ import annotations

import math
from typing import Sequence

from shard_planner.hardware import NodeSpec
from shard_planner.model_spec import PREFILL_CHUNK, ModelSpec

__all__ = ["StageCosts", "budget_bytes", "feasible", "placeable"]


def budget_bytes(node: NodeSpec, usable: int, headroom: float) -> int:
    """What a stage may use on ``node`` when its usable memory is ``usable``."""
    return usable - node.reserve - math.floor(usable * headroom)


class StageCosts:
    """Prefix sums over layers so a stage's bytes are O(1) to evaluate.

    A stage [s, e) needs its weights, the KV cache of ``sessions`` x ``context`` tokens, the
    prompt cache (finished sessions' KV, ``prompt_cache_tokens`` tokens' worth), the prefill
    workspace and, on the last stage when ``mtp``, the MTP module with its own KV cache.
    """

    def __init__(self, spec: ModelSpec, context: int, sessions: int,
                 chunk: int = PREFILL_CHUNK, prompt_cache_tokens: int | None = None,
                 mtp: bool = False) -> None:
        if mtp and spec.mtp is None:
            raise ValueError(f"{spec.name} has no multi-token-prediction layer")
        self.spec, self.n = spec, spec.num_layers
        self.context, self.sessions, self.chunk = context, sessions, chunk
        self.prompt_cache_tokens = context if prompt_cache_tokens is None else prompt_cache_tokens
        self.mtp = mtp
        self.w = [0]
        self.a = [0]
        self.k = [0]
        self.c = [0]
        for i, layer in enumerate(spec.layers):
            self.w.append(self.w[-1] + layer.weight_bytes)
            self.a.append(self.a[-1] + layer.active_bytes)
            self.k.append(self.k[-1] + spec.kv_bytes(i, i + 1, context, sessions))
            self.c.append(self.c[-1] + spec.kv_bytes(i, i + 1, self.prompt_cache_tokens))
        ws = [spec.workspace_bytes(i, i + 1, context, chunk) for i in range(self.n)]
        self.mtp_kv_bytes = 0
        if mtp and spec.mtp is not None:
            per_token = spec.mtp.kv_bytes_per_token
            self.mtp_kv_bytes = per_token * (
                sessions * spec.cache_tokens(context) + spec.cache_tokens(self.prompt_cache_tokens))
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
        """The main model's weights in [s, e) (the MTP module is counted apart)."""
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

    def prompt_cache(self, s: int, e: int) -> int:
        return self.c[e] - self.c[s]

    def mtp_weight(self, s: int, e: int) -> int:
        return self.spec.mtp_stage_bytes(s) if self.mtp and e == self.n else 0

    def mtp_kv(self, s: int, e: int) -> int:
        return self.mtp_kv_bytes if self.mtp and e == self.n else 0

    def workspace(self, s: int, e: int) -> int:
        return self.ws_max[s][e - s - 1]

    def need(self, s: int, e: int) -> int:
        return (self.weight(s, e) + self.kv(s, e) + self.prompt_cache(s, e) + self.workspace(s, e)
                + self.mtp_weight(s, e) + self.mtp_kv(s, e))

    def active(self, s: int, e: int) -> int:
        return (self.a[e] - self.a[s] + (self.embed_row if s == 0 else 0)
                + (self.head if e == self.n else 0))


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
