"""mlx-lm itself, as the benchmark's baseline: one long-lived process (or, with
--pipeline, one process per rank under `mlx.launch --backend ring`) that loads
the model once and answers generation requests read from stdin.

Protocol, one JSON object per line:
  in:  {"prompt": [ids], "max_tokens": n, "prefill_step_size": s}   or   {"quit": true}
       or, single process only, {"op": NAME, "args": {...}}: one of the serving
       measurements in clusterd/bench/mlx_batch.py (batch, interleave, turns,
       forward_k, teacher_force), answered with that function's result
  out: {"ready": true, "rank": r, "size": n, "pid": p, "load_s": t, "layers": [a, b]}
       {"rank": r, "ttft_s": t, "decode_s": t, "tokens": [...], "token_times": [...],
        "rss_bytes": n}
Under mlx.launch every rank reads the same stdin (the launcher broadcasts it)
and every rank answers, so the parent collects one line per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _load(path: Path, pipeline: bool, split: list[int] | None):
    import mlx.core as mx
    from mlx_lm.utils import load_model

    if not pipeline:
        model, _ = load_model(path)
        return model, 0, 1, (0, len(model.model.layers))
    group = mx.distributed.init(backend="ring", strict=True)
    # mlx-lm's sharded_load, with the split given explicitly so the stages are
    # the same as the clusterd layout's: rank 0 holds the LAST layers.
    model, _ = load_model(path, lazy=True, strict=False)
    by_rank = list(reversed(split)) if split else None
    model.model.pipeline(group, by_rank)
    mx.eval(model.parameters())
    mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))  # everyone loaded
    return model, group.rank(), group.size(), (model.model.start_idx, model.model.end_idx)


def _generate(model, prompt: list[int], max_tokens: int, prefill_step_size: int) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    tokens, times = [], []
    t0 = time.perf_counter()
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens,
                                  prefill_step_size=prefill_step_size):
        times.append(time.perf_counter() - t0)
        tokens.append(int(token))
    return {
        "ttft_s": times[0],
        "decode_s": times[-1] - times[0],
        "tokens": tokens,
        "token_times": times,
    }


def _serving_op(model, name: str, args: dict) -> dict:
    from clusterd.bench import mlx_batch

    ops = {"batch": mlx_batch.batch, "interleave": mlx_batch.interleave,
           "turns": mlx_batch.turns, "forward_k": mlx_batch.forward_k,
           "teacher_force": mlx_batch.teacher_force}
    if name not in ops:
        raise ValueError(f"unknown op {name!r}; one of {', '.join(ops)}")
    return ops[name](model, **args)


def _rss() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--pipeline", action="store_true")
    ap.add_argument("--split", default="", help="layers per stage, first stage first")
    args = ap.parse_args(argv)
    split = [int(x) for x in args.split.split(",")] if args.split else None

    t0 = time.perf_counter()
    model, rank, size, layers = _load(args.model, args.pipeline, split)
    out = sys.stdout

    def say(obj: dict) -> None:
        # One write per line, so the launcher never interleaves two ranks mid-line.
        out.write(json.dumps(obj) + "\n")
        out.flush()

    say({"ready": True, "rank": rank, "size": size, "pid": os.getpid(),
         "load_s": time.perf_counter() - t0, "layers": list(layers)})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        req = json.loads(line)
        if req.get("quit"):
            break
        try:
            if "op" in req:
                if args.pipeline:
                    raise ValueError("serving measurements run in one process, not a ring")
                res = _serving_op(model, req["op"], req.get("args", {}))
            else:
                res = _generate(model, req["prompt"], int(req["max_tokens"]),
                                int(req.get("prefill_step_size", 2048)))
        except Exception as e:  # reported to the parent, which shows it
            res = {"error": f"{type(e).__name__}: {e}"}
        say({"rank": rank, **res, "rss_bytes": _rss()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
