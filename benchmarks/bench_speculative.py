"""What the parts of speculative decoding cost, in one process, on a synthetic model:
the MTP layer's conversion, a draft (k = 1 and chained), the target's forward over k+1
tokens against one, verification, and prompt lookup on a long history.

    python benchmarks/bench_speculative.py [--preset bench] [--out benchmarks/results]

Synthetic weights are random, so acceptance rates mean nothing here (R1's MTP layer is
reported at 85-90% for the second token); only times do. Check `uptime` first.
"""

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from clusterd.models import mtp_convert
from clusterd.models.mtp import MtpDrafter, load_main_embedding
from clusterd.models.synthetic import build_synthetic_model
from clusterd.models.synthetic_mtp import build_synthetic_original
from clusterd.speculative.ngram import PromptLookup
from clusterd.speculative.sampling import SamplingParams
from clusterd.speculative.verify import verify

R1_SAMPLING = SamplingParams(0.6, top_p=0.95)


def timed(fn, repeats):
    fn()  # warm-up: compiles, allocates the cache
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def target_forward(model, prompt, repeats):
    """Milliseconds for the target's forward over n = 1..4 tokens after `prompt`."""
    cache = make_prompt_cache(model)
    for i in range(0, len(prompt), 512):
        mx.eval(model(mx.array([prompt[i:i + 512]]), cache=cache))
    base = cache[0].offset

    def step(n):
        def run():
            trim_prompt_cache(cache, cache[0].offset - base)
            mx.eval(model(mx.array([prompt[:n]]), cache=cache))
        return run

    return {n: timed(step(n), repeats) for n in (1, 2, 3, 4)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--long-context", type=int, default=2048,
                    help="also time the target's k+1 forward after this many tokens")
    ap.add_argument("-r", "--repeats", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    results = {"command": shlex.join(["python", *sys.argv]), "preset": args.preset,
               "load_average": os.getloadavg(), "prompt_tokens": args.prompt_tokens}

    main_dir = build_synthetic_model("deepseek_v3", args.preset, 0)
    original = build_synthetic_original(args.preset, 0)
    config = json.loads((main_dir / "config.json").read_text())
    out = Path(main_dir).parent / f"mtp-bench-{args.preset}"
    t0 = time.perf_counter()
    source = mtp_convert.convert(original, config, out, "synthetic/original", "0" * 40)
    results["convert_s"] = time.perf_counter() - t0
    results["mtp_bytes"] = source.weight_bytes

    model, _ = load(str(main_dir))
    results["model_bytes"] = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    rng = random.Random(0)
    prompt = [rng.randrange(config["vocab_size"]) for _ in range(args.prompt_tokens)]
    results["target_forward_ms"] = target_forward(model, prompt, args.repeats)
    # mlx-lm's MLA attention takes its absorbed path only for one token; a chunk of 2+
    # re-expands the whole latent cache per head, so its cost grows with the context.
    long = [rng.randrange(config["vocab_size"]) for _ in range(args.long_context)]
    results["target_forward_ms_long_context"] = target_forward(model, long, 3)

    drafter = MtpDrafter.load(out, config, load_main_embedding(main_dir), model.lm_head)
    hidden = config["hidden_size"]
    h_prompt = mx.random.normal((args.prompt_tokens, hidden), key=mx.random.key(0)).astype(
        model.model.norm.weight.dtype)
    state = drafter.new_state()
    drafter.extend(state, h_prompt, prompt)
    start = state.offset

    def draft(n, k, params=SamplingParams()):
        def run():
            state.rewind(start)
            drafter.draft(state, h_prompt[:n], prompt[:n], k=k, params=params,
                          key=mx.random.key(1))
        return run

    results["mtp_draft_ms"] = {
        "n1_k1": timed(draft(1, 1), args.repeats),
        "n2_k1": timed(draft(2, 1), args.repeats),
        "n1_k3_chained": timed(draft(1, 3), args.repeats),
        "n1_k1_sampled": timed(draft(1, 1, R1_SAMPLING), args.repeats),
    }

    vocab = config["vocab_size"]
    rows = mx.random.normal((4, vocab), key=mx.random.key(2)) * 4
    rows = rows - mx.logsumexp(rows, axis=-1, keepdims=True)
    mx.eval(rows)
    results["verify_ms"] = {
        f"{mode}_k{k}": timed(lambda k=k, p=p: verify(rows[:k + 1], list(range(k)), p,
                                                      mx.random.key(3)), args.repeats)
        for mode, p in (("greedy", SamplingParams()), ("sampled", R1_SAMPLING))
        for k in (0, 1, 3)}

    lookup = PromptLookup([rng.randrange(vocab) for _ in range(100_000)])
    t0 = time.perf_counter()
    for _ in range(10_000):
        lookup.extend([rng.randrange(vocab)])
        lookup.propose(3)
    results["ngram_us_per_token_100k_history"] = (time.perf_counter() - t0) / 10_000 * 1e6

    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"speculative-{args.preset}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
