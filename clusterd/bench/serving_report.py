"""The serving benchmarks' output: a table on the terminal, JSON, CSV (one
row per table row) and a PNG chart, for each mode."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console
from rich.table import Table

from clusterd.bench.report import median_of, ratio_text, spread_text, write_json


def _f(x: Optional[float], spec: str = ".1f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def _title(result: dict, what: str, how: str = "") -> str:
    w = result["workload"]
    how = how or f"median of {w['repetitions']} rounds (± half the min-max range)"
    return f"{result['model']['name']}: {what}; {how}"


def _misses(v) -> str:
    return "-" if v is None else ("0" if v == 0 else f"[red]{v}[/red]")


# -- concurrency ----------------------------------------------------------------
def concurrency_rows(result: dict) -> list[dict]:
    out = []
    for s in result["subjects"]:
        for r in s["rows"]:
            out.append({
                "name": s["name"], "kind": s["kind"], "stages": s["stages"],
                "split": " ".join(map(str, s["split"])), "concurrency": r["concurrency"],
                "aggregate_tok_s": median_of(r["aggregate_tok_s"]),
                "aggregate_tok_s_spread_pct": r["aggregate_tok_s"].get("spread_pct"),
                "per_stream_tok_s": median_of(r["per_stream_tok_s"]),
                "ttft_p50_s": median_of(r["ttft_s"]), "ttft_p99_s": r["ttft_p99_s"],
                "vs_mlx_lm_batched": r["vs_mlx_lm_batched"], "vs_own_c1": r["vs_own_c1"],
                "teacher_forced_misses": r["teacher_forced_misses"],
                "cached_tokens": r["cached_tokens"], "error": s["error"]})
        if not s["rows"]:
            out.append({"name": s["name"], "kind": s["kind"], "error": s["error"]})
    return out


def print_concurrency(result: dict, console: Console) -> None:
    w = result["workload"]
    t = Table(title=_title(result, f"C streams at once, prompts {w['prompt_lengths'][:4]} "
                                   f"tokens, {w['new_tokens']} new"))
    for col in ("subject", "C", "tok/s, all streams", "per stream", "TTFT p50 s", "TTFT p99 s",
                "÷ mlx-lm batched", "÷ own C=1", "misses"):
        t.add_column(col, justify="left" if col == "subject" else "right")
    for s in result["subjects"]:
        if s["error"] and not s["rows"]:
            t.add_row(s["name"], "", "[red]failed[/red]", s["error"][:60], "", "", "", "", "")
        for i, r in enumerate(s["rows"]):
            t.add_row(s["name"] if i == 0 else "", str(r["concurrency"]),
                      _f(median_of(r["aggregate_tok_s"])) + spread_text(r["aggregate_tok_s"]),
                      _f(median_of(r["per_stream_tok_s"])), _f(median_of(r["ttft_s"]), ".3f"),
                      _f(r["ttft_p99_s"], ".3f"), ratio_text(r["vs_mlx_lm_batched"]),
                      ratio_text(r["vs_own_c1"]), _misses(r["teacher_forced_misses"]),
                      end_section=i == len(s["rows"]) - 1)
    console.print(t)


def chart_concurrency(result: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"mlx-lm-batched": dict(color="#7f7f7f", linestyle="--", marker="s"),
              "mlx-lm": dict(color="#000000", linestyle="", marker="x", markersize=9)}
    for s in result["subjects"]:
        rows = [r for r in s["rows"] if r["aggregate_tok_s"]["n"]]
        if not rows:
            continue
        cs = [r["concurrency"] for r in rows]
        med = [r["aggregate_tok_s"]["median"] for r in rows]
        lo = [m - r["aggregate_tok_s"]["min"] for m, r in zip(med, rows)]
        hi = [r["aggregate_tok_s"]["max"] - m for m, r in zip(med, rows)]
        ax.errorbar(cs, med, yerr=[lo, hi], capsize=4, label=s["name"],
                    **styles.get(s["kind"], dict(marker="o")))
    ax.set_xscale("log", base=2)
    allc = result["workload"]["concurrency"]
    ax.set_xticks(allc)
    ax.set_xticklabels([str(c) for c in allc])
    ax.set_xlabel("streams at once (C)")
    ax.set_ylabel("tokens/s, all streams together (higher is better)")
    ax.legend(fontsize=8)
    _suptitle(fig, result, f"new tokens {result['workload']['new_tokens']}")
    _save(fig, path)


# -- interleave -----------------------------------------------------------------
PHASES = ("before", "during", "after")


def interleave_rows(result: dict) -> list[dict]:
    out = []
    for s in result["subjects"]:
        row = {"name": s["name"], "kind": s["kind"], "stages": s["stages"], "error": s["error"],
               "long_ttft_s": median_of(s.get("long_ttft_s")),
               "tokens_during_prefill": median_of(s.get("tokens_during_prefill")),
               "teacher_forced_misses": s.get("teacher_forced_misses")}
        for ph in PHASES:
            iv = (s.get("intervals") or {}).get(ph) or {}
            row[f"{ph}_p50_ms"], row[f"{ph}_p99_ms"] = iv.get("p50_ms"), iv.get("p99_ms")
        out.append(row)
    return out


def print_interleave(result: dict, console: Console) -> None:
    w = result["workload"]
    t = Table(title=_title(result, f"{w['streams']} streams decoding, then a "
                                   f"{w['long_prompt']}-token prompt",
                           f"intervals of {w['repetitions']} rounds together; TTFT: median "
                           "(± half the min-max range)"))
    for col in ("subject", "before p50/p99 ms", "during p50/p99 ms", "after p50/p99 ms",
                "worst interval ms", "tokens per stream during", "long prompt TTFT s", "misses"):
        t.add_column(col, justify="left" if col == "subject" else "right")
    for s in result["subjects"]:
        if s["error"]:
            t.add_row(s["name"], "[red]failed[/red]", s["error"][:60], "", "", "", "", "")
            continue
        iv = s["intervals"]
        cells = [f"{_f(iv[ph]['p50_ms'])} / {_f(iv[ph]['p99_ms'])}" for ph in PHASES]
        t.add_row(s["name"], *cells, _f(iv["during"]["max_ms"]),
                  _f(median_of(s["tokens_during_prefill"])),
                  _f(median_of(s["long_ttft_s"]), ".3f") + spread_text(s["long_ttft_s"]),
                  _misses(s.get("teacher_forced_misses")))
    console.print(t)


def chart_interleave(result: dict, path: Path) -> None:
    plt = _pyplot()
    subs = [s for s in result["subjects"] if not s["error"]]
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.8 / max(1, len(subs))
    for j, s in enumerate(subs):
        xs = [i + (j - (len(subs) - 1) / 2) * width for i in range(len(PHASES))]
        p50 = [s["intervals"][ph]["p50_ms"] for ph in PHASES]
        p99 = [s["intervals"][ph]["p99_ms"] for ph in PHASES]
        bars = ax.bar(xs, p99, width * 0.9, alpha=0.35, label=f"{s['name']} p99")
        ax.bar(xs, p50, width * 0.9, color=bars.patches[0].get_facecolor(), alpha=1.0,
               label=f"{s['name']} p50")
    ax.set_yscale("log")  # a blocked decode is 100x a normal interval
    ax.set_xticks(range(len(PHASES)))
    ax.set_xticklabels([f"{ph} the long prompt's prefill" for ph in PHASES])
    ax.set_ylabel("inter-token interval of the running streams, ms (lower is better)")
    ax.legend(fontsize=7, ncol=2)
    w = result["workload"]
    _suptitle(fig, result, f"{w['streams']} streams, {w['long_prompt']}-token prompt")
    _save(fig, path)


# -- cache turns ------------------------------------------------------------------
def cache_rows(result: dict) -> list[dict]:
    return [{"name": s["name"], "kind": s["kind"], "stages": s.get("stages"),
             "prompt_cache": s.get("prompt_cache"), "error": s["error"],
             "turn1_ttft_s": median_of(s.get("turn1_ttft_s")),
             "turn2_ttft_s": median_of(s.get("turn2_ttft_s")),
             "turn2_ttft_s_spread_pct": (s.get("turn2_ttft_s") or {}).get("spread_pct"),
             "turn2_cached_tokens": median_of(s.get("turn2_cached_tokens")),
             "turn2_cache_missed_rounds": s.get("turn2_cache_missed_rounds"),
             "turn2_vs_without_cache": s.get("turn2_vs_without_cache"),
             "teacher_forced_misses": s.get("teacher_forced_misses")}
            for s in result["subjects"]]


def print_cache(result: dict, console: Console) -> None:
    w = result["workload"]
    gap = f", sent {w['turn_gap_s']:g}s after it" if w.get("turn_gap_s") else ", sent at once"
    t = Table(title=_title(result, f"turn 2 of a chat whose turn 1 was {w['first_turn']} tokens "
                                   f"(+{w['new_tokens']} answered, +{w['follow_up']} asked{gap})"))
    for col in ("subject", "prompt cache", "turn 1 TTFT s", "turn 2 TTFT s", "turn 2 cached tokens",
                "rounds it found none", "turn 2 ÷ without cache", "misses"):
        t.add_column(col, justify="left" if col in ("subject", "prompt cache") else "right")
    for s in result["subjects"]:
        if s["error"]:
            t.add_row(s["name"], "", "[red]failed[/red]", s["error"][:60], "", "", "", "")
            continue
        missed = s.get("turn2_cache_missed_rounds")
        t.add_row(s["name"], s["prompt_cache"],
                  _f(median_of(s["turn1_ttft_s"]), ".3f"),
                  _f(median_of(s["turn2_ttft_s"]), ".3f") + spread_text(s["turn2_ttft_s"]),
                  _f(median_of(s["turn2_cached_tokens"]), ".0f"),
                  "-" if missed is None else (f"[red]{missed}[/red]" if missed else "0"),
                  ratio_text(s.get("turn2_vs_without_cache")),
                  _misses(s.get("teacher_forced_misses")))
    console.print(t)


def chart_cache(result: dict, path: Path) -> None:
    plt = _pyplot()
    subs = [s for s in result["subjects"] if not s["error"]]
    fig, ax = plt.subplots(figsize=(9, 5))
    names = [s["name"] for s in subs]
    med = [s["turn2_ttft_s"]["median"] for s in subs]
    lo = [m - s["turn2_ttft_s"]["min"] for m, s in zip(med, subs)]
    hi = [s["turn2_ttft_s"]["max"] - m for m, s in zip(med, subs)]
    colors = ["#1f77b4" if s["prompt_cache"].startswith("on") else "#aec7e8" for s in subs]
    ax.bar(range(len(subs)), med, yerr=[lo, hi], capsize=4, color=colors)
    ax.set_xticks(range(len(subs)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("turn 2 time to first token, s (lower is better)")
    _suptitle(fig, result, f"turn 1: {result['workload']['first_turn']} tokens")
    _save(fig, path)


# -- trips -------------------------------------------------------------------------
def trip_rows(result: dict) -> list[dict]:
    out = []
    for s in result["subjects"]:
        for r in s["rows"]:
            out.append({"name": s["name"], "kind": s["kind"], "stages": s["stages"],
                        "tokens": r["tokens"], "p50_ms": r["trip"]["p50_ms"],
                        "p90_ms": r["trip"]["p90_ms"], "vs_one_token": r["vs_one_token"],
                        "teacher_forced_misses": r.get("teacher_forced_misses"),
                        "error": s["error"]})
        if not s["rows"]:
            out.append({"name": s["name"], "kind": s["kind"], "error": s["error"]})
    return out


def print_trips(result: dict, console: Console) -> None:
    w = result["workload"]
    t = Table(title=_title(result, f"one trip carrying k tokens of one session at context "
                                   f"{w['context']}",
                           f"{w['trips']} trips per k in each of {w['repetitions']} rounds"))
    for col in ("subject", "k", "trip p50 ms", "p90 ms", "÷ 1-token trip", "misses"):
        t.add_column(col, justify="left" if col == "subject" else "right")
    for s in result["subjects"]:
        if s["error"] and not s["rows"]:
            t.add_row(s["name"], "", "[red]failed[/red]", s["error"][:60], "", "")
        for i, r in enumerate(s["rows"]):
            t.add_row(s["name"] if i == 0 else "", str(r["tokens"]), _f(r["trip"]["p50_ms"], ".2f"),
                      _f(r["trip"]["p90_ms"], ".2f"), ratio_text(r["vs_one_token"]),
                      _misses(r.get("teacher_forced_misses")), end_section=i == len(s["rows"]) - 1)
    console.print(t)


def chart_trips(result: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for s in result["subjects"]:
        if s["rows"]:
            ax.plot([r["tokens"] for r in s["rows"]], [r["vs_one_token"] for r in s["rows"]],
                    marker="o", label=s["name"],
                    **({"color": "#7f7f7f", "linestyle": "--"} if s["kind"] == "mlx-lm" else {}))
    ks = result["workload"]["trip_tokens"]
    ax.plot(ks, ks, color="#d62728", linestyle=":", linewidth=1, label="k x a 1-token trip")
    ax.axhline(1.0, color="#2ca02c", linestyle=":", linewidth=1, label="free (1x)")
    ax.set_xticks(ks)
    ax.set_xlabel("tokens carried by one trip (k)")
    ax.set_ylabel("trip time ÷ a 1-token trip (lower is better)")
    ax.legend(fontsize=8)
    _suptitle(fig, result, f"context {result['workload']['context']}")
    _save(fig, path)


# -- shared --------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on a headless node
    import matplotlib.pyplot as plt

    return plt


def _suptitle(fig, result: dict, what: str) -> None:
    m = result["machine"]
    fig.suptitle(f"{result['model']['name']} ({result['mode']}): {what}\n{m['cpu_count']} cores, "
                 f"{m['os']}, mlx {m['mlx']}, {result['date'][:10]}", fontsize=9)
    fig.tight_layout()


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)


MODES: dict[str, tuple[Callable, Callable, Callable]] = {
    "concurrency": (print_concurrency, concurrency_rows, chart_concurrency),
    "interleave": (print_interleave, interleave_rows, chart_interleave),
    "cache_turns": (print_cache, cache_rows, chart_cache),
    "trips": (print_trips, trip_rows, chart_trips),
}


def print_result(result: dict, console: Console) -> None:
    MODES[result["mode"]][0](result, console)
    for sk in result.get("skipped", []):
        console.print(f"[yellow]skipped[/yellow] {sk['name']}: {sk['reason']}")


def write_all(result: dict, out_dir: Path, name: str) -> list[Path]:
    _, rows_of, chart = MODES[result["mode"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.csv"]
    write_json(result, paths[0])
    rows = rows_of(result)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    if any(not s.get("error") for s in result["subjects"]):
        paths.append(out_dir / f"{name}.png")
        chart(result, paths[2])
    return paths
