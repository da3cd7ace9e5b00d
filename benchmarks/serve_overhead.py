"""What the HTTP server costs per request: one-token chat completions per
second through `clusterd serve` (the official openai client, non-streamed
and streamed) next to the engine's own submit() on the same ring (same
model, nodes and split), interleaved in one run.

    python benchmarks/serve_overhead.py [--requests 30] [--rounds 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

from clusterd.bench.stats import code_version, load_average, machine, now_iso, summary
from clusterd.coordinator.engine import Engine
from clusterd.coordinator.generation import GenerationRequest, Sampling
from clusterd.coordinator.ring import RingOptions, model_source, open_ring
from clusterd.local_cluster import LocalCluster
from clusterd.models.synthetic import build_synthetic_model

QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]
KEY = "bench"


def raw_rate(engine: Engine, n: int) -> float:
    chat = engine.chat
    prompt = tuple(chat.prompt(QUESTION).ids)
    t0 = time.perf_counter()
    for _ in range(n):
        tokens = list(engine.submit(GenerationRequest(prompt, 1, Sampling(temperature=0.0),
                                                      tuple(chat.stop_ids))))
        assert len(tokens) <= 1
    return n / (time.perf_counter() - t0)


def http_rate(client: openai.OpenAI, model: str, n: int, stream: bool) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=1,
                                               temperature=0, stream=stream)
        if stream:
            for _ in reply:
                pass
        else:
            assert reply.usage.completion_tokens <= 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--requests", type=int, default=30, help="per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="each mode, interleaved")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="serve_overhead")
    args = ap.parse_args()

    model = build_synthetic_model("deepseek_v3", args.preset, 0)
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    per = [layers // args.nodes + (i < layers % args.nodes) for i in range(args.nodes)]
    split = ",".join(map(str, per))
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="clusterd-serve-bench-") as tmp, \
            LocalCluster(args.nodes, workdir=Path(tmp), prefix="bench") as cluster:
        peers = sum((["--peer", a] for a in cluster.addresses), [])
        server = subprocess.Popen(
            [sys.executable, "-m", "clusterd", "serve", str(model), *peers, "--split", split,
             "--http-port", "0", "--api-key", KEY],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            url = re.search(r"on (http://\S+)/v1", server.stdout.readline()).group(1)
            ring = open_ring(model_source(str(model), None, print), cluster.addresses,
                             RingOptions(split=split, show=False), print)
            engine = Engine(ring, name=model.name, context=4096)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
            # Warm up each path (first requests compile and connect).
            raw_rate(engine, 3)
            http_rate(client, model.name, 3, False)
            http_rate(client, model.name, 3, True)
            rates: dict[str, list[float]] = {"raw_submit": [], "http": [], "http_stream": []}
            for _ in range(args.rounds):
                rates["raw_submit"].append(raw_rate(engine, args.requests))
                rates["http"].append(http_rate(client, model.name, args.requests, False))
                rates["http_stream"].append(http_rate(client, model.name, args.requests, True))
            engine.close()
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(30)

    med = {k: summary(v)["median"] for k, v in rates.items()}
    result = {
        "command": " ".join(["python", "benchmarks/serve_overhead.py", *sys.argv[1:]]),
        "date": now_iso(),
        "machine": machine(),
        "code": code_version(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "workload": {"model": f"synthetic deepseek_v3 {args.preset}", "nodes": args.nodes,
                     "split": split, "max_tokens": 1, "requests_per_measurement": args.requests,
                     "rounds": args.rounds, "client": "openai (one request at a time)"},
        "completions_per_s": {k: summary(v) for k, v in rates.items()},
        "ratio_to_raw_submit": {k: med[k] / med["raw_submit"] for k in ("http", "http_stream")},
        "overhead_ms_per_request": {k: 1e3 * (1 / med[k] - 1 / med["raw_submit"])
                                    for k in ("http", "http_stream")},
    }
    out = Path(args.out) / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for k, v in med.items():
        print(f"{k:12s} {v:7.1f} completions/s")
    for k in ("http", "http_stream"):
        print(f"{k:12s} {result['ratio_to_raw_submit'][k]:.2f}x raw submit, "
              f"+{result['overhead_ms_per_request'][k]:.1f} ms per request")
    print(f"wrote {out}")


if __name__ == "__main__":
    # Daemons, secret and synthetic model in a folder of their own, not the user's.
    os.environ.setdefault("CLUSTERD_HOME", tempfile.mkdtemp(prefix="clusterd-bench-home-"))
    main()
