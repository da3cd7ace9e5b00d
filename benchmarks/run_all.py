"""Every run whose results are committed in benchmarks/results/ (the README, "Benchmarks"
quotes them), one after another. Check `uptime` first: on a shared machine,
run when the load average is low.

    python benchmarks/run_all.py [--out benchmarks/results]
"""

import argparse
import os
import subprocess
import sys

RUNS = {
    # The few-hundred-MB model: decode and TTFT per layout, both baselines.
    "layouts-bench": ["--preset", "bench", "--nodes", "1,2,3", "-r", "5", "--no-hop"],
    # A few MB: hops dominate.
    "layouts-tiny": ["--preset", "tiny", "--nodes", "1,2,3", "-r", "5", "--prompt-tokens", "32",
                     "--new-tokens", "128", "--no-hop"],
    # A 2048-token prompt in 256-token chunks that the stages overlap.
    "prefill-tiny-2048": ["--preset", "tiny", "--nodes", "1,3", "-r", "3",
                          "--prompt-tokens", "2048", "--new-tokens", "8",
                          "--prefill-step-size", "256", "--no-hop"],
    "hop": ["--hop-only"],
    "predict": ["--predict"],  # after "hop": it uses the measured hop overhead
}

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", nargs="*", choices=list(RUNS), default=list(RUNS))
    args = ap.parse_args()
    print("load average:", os.getloadavg(), flush=True)
    for name in args.only:
        cmd = [sys.executable, "-m", "clusterd", "bench", *RUNS[name], "--out", args.out,
               "--name", name]
        print("$", " ".join(["clusterd", *cmd[3:]]), flush=True)
        subprocess.run(cmd, check=True)
