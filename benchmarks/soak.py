"""Soak: N concurrent sessions on 3 local daemons for a given time, with abuse
interleaved (unauthenticated floods, headers-only callers, oversize and
garbage requests, the coordinator process killed and restarted). Records
each node's RSS (and what it is made of) after a warm-up running the same
workload, and at the end of `--duration` more, both in the same idle state
(the coordinator killed and every session freed; samples while busy swing
by several percent with the batch), and checks every finished
generation's tokens against single-process mlx-lm (greedy).

    python benchmarks/soak.py --duration 120 --sessions 4
    python benchmarks/soak.py --duration 3600 --sessions 8 --kill-every 120

Writes benchmarks/results/soak-<time>.json (with the exact command). Not a
test: it runs as long as asked, and only on this machine's loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import grpc
import psutil

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


# -- the coordinator process (killed and restarted by the soak) -------------

def coordinator(args) -> None:
    from clusterd.coordinator.generation import GenerationError, GenerationRequest, Sampling
    from clusterd.coordinator.peers import PeerError
    from clusterd.coordinator.ring import RingOptions, model_source, open_engine, open_ring

    config = json.loads((Path(args.model) / "config.json").read_text())
    layers, n = config["num_hidden_layers"], len(args.peers)
    split = ",".join(str(layers // n + (i < layers % n)) for i in range(n))
    # Every session at once in one ring: the stages batch them.
    ring = open_ring(model_source(args.model, None, print), args.peers,
                     RingOptions(split=split, context=args.context, sessions=args.sessions,
                                 draft="none", show=False), print)
    engine = open_engine(ring, "soak")
    eos = config.get("eos_token_id", 1)
    stop_ids = tuple(eos if isinstance(eos, list) else [eos])
    out = open(args.log, "a", buffering=1)
    lock = threading.Lock()

    def session(seed: int) -> None:
        rng = random.Random(seed)
        while True:
            prompt = [rng.randrange(2, config["vocab_size"]) for _ in range(rng.randint(4, 48))]
            # Every other conversation has a second turn: the prompt cache at work.
            if rng.random() < 0.5 and last[seed]:
                prompt = last[seed] + prompt[:8]
            try:
                gen = engine.submit(GenerationRequest(tuple(prompt), args.max_tokens,
                                                      Sampling(temperature=0.0), stop_ids))
                tokens = list(gen)
                row = {"prompt": prompt, "tokens": tokens, "cached": gen.stats.cached_tokens}
                last[seed] = (prompt + tokens)[: args.context // 2]
            except (GenerationError, PeerError) as e:
                row = {"prompt": prompt, "error": str(e)[:300]}
            with lock:
                out.write(json.dumps(row) + "\n")

    last: dict[int, list[int]] = {args.seed * 1000 + i: [] for i in range(args.sessions)}
    threads = [threading.Thread(target=session, args=(args.seed * 1000 + i,), daemon=True)
               for i in range(args.sessions)]
    for t in threads:
        t.start()
    print("coordinator running", flush=True)
    for t in threads:
        t.join()


# -- abuse ---------------------------------------------------------------------

def abuse_round(address: str, counts: dict) -> None:
    """One round of hostile traffic at one node; every answer is checked
    for a status (a dropped node would show as UNAVAILABLE)."""
    from clusterd.wire.channel import MAX_MESSAGE_BYTES, open_channel

    raw = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])
    try:
        futures = [raw.unary_unary("/clusterd.v1.Node/Info").future(b"", timeout=10)
                   for _ in range(50)]  # a flood without proofs
        held = threading.Event()

        def nothing():
            held.wait(5)
            yield from ()

        silent = [raw.stream_unary("/clusterd.v1.Node/Health").future(nothing(), timeout=10)
                  for _ in range(16)]  # headers, never a body
        big = raw.unary_unary("/clusterd.v1.Node/LoadShard").future(b"\x01" * (8 * 2**20),
                                                                     timeout=30)
        for f in futures + silent + [big]:
            counts[f.exception(timeout=30).code().name] += 1
        held.set()
    finally:
        raw.close()
    signed = open_channel(address)
    try:
        for body in (b"\x00" * (MAX_MESSAGE_BYTES + 1), os.urandom(200), b"\xff" * 16):
            try:
                signed.unary_unary("/clusterd.v1.Node/Forward")(body, timeout=30)
                counts["OK"] += 1
            except grpc.RpcError as e:
                counts[e.code().name] += 1
    finally:
        signed.close()


# -- the soak --------------------------------------------------------------------

def rss_of(nodes) -> dict:
    return {n.name: psutil.Process(n.pid).memory_info().rss for n in nodes}


def memory_of(nodes, peers) -> dict:
    """What the RSS is made of, per node: threads, anonymous and file-backed
    pages (the kernel's split) and what the node says its prompt cache holds."""
    out = {}
    for n, p in zip(nodes, peers):
        rollup = {}
        for line in Path(f"/proc/{n.pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, value = line.split(":", 1)
            rollup[key] = int(value.split()[0]) * 1024
        shards = p.info().shards
        out[n.name] = {"threads": psutil.Process(n.pid).num_threads(),
                       "anonymous": rollup.get("Anonymous", 0),
                       "file": rollup.get("Rss", 0) - rollup.get("Anonymous", 0),
                       "prompt_cache_bytes": sum(s.prompt_cache_bytes for s in shards),
                       "prompt_cache_entries": sum(s.prompt_cache_entries for s in shards)}
    return out


def verify(model: Path, rows: list[dict], max_tokens: int, stop_ids: list[int],
           limit: int, exact_limit: int) -> dict:
    """Each finished generation's tokens against mlx-lm fed the same prefix
    (batched passes may differ from one-at-a-time ones in the last bits),
    and how many equal mlx-lm's own greedy run exactly."""
    from mlx_lm.utils import load_model

    from clusterd.reference import mlx_lm_greedy, teacher_forced_misses

    ref_model = load_model(model)[0]
    done = [r for r in rows if "tokens" in r]
    todo = done[:limit] if limit else done
    checked, exact, mismatches = 0, 0, []
    t0 = time.monotonic()
    for row in todo:
        checked += 1
        tokens = row["tokens"]
        if len(tokens) < max_tokens:  # stopped early: the stop token must be mlx-lm's too
            tokens = [*tokens, *stop_ids[:1]]
        misses = teacher_forced_misses(model, row["prompt"], tokens, model=ref_model)
        if misses:
            mismatches.append({"prompt": row["prompt"], "got": row["tokens"], "misses": misses})
        if checked <= exact_limit:  # a whole greedy run each: the slow part, so a sample
            exact += row["tokens"] == mlx_lm_greedy(model, row["prompt"], max_tokens,
                                                    stop_ids=stop_ids, model=ref_model)
        if checked % 500 == 0:
            print(f"verified {checked}/{len(todo)} ({time.monotonic() - t0:.0f}s), "
                  f"{len(mismatches)} teacher-forcing misses", flush=True)
    return {"finished": len(done), "checked": checked, "teacher_forced_misses": len(mismatches),
            "mismatches": mismatches[:10], "exact_checked": min(checked, exact_limit),
            "exactly_mlx_lm": exact,
            "with_cached_prefix": sum(1 for r in done if r.get("cached"))}


def soak(args) -> dict:
    from collections import Counter

    from clusterd.coordinator.peers import PeerHandle
    from clusterd.local_cluster import LocalCluster
    from clusterd.models.synthetic import build_synthetic_model

    model = build_synthetic_model(args.arch, args.preset, 0)
    config = json.loads((model / "config.json").read_text())
    eos = config.get("eos_token_id", 1)
    stop_ids = eos if isinstance(eos, list) else [eos]
    work = Path(tempfile.mkdtemp(prefix="clusterd-soak-"))
    log = work / "generations.jsonl"
    counts: Counter = Counter()
    report: dict = {"command": " ".join([sys.executable, *sys.argv]), "model": str(model.name),
                    "sessions": args.sessions, "duration_s": args.duration,
                    "max_tokens": args.max_tokens}
    with LocalCluster(3, workdir=work, prefix="soak") as cluster:
        def start_coordinator() -> subprocess.Popen:
            cmd = [sys.executable, __file__, "--coordinator", "--model", str(model),
                   "--log", str(log), "--sessions", str(args.sessions),
                   "--context", str(args.context),
                   "--max-tokens", str(args.max_tokens), "--seed", str(counts["restarts"]),
                   *sum((["--peer", a] for a in cluster.addresses), [])]
            return subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                    stderr=open(work / "coordinator.log", "a"))

        peers = [PeerHandle(a) for a in cluster.addresses]

        def quiesce(proc: subprocess.Popen, label: str) -> dict:
            """Kill the coordinator, wait until every stage freed its sessions,
            then read RSS: the same idle state after warm-up and at the end."""
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(p.info().sessions for p in peers):
                time.sleep(0.2)
            time.sleep(1)
            report[f"memory_{label}"] = memory_of(cluster.nodes, peers)
            return rss_of(cluster.nodes)

        def run(proc: subprocess.Popen, seconds: float, phase: str, peak: Optional[dict] = None):
            """The workload: sessions, an abuse round every few seconds, the
            coordinator killed and restarted every `kill_every` seconds."""
            t0 = time.monotonic()
            next_kill = t0 + args.kill_every
            while time.monotonic() - t0 < seconds:
                abuse_round(random.choice(cluster.addresses), counts)
                counts["abuse_rounds"] += 1
                for name, value in rss_of(cluster.nodes).items() if peak is not None else ():
                    peak[name] = max(peak.get(name, 0), value)
                if time.monotonic() >= next_kill:
                    print(f"{phase} {time.monotonic() - t0:.0f}s of {seconds:.0f}: "
                          f"{counts['abuse_rounds']} abuse rounds, "
                          f"{sum(1 for _ in open(log)) if log.exists() else 0} generations, "
                          f"RSS MB {[round(v / 2**20) for v in rss_of(cluster.nodes).values()]}; "
                          "killing the coordinator", flush=True)
                    proc.send_signal(signal.SIGKILL)  # the coordinator vanishes mid-generation
                    proc.wait()
                    counts["coordinator_kills"] += 1
                    counts["restarts"] += 1
                    proc = start_coordinator()
                    next_kill = time.monotonic() + args.kill_every
                time.sleep(args.abuse_every)
            return proc

        # Warm-up runs the same workload (abuse included: its bursts of calls
        # grow gRPC's thread pool to its working size) before the first reading.
        proc = run(start_coordinator(), args.warmup, "warm-up")
        report["rss_busy_after_warmup"] = rss_of(cluster.nodes)
        report["rss_after_warmup"] = quiesce(proc, "after_warmup")
        counts["coordinator_kills"] += 1
        counts["restarts"] += 1
        peak: dict = {}
        proc = run(start_coordinator(), args.duration, "soak", peak)
        report["rss_at_end"] = quiesce(proc, "at_end")
        report["sessions_left_after_coordinator_gone"] = sum(len(p.info().sessions)
                                                            for p in peers)
        report["nodes_healthy_at_end"] = all(p.health().state == "ready" for p in peers)
        for p in peers:
            p.close()
        report["rss_growth"] = {k: report["rss_at_end"][k] / v - 1
                                for k, v in report["rss_after_warmup"].items()}
        report["rss_peak_sampled"] = peak
        report["exit_codes"] = [n.stop() for n in cluster.nodes]
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    report["abuse_answers"] = dict(counts)
    report["generation_errors"] = sum(1 for r in rows if "error" in r)
    report["verification"] = verify(model, rows, args.max_tokens, stop_ids,
                                    args.verify_limit, args.exact_limit)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=120.0,
                   help="seconds of soak after the warm-up (RSS compared across them)")
    p.add_argument("--sessions", type=int, default=4, help="concurrent sessions")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--context", type=int, default=512, help="tokens per session the ring plans")
    p.add_argument("--arch", default="deepseek_v3")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--warmup", type=float, default=60.0,
                   help="seconds of the same workload before the first RSS reading")
    p.add_argument("--abuse-every", type=float, default=2.0)
    p.add_argument("--kill-every", type=float, default=40.0, help="coordinator kill period, s")
    p.add_argument("--verify-limit", type=int, default=0,
                   help="generations checked at most (0: every one)")
    p.add_argument("--exact-limit", type=int, default=1000,
                   help="of those, how many are also compared with a whole mlx-lm greedy run")
    p.add_argument("--out", type=Path, default=None)
    # The coordinator process's own arguments.
    p.add_argument("--coordinator", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--peer", dest="peers", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--log", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.coordinator:
        coordinator(args)
        return
    report = soak(args)
    out = args.out or RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("verification", "rss_after_warmup", "rss_at_end",
                                              "rss_growth", "sessions_left_after_coordinator_gone",
                                              "exit_codes")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
