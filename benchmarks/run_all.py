"""Every run whose results are committed in benchmarks/results/ (the README, "Benchmarks"
quotes them), one after another, each `clusterd bench` command printed before it runs (and
recorded in its JSON). Check `uptime` first: on a shared machine, run when the load average
is low. The bench preset's prefill runs at ~8 tokens/s on a 2-core CPU, so its long-prompt
runs use shorter prompts than the tiny preset's; all of it takes a few hours there.

    python benchmarks/run_all.py [--out benchmarks/results] [--only NAME ...] [--list]
"""

import argparse
import os
import shlex
import subprocess
import sys
import time

TINY, BENCH = ["--preset", "tiny"], ["--preset", "bench"]
RUNS = {
    # The few-hundred-MB model: decode and TTFT per layout, both baselines.
    "layouts-bench": [*BENCH, "--nodes", "1,2,3", "-r", "5", "--no-hop"],
    # A few MB: hops dominate.
    "layouts-tiny": [*TINY, "--nodes", "1,2,3", "-r", "5", "--prompt-tokens", "32",
                     "--new-tokens", "128", "--no-hop"],
    # A 2048-token prompt in 256-token chunks that the stages overlap.
    "prefill-tiny-2048": [*TINY, "--nodes", "1,3", "-r", "3", "--prompt-tokens", "2048",
                          "--new-tokens", "8", "--prefill-step-size", "256", "--no-hop"],
    "hop": ["--hop-only"],
    "hop-bfloat16": ["--hop-only", "--dtype", "bfloat16"],
    "predict": ["--predict"],  # after "hop": it uses the measured hop overhead
    # Streams at once through the engine, against mlx-lm's batched generation.
    "concurrency-tiny": [*TINY, "--concurrency", "1,2,4,8", "--nodes", "1,3", "-r", "5",
                         "--prompt-tokens", "32", "--new-tokens", "128"],
    "concurrency-bench": [*BENCH, "--concurrency", "1,2,4,8", "--nodes", "1,3", "-r", "3",
                          "--prompt-tokens", "32", "--new-tokens", "32"],
    # 4 streams decoding while a long prompt is prefilled.
    "interleave-tiny": [*TINY, "--interleave-prompt", "2000", "--nodes", "1,3", "-r", "3",
                        "--prompt-tokens", "32", "--new-tokens", "32"],
    "interleave-bench": [*BENCH, "--interleave-prompt", "512", "--nodes", "1,3", "-r", "3",
                         "--prompt-tokens", "16", "--new-tokens", "16"],
    # Turn 2 of a chat, with the prompt cache and without.
    "cache-turns-tiny": [*TINY, "--cache-turns", "2000", "--nodes", "1,3", "-r", "3",
                         "--prompt-tokens", "32", "--new-tokens", "16"],
    "cache-turns-bench": [*BENCH, "--cache-turns", "256", "--nodes", "1,3", "-r", "2",
                          "--prompt-tokens", "16", "--new-tokens", "8"],
    # One trip carrying 1-4 tokens: what speculation buys.
    "trips-bench": [*BENCH, "--trip-tokens", "1,2,3,4", "--nodes", "1,3", "-r", "3",
                    "--trips", "20", "--prompt-tokens", "64"],
    "trips-tiny": [*TINY, "--trip-tokens", "1,2,3,4", "--nodes", "1,3", "-r", "5",
                   "--trips", "50", "--prompt-tokens", "64"],
    # mlx-lm's MLA attention re-expands its cache for chunks of 2+: the cost grows with context.
    "trips-tiny-1024": [*TINY, "--trip-tokens", "1,2,3,4", "--nodes", "1,3", "-r", "5",
                        "--trips", "50", "--prompt-tokens", "1024"],
}

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", nargs="*", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--list", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args()
    print("load average:", os.getloadavg(), flush=True)
    for i, name in enumerate(args.only, 1):
        cmd = [sys.executable, "-m", "clusterd", "bench", *RUNS[name], "--out", args.out,
               "--name", name]
        print(f"[{i}/{len(args.only)}] $", shlex.join(["clusterd", *cmd[3:]]), flush=True)
        if args.list:
            continue
        t0 = time.monotonic()
        subprocess.run(cmd, check=True)
        print(f"[{i}/{len(args.only)}] {name}: {time.monotonic() - t0:.0f}s, load average "
              f"{os.getloadavg()}", flush=True)
