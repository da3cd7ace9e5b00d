"""`clusterd bench --predict`: the shard planner's forecasts for real Mac
layouts with each link preset, next to the published results (the planner's
own table of them), and with the per-hop overhead this machine measured; the
aggregate of N sessions decoding at once; and R1 with MTP drafts next to exo's
tensor-parallel figures."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from clusterd.bench.stats import machine, now_iso

# (label, chip, RAM GB, count, quantization): the layouts people build for R1.
LAYOUTS = (
    ("3 x M2 Ultra 192 GB", "m2-ultra", 192, 3, "4bit"),
    ("4 x M2 Ultra 192 GB", "m2-ultra", 192, 4, "4bit"),
    ("8 x M4 Pro 64 GB Mac mini", "m4-pro", 64, 8, "4bit"),
    # 4-bit (420 GB at group 32) is more than 8 x 48 GB of default wired memory.
    ("8 x M4 Pro 64 GB Mac mini, R1 3-bit", "m4-pro", 64, 8, "3bit"),
    ("1 x M3 Ultra 512 GB", "m3-ultra", 512, 1, "4bit"),
    ("2 x M3 Ultra 512 GB", "m3-ultra", 512, 2, "4bit"),
)
# Layouts predicted with R1's MTP drafts, at the acceptance DeepSeek published (85-90%).
MTP_LAYOUTS = (
    ("3 x M2 Ultra 192 GB", "m2-ultra", 192, 3),
    ("2 x M3 Ultra 512 GB", "m3-ultra", 512, 2),
)
MTP_ACCEPTANCES = (0.85, 0.90)
DEFAULT_SESSIONS = 8


def _nodes(chip: str, ram: int, count: int):
    from shard_planner.hardware import hypothetical_node

    first = hypothetical_node(chip, ram)
    return [replace(first, name=f"{first.name}#{i + 1}") for i in range(count)]


def measured_overhead_s(out_dir: Path) -> Optional[float]:
    """The in-pipeline hop p50 of the newest hop measurement in out_dir: on
    loopback that is all software overhead (the link adds ~nothing)."""
    best = None
    for p in sorted(Path(out_dir).glob("*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        hop = data.get("hop") if isinstance(data, dict) else None
        if isinstance(hop, dict) and hop.get("pipeline_hop"):
            stamp = data.get("date", "")
            if best is None or stamp > best[0]:
                best = (stamp, hop["pipeline_hop"]["p50_ms"] / 1e3)
    return best[1] if best else None


def mtp_predictions(spec, sessions: int, overhead_s: Optional[float] = None) -> list[dict]:
    """R1 with its MTP module on the last stage: one stream and `sessions` at once, at each
    published acceptance, next to exo's tensor-parallel figures on the same Macs."""
    from shard_planner.costs import DEFAULT_STACK_OVERHEAD_S
    from shard_planner.planner import plan
    from shard_planner.serving import predict_serving
    from shard_planner.simulate import matching_anchors

    overhead = DEFAULT_STACK_OVERHEAD_S if overhead_s is None else overhead_s
    rows = []
    for label, chip, ram, count in MTP_LAYOUTS:
        nodes = _nodes(chip, ram, count)
        # RDMA over TB5 is the link exo's tensor-parallel figures ran on.
        p = plan(spec, nodes, context=4096, link="tb5-rdma", draft="mtp", advise=True)
        exo = [f"{a.decode} tok/s ({a.system})" for a in matching_anchors(nodes)
               if a.system.startswith("exo v1")]
        row = {"layout": label, "link": "tb5-rdma", "verdict": p.verdict, "draft": p.draft,
               "stages": [[s.start, s.end] for s in p.stages], "published_tensor_parallel": exo,
               "advice": [a for a in p.advice if "MTP" in a]}
        if p.stages:
            base = predict_serving(p, 1, stack_overhead_s=overhead)
            row["decode_tok_s"] = base.single_stream_tok_s if base else None
            many = predict_serving(p, sessions, stack_overhead_s=overhead)
            row["sessions"] = sessions
            row["aggregate_tok_s"] = many.aggregate_tok_s if many else None
            row["mtp"] = []
            for a in MTP_ACCEPTANCES if p.draft == "mtp" else ():
                one = predict_serving(p, 1, draft_tokens=1, acceptance=a, stack_overhead_s=overhead)
                agg = predict_serving(p, sessions, draft_tokens=1, acceptance=a,
                                      stack_overhead_s=overhead)
                row["mtp"].append({
                    "acceptance": a, "decode_tok_s": one.per_stream_tok_s if one else None,
                    "trip_cost_ratio": one.trip_cost_ratio if one else None,
                    "aggregate_tok_s": agg.aggregate_tok_s if agg else None})
        rows.append(row)
    return rows


def predictions(model: str = "deepseek-r1", quant: str = "4bit",
                overhead_s: Optional[float] = None, sessions: int = DEFAULT_SESSIONS) -> dict:
    from clusterd.models import catalog
    from shard_planner.costs import DEFAULT_STACK_OVERHEAD_S, LINKS
    from shard_planner.model_spec import model_spec_from_config
    from shard_planner.planner import plan
    from shard_planner.serving import predict_serving
    from shard_planner.simulate import anchor_comparison, matching_anchors, simulate

    def spec_for(q: str):
        r = catalog.resolve(model, q)
        return r, model_spec_from_config(r.config, r.quantization, dtype=r.dtype, name=r.name)

    r, spec = spec_for(quant)
    rows = []
    for label, chip, ram, count, q in LAYOUTS:
        nodes = _nodes(chip, ram, count)
        lspec = spec if q == quant else spec_for(q)[1]
        published = [f"{a.system}: {a.decode} tok/s ({a.source})" for a in matching_anchors(nodes)]
        for link in LINKS:
            p = plan(lspec, nodes, context=4096, link=link, advise=False)
            row = {"layout": label, "link": link, "verdict": p.verdict,
                   "stages": [[s.start, s.end] for s in p.stages], "published": published}
            if p.stages:
                pred = simulate(p, link, prompt_tokens=2048)
                row.update(decode_tok_s=pred.decode_tok_s, prefill_tok_s=pred.prefill_tok_s,
                           hop_ms=pred.hop_ms, hops=pred.hops)
                many = predict_serving(p, sessions, link=link)
                if many is not None:
                    row.update(sessions=sessions, aggregate_tok_s=many.aggregate_tok_s,
                               per_stream_tok_s=many.per_stream_tok_s)
                if overhead_s is not None:
                    measured = simulate(p, link, prompt_tokens=2048, stack_overhead_s=overhead_s)
                    row["decode_tok_s_measured_overhead"] = measured.decode_tok_s
            rows.append(row)
    anchors = []
    for a, p, pred in anchor_comparison(spec):
        anchors.append({
            "system": a.system, "hardware": a.hardware, "model": a.model,
            "published_decode": a.decode, "published_other": a.other, "source": a.source,
            "link": a.link, "caveat": a.caveat,
            "verdict": p.verdict if p else "not modelled (hardware not in the chip catalog)",
            "predicted_decode_tok_s": pred.decode_tok_s if pred else None,
            "predicted_prefill_tok_s": pred.prefill_tok_s if pred else None,
        })
    return {"model": f"{r.name} {r.label}", "weight_bytes": spec.total_weight_bytes,
            "stack_overhead_s_assumed": DEFAULT_STACK_OVERHEAD_S,
            "stack_overhead_s_measured": overhead_s, "sessions": sessions, "layouts": rows,
            "mtp": mtp_predictions(spec, sessions, overhead_s), "anchors": anchors}


def _rate(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}"


def print_predictions(res: dict, console: Console) -> None:
    meas = res["stack_overhead_s_measured"]
    t = Table(title=f"{res['model']} ({res['weight_bytes'] / 1e9:.0f} GB): planner predictions, "
                    f"hop software overhead {res['stack_overhead_s_assumed'] * 1e6:.0f} us (assumed)"
                    + (f" / {meas * 1e3:.2f} ms (measured here)" if meas else ""))
    n = res["sessions"]
    for col in ("layout", "link", "fits", "decode tok/s", "prefill tok/s (2k)", "hops ms/token",
                "decode, measured overhead", f"{n} sessions: tok/s in all", "per stream",
                "published (same hardware)"):
        t.add_column(col, justify="right" if "tok" in col or "ms" in col or "measured" in col
                     or "stream" in col else "left")
    last = None
    for r in res["layouts"]:
        first = r["layout"] != last
        last = r["layout"]
        t.add_row(r["layout"] if first else "", r["link"], r["verdict"],
                  _rate(r.get("decode_tok_s")), _rate(r.get("prefill_tok_s")),
                  "-" if r.get("hop_ms") is None else f"{r['hop_ms']:.2f}",
                  _rate(r.get("decode_tok_s_measured_overhead")),
                  _rate(r.get("aggregate_tok_s")), _rate(r.get("per_stream_tok_s")),
                  "; ".join(r["published"]) if first else "", end_section=False)
    console.print(t)
    print_mtp(res, console)
    a = Table(title="published results (README, 'Predicted speed') next to the planner's prediction")
    for col in ("system", "hardware", "model", "published decode tok/s", "predicted tok/s",
                "caveat"):
        a.add_column(col)
    for r in res["anchors"]:
        a.add_row(r["system"], r["hardware"], r["model"], r["published_decode"],
                  _rate(r["predicted_decode_tok_s"]) if r["predicted_decode_tok_s"] else r["verdict"],
                  r["caveat"])
    console.print(a)


def print_mtp(res: dict, console: Console) -> None:
    n = res["sessions"]
    t = Table(title=f"{res['model']} with MTP drafts (1 per trip) over RDMA: pipeline, next to "
                    "exo's published tensor parallelism on the same Macs")
    for col in ("layout", "fits", "decode tok/s", "MTP @ 85%", "MTP @ 90%", "trip cost",
                f"{n} sessions", f"{n} sessions, MTP @ 85%", "exo v1 tensor parallel"):
        t.add_column(col, justify="left" if col in ("layout", "fits", "exo v1 tensor parallel")
                     else "right")
    for r in res["mtp"]:
        mtp = {m["acceptance"]: m for m in r.get("mtp", [])}
        m85, m90 = mtp.get(0.85, {}), mtp.get(0.90, {})
        ratio = m85.get("trip_cost_ratio")
        t.add_row(r["layout"], r["verdict"] + ("" if r["draft"] == "mtp" else " (no MTP room)"),
                  _rate(r.get("decode_tok_s")), _rate(m85.get("decode_tok_s")),
                  _rate(m90.get("decode_tok_s")), "-" if ratio is None else f"{ratio:.2f}x",
                  _rate(r.get("aggregate_tok_s")), _rate(m85.get("aggregate_tok_s")),
                  "; ".join(r["published_tensor_parallel"]) or "-")
    console.print(t)


def run_predict(console: Console, out_dir: Path, name: str, command: str,
                sessions: int = DEFAULT_SESSIONS) -> Path:
    res = predictions(overhead_s=measured_overhead_s(out_dir), sessions=sessions)
    print_predictions(res, console)
    res = {"command": command, "date": now_iso(), "machine": machine(), **res}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    console.print(f"wrote {path}")
    return path
