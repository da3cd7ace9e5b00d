"""`clusterd bench --interleave-prompt 2000`: while --streams streams decode
on a layout, one long prompt arrives. The running streams' inter-token
intervals before, during and after its prefill (p50/p99 of each phase), and
its time to first token; the same scenario in mlx-lm's BatchGenerator in one
process, which runs each prefill chunk between two decode steps.

An interval belongs to "during" when it overlaps the prefill at all (from
the long prompt's submission to its first token): the stall a reader sees
is the interval that straddles it."""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

from rich.console import Console

from clusterd.bench.concurrency import stream_lengths
from clusterd.bench.engine_layout import EngineLayout, Stream, StreamRun
from clusterd.bench.modes import (ServingConfig, Setup, distinct_prompt, measure_layouts,
                                  ms_summary, ordered, rotate, stream_run, teacher_force)
from clusterd.bench.runs import SubjectInfo
from clusterd.bench.stats import summary
from clusterd.coordinator.ring import RingOptions

LONG_TOKENS = 2  # the long prompt's answer: only its first token matters here
WAIT_S = 3600.0  # a stream that makes no progress this long fails the run


def phases(streams: Sequence[StreamRun], submitted: float, first: float) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"before": [], "during": [], "after": []}
    for s in streams:
        for a, b in s.intervals:
            key = "before" if b <= submitted else "after" if a >= first else "during"
            out[key].append(b - a)
    return out


def run_interleave(cfg: ServingConfig, console: Console, workdir: Optional[Path] = None) -> dict:
    setup = Setup(cfg, "interleave", console, workdir)
    lengths = stream_lengths(cfg.prompt_tokens, cfg.streams)
    # Each stream decodes --new-tokens before the long prompt arrives and again
    # after its first token; room for as many more while it is prefilled.
    budget = 2 * cfg.new_tokens + cfg.long_prompt
    opts = RingOptions(context=max(max(lengths) + budget, cfg.long_prompt + LONG_TOKENS) + 1,
                       sessions=cfg.streams + 1, prefill_step_size=cfg.prefill_step_size)
    result = setup.header({"streams": cfg.streams, "prompt_lengths": lengths,
                           "long_prompt": cfg.long_prompt, "tokens_before": cfg.new_tokens,
                           "tokens_after": cfg.new_tokens, "prefill_step_size": cfg.prefill_step_size,
                           "ring": {"context": opts.context, "sessions": opts.sessions}})
    mlx = setup.mlx_lm()
    book: dict[str, dict] = {}
    salts = itertools.count(1)
    try:
        baseline = [_MlxInterleave(mlx, cfg.prefill_step_size)] if mlx else []
        measure_layouts(setup, EngineLayout.factory(setup.model_dir, opts), result,
                        lambda layouts: _measure(setup, [*layouts, *baseline], lengths,
                                                 budget, book, salts))
        with setup.console.status("checking tokens") as status:
            pairs = [(s.prompt, s.tokens) for b in book.values() for rnd in b["rounds"]
                     for s in [*rnd[0], rnd[1]]]
            misses = teacher_force(mlx, pairs, lambda t: status.update(t))
    finally:
        if mlx is not None:
            mlx.close()
    result["subjects"] = ordered(_summarize(book, misses))
    return setup.finish(result)


class _MlxInterleave:
    def __init__(self, mlx, prefill_step_size: int):
        self.mlx, self.step = mlx, prefill_step_size
        self.info = SubjectInfo("mlx-lm batched, 1 process", "mlx-lm-batched", 1,
                                list(mlx.info.split))

    def scenario(self, prompts, long_prompt, before: int, after: int, max_tokens: int):
        res = self.mlx.op("interleave", prompts=prompts, long_prompt=long_prompt,
                          max_tokens=max_tokens, long_tokens=LONG_TOKENS, before=before,
                          after=after, prefill_step_size=self.step)
        return ([stream_run(p, s) for p, s in zip(prompts, res["streams"])],
                stream_run(long_prompt, res["long"]))


def _engine_scenario(layout: EngineLayout, prompts, long_prompt, before: int, after: int,
                     max_tokens: int) -> tuple[list[StreamRun], StreamRun]:
    streams = [Stream(layout.engine, p, max_tokens) for p in prompts]
    long = Stream(layout.engine, long_prompt, LONG_TOKENS)
    t0 = time.monotonic()
    for s in streams:
        s.start(t0)
    try:
        for s in streams:
            s.wait_until(lambda r: len(r.tokens) >= before, WAIT_S)
        long.start(t0)
        long.wait_until(lambda r: bool(r.tokens), WAIT_S)
        first = long.run.token_times[0] if long.run.token_times else float("inf")
        for s in streams:
            s.wait_until(lambda r: sum(t > first for t in r.token_times) >= after, WAIT_S)
    except BaseException:
        long.cancel()
        raise
    finally:
        for s in streams:
            s.cancel()
    runs = [s.join(60) for s in streams]
    return runs, long.join(WAIT_S)


def _measure(setup: Setup, subjects: list, lengths: list[int], budget: int, book: dict,
             salts) -> None:
    cfg = setup.cfg
    for subj in subjects:
        book.setdefault(subj.info.name, {"info": subj.info, "rounds": [], "error": ""})
    rounds = cfg.warmup + cfg.repetitions
    with setup.progress() as p:
        task = p.add_task("measuring", total=rounds * len(subjects))
        for r in range(rounds):
            warm = r < cfg.warmup
            label = "warm-up" if warm else f"round {r - cfg.warmup + 1}/{cfg.repetitions}"
            prompts = [distinct_prompt(n, setup.vocab, next(salts)) for n in lengths]
            long_prompt = distinct_prompt(cfg.long_prompt, setup.vocab, next(salts))
            for subj in rotate(subjects, r):
                entry = book[subj.info.name]
                p.update(task, description=f"{label}: {subj.info.name}")
                if not entry["error"]:
                    try:
                        if isinstance(subj, EngineLayout):
                            runs, long = _engine_scenario(subj, prompts, long_prompt,
                                                          cfg.new_tokens, cfg.new_tokens, budget)
                        else:
                            runs, long = subj.scenario(prompts, long_prompt, cfg.new_tokens,
                                                       cfg.new_tokens, budget)
                        failed = next((s.error for s in [*runs, long] if s.error), "")
                        if failed:
                            raise RuntimeError(failed)
                        if not warm:
                            entry["rounds"].append((runs, long))
                    except Exception as e:  # one failed subject must not end the run
                        entry["error"] = f"{type(e).__name__}: {e}"
                p.advance(task)


def _summarize(book: dict, misses: Optional[list[int]]) -> list[dict]:
    it = iter(misses) if misses is not None else None
    out = []
    for name, entry in book.items():
        info, rounds = entry["info"], entry["rounds"]
        pooled: dict[str, list[float]] = {"before": [], "during": [], "after": []}
        ttft, during_tokens = [], []
        for runs, long in rounds:
            submitted, first = long.submitted, long.token_times[0]
            for k, v in phases(runs, submitted, first).items():
                pooled[k] += v
            ttft.append(long.ttft_s)
            during_tokens.append(statistics.median(
                sum(submitted < t <= first for t in s.token_times) for s in runs))
        checked = None
        if it is not None:
            checked = sum(next(it) for runs, long in rounds for _ in [*runs, long])
        out.append({"name": name, "kind": info.kind, "stages": info.stages, "split": info.split,
                    "error": entry["error"],
                    "intervals": {k: ms_summary(v) for k, v in pooled.items()},
                    "long_ttft_s": summary(ttft), "tokens_during_prefill": summary(during_tokens),
                    "teacher_forced_misses": checked})
    return out
