"""Where a decode step's time goes in a running ring: py-spy samples every
daemon of a 3-stage ring (and the coordinator) while one stream decodes, and
each sample is put in one bucket by the innermost clusterd or mlx-lm frame
on the compute thread, the link threads and the RPC threads.

    pip install -e '.[bench]'     # py-spy
    python benchmarks/profile_ring.py --preset tiny --seconds 15

Writes benchmarks/results/profile-<preset>.json (with the exact command) and
prints the shares per process. A profile, not a guess: it says which part of
the hop and the step to work on next.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

EVAL = ("mx.eval(", ".tolist()", ".item()", "mx.async_eval(")
WAIT = ("self._cond.wait(", "f.read(", ".get(timeout", "q.get(", "self._queue.get(",
        "wait(", "accept(", "select(")


def _source(path: str, line: int) -> str:
    """The text of a sampled frame's line (py-spy gives paths from the
    package root: clusterd/..., mlx_lm/...)."""
    import linecache

    import mlx_lm

    for root in (HERE.parent, Path(mlx_lm.__file__).parent.parent):
        text = linecache.getline(str(root / path), line)
        if text:
            return text
    return ""


def bucket(frames: list[tuple[str, str, int]]) -> str:
    """frames: (function, path, line), outermost first."""
    fn, path, line = frames[-1]
    text = _source(path, line)
    if any(k in text for k in EVAL):
        return "compute: waiting for MLX to evaluate"
    if any(k in text for k in WAIT):
        return "idle: waiting for work (a frame, a job, an event)"
    for _, p, _ in reversed(frames):
        if p.startswith(("mlx_lm/models", "clusterd/models/", "mlx/nn")):
            return "graph: building the stage's MLX graph"
        if p.startswith(("clusterd/node/last_stage", "clusterd/node/sampling",
                         "clusterd/speculative", "mlx_lm/sample_utils")):
            return "sampling and verification"
        if p.startswith("clusterd/node/link"):
            return "link: frames in and out"
        if p.startswith(("clusterd/node/executor", "clusterd/node/batching",
                         "clusterd/node/checks", "clusterd/node/sessions",
                         "clusterd/node/events", "clusterd/wire/tensors")):
            return "executor: queues and bookkeeping"
        if p.startswith(("grpc/", "clusterd/node/session_rpcs", "clusterd/node/guard",
                         "clusterd/proofs", "clusterd/coordinator/peers",
                         "clusterd/coordinator/pipeline")):
            return "gRPC: event streams and calls"
    return "other (interpreter, thread start-up, mDNS, ...)"


def _frames(stack: str) -> list[tuple[str, str, int]]:
    out = []
    for f in stack.split(";"):
        fn, _, where = f.partition(" (")
        path, _, line = where.rstrip(")").rpartition(":")
        out.append((fn, path, int(line) if line.isdigit() else 0))
    return out


def summarize(raw: Path) -> dict:
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit() or not stack:
            continue
        counts[bucket(_frames(stack))] += int(n)
        total += int(n)
    return {"samples": total, "shares": {k: v / total for k, v in counts.most_common()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rate", type=int, default=500, help="samples per second")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy is needed: pip install -e '.[bench]'")
    from clusterd.coordinator.cluster import connect, load_ring, ranges_from_counts
    from clusterd.coordinator.generation import GenerationStats, Sampling
    from clusterd.coordinator.pipeline import Pipeline
    from clusterd.local_cluster import LocalCluster
    from clusterd.models.stage import read_config
    from clusterd.models.synthetic import build_synthetic_model

    model = build_synthetic_model("deepseek_v3", args.preset, 0)
    layers = read_config(model)["num_hidden_layers"]
    split = [layers // 3 + (i < layers % 3) for i in range(3)]
    work = Path(tempfile.mkdtemp(prefix="clusterd-profile-"))
    prompt = list(range(5, 37))
    report: dict = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": model.name,
                    "split": split, "processes": {}}
    with LocalCluster(3, workdir=work) as cluster:
        pipe = Pipeline(load_ring(model, connect(cluster.addresses), ranges_from_counts(split)))
        list(pipe.generate(prompt, 16, Sampling(temperature=0.0)))  # warm-up
        pids = {f"stage {i} ({n.name})": n.pid for i, n in enumerate(cluster.nodes)}
        pids["coordinator (this process)"] = os.getpid()
        spies = {name: subprocess.Popen(
            [spy, "record", "-p", str(pid), "-o", str(work / f"{pid}.txt"), "-f", "raw",
             "-d", str(int(args.seconds)), "-r", str(args.rate), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in pids.items()}
        time.sleep(0.5)
        t0, rates = time.monotonic(), []
        while time.monotonic() - t0 < args.seconds - 1:
            st = GenerationStats()
            list(pipe.generate(prompt, 128, Sampling(temperature=0.0), stats=st))
            rates.append(st.decode_tok_s)
        for p in spies.values():
            p.wait()
        pipe.close()
    report["decode_tok_s"] = rates
    for name, pid in pids.items():
        raw = work / f"{pid}.txt"
        report["processes"][name] = summarize(raw) if raw.exists() else {"error": "no samples"}
    out = args.out or RESULTS / f"profile-{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in report["processes"].items():
        print(name)
        for k, v in r.get("shares", {}).items():
            print(f"  {v:6.1%}  {k}")
    print(f"decode tok/s (one stream, 3 stages): {sorted(rates)[len(rates) // 2]:.1f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
