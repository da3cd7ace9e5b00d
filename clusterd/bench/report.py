"""The bench's output: a table on the terminal, JSON, CSV and a PNG chart."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

MiB = 2**20


def median_of(s: Optional[dict]) -> Optional[float]:
    return None if not s else s.get("median")


def _fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def spread_text(s: Optional[dict]) -> str:
    if not s or s.get("spread_pct") is None:
        return ""
    return f" ±{s['spread_pct'] / 2:.0f}%"


def ratio_text(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def print_table(result: dict, console: Console) -> None:
    w = result["workload"]
    t = Table(title=f"{result['model']['name']}: prompt {w['prompt_tokens']} tokens, "
                    f"{w['new_tokens']} new tokens, median of {w['repetitions']} "
                    f"(± half the min-max range)")
    for col in ("layout", "split", "TTFT s", "prefill tok/s", "decode tok/s",
                "decode ÷ mlx-lm", "TTFT ÷ mlx-lm", "hop in ring p50 ms", "RSS MiB per process"):
        t.add_column(col, justify="left" if col in ("layout", "split") else "right")
    for s in result["subjects"]:
        if s.get("error"):
            t.add_row(s["name"], ",".join(map(str, s.get("split", []))), "[red]failed[/red]",
                      "", "", "", "", "", s["error"][:60])
            continue
        hop = s.get("hop_in_pipeline") or {}
        hop_txt = f"{hop['p50_ms']:.3f}" if hop.get("n") else "-"
        mem = "/".join(f"{m['rss_bytes'] / MiB:.0f}" for m in s.get("memory", []))
        t.add_row(
            s["name"], ",".join(map(str, s.get("split", []))),
            _fmt(median_of(s["ttft_s"]), ".3f") + spread_text(s["ttft_s"]),
            _fmt(median_of(s["prefill_tok_s"]), ".1f") + spread_text(s["prefill_tok_s"]),
            _fmt(median_of(s["decode_tok_s"]), ".1f") + spread_text(s["decode_tok_s"]),
            ratio_text(s.get("decode_vs_mlx_lm")), ratio_text(s.get("ttft_vs_mlx_lm")),
            hop_txt, mem)
    console.print(t)
    for sk in result.get("skipped", []):
        console.print(f"[yellow]skipped[/yellow] {sk['name']}: {sk['reason']}")
    hop = result.get("hop")
    if hop:
        print_hop(hop, console)


def print_hop(hop: dict, console: Console) -> None:
    t = Table(title=f"one decode hop: {hop['hidden']} {hop.get('dtype', 'float32')} values "
                    f"({hop['payload_bytes']} bytes), "
                    "same run, loopback")
    for col in ("what", "p50 ms", "p99 ms", "p50 vs TCP"):
        t.add_column(col, justify="left" if col == "what" else "right")
    tcp = hop["tcp_round_trip"]["p50_ms"]
    rows = [("plain TCP round trip (floor)", hop["tcp_round_trip"]),
            ("one hop inside a running ring", hop["pipeline_hop"])]
    for name, s in hop.get("plain_transports", {}).items():
        rows.append((f"plain {name.replace('_', ' ')}", s))
    for name, s in rows:
        t.add_row(name, f"{s['p50_ms']:.3f}", f"{s['p99_ms']:.3f}", f"{s['p50_ms'] / tcp:.1f}x")
    console.print(t)


def write_json(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")


CSV_FIELDS = [
    "name", "kind", "stages", "split", "ttft_s_median", "ttft_s_spread_pct",
    "prefill_tok_s_median", "decode_tok_s_median", "decode_tok_s_min", "decode_tok_s_max",
    "decode_tok_s_spread_pct", "decode_vs_mlx_lm", "ttft_vs_mlx_lm", "prefill_vs_mlx_lm",
    "hop_in_pipeline_p50_ms", "hop_in_pipeline_p99_ms",
    "max_rss_mib", "total_rss_mib", "tokens_match_mlx_lm", "error",
]


def write_csv(result: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for s in result["subjects"]:
            d = s.get("decode_tok_s") or {}
            rss = [m["rss_bytes"] for m in s.get("memory", [])] or [0]
            pipe = s.get("hop_in_pipeline") or {}
            w.writerow({
                "name": s["name"], "kind": s["kind"], "stages": s["stages"],
                "split": " ".join(map(str, s.get("split", []))),
                "ttft_s_median": median_of(s.get("ttft_s")),
                "ttft_s_spread_pct": (s.get("ttft_s") or {}).get("spread_pct"),
                "prefill_tok_s_median": median_of(s.get("prefill_tok_s")),
                "decode_tok_s_median": d.get("median"), "decode_tok_s_min": d.get("min"),
                "decode_tok_s_max": d.get("max"), "decode_tok_s_spread_pct": d.get("spread_pct"),
                "decode_vs_mlx_lm": s.get("decode_vs_mlx_lm"),
                "ttft_vs_mlx_lm": s.get("ttft_vs_mlx_lm"),
                "prefill_vs_mlx_lm": s.get("prefill_vs_mlx_lm"),
                "hop_in_pipeline_p50_ms": pipe.get("p50_ms"),
                "hop_in_pipeline_p99_ms": pipe.get("p99_ms"),
                "max_rss_mib": max(rss) / MiB, "total_rss_mib": sum(rss) / MiB,
                "tokens_match_mlx_lm": s.get("tokens_match_mlx_lm"), "error": s.get("error", ""),
            })


_COLORS = {"mlx-lm": "#7f7f7f", "mlx-lm-ring": "#ff7f0e", "clusterd": "#1f77b4"}


def write_chart(result: dict, path: Path) -> None:
    """Decode tok/s and TTFT per layout, min-max as error bars, single-process
    mlx-lm drawn across both panels as the reference line."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a headless node
    import matplotlib.pyplot as plt

    subs = [s for s in result["subjects"] if not s.get("error") and s.get("decode_tok_s")]
    names = [s["name"] for s in subs]
    colors = [_COLORS.get(s["kind"], "#1f77b4") for s in subs]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "decode_tok_s", "decode tok/s (higher is better)"),
                           (axes[1], "ttft_s", "time to first token, s (lower is better)")):
        med = [s[key]["median"] for s in subs]
        lo = [s[key]["median"] - s[key]["min"] for s in subs]
        hi = [s[key]["max"] - s[key]["median"] for s in subs]
        ax.bar(range(len(subs)), med, color=colors, yerr=[lo, hi], capsize=4)
        base = next((s for s in subs if s["kind"] == "mlx-lm"), None)
        if base is not None:
            ax.axhline(base[key]["median"], color="#7f7f7f", linestyle="--", linewidth=1,
                       label="mlx-lm, 1 process")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.15)  # room for the legend above the bars
        ax.set_xticks(range(len(subs)))
        ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(label)
        for i, s in enumerate(subs):
            r = s.get("decode_vs_mlx_lm" if key == "decode_tok_s" else "ttft_vs_mlx_lm")
            if r is not None:
                ax.annotate(f"{r:.2f}x", (i, s[key]["max"]), ha="center", va="bottom", fontsize=7,
                            xytext=(0, 2), textcoords="offset points")
    w, m = result["workload"], result["machine"]
    fig.suptitle(f"{result['model']['name']}: prompt {w['prompt_tokens']}, {w['new_tokens']} new "
                 f"tokens; {m['cpu_count']} cores, {m['os']}, mlx {m['mlx']}; {result['date'][:10]}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(result: dict, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.csv"]
    write_json(result, paths[0])
    write_csv(result, paths[1])
    if any(not s.get("error") for s in result["subjects"]):
        paths.append(out_dir / f"{name}.png")
        write_chart(result, paths[2])
    return paths
