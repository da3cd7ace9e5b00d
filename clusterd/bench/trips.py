"""`clusterd bench --trip-tokens 1,2,3,4`: what one trip around the ring
costs when it carries k tokens of one session instead of one, as a ratio to
a 1-token trip: what speculative decoding buys on this machine (a trip that
verifies k - 1 drafts carries k tokens).

Measured through the real wire: after a --prompt-tokens prefill, the
session's next positions are sent to the first stage as a chunk of width k
(an Activation with sample=True, through Forward) and timed from the
Forward call to the last stage's token event; every chunk first drops the
previous one's positions (Row.trim), so every trip runs at the same context
length. Widths interleave, the order rotating. Next to it, mlx-lm's model
over k tokens at the same context in one process (no wire)."""

from __future__ import annotations

import itertools
import queue
import time
import uuid
from pathlib import Path
from typing import Optional

from rich.console import Console

from clusterd.bench.engine_layout import GREEDY, EngineLayout
from clusterd.bench.modes import (ServingConfig, Setup, distinct_prompt, measure_layouts, ordered,
                                  rotate, teacher_force)
from clusterd.bench.stats import latency_summary
from clusterd.coordinator.generation import GenerationRequest
from clusterd.coordinator.peers import PeerError
from clusterd.coordinator.ring import RingOptions
from clusterd.wire import clusterd_pb2 as pb

EVENT_WAIT_S = 600.0


class TripError(RuntimeError):
    pass


class _RingTrips:
    """One session held open on a ring, its next positions sent k at a time."""

    def __init__(self, layout: EngineLayout, prompt: list[int], prefill_step_size: int):
        self.ring = layout.ring
        self.first = self.ring.stages[0]
        self.last = len(self.ring.stages) - 1
        self.prompt = prompt
        self.sid = uuid.uuid4().hex
        self._events: "queue.Queue" = queue.Queue()
        self._held = 0  # positions of the last chunk, dropped before the next
        # max_tokens 1: every chunk's token ends the answer, so none decodes on.
        req = GenerationRequest(tuple(prompt), 1, GREEDY, (), draft="none")
        self.ring.open(self.sid, req, lambda i, ev: self._events.put((i, ev)))
        try:
            self.ring.send_prompt(self.sid, prompt, 0, prefill_step_size)
            self._token()
        except BaseException:
            self.close()
            raise

    def _token(self) -> int:
        deadline = time.monotonic() + EVENT_WAIT_S
        while True:
            try:
                i, ev = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TripError(f"no token within {EVENT_WAIT_S:.0f}s") from None
            if isinstance(ev, PeerError) or ev.finish_reason == "error":
                raise TripError(str(ev) if isinstance(ev, PeerError) else ev.error)
            if i == self.last and (ev.tokens or ev.done):
                return ev.tokens[0] if ev.tokens else -1

    def trip(self, ids: list[int]) -> tuple[float, int]:
        """Seconds from Forward to the token event, and the token."""
        act = pb.Activation(shard=self.first.shard, group=0, width=len(ids), sample=True,
                            rows=[pb.Row(session_id=self.sid, position=len(self.prompt),
                                         trim=self._held)],
                            tokens=pb.TokenIds(ids=ids))
        t0 = time.monotonic()
        self.first.peer.forward(act)
        token = self._token()
        dt = time.monotonic() - t0
        self._held = len(ids)
        return dt, token

    def close(self) -> None:
        self.ring.end(self.sid)


def run_trips(cfg: ServingConfig, console: Console, workdir: Optional[Path] = None) -> dict:
    setup = Setup(cfg, "trips", console, workdir)
    ks = list(cfg.trip_tokens)
    opts = RingOptions(context=cfg.prompt_tokens + max(ks) + 1, sessions=1,
                       prefill_step_size=cfg.prefill_step_size, prompt_cache_tokens=0)
    result = setup.header({"context": cfg.prompt_tokens, "trip_tokens": ks, "trips": cfg.trips,
                           "prefill_step_size": cfg.prefill_step_size,
                           "how": "a chunk of width k with sample=True through Forward, timed "
                                  "to the last stage's token event; the previous chunk trimmed "
                                  "first, so every trip runs at the same context"})
    mlx = setup.mlx_lm()
    book: dict[str, dict] = {}
    checks: list[tuple[str, int, list[int], list[int]]] = []  # name, k, prompt, [token]
    salts = itertools.count(1)
    try:
        measure_layouts(setup, EngineLayout.factory(setup.model_dir, opts), result,
                        lambda layouts: _measure(setup, layouts, mlx, ks, book, checks, salts))
        with setup.console.status("checking tokens") as status:
            misses = teacher_force(mlx, [(p, t) for _, _, p, t in checks],
                                   lambda text: status.update(text))
    finally:
        if mlx is not None:
            mlx.close()
    missed: dict[tuple[str, int], int] = {}
    for (name, k, _, _), m in zip(checks, misses or []):
        missed[(name, k)] = missed.get((name, k), 0) + m
    result["subjects"] = ordered(_summarize(book, ks, missed if misses is not None else None))
    return setup.finish(result)


def _measure(setup: Setup, layouts: list, mlx, ks: list[int], book: dict, checks: list,
             salts) -> None:
    cfg = setup.cfg
    subjects = [*layouts, *([mlx] if mlx is not None else [])]
    for s in subjects:
        book.setdefault(s.info.name, {"info": s.info, "seconds": {k: [] for k in ks}, "error": ""})
    rounds = cfg.warmup + cfg.repetitions
    with setup.progress() as p:
        task = p.add_task("measuring", total=rounds * len(subjects))
        for r in range(rounds):
            warm = r < cfg.warmup
            label = "warm-up" if warm else f"round {r - cfg.warmup + 1}/{cfg.repetitions}"
            prompt = distinct_prompt(cfg.prompt_tokens, setup.vocab, next(salts))
            chunk = distinct_prompt(max(ks), setup.vocab, next(salts))
            for subj in rotate(subjects, r):
                entry = book[subj.info.name]
                p.update(task, description=f"{label}: {subj.info.name}")
                if not entry["error"]:
                    try:
                        got = (_ring_round(subj, prompt, chunk, ks, cfg, checks, warm)
                               if isinstance(subj, EngineLayout) else
                               _mlx_round(subj, prompt, chunk, ks, cfg))
                        if not warm:
                            for k in ks:
                                entry["seconds"][k] += got[k]
                    except Exception as e:  # one failed subject must not end the run
                        entry["error"] = f"{type(e).__name__}: {e}"
                p.advance(task)


def _ring_round(layout: EngineLayout, prompt, chunk, ks, cfg: ServingConfig, checks: list,
                warm: bool) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {k: [] for k in ks}
    session = _RingTrips(layout, prompt, cfg.prefill_step_size)
    try:
        for rep in range(cfg.trips):
            for k in rotate(ks, rep):
                dt, token = session.trip(chunk[:k])
                out[k].append(dt)
                if rep == 0 and not warm:  # each width's token, checked against mlx-lm
                    checks.append((layout.info.name, k, [*prompt, *chunk[:k]], [token]))
    finally:
        session.close()
    return out


def _mlx_round(mlx, prompt, chunk, ks, cfg: ServingConfig) -> dict[int, list[float]]:
    res = mlx.op("forward_k", prompt=prompt, chunk=chunk, widths=ks,
                 repetitions=cfg.trips, prefill_step_size=cfg.prefill_step_size)
    return {k: res["seconds"][str(k)] for k in ks}


def _summarize(book: dict, ks: list[int], missed: Optional[dict]) -> list[dict]:
    out = []
    for name, e in book.items():
        info = e["info"]
        rows = []
        for k in ks:
            secs = e["seconds"][k]
            if secs:
                checked = missed is not None and info.kind == "clusterd"
                rows.append({"tokens": k, "trip": latency_summary(secs),
                             "teacher_forced_misses": missed.get((name, k), 0) if checked else None})
        base = rows[0]["trip"]["p50_ms"] if rows and rows[0]["tokens"] == 1 else None
        for r in rows:
            r["vs_one_token"] = r["trip"]["p50_ms"] / base if base else None
        out.append({"name": name, "kind": info.kind, "stages": info.stages, "split": info.split,
                    "error": e["error"], "rows": rows})
    return out
