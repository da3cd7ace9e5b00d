"""What to tell the user about a plan: why nodes were left out, which wired limits to raise,
and when it does not fit, by how much and what would fit instead (a lower quantization, more
nodes, a shorter context, fewer sessions, a smaller prompt cache). Each alternative is
checked, not guessed."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

from shard_planner.costs import hop_seconds
from shard_planner.hardware import NodeSpec
from shard_planner.model_spec import ModelSpec, Quantization, UnsupportedModel
from shard_planner.plans import DRAFT_MTP, Plan
from shard_planner.stage_costs import StageCosts, feasible, placeable

# Lower quantizations to offer, largest (best quality) first.
QUANT_LADDER = (
    Quantization(8, 64), Quantization(6, 64), Quantization(5, 64), Quantization(4, 32),
    Quantization(4, 64), Quantization(3, 32), Quantization(3, 64), Quantization(2, 64),
)
MAX_EXTRA_NODES = 64


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _quant_flag(q: Quantization) -> str:
    return f"--quant {q.bits}bit-g{q.group_size}"


def _largest(predicate: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """Largest x in [lo, hi] with predicate(x), for a predicate true up to some point."""
    if hi < lo or not predicate(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if predicate(mid) else (lo, mid - 1)
    return lo


def lower_quantizations(spec: ModelSpec) -> Iterator[tuple[Quantization, ModelSpec]]:
    """The model at each quantization of the ladder that is smaller than it is now."""
    if not spec.config:
        return
    for q in QUANT_LADDER:
        try:
            alt = spec.with_quantization(q)
        except (UnsupportedModel, ValueError, KeyError):
            return
        if alt.total_weight_bytes < spec.total_weight_bytes:
            yield q, alt


def _costs(p: Plan, spec: ModelSpec | None = None, context: int | None = None,
           sessions: int | None = None, chunk: int | None = None,
           prompt_cache: int | None = None) -> StageCosts:
    """Costs of ``p``'s input with one thing changed. A prompt cache of one context's worth
    (the default) follows a changed context."""
    if prompt_cache is None:
        follows = p.prompt_cache_tokens == p.context
        prompt_cache = context if follows and context else p.prompt_cache_tokens
    model = spec or p.model
    return StageCosts(model, context or p.context, sessions or p.sessions,
                      chunk or p.prefill_chunk, prompt_cache,
                      mtp=p.draft == DRAFT_MTP and model.mtp is not None)


def fits_where(costs: StageCosts, now: Sequence[int], raised: Sequence[int]) -> str | None:
    """Where a split of ``costs`` fits: at the current limits, with raised ones, or None."""
    if feasible(costs, now):
        return "at the current limits"
    if feasible(costs, raised):
        return "with raised wired limits"
    return None


def _left_out(p: Plan, costs: StageCosts, budgets: Sequence[int], hop_ms: float) -> list[str]:
    smallest = min(costs.need_tab[i][i + 1] for i in range(costs.n))
    used = {s.node_index for s in p.stages}
    out = []
    for j, node in enumerate(p.nodes):
        if j in used:
            continue
        if budgets[j] < smallest:
            out.append(f"{node.name} is left out: too small to matter (it can hold "
                       f"{_gib(max(budgets[j], 0))}, the smallest layer needs {_gib(smallest)}).")
        elif p.objective == "time":
            out.append(f"{node.name} is left out: the model fits on fewer nodes, and each "
                       f"extra stage adds a hop (~{hop_ms:.2f} ms) to every token.")
        else:
            out.append(f"{node.name} is left out: the other nodes hold the model with less "
                       "of their memory in use.")
    return out


def _bandwidth_notes(nodes: Sequence[NodeSpec]) -> list[str]:
    known = [n.bandwidth for n in nodes if n.bandwidth]
    unknown = [n.name for n in nodes if not n.bandwidth]
    if not known:
        return ["No node's memory bandwidth is known: layers are split by memory alone."]
    if unknown:
        return [f"Bandwidth unknown for {', '.join(unknown)}: assumed to be the slowest known "
                f"({min(known):g} GB/s)."]
    return []


def _smaller_steps(p: Plan, now: Sequence[int], raised: Sequence[int]) -> list[str]:
    """Prefill workspace shrinks with the prefill step: the largest step that fits better."""
    want = ("at the current limits",) if p.verdict != "does-not-fit" else (
        "at the current limits", "with raised wired limits")
    for chunk in (1024, 512, 256, 128):
        if chunk >= p.prefill_chunk:
            continue
        where = fits_where(_costs(p, chunk=chunk), now, raised)
        if where in want:
            return [f"Smaller prefill steps: with --prefill-step-size {chunk} it fits {where} "
                    "(prefill working memory shrinks with the step)."]
    return []


def _smaller_prompt_cache(p: Plan, now: Sequence[int], raised: Sequence[int]) -> list[str]:
    """The largest prompt cache that fits better (at the current limits when the plan needs
    raised ones, at all when it does not fit)."""
    if p.prompt_cache_tokens < 1:
        return []
    want = ("at the current limits",) if p.verdict != "does-not-fit" else (
        "at the current limits", "with raised wired limits")

    def ok(t: int) -> bool:
        return fits_where(_costs(p, prompt_cache=t), now, raised) in want

    t = _largest(ok, 0, p.prompt_cache_tokens - 1)
    if t is None:
        return []
    where = fits_where(_costs(p, prompt_cache=t), now, raised)
    return [f"Smaller prompt cache: keeping {t} tokens of finished sessions' KV per stage (not "
            f"{p.prompt_cache_tokens}) fits {where}: --prompt-cache {t}"]


def _fit_advice(p: Plan, costs: StageCosts, now: Sequence[int], raised: Sequence[int]) -> list[str]:
    hop_ms = hop_seconds(p.link, p.model.hidden_size * p.model.act_bytes) * 1000
    budgets = raised if p.verdict == "fits-with-wired-limit" else now
    out = _left_out(p, costs, budgets, hop_ms)
    if p.verdict == "fits-with-wired-limit":
        out += _smaller_steps(p, now, raised)
        out += _smaller_prompt_cache(p, now, raised)
        out.append("Fits only with the GPU wired limit raised (until the next reboot); run on")
        for s in p.stages:
            if s.sysctl:
                out.append(f"  {s.node.name}: {s.sysctl}   "
                           f"(usable now {s.current_usable_bytes // 2**20} MB)")
    for s in p.stages:
        if s.node.free_disk_bytes is not None and s.weight_bytes > s.node.free_disk_bytes:
            out.append(f"{s.node.name} has {_gib(s.node.free_disk_bytes)} free disk; its "
                       f"layers need {_gib(s.weight_bytes)} of weight files.")
    return out


def _need_parts(costs: StageCosts, raised: Sequence[int]) -> tuple[int, int, int, int, int]:
    """(weights, KV, prompt cache, workspace, stages): the least a split over every usable
    node needs (the MTP module, when planned, with the weights and its cache with the KV)."""
    n = costs.n
    stages = max(1, sum(1 for b in raised if b > 0))
    return (costs.weight(0, n) + costs.mtp_weight(0, n), costs.kv(0, n) + costs.mtp_kv(0, n),
            costs.prompt_cache(0, n), stages * costs.workspace(0, n), stages)


def _more_nodes(p: Plan, costs: StageCosts, now: Sequence[int],
                raised: Sequence[int]) -> list[str]:
    """Fewest extra nodes like the biggest one for a fit at all, and at the current limits."""
    big = max(range(len(p.nodes)), key=lambda j: (raised[j], -j))
    node = p.nodes[big]
    like = f"like {node.name} ({node.chip or 'same memory'}, {_gib(node.total_bytes)})"
    out: list[str] = []
    for k in range(1, MAX_EXTRA_NODES + 1):
        where = fits_where(costs, list(now) + [now[big]] * k, list(raised) + [raised[big]] * k)
        if where and not out:
            out.append(f"More nodes: {k} more {like} would fit {where}.")
        if where == "at the current limits":
            if len(out) == 1 and not out[0].endswith("current limits."):
                out.append(f"More nodes: {k} more {like} would fit at the current limits.")
            break
    return out


def _infeasible_advice(p: Plan, costs: StageCosts, now: Sequence[int],
                       raised: Sequence[int]) -> tuple[list[str], int]:
    spec = p.model
    weights, kv, cache, work, stages = _need_parts(costs, raised)
    total = weights + kv + cache + work
    have = sum(b for b in raised if b > 0)
    short = total - have
    if short > 0:
        limits = " with every wired limit raised as far as is safe" if raised != now else ""
        out = [f"Does not fit: about {_gib(short)} short. It needs {_gib(total)} "
               f"({_gib(weights)} of weights, {_gib(kv)} of KV cache, {_gib(cache)} of prompt "
               f"cache, {_gib(work)} of prefill working memory over {stages} stage(s)); the "
               f"nodes offer {_gib(have)}{limits}, after reserves and headroom."]
    else:
        out = [f"Does not fit: the nodes offer {_gib(have)} for {_gib(total)}, but "
               f"whole layers do not pack: in order they hold at most {placeable(costs, raised)} "
               f"of the {costs.n} layers (each stage also needs its own prefill working memory)."]
        short = 0
    # A lower quantization of the same model: the best that fits at all, and the best that
    # fits without touching the wired limit when that is a different one.
    said: set[str] = set()
    for q, alt in lower_quantizations(spec):
        where = fits_where(_costs(p, spec=alt), now, raised)
        if where and where not in said:
            said.add(where)
            worse = " (2-bit loses much quality)" if q.bits == 2 else ""
            out.append(f"Lower quantization: {q.bits}-bit, group {q.group_size} "
                       f"({_gib(alt.total_weight_bytes)}) fits {where}: "
                       f"{_quant_flag(q)}{worse}")
            if where == "at the current limits":
                break
    out += _more_nodes(p, costs, now, raised)
    out += _smaller_steps(p, now, raised)
    out += _smaller_prompt_cache(p, now, raised)
    # A shorter context, or fewer sessions.
    if p.context > 1:
        c = _largest(lambda c: fits_where(_costs(p, context=c), now, raised) is not None,
                     1, p.context - 1)
        if c:
            where = fits_where(_costs(p, context=c), now, raised)
            out.append(f"Shorter context: up to {c} tokens fits {where}: --context {c}")
    if p.sessions > 1:
        n = _largest(lambda n: fits_where(_costs(p, sessions=n), now, raised) is not None,
                     1, p.sessions - 1)
        if n:
            out.append(f"Fewer sessions: {n} concurrent sessions fit: --sessions {n}")
    return out, short


def advice_for(p: Plan, costs: StageCosts, now: Sequence[int],
               raised: Sequence[int]) -> tuple[tuple[str, ...], int]:
    """-> (advice lines, shortfall in bytes)."""
    out = _bandwidth_notes(p.nodes)
    short = 0
    if p.fits:
        out += _fit_advice(p, costs, now, raised)
    else:
        more, short = _infeasible_advice(p, costs, now, raised)
        out = more + out
    return tuple(out), short
