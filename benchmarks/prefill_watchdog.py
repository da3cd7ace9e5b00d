"""Prefill with and without the Metal-safe per-layer evaluation, on this
machine's backend, in the same run (interleaved rounds): what evaluating every
k layers during prefill (clusterd/models/watchdog.py) costs.

    .venv/bin/python benchmarks/prefill_watchdog.py [--preset small] [--tokens 1024]
        [--chunk 256] [--rounds 7] [--out benchmarks/results/prefill-watchdog.json]

On the CPU the policy evaluates nothing by itself; here it is forced to every
layer (k=1, the most evaluations it can ask for) against one graph per chunk.
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

from clusterd.bench.stats import code_version, load_average, machine, now_iso
from clusterd.models.stage import load_stage, read_config
from clusterd.models.synthetic import build_synthetic_model
from clusterd.models.watchdog import current_backend


def prefill_seconds(stage, prompt: list[int], chunk: int) -> float:
    """All prompt tokens through the stage in chunks, as a node prefills."""
    cache = stage.make_cache()
    t = time.perf_counter()
    for i in range(0, len(prompt), chunk):
        h = stage.forward(mx.array([prompt[i:i + chunk]], dtype=mx.int32), cache)
        mx.eval(h, [c.state for c in cache])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "bench"])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prefill-watchdog.json"))
    args = ap.parse_args()
    model = build_synthetic_model("deepseek_v3", args.preset)
    layers = read_config(model)["num_hidden_layers"]
    stage = load_stage(model, 0, layers)
    vocab = stage.vocab_size
    prompt = [(i * 37 + 11) % (vocab - 2) + 2 for i in range(args.tokens)]
    one_graph = stage.prefill_evals
    per_layer = dataclasses.replace(one_graph, forced=1)
    load_before = load_average()
    times: dict[str, list[float]] = {"one_graph": [], "every_layer": []}
    for policy in (one_graph, per_layer):  # warm-up
        stage.prefill_evals = policy
        prefill_seconds(stage, prompt, args.chunk)
    for r in range(args.rounds):
        order = [("one_graph", one_graph), ("every_layer", per_layer)]
        for name, policy in (order if r % 2 == 0 else order[::-1]):
            stage.prefill_evals = policy
            times[name].append(prefill_seconds(stage, prompt, args.chunk))
    tok_s = {k: [args.tokens / s for s in v] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in tok_s.items()}
    result = {
        "command": "python benchmarks/prefill_watchdog.py " + " ".join(sys.argv[1:]),
        "date": now_iso(), "machine": machine(), "code": code_version(),
        "backend": "metal" if current_backend().metal else "cpu",
        "model": model.name, "layers": layers, "prompt_tokens": args.tokens,
        "chunk": args.chunk, "rounds": args.rounds,
        "prefill_tok_s": {k: {"median": med[k], "min": min(v), "max": max(v), "all": v}
                          for k, v in tok_s.items()},
        "every_layer_over_one_graph": med["every_layer"] / med["one_graph"],
        "load_average_before": load_before, "load_average_after": load_average(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"prefill {args.tokens} tokens in chunks of {args.chunk}, {layers} layers: "
          f"one graph {med['one_graph']:.1f} tok/s, every layer {med['every_layer']:.1f} tok/s "
          f"({result['every_layer_over_one_graph']:.3f}x); wrote {args.out}")


if __name__ == "__main__":
    main()
