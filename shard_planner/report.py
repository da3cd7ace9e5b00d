"""A plan and its prediction as one JSON-ready dict (what `clusterd plan --json` prints)."""

from __future__ import annotations

from typing import Any

from shard_planner.planner import Plan
from shard_planner.simulate import Anchor, Prediction


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


def plan_to_dict(p: Plan, pred: Prediction | None = None,
                 anchors: list[Anchor] | None = None) -> dict[str, Any]:
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
        "objective": p.objective,
        "link": p.link.name,
        "headroom": p.headroom,
        "stages": [
            {
                "node": s.node.name, "chip": s.node.chip, "address": s.node.address,
                "layers": [s.start, s.end], "weight_bytes": s.weight_bytes,
                "kv_bytes": s.kv_bytes, "workspace_bytes": s.workspace_bytes,
                "reserve_bytes": s.reserve_bytes, "headroom_bytes": s.headroom_bytes,
                "need_bytes": s.need_bytes, "usable_bytes": s.usable_bytes,
                "current_usable_bytes": s.current_usable_bytes, "active_bytes": s.active_bytes,
                "bandwidth_gbs": s.node.bandwidth, "wired_limit_mb": s.wired_limit_mb,
                "sysctl": s.sysctl,
            }
            for s in p.stages
        ],
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
    out["published"] = [
        {"system": a.system, "hardware": a.hardware, "model": a.model, "decode_tok_s": a.decode,
         "other": a.other, "source": a.source, "caveat": a.caveat}
        for a in anchors or []
    ]
    return out
