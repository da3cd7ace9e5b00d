"""Prompt lookup against plain decoding, same run: one stream on a prompt
whose answer repeats its input (a synthetic Qwen2, the R1-Distill base,
loops on a run of one token), on 1 and 3 local daemons, rounds interleaved.
Reports decode tokens/s, tokens per trip and acceptance, and checks every
answer against mlx-lm fed the same prefix.

    python benchmarks/drafts_speed.py --rounds 5

Writes benchmarks/results/drafts-speed.json and .png (with the command)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="qwen2")
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--nodes", default="1,3")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from clusterd.bench.stats import code_version, machine, now_iso
    from clusterd.coordinator.engine import Engine
    from clusterd.coordinator.generation import GenerationRequest, Sampling
    from clusterd.coordinator.ring import RingOptions, model_source, open_ring
    from clusterd.local_cluster import LocalCluster
    from clusterd.models.stage import read_config
    from clusterd.models.synthetic import build_synthetic_model
    from clusterd.reference import teacher_forced_misses

    model = build_synthetic_model(args.arch, args.preset, 0)
    layers = read_config(model)["num_hidden_layers"]
    prompt = (100,) * 10
    counts = [int(n) for n in args.nodes.split(",")]
    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "date": now_iso(), "machine": machine(), "code": code_version(),
              "model": model.name, "prompt": list(prompt), "new_tokens": args.new_tokens,
              "layouts": []}
    # Each layout on daemons of its own (a node holds one copy of a model's shard).
    with LocalCluster(sum(counts), workdir=Path(tempfile.mkdtemp(prefix="drafts-"))) as cluster:
        engines, first = {}, 0
        for n in counts:
            split = ",".join(str(layers // n + (i < layers % n)) for i in range(n))
            ring = open_ring(model_source(str(model), None, lambda t: None),
                             cluster.addresses[first:first + n],
                             RingOptions(context=1024, split=split, show=False), lambda t: None)
            first += n
            engines[n] = Engine(ring, name=model.name, context=1024)
        runs: dict = {(n, d): [] for n in counts for d in ("none", "ngram")}
        for r in range(args.rounds + 1):  # the first round warms up
            for n in counts:
                for draft in ("none", "ngram"):
                    gen = engines[n].submit(GenerationRequest(prompt, args.new_tokens,
                                                              Sampling(temperature=0.0), (),
                                                              draft))
                    tokens = list(gen)
                    s = gen.stats
                    print(f"round {r}: {n} node(s), draft {draft}: {s.decode_tok_s:.1f} tok/s, "
                          f"{len(tokens) / max(s.trips, 1):.2f} tokens/trip", flush=True)
                    if r:
                        runs[(n, draft)].append({
                            "decode_tok_s": s.decode_tok_s, "trips": s.trips,
                            "tokens": len(tokens), "drafted": s.drafted, "accepted": s.accepted,
                            "teacher_forced_misses": len(teacher_forced_misses(
                                model, prompt, tokens))})
        for e in engines.values():
            e.close()
    for n in counts:
        plain = statistics.median(x["decode_tok_s"] for x in runs[(n, "none")])
        for draft in ("none", "ngram"):
            rs = runs[(n, draft)]
            rate = statistics.median(x["decode_tok_s"] for x in rs)
            result["layouts"].append({
                "nodes": n, "draft": draft, "decode_tok_s": rate, "vs_plain": rate / plain,
                "tokens_per_trip": statistics.median(x["tokens"] / x["trips"] for x in rs),
                "acceptance": (sum(x["accepted"] for x in rs) / sum(x["drafted"] for x in rs)
                               if any(x["drafted"] for x in rs) else None),
                "teacher_forced_misses": sum(x["teacher_forced_misses"] for x in rs),
                "runs": rs})
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "drafts-speed.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    _chart(result, args.out / "drafts-speed.png")
    for row in result["layouts"]:
        print(f"{row['nodes']} node(s), {row['draft']:5}: {row['decode_tok_s']:.1f} tok/s "
              f"({row['vs_plain']:.2f}x plain), {row['tokens_per_trip']:.2f} tokens/trip, "
              f"misses {row['teacher_forced_misses']}")
    print(f"wrote {path}")


def _chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["layouts"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['nodes']} node{'s' if r['nodes'] > 1 else ''}\n{r['draft']}" for r in rows]
    bars = ax.bar(labels, [r["decode_tok_s"] for r in rows],
                  color=["#7f7f7f" if r["draft"] == "none" else "#1f77b4" for r in rows])
    for b, r in zip(bars, rows):
        ax.annotate(f"{r['tokens_per_trip']:.2f} tok/trip", (b.get_x() + b.get_width() / 2,
                                                             b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("decode tok/s (one stream)")
    ax.set_title(f"prompt lookup vs plain decoding: {result['model']}", fontsize=9)
    fig.text(0.01, 0.01, f"{result['command']}  ({result['date']})", fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
