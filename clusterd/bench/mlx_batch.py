"""mlx-lm in one process, for the serving benchmarks (run inside the
baseline worker, clusterd/bench/mlx_worker.py): mlx-lm's own batched
generation (BatchGenerator, what `mlx_lm.generate.batch_generate` drives)
timed per stream; a long prompt arriving while streams decode; a second
chat turn with and without mlx-lm's prompt cache; the model's forward over
k tokens at a fixed context; and the teacher-forcing check of tokens.

Every time is in seconds from the start of the request, on this process's
clock. Greedy, no stop tokens, as clusterd runs in the bench."""

from __future__ import annotations

import time
from typing import Sequence

import mlx.core as mx


def _generator(model, streams: int, prefill_step_size: int):
    from mlx_lm.generate import BatchGenerator

    # Every stream prefills and decodes in one batch (mlx-lm's defaults cap
    # the prefill batch at 8).
    return BatchGenerator(model, stop_tokens=None, completion_batch_size=streams,
                          prefill_batch_size=streams, prefill_step_size=prefill_step_size)


class _Timed:
    """Drives a BatchGenerator, keeping each uid's tokens and their times."""

    def __init__(self, gen, t0: float):
        self.gen, self.t0 = gen, t0
        self.tokens: dict[int, list[int]] = {}
        self.times: dict[int, list[float]] = {}
        self.finished: set[int] = set()

    def insert(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[int]:
        uids = self.gen.insert([list(p) for p in prompts], [max_tokens] * len(prompts))
        for u in uids:
            self.tokens[u], self.times[u] = [], []
        return uids

    def step(self) -> None:
        _, responses = self.gen.next()
        now = time.perf_counter() - self.t0
        for r in responses:
            self.tokens[r.uid].append(int(r.token))
            self.times[r.uid].append(now)
            if r.finish_reason is not None:
                self.finished.add(r.uid)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def stream(self, uid: int, submitted: float = 0.0) -> dict:
        return {"tokens": self.tokens[uid], "token_times": self.times[uid],
                "submitted": submitted}


def batch(model, prompts: list[list[int]], max_tokens: int, prefill_step_size: int) -> dict:
    """All prompts inserted at once, stepped until every stream has its tokens."""
    gen = _generator(model, len(prompts), prefill_step_size)
    try:
        run = _Timed(gen, time.perf_counter())
        uids = run.insert(prompts, max_tokens)
        while len(run.finished) < len(uids):
            run.step()
        return {"streams": [run.stream(u) for u in uids], "wall_s": run.now()}
    finally:
        gen.close()


def interleave(model, prompts: list[list[int]], long_prompt: list[int], max_tokens: int,
               long_tokens: int, before: int, after: int, prefill_step_size: int) -> dict:
    """Streams decode; once each has `before` tokens the long prompt is
    inserted; after its first token, each stream decodes `after` more."""
    gen = _generator(model, len(prompts) + 1, prefill_step_size)
    try:
        run = _Timed(gen, time.perf_counter())
        uids = run.insert(prompts, max_tokens)

        def live() -> list[int]:
            return [u for u in uids if u not in run.finished]

        while any(len(run.tokens[u]) < before for u in live()):
            run.step()
        submitted = run.now()
        (lu,) = run.insert([long_prompt], long_tokens)
        while not run.tokens[lu]:
            run.step()
        first = run.times[lu][0]
        while any(sum(t > first for t in run.times[u]) < after for u in live()):
            run.step()
        gen.remove(live() + ([lu] if lu not in run.finished else []))
        return {"streams": [run.stream(u) for u in uids],
                "long": run.stream(lu, submitted), "submitted_s": submitted}
    finally:
        gen.close()


def turns(model, first: list[int], follow: list[int], new_tokens: int,
          prefill_step_size: int) -> dict:
    """Turn 1, then turn 2 (turn 1, its answer and `follow`) twice: with a
    fresh cache, and continuing turn 1's cache (mlx-lm's own prompt reuse)."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    def gen(ids: list[int], cache) -> tuple[list[int], float]:
        t0 = time.perf_counter()
        out, ttft = [], 0.0
        for tok, _ in generate_step(mx.array(ids), model, max_tokens=new_tokens,
                                    prompt_cache=cache, prefill_step_size=prefill_step_size):
            if not out:
                ttft = time.perf_counter() - t0
            out.append(int(tok))
        return out, ttft

    cache = make_prompt_cache(model)
    answer, ttft1 = gen(first, cache)
    second = [*first, *answer, *follow]
    fresh, ttft_fresh = gen(second, make_prompt_cache(model))
    held = cache[0].offset  # turn 1's prompt and (all or all but one of) its answer
    reused, ttft_cached = gen(second[held:], cache)
    return {"turn1": {"tokens": answer, "ttft_s": ttft1},
            "turn2_fresh": {"tokens": fresh, "ttft_s": ttft_fresh},
            "turn2_cached": {"tokens": reused, "ttft_s": ttft_cached, "cached_tokens": held}}


def forward_k(model, prompt: list[int], chunk: list[int], widths: list[int], repetitions: int,
              prefill_step_size: int) -> dict:
    """Seconds for the model over chunk[:k] after `prompt` (and the head's
    argmax of the last position, as a node samples), the cache cut back to the
    prompt each time; widths interleaved, repetitions rotating their order."""
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    cache = make_prompt_cache(model)
    for i in range(0, len(prompt), prefill_step_size):
        mx.eval(model(mx.array([prompt[i:i + prefill_step_size]]), cache=cache))
    base = cache[0].offset
    out: dict[int, list[float]] = {k: [] for k in widths}
    for r in range(repetitions + 1):  # the first pass warms up
        order = widths[r % len(widths):] + widths[:r % len(widths)]
        for k in order:
            t0 = time.perf_counter()
            logits = model(mx.array([chunk[:k]]), cache=cache)
            mx.eval(mx.argmax(logits[:, -1, :], axis=-1))
            if r:
                out[k].append(time.perf_counter() - t0)
            trim_prompt_cache(cache, cache[0].offset - base)
    return {"seconds": {str(k): v for k, v in out.items()}}


def teacher_force(model, items: list[list[list[int]]], tolerance: float) -> dict:
    """Each [prompt, tokens]: the tokens that are not mlx-lm's argmax there
    (clusterd.reference's rule)."""
    from clusterd.reference import teacher_forced_misses

    return {"misses": [[list(m) for m in teacher_forced_misses(None, p, t, tolerance, model=model)]
                       for p, t in items]}
