"""`clusterd bench --concurrency 1,2,4,8`: C streams started at once through
the real engine, per layout, next to mlx-lm's own batched generation in one
process on the same prompts (and single-process mlx-lm at C = 1).

One ring per layout, loaded for max(C) sessions so every stream of a batch
runs at once. In each round every concurrency runs on every subject, the
order rotating; prompts are distinct (no prompt cache helps) and of a few
lengths around --prompt-tokens, the same for every subject within a round.
Afterwards every stream's tokens are checked against mlx-lm fed the same
prefix (the teacher-forcing rule)."""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path
from typing import Optional

from rich.console import Console

from clusterd.bench.engine_layout import EngineLayout, StreamRun
from clusterd.bench.modes import (MlxBatched, MlxSingle, ServingConfig, Setup, distinct_prompt,
                                  measure_layouts, ordered, ratio, rotate, teacher_force)
from clusterd.bench.stats import percentile, summary
from clusterd.coordinator.ring import RingOptions

# Prompt lengths of a batch's streams, as fractions of --prompt-tokens.
LENGTHS = (1.0, 0.5, 1.5, 0.75)


def stream_lengths(base: int, n: int) -> list[int]:
    return [max(2, round(base * LENGTHS[i % len(LENGTHS)])) for i in range(n)]


def run_concurrency(cfg: ServingConfig, console: Console, workdir: Optional[Path] = None) -> dict:
    setup = Setup(cfg, "concurrency", console, workdir)
    cs = cfg.concurrency
    lengths = stream_lengths(cfg.prompt_tokens, max(cs))
    opts = RingOptions(context=max(lengths) + cfg.new_tokens + 1, sessions=max(cs),
                       prefill_step_size=cfg.prefill_step_size)
    result = setup.header({"concurrency": list(cs), "prompt_lengths": lengths,
                           "new_tokens": cfg.new_tokens,
                           "prefill_step_size": cfg.prefill_step_size,
                           "ring": {"context": opts.context, "sessions": opts.sessions,
                                    "prompt_cache_tokens": opts.cache_tokens}})
    result["baseline"] = "mlx-lm batched, 1 process"
    book = _Book()
    mlx = setup.mlx_lm()
    try:
        def measure(layouts: list[EngineLayout]) -> None:
            _measure(setup, layouts, mlx, lengths, book)
            for lay in layouts:
                book.memory[lay.info.name] = lay.memory()

        measure_layouts(setup, EngineLayout.factory(setup.model_dir, opts), result, measure)
        with setup.console.status("checking tokens") as status:
            _check(book, mlx, lambda t: status.update(t))
    finally:
        if mlx is not None:
            mlx.close()
    result["subjects"] = ordered(_summarize(book, cs))
    return setup.finish(result)


class _Book:
    """Everything measured: per subject and concurrency, one list of streams per round."""

    def __init__(self) -> None:
        self.infos: dict = {}
        self.runs: dict[str, dict[int, list[list[StreamRun]]]] = {}
        self.errors: dict[str, str] = {}
        self.memory: dict[str, list] = {}
        self.misses: dict[str, dict[int, Optional[list[int]]]] = {}
        self.matches: dict[str, Optional[bool]] = {}
        self.salts = itertools.count(1)  # every prompt of the run its own

    def add(self, subject, c: int, streams: list[StreamRun]) -> None:
        self.infos.setdefault(subject.info.name, subject.info)
        self.runs.setdefault(subject.info.name, {}).setdefault(c, []).append(streams)


def _measure(setup: Setup, layouts: list, mlx, lengths: list[int], book: _Book) -> None:
    cfg = setup.cfg
    extra = [] if mlx is None else [MlxBatched(mlx, cfg.prefill_step_size)]
    single = [] if mlx is None else [MlxSingle(mlx, cfg.prefill_step_size)]

    def subjects(c: int) -> list:
        return [*layouts, *extra, *(single if c == 1 else [])]

    for subj in subjects(1 if 1 in cfg.concurrency else 0):  # the table's order
        book.infos.setdefault(subj.info.name, subj.info)
    salts = book.salts
    rounds = cfg.warmup + cfg.repetitions
    with setup.progress() as p:
        task = p.add_task("measuring", total=rounds * sum(len(subjects(c)) for c in cfg.concurrency))
        for r in range(rounds):
            warm = r < cfg.warmup
            label = "warm-up" if warm else f"round {r - cfg.warmup + 1}/{cfg.repetitions}"
            for c in cfg.concurrency:
                prompts = [distinct_prompt(lengths[i], setup.vocab, next(salts)) for i in range(c)]
                for subj in rotate(subjects(c), r):
                    name = subj.info.name
                    p.update(task, description=f"{label}: C={c} {name}")
                    if name not in book.errors:
                        try:
                            # Two tokens first, unmeasured: an idle connection may have been
                            # closed meanwhile, and a reconnect belongs to no batch.
                            subj.run_streams([distinct_prompt(1, setup.vocab, next(salts))], 2)
                            streams = subj.run_streams(prompts, cfg.new_tokens)
                            failed = next((s.error for s in streams if s.error), "")
                            if failed:
                                raise RuntimeError(failed)
                            if not warm:
                                book.add(subj, c, streams)
                        except Exception as e:  # one failed subject must not end the run
                            book.errors[name] = f"{type(e).__name__}: {e}"
                            book.infos.setdefault(name, subj.info)
                    p.advance(task)


def _check(book: _Book, mlx, progress) -> None:
    pairs = [(s.prompt, s.tokens) for by_c in book.runs.values() for rounds in by_c.values()
             for streams in rounds for s in streams]
    misses = iter(teacher_force(mlx, pairs, progress) or [None] * len(pairs))
    for name, by_c in book.runs.items():
        book.misses[name] = {c: [next(misses) for streams in rounds for _ in streams]
                             for c, rounds in by_c.items()}
    # One stream alone is exact: the same ids as single-process mlx-lm, round by round.
    ref = book.runs.get(mlx.info.name, {}).get(1) if mlx is not None else None
    for name, by_c in book.runs.items():
        mine = by_c.get(1)
        book.matches[name] = (None if not ref or not mine or len(ref) != len(mine) else
                              all(a[0].tokens == b[0].tokens for a, b in zip(mine, ref)))


def _row(c: int, rounds: list[list[StreamRun]], misses: Optional[list[int]]) -> dict:
    agg, per_stream, ttft_med, ttfts = [], [], [], []
    for streams in rounds:
        wall = max(s.token_times[-1] for s in streams if s.token_times)
        agg.append(sum(len(s.tokens) for s in streams) / wall)
        per_stream.append(statistics.median(s.decode_tok_s for s in streams))
        ttft_med.append(statistics.median(s.ttft_s for s in streams))
        ttfts += [s.ttft_s for s in streams]
    clean = misses is not None and None not in misses
    return {"concurrency": c, "aggregate_tok_s": summary(agg),
            "per_stream_tok_s": summary(per_stream), "ttft_s": summary(ttft_med),
            "ttft_p99_s": percentile(ttfts, 99), "streams": len(ttfts),
            "tokens": sum(len(s.tokens) for streams in rounds for s in streams),
            "cached_tokens": sum(s.cached_tokens for streams in rounds for s in streams),
            "teacher_forced_misses": sum(misses) if clean else None,
            "streams_with_misses": sum(1 for m in misses if m) if clean else None}


def _summarize(book: _Book, cs) -> list[dict]:
    out = []
    for name, info in book.infos.items():
        by_c = book.runs.get(name, {})
        rows = [_row(c, by_c[c], book.misses.get(name, {}).get(c)) for c in cs if c in by_c]
        out.append({"name": name, "kind": info.kind, "stages": info.stages, "split": info.split,
                    "how": info.note, "error": book.errors.get(name, ""), "rows": rows,
                    "tokens_match_mlx_lm": book.matches.get(name),
                    "memory": [{"name": m.name, "layers": list(m.layers), "rss_bytes": m.rss_bytes,
                                "held_bytes": m.held_bytes} for m in book.memory.get(name, [])]})
    batched = next((s for s in out if s["kind"] == "mlx-lm-batched"), None)
    base = {r["concurrency"]: r for r in batched["rows"]} if batched else {}
    for s in out:
        own = next((r for r in s["rows"] if r["concurrency"] == 1), None)
        for r in s["rows"]:
            b = base.get(r["concurrency"])
            r["vs_mlx_lm_batched"] = ratio(r["aggregate_tok_s"], b["aggregate_tok_s"]) if b else None
            r["vs_own_c1"] = ratio(r["aggregate_tok_s"], own["aggregate_tok_s"]) if own else None
    return out
