"""What `clusterd plan` prints for people: the split per stage, the verdict, the predicted
speed (one stream, many sessions, drafts), the links used, and the advice; and for several
models on the same nodes, each model's split, every node's memory and why each went there."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shard_planner.multi import MultiPlan
from shard_planner.planner import Plan
from shard_planner.serving import ServingPrediction
from shard_planner.simulate import Anchor, Prediction, fmt_rate

WIRED_BLOCK = "Fits only with the GPU wired limit raised"


def console() -> Console:
    # Never wrap a line: advice holds commands to copy.
    return Console(width=max(Console().width, 110), soft_wrap=True)


def _gib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def _header(c: Console, p: Plan, source: dict[str, Any], role: str = "") -> None:
    spec = p.model
    repo = source.get("repo")
    where = source.get("path") or (f"{repo}{'' if source.get('repo_verified') else ' (unverified)'}"
                                   if repo else source.get("repo_note", ""))
    c.print(f"{role}[bold]{spec.name}[/] {spec.quant_label}" + (f"  ({where})" if where else ""),
            highlight=False)
    c.print(f"{spec.num_layers} layers, {_gib(spec.total_weight_bytes)} GiB of weights "
            f"(from {spec.source}), {spec.params / 1e9:.1f}B parameters, "
            f"{spec.active_params / 1e9:.1f}B active, "
            f"{spec.active_bytes_per_token / 1e9:.1f} GB read per token", highlight=False)
    kv = spec.kv_bytes(0, spec.num_layers, p.context, p.sessions)
    cache = spec.kv_bytes(0, spec.num_layers, p.prompt_cache_tokens) if p.prompt_cache_tokens else 0
    c.print(f"context {p.context} x {p.sessions} session(s): KV cache {kv / 2**30:.2f} GiB; "
            f"prompt cache {p.prompt_cache_tokens} tokens ({cache / 2**30:.2f} GiB over the stages)")


def _table(c: Console, p: Plan, pred: Prediction) -> None:
    if not p.stages:
        return
    spec = p.model
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("#", "node", "chip", "layers", "weights", "KV", "cache", "work", "need",
                "usable", "GB/s", "ms/token"):
        table.add_column(col, justify="left" if col in ("node", "chip", "layers") else "right")
    for i, (s, sp) in enumerate(zip(p.stages, pred.stages)):
        usable = _gib(s.usable_bytes) + ("*" if s.wired_limit_mb else "")
        extra = " +emb" if s.start == 0 else ""
        extra += " +head" if s.end == spec.num_layers else ""
        extra += " +mtp" if s.mtp_bytes else ""
        table.add_row(
            str(i), s.node.name, s.node.chip or "-", f"{s.start}-{s.end}{extra}",
            _gib(s.weight_bytes + s.mtp_bytes), _gib(s.kv_bytes + s.mtp_kv_bytes),
            _gib(s.prompt_cache_bytes), _gib(s.workspace_bytes),
            _gib(s.need_bytes + s.headroom_bytes), usable,
            f"{s.node.bandwidth:g}" if s.node.bandwidth else "?",
            f"{sp.decode_ms:.1f}" if sp.decode_ms is not None else "-")
    c.print(table)
    c.print("  GiB; need = weights + KV + prompt cache + prefill workspace + reserve + headroom"
            + ("; * usable after raising the wired limit" if any(
                s.wired_limit_mb for s in p.stages) else ""))
    for s in p.stages:
        if s.mtp_bytes:
            c.print(f"  MTP module on {s.node.name}: {_gib(s.mtp_bytes)} GiB of weights (with "
                    f"its embedding copy), {s.mtp_kv_bytes / 2**20:.1f} MiB of its own KV cache")


def _links(c: Console, p: Plan) -> None:
    measured = [h for h in p.hops if h.source != "preset"]
    if not p.links:
        return
    if not p.hops:
        c.print(f"measured links: {len(p.links)} pair(s) given, not used (no hops: "
                f"{'one stage' if p.stages else 'no plan'})", highlight=False)
        return
    for h in measured:
        c.print(f"link {h.src} -> {h.dst}: {h.source}, {h.link.latency_s * 2e3:.3g} ms round "
                f"trip, {h.link.bandwidth_gbps * 1e3:g} Mb/s", highlight=False)
    preset = [f"{h.src} -> {h.dst}" for h in p.hops if h.source == "preset"]
    if preset:
        c.print(f"link preset {p.link.name} (not measured) for {', '.join(preset)}",
                highlight=False)


def _speeds(c: Console, pred: Prediction, serving: dict[str, Optional[ServingPrediction]]) -> None:
    if pred.decode_tok_s is None:
        return
    c.print(f"predicted: decode {fmt_rate(pred.decode_tok_s)} tok/s, prefill "
            f"{fmt_rate(pred.prefill_tok_s)} tok/s ({pred.prompt_tokens}-token prompt; "
            f"{pred.hops} hops of {pred.link}, bandwidth at {pred.efficiency:.0%})",
            highlight=False)
    mtp = serving.get("mtp")
    if mtp is not None:
        c.print(f"with MTP drafts: decode {fmt_rate(mtp.per_stream_tok_s)} tok/s "
                f"({mtp.draft_tokens} draft per trip kept {mtp.acceptance:.0%} of the time: "
                f"{mtp.tokens_per_trip:.2f} tokens per trip, a trip costs "
                f"{mtp.trip_cost_ratio:.2f}x a 1-token one)", highlight=False)
    for key in ("sessions", "sessions+mtp"):
        sp = serving.get(key)
        if sp is None:
            continue
        limit = "the busiest stage" if sp.bound == "stage" else "one trip's latency"
        drafts = " with MTP drafts" if sp.draft_tokens else ""
        c.print(f"serving {sp.sessions} sessions at once{drafts}: {fmt_rate(sp.aggregate_tok_s)} "
                f"tok/s in all, {fmt_rate(sp.per_stream_tok_s)} tok/s per stream (one stream "
                f"alone: {fmt_rate(sp.single_stream_tok_s)}); {sp.groups} micro-batch(es) of up "
                f"to {sp.batch} on the ring" + (f", {sp.sessions - sp.active} waiting their turn"
                                                if sp.active < sp.sessions else "")
                + f", limited by {limit}", highlight=False)


def _lines(c: Console, lines: Sequence[str]) -> None:
    for line in lines:
        c.print(line if line.startswith("  ") else f"- {line}", highlight=False, markup=False)


def _without_wired_block(advice: Sequence[str]) -> list[str]:
    """Advice without its wired-limit commands (a multi-model plan gives them per node)."""
    out, skipping = [], False
    for line in advice:
        if line.startswith(WIRED_BLOCK):
            skipping = True
            continue
        if skipping and line.startswith("  "):
            continue
        skipping = False
        out.append(line)
    return out


def _verdict(c: Console, verdict: str) -> None:
    style = {"fits": "green", "fits-with-wired-limit": "yellow"}.get(verdict, "red")
    c.print(f"verdict: [bold {style}]{verdict}[/]")


def print_plan(p: Plan, pred: Prediction, source: dict[str, Any], anchors: list[Anchor],
               serving: dict[str, Optional[ServingPrediction]]) -> None:
    c = console()
    _header(c, p, source)
    _table(c, p, pred)
    _verdict(c, p.verdict)
    _speeds(c, pred, serving)
    _links(c, p)
    for a in anchors:
        c.print(f"published on this hardware: {a.system}, {a.model}: {a.decode} tok/s"
                f" ({a.other}; {a.source})" + (f" [{a.caveat}]" if a.caveat else ""))
    _lines(c, p.advice)
    for note in p.notes:
        c.print(f"note: {note}", highlight=False)


def print_multi(mp: MultiPlan, preds: Sequence[Prediction], sources: Sequence[dict[str, Any]],
                serving: Sequence[dict[str, Optional[ServingPrediction]]]) -> None:
    c = console()
    for m, pred, source, sv in zip(mp.models, preds, sources, serving):
        _header(c, m.plan, source, escape(f"[{m.role}] "))
        _table(c, m.plan, pred)
        _speeds(c, pred, sv)
        _lines(c, m.why if m.role == "also" else _without_wired_block(m.plan.advice))
        c.print()
    table = Table(box=None, header_style="bold", pad_edge=False, title="memory per node")
    for col in ("node", "holds", "need", "usable", "free"):
        table.add_column(col, justify="left" if col in ("node", "holds") else "right")
    for u in mp.loads:
        holds = ", ".join(f"{m} {a}-{b}" for m, a, b in u.stages) or "-"
        table.add_row(u.node.name, holds, _gib(u.need_bytes + u.headroom_bytes),
                      _gib(u.usable_bytes) + ("*" if u.wired_limit_mb else ""), _gib(u.free_bytes))
    c.print(table)
    c.print("  GiB; need includes each node's reserve once and its headroom"
            + ("; * usable after raising the wired limit" if mp.wired_limit_commands else ""))
    _verdict(c, mp.verdict)
    _lines(c, mp.advice)
    for note in mp.main.notes:
        c.print(f"note: {note}", highlight=False)
