"""`clusterd bench --cache-turns 2000`: the time to first token of a chat's
second turn whose first turn was that long, with the stages' prompt cache
and without it, in the same run: each layout is loaded twice on the same
daemons, under two shard names, once with the plan's prompt-cache room and
once with none. Turn 2 is turn 1, its answer and a follow-up of
--prompt-tokens tokens, sent the moment turn 1 has ended (as a client
sending the next turn at once would) or --turn-gap seconds later. Next to
it, single-process mlx-lm with a fresh cache and continuing turn 1's cache.
A round whose turn 2 found nothing cached on a ring with the cache is
counted (`turn2_cache_missed_rounds`).

Every round is a new chat (no earlier round's cache helps turn 1)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from rich.console import Console

from clusterd.bench.engine_layout import EngineLayout
from clusterd.bench.modes import (ServingConfig, Setup, distinct_prompt, measure_layouts, ordered,
                                  ratio, rotate, teacher_force)
from clusterd.bench.runs import SubjectInfo
from clusterd.bench.stats import summary
from clusterd.coordinator.ring import RingOptions

# "off": the ring loaded with no prompt-cache room, as `--prompt-cache 0` loads it.
WITH, WITHOUT = "on", "off"


@dataclass(frozen=True)
class _Turn:
    prompt: tuple[int, ...]
    tokens: list[int]
    ttft_s: float
    cached: int  # prompt tokens reused from a cache


def run_cache_turns(cfg: ServingConfig, console: Console, workdir: Optional[Path] = None) -> dict:
    setup = Setup(cfg, "cache_turns", console, workdir)
    follow = cfg.prompt_tokens
    context = cfg.first_turn + follow + 2 * cfg.new_tokens + 1
    on = RingOptions(context=context, sessions=1, prefill_step_size=cfg.prefill_step_size)
    off = replace(on, prompt_cache_tokens=0)
    result = setup.header({"first_turn": cfg.first_turn, "new_tokens": cfg.new_tokens,
                           "follow_up": follow, "turn_gap_s": cfg.turn_gap_s,
                           "prefill_step_size": cfg.prefill_step_size,
                           "ring": {"context": context, "sessions": 1,
                                    "prompt_cache_tokens": on.cache_tokens},
                           "cache_off": "the same layout loaded again with no prompt-cache room "
                                        "(--prompt-cache 0); mlx-lm: a fresh cache for turn 2"})
    stem = setup.model_dir.name

    def both(spec, addresses) -> list["_RingTurns"]:
        out = [_RingTurns(EngineLayout(setup.model_dir, addresses, spec, on, shard=f"{stem}-cache",
                                       name=f"{spec.label}, cache {WITH}"), WITH, cfg)]
        try:
            out.append(_RingTurns(EngineLayout(setup.model_dir, addresses, spec, off,
                                               shard=f"{stem}-nocache",
                                               name=f"{spec.label}, cache {WITHOUT}"),
                                  WITHOUT, cfg))
        except BaseException:
            out[0].close()
            raise
        return out

    mlx = setup.mlx_lm()
    book: dict[str, dict] = {}
    salts = itertools.count(1)
    try:
        baseline = [_MlxTurns(mlx, cfg)] if mlx else []
        measure_layouts(setup, both, result,
                        lambda layouts: _measure(setup, [*layouts, *baseline], follow, book, salts))
        with setup.console.status("checking tokens") as status:
            turns = [t for e in book.values() for rnd in e["rounds"] for t in rnd]
            misses = teacher_force(mlx, [(t.prompt, t.tokens) for t in turns],
                                   lambda text: status.update(text))
    finally:
        if mlx is not None:
            mlx.close()
    result["subjects"] = ordered(_summarize(book, misses))
    return setup.finish(result)


@dataclass(frozen=True)
class _Variant:
    name: str
    layout: str  # what an "on" row is compared with: the "off" row of the same layout
    cache: str


class _RingTurns:
    """A chat's two turns through one ring's engine."""

    def __init__(self, layout: EngineLayout, cache: str, cfg: ServingConfig):
        self.layout, self.cfg, self.info = layout, cfg, layout.info
        self.variants = (_Variant(layout.info.name, layout.spec.label, cache),)

    def chat(self, first, follow) -> dict[str, list[_Turn]]:
        (one,) = self.layout.run_streams([first], self.cfg.new_tokens)
        if one.error:
            raise RuntimeError(one.error)
        second = [*first, *one.tokens, *follow]
        time.sleep(self.cfg.turn_gap_s)
        (two,) = self.layout.run_streams([second], self.cfg.new_tokens)
        if two.error:
            raise RuntimeError(two.error)
        return {self.info.name: [_Turn(tuple(first), one.tokens, one.ttft_s, one.cached_tokens),
                                 _Turn(tuple(second), two.tokens, two.ttft_s, two.cached_tokens)]}

    def close(self) -> None:
        self.layout.close()


class _MlxTurns:
    """One request runs both of mlx-lm's variants; two rows in the table."""

    def __init__(self, mlx, cfg: ServingConfig):
        self.mlx, self.cfg = mlx, cfg
        self.info = SubjectInfo("mlx-lm, 1 process", "mlx-lm", 1, list(mlx.info.split))
        self.variants = (_Variant(f"mlx-lm, 1 process, cache {WITH}", self.info.name,
                                  WITH),
                         _Variant(f"mlx-lm, 1 process, cache {WITHOUT}", self.info.name,
                                  WITHOUT))

    def chat(self, first, follow) -> dict[str, list[_Turn]]:
        r = self.mlx.op("turns", first=first, follow=follow, new_tokens=self.cfg.new_tokens,
                        prefill_step_size=self.cfg.prefill_step_size)
        t1 = _Turn(tuple(first), r["turn1"]["tokens"], r["turn1"]["ttft_s"], 0)
        second = [*first, *t1.tokens, *follow]
        cached, fresh = r["turn2_cached"], r["turn2_fresh"]
        on, off = self.variants
        return {on.name: [t1, _Turn(tuple(second), cached["tokens"], cached["ttft_s"],
                                    cached["cached_tokens"])],
                off.name: [t1, _Turn(tuple(second), fresh["tokens"], fresh["ttft_s"], 0)]}


def _measure(setup: Setup, subjects: list, follow: int, book: dict, salts) -> None:
    cfg = setup.cfg
    for subj in subjects:
        for v in subj.variants:
            book.setdefault(v.name, {"info": subj.info, "variant": v, "rounds": [], "error": ""})
    rounds = cfg.warmup + cfg.repetitions
    with setup.progress() as p:
        task = p.add_task("measuring", total=rounds * len(subjects))
        for r in range(rounds):
            warm = r < cfg.warmup
            label = "warm-up" if warm else f"round {r - cfg.warmup + 1}/{cfg.repetitions}"
            first = distinct_prompt(cfg.first_turn, setup.vocab, next(salts))
            question = distinct_prompt(follow, setup.vocab, next(salts))
            for subj in rotate(subjects, r):
                p.update(task, description=f"{label}: {subj.info.name}")
                entries = [book[v.name] for v in subj.variants]
                if not entries[0]["error"]:
                    try:
                        for name, turns in subj.chat(first, question).items():
                            if not warm:
                                book[name]["rounds"].append(turns)
                    except Exception as e:  # one failed subject must not end the run
                        for entry in entries:
                            entry["error"] = f"{type(e).__name__}: {e}"
                p.advance(task)


def _summarize(book: dict, misses: Optional[list[int]]) -> list[dict]:
    it = iter(misses) if misses is not None else None
    out = []
    for name, e in book.items():
        info, rounds = e["info"], e["rounds"]
        checked = sum(next(it) for rnd in rounds for _ in rnd) if it is not None else None
        out.append({
            "name": name, "kind": info.kind, "stages": info.stages, "split": info.split,
            "layout": e["variant"].layout, "prompt_cache": e["variant"].cache, "error": e["error"],
            "turn1_ttft_s": summary([rnd[0].ttft_s for rnd in rounds]),
            "turn1_cached_tokens": summary([rnd[0].cached for rnd in rounds]),
            "turn2_prompt_tokens": len(rounds[0][1].prompt) if rounds else None,
            "turn2_ttft_s": summary([rnd[1].ttft_s for rnd in rounds]),
            "turn2_cached_tokens": summary([rnd[1].cached for rnd in rounds]),
            "turn2_cache_missed_rounds": (sum(1 for rnd in rounds if not rnd[1].cached)
                                          if e["variant"].cache == WITH else None),
            "teacher_forced_misses": checked, "turn2_tokens": [rnd[1].tokens for rnd in rounds]})
    # Each "on" row next to its own "off" row (same layout, same chats).
    for s in out:
        if s["prompt_cache"] == WITH:
            twin = next((o for o in out if o["prompt_cache"] == WITHOUT
                         and o["layout"] == s["layout"]), None)
            if twin is not None:
                s["turn2_vs_without_cache"] = ratio(s["turn2_ttft_s"], twin["turn2_ttft_s"])
                s["tokens_match_without_cache"] = s["turn2_tokens"] == twin["turn2_tokens"]
    return out
