"""A plan and its prediction as one JSON-ready dict (what `clusterd plan --json` prints)."""

from __future__ import annotations

from typing import Any

from shard_planner.multi import MultiPlan
from shard_planner.planner import Plan
from shard_planner.serving import ServingPrediction
from shard_planner.simulate import Anchor, Prediction


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


def serving_to_dict(sp: ServingPrediction | None) -> dict[str, Any] | None:
    if sp is None:
        return None
    return {
        "sessions": sp.sessions, "groups": sp.groups, "batch": sp.batch,
        "draft_tokens": sp.draft_tokens, "acceptance": sp.acceptance,
        "tokens_per_trip": _round(sp.tokens_per_trip, 3),
        "trip_cost_ratio": _round(sp.trip_cost_ratio, 3), "round_ms": _round(sp.round_ms, 3),
        "aggregate_tok_s": _round(sp.aggregate_tok_s), "per_stream_tok_s": _round(sp.per_stream_tok_s),
        "single_stream_tok_s": _round(sp.single_stream_tok_s), "bound": sp.bound,
        "kv_tokens": sp.kv_tokens, "assumptions": list(sp.assumptions),
    }


def plan_to_dict(p: Plan, pred: Prediction | None = None,
                 anchors: list[Anchor] | None = None,
                 serving: dict[str, ServingPrediction | None] | None = None) -> dict[str, Any]:
    """``serving``: named serving predictions (e.g. "sessions", "mtp") to include."""
    spec = p.model
    out: dict[str, Any] = {
        "verdict": p.verdict,
        "model": {
            "name": spec.name, "model_type": spec.model_type, "quantization": spec.quant_label,
            "dtype": spec.dtype, "num_layers": spec.num_layers, "source": spec.source,
            "params": spec.params, "active_params": spec.active_params,
            "active_bytes_per_token": spec.active_bytes_per_token,
            "kv_bytes_per_token": spec.kv_bytes_per_token,
            "embed_bytes": spec.embed_bytes, "head_bytes": spec.head_bytes,
        },
        "total_weight_bytes": p.total_weight_bytes,
        "context": p.context,
        "sessions": p.sessions,
        "prompt_cache_tokens": p.prompt_cache_tokens,
        "draft": p.draft,
        "mtp": None if spec.mtp is None else {
            "params": spec.mtp.params, "weight_bytes": spec.mtp.weight_bytes,
            "kv_bytes_per_token": spec.mtp.kv_bytes_per_token},
        "objective": p.objective,
        "link": p.link.name,
        "headroom": p.headroom,
        "stages": [
            {
                "node": s.node.name, "chip": s.node.chip, "address": s.node.address,
                "layers": [s.start, s.end], "weight_bytes": s.weight_bytes,
                "kv_bytes": s.kv_bytes, "prompt_cache_bytes": s.prompt_cache_bytes,
                "mtp_bytes": s.mtp_bytes, "mtp_kv_bytes": s.mtp_kv_bytes,
                "workspace_bytes": s.workspace_bytes,
                "reserve_bytes": s.reserve_bytes, "headroom_bytes": s.headroom_bytes,
                "need_bytes": s.need_bytes, "usable_bytes": s.usable_bytes,
                "current_usable_bytes": s.current_usable_bytes, "active_bytes": s.active_bytes,
                "bandwidth_gbs": s.node.bandwidth, "wired_limit_mb": s.wired_limit_mb,
                "sysctl": s.sysctl,
            }
            for s in p.stages
        ],
        "hops": [{"from": h.src, "to": h.dst, "source": h.source, "link": h.link.name,
                  "latency_ms": round(h.link.latency_s * 1e3, 4),
                  "bandwidth_gbps": h.link.bandwidth_gbps} for h in p.hops],
        "left_out": list(p.left_out),
        "wired_limit_commands": [{"node": n, "command": c} for n, c in p.wired_limit_commands],
        "shortfall_bytes": p.shortfall_bytes,
        "advice": list(p.advice),
        "notes": list(p.notes),
    }
    if pred is not None:
        out["predicted"] = {
            "decode_tok_s": _round(pred.decode_tok_s), "prefill_tok_s": _round(pred.prefill_tok_s),
            "decode_ms": _round(pred.decode_ms, 3), "hop_ms": _round(pred.hop_ms, 3),
            "hops": pred.hops, "prompt_tokens": pred.prompt_tokens, "link": pred.link,
            "efficiency": pred.efficiency, "prefill_efficiency": pred.prefill_efficiency,
            "stages": [{"node": s.node, "decode_ms": _round(s.decode_ms, 3),
                        "prefill_chunk_ms": _round(s.prefill_chunk_ms, 1)} for s in pred.stages],
            "assumptions": list(pred.assumptions),
        }
    else:
        out["predicted"] = {"decode_tok_s": None, "prefill_tok_s": None}
    out["serving"] = {k: serving_to_dict(v) for k, v in (serving or {}).items()}
    out["published"] = [
        {"system": a.system, "hardware": a.hardware, "model": a.model, "decode_tok_s": a.decode,
         "other": a.other, "source": a.source, "caveat": a.caveat}
        for a in anchors or []
    ]
    return out


def multi_plan_to_dict(mp: MultiPlan, models: list[dict[str, Any]]) -> dict[str, Any]:
    """``models``: plan_to_dict of each placement's plan, in the same order."""
    return {
        "verdict": mp.verdict,
        "models": [{**d, "role": m.role, "why": list(m.why), "forced_node": m.forced_node}
                   for m, d in zip(mp.models, models)],
        "nodes": [{"node": u.node.name, "address": u.node.address, "node_index": u.node_index,
                   "stages": [{"model": m, "layers": [a, b]} for m, a, b in u.stages],
                   "need_bytes": u.need_bytes, "usable_bytes": u.usable_bytes,
                   "headroom_bytes": u.headroom_bytes, "free_bytes": u.free_bytes,
                   "wired_limit_mb": u.wired_limit_mb, "sysctl": u.sysctl} for u in mp.loads],
        # What a coordinator loads: per model, per stage, the node and its layers.
        "layout": [{"model": ml.model,
                    "stages": [{"node_index": j, "node": mp.nodes[j].name,
                                "address": mp.nodes[j].address, "layers": [s, e]}
                               for j, s, e in ml.stages]} for ml in mp.layout()],
        "wired_limit_commands": [{"node": n, "command": c} for n, c in mp.wired_limit_commands],
        "advice": list(mp.advice),
    }
