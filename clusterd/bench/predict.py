"""`clusterd bench --predict`: the shard planner's forecasts for real Mac
layouts with each link preset, next to the published results (the planner's
own table of them), and with the per-hop overhead this machine measured."""

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


def predictions(model: str = "deepseek-r1", quant: str = "4bit",
                overhead_s: Optional[float] = None) -> dict:
    from clusterd.models import catalog
    from shard_planner.costs import DEFAULT_STACK_OVERHEAD_S, LINKS
    from shard_planner.model_spec import model_spec_from_config
    from shard_planner.planner import plan
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
            "stack_overhead_s_measured": overhead_s, "layouts": rows, "anchors": anchors}


def _rate(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}"


def print_predictions(res: dict, console: Console) -> None:
    meas = res["stack_overhead_s_measured"]
    t = Table(title=f"{res['model']} ({res['weight_bytes'] / 1e9:.0f} GB): planner predictions, "
                    f"hop software overhead {res['stack_overhead_s_assumed'] * 1e6:.0f} us (assumed)"
                    + (f" / {meas * 1e3:.2f} ms (measured here)" if meas else ""))
    for col in ("layout", "link", "fits", "decode tok/s", "prefill tok/s (2k)", "hops ms/token",
                "decode, measured overhead", "published (same hardware)"):
        t.add_column(col, justify="right" if "tok" in col or "ms" in col or "measured" in col
                     else "left")
    last = None
    for r in res["layouts"]:
        first = r["layout"] != last
        last = r["layout"]
        t.add_row(r["layout"] if first else "", r["link"], r["verdict"],
                  _rate(r.get("decode_tok_s")), _rate(r.get("prefill_tok_s")),
                  "-" if r.get("hop_ms") is None else f"{r['hop_ms']:.2f}",
                  _rate(r.get("decode_tok_s_measured_overhead")),
                  "; ".join(r["published"]) if first else "", end_section=False)
    console.print(t)
    a = Table(title="published results (README, 'Predicted speed') next to the planner's prediction")
    for col in ("system", "hardware", "model", "published decode tok/s", "predicted tok/s",
                "caveat"):
        a.add_column(col)
    for r in res["anchors"]:
        a.add_row(r["system"], r["hardware"], r["model"], r["published_decode"],
                  _rate(r["predicted_decode_tok_s"]) if r["predicted_decode_tok_s"] else r["verdict"],
                  r["caveat"])
    console.print(a)


def run_predict(console: Console, out_dir: Path, name: str, command: str) -> Path:
    res = predictions(overhead_s=measured_overhead_s(out_dir))
    print_predictions(res, console)
    res = {"command": command, "date": now_iso(), "machine": machine(), **res}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    console.print(f"wrote {path}")
    return path
