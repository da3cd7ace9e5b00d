"""A layout as the serving engine runs it: a ring loaded on given daemons
with the plan's limits (context, sessions, prefill step, prompt-cache room)
and the coordinator's Engine on top, as `clusterd run/serve` open it for a
model folder with a forced split; and streams through it, each token timed
on one clock shared by every stream of a batch.

A layout may be loaded twice on the same daemons under two shard names
(the prompt-cache comparison runs one ring with its cache and one without)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from clusterd.bench.layouts import LayoutSpec, stage_memory
from clusterd.bench.runs import ProcessMemory, SubjectInfo
from clusterd.coordinator.cluster import Node, connect, load_ring
from clusterd.coordinator.engine import Engine
from clusterd.coordinator.generation import GenerationRequest, Sampling
from clusterd.coordinator.peers import PeerError
from clusterd.coordinator.pipeline import RingClient
from clusterd.coordinator.placement import plan_ranges, ranges_from_counts
from clusterd.coordinator.ring import RingOptions

GREEDY = Sampling(temperature=0.0)


@dataclass
class StreamRun:
    """One stream of a batch: what it sent, got, and when (seconds from the
    batch's start on the caller's clock)."""

    prompt: tuple[int, ...]
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    submitted: float = 0.0
    cached_tokens: int = 0
    error: str = ""

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.submitted if self.token_times else float("nan")

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first over the time they took: what a reader of the stream sees."""
        t = self.token_times
        span = t[-1] - t[0] if len(t) > 1 else 0.0
        return (len(t) - 1) / span if span > 0 else 0.0

    @property
    def intervals(self) -> list[tuple[float, float]]:
        """(start, end) of each inter-token interval."""
        t = self.token_times
        return list(zip(t, t[1:]))


@dataclass(frozen=True)
class _BenchRing:
    """What the engine reads of a ring (no placer: a bench ring does not heal)."""

    client: RingClient
    chat: None = None


class Stream:
    """One generation through the engine on its own thread, timed from `t0`."""

    def __init__(self, engine: Engine, prompt: Sequence[int], max_tokens: int):
        self.run = StreamRun(tuple(prompt))
        self._gen = engine.submit(GenerationRequest(tuple(prompt), max_tokens, GREEDY, (),
                                                    draft="none"))
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None

    def start(self, t0: float) -> "Stream":
        self.run.submitted = time.monotonic() - t0
        self._thread = threading.Thread(target=self._follow, args=(t0,), daemon=True)
        self._thread.start()
        return self

    def _follow(self, t0: float) -> None:
        try:
            for tok in self._gen:
                now = time.monotonic() - t0
                with self._cond:
                    self.run.tokens.append(tok)
                    self.run.token_times.append(now)
                    self._cond.notify_all()
        except Exception as e:  # reported with the run; the batch goes on
            self.run.error = f"{type(e).__name__}: {e}"
        finally:
            self.run.cached_tokens = self._gen.stats.cached_tokens
            with self._cond:
                self._cond.notify_all()

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def wait_until(self, predicate, timeout: float) -> None:
        """Until predicate(run) holds or the stream ends; a timeout raises."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.run) and not self.done:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"a stream made no progress for {timeout:.0f}s")
                self._cond.wait(min(left, 0.25))

    def cancel(self) -> None:
        self._gen.cancel()

    def join(self, timeout: float) -> StreamRun:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.cancel()
                self._thread.join(10)
                self.run.error = self.run.error or f"no end within {timeout:.0f}s"
        return self.run


class EngineLayout:
    """A loaded ring and its engine; `name` is the subject's label."""

    def __init__(self, model_dir: Path, addresses: Sequence[str], spec: LayoutSpec,
                 opts: RingOptions, shard: str = "", name: str = ""):
        self.spec = spec
        self.options = opts
        self.nodes: list[Node] = connect(list(addresses)[: spec.nodes])
        try:
            ranges = self._ranges(Path(model_dir), spec, opts)
            used = [n for n, r in zip(self.nodes, ranges) if r is not None]
            counts = [e - s for s, e in (r for r in ranges if r is not None)]
            self.stages = load_ring(Path(model_dir), used, [r for r in ranges if r is not None],
                                    limits=opts.limits, prompt_cache_tokens=opts.cache_tokens,
                                    shard=shard)
        except BaseException:
            self._close_peers()
            raise
        self.shard = self.stages[0].shard
        label = name or spec.label
        if len(counts) != spec.nodes:  # the planner may leave nodes out: fewer hops
            label += f" (planner used {len(counts)})"
        self.info = SubjectInfo(label, "clusterd", len(counts), counts, spec.how)
        self.engine = Engine(_BenchRing(RingClient(self.stages)), name=self.info.name,
                             context=opts.context, max_sessions=opts.sessions,
                             prefill_step_size=opts.prefill_step_size)

    @staticmethod
    def factory(model_dir: Path, opts: RingOptions):
        """What `measure_layouts` opens for each layout: one engine ring."""
        return lambda spec, addresses: [EngineLayout(model_dir, addresses, spec, opts)]

    def _ranges(self, model_dir: Path, spec: LayoutSpec, opts: RingOptions):
        if spec.how != "planned":
            return ranges_from_counts(spec.split)
        return plan_ranges(model_dir, self.nodes, None, context=opts.context,
                           sessions=opts.sessions, prefill_step_size=opts.prefill_step_size,
                           prompt_cache_tokens=opts.cache_tokens)

    @property
    def ring(self) -> RingClient:
        return self.engine.ring.client

    def run_streams(self, prompts: Sequence[Sequence[int]], max_tokens: int,
                    timeout: float = 3600.0) -> list[StreamRun]:
        """Every prompt submitted at once; each stream's tokens and times."""
        streams = [Stream(self.engine, p, max_tokens) for p in prompts]
        t0 = time.monotonic()
        for s in streams:
            s.start(t0)
        return [s.join(timeout) for s in streams]

    def memory(self) -> list[ProcessMemory]:
        return stage_memory(self.stages)

    def close(self) -> None:
        self.engine.close()
        for st in self.stages:
            try:
                st.peer.unload(self.shard)
            except PeerError:
                pass
        self._close_peers()

    def _close_peers(self) -> None:
        for n in self.nodes:
            n.peer.close()
