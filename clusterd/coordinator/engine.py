"""The engine: one loaded ring behind a submit() that every face uses.
It checks a request against the ring's limits (context, sampling ranges),
admits it when the ring has room (else it waits in a bounded queue, in
arrival order), and runs it on the ring, healing through node loss."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

from clusterd.coordinator.generation import (ContextTooLong, GenerationError,
                                             GenerationRequest, GenerationStats, QueueFull,
                                             Sampling, Unsupported)
from clusterd.coordinator.peers import PeerError
from clusterd.coordinator.ring import Ring

DEFAULT_QUEUE = 64


class _Admission:
    """At most `slots` running, at most `limit` waiting, served in arrival order."""

    def __init__(self, slots: int, limit: int):
        self.slots, self.limit = slots, limit
        self._cond = threading.Condition()
        self._running = 0
        self._waiting: list[object] = []

    def enter(self, ticket: object, cancelled: threading.Event) -> None:
        with self._cond:
            if self._running < self.slots and not self._waiting:
                self._running += 1
                return
            if len(self._waiting) >= self.limit:
                raise QueueFull(len(self._waiting), self.limit, self._running)
            self._waiting.append(ticket)
            try:
                while not (self._running < self.slots and self._waiting[0] is ticket):
                    if cancelled.is_set():
                        raise GenerationError("cancelled while waiting for room in the ring")
                    self._cond.wait(0.25)
                self._running += 1
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()

    def leave(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    @property
    def counts(self) -> tuple[int, int]:
        with self._cond:
            return self._running, len(self._waiting)


class _Run:
    """One request on the ring (a Generation)."""

    def __init__(self, engine: "Engine", request: GenerationRequest):
        self._engine = engine
        self._request = request
        self._cancelled = threading.Event()
        self.stats = GenerationStats(prompt_tokens=len(request.prompt))

    def cancel(self) -> None:
        self._cancelled.set()

    def __iter__(self) -> Iterator[int]:
        engine, req = self._engine, self._request
        t0 = time.monotonic()
        engine._admission.enter(self, self._cancelled)
        try:
            self.stats.queued_s = time.monotonic() - t0
            s = req.sampling
            tokens = engine.ring.pipeline.generate(
                list(req.prompt), req.max_tokens,
                Sampling(temperature=s.temperature, top_p=s.top_p, seed=s.seed),
                list(req.stop_ids), self.stats)
            try:
                for token in tokens:
                    yield token
                    if self._cancelled.is_set():
                        self.stats.finish_reason = "cancelled"
                        return
            finally:
                tokens.close()  # ends the session on every stage
        finally:
            engine._admission.leave()
        self.stats.ttft_s += self.stats.queued_s


class Engine:
    def __init__(self, ring: Ring, *, name: str, context: int, max_sessions: int = 1,
                 queue_limit: int = DEFAULT_QUEUE):
        self.ring = ring
        self.name = name
        self.context = context
        self.max_sessions = max_sessions
        self._admission = _Admission(max_sessions, queue_limit)

    @property
    def chat(self):
        return self.ring.chat

    def submit(self, request: GenerationRequest) -> _Run:
        """Raises an AdmissionError (ContextTooLong, QueueFull, Unsupported)
        before anything runs; the returned Generation waits for room when
        iterated."""
        if not request.prompt:
            raise GenerationError("the prompt is empty")
        if request.max_tokens < 1:
            raise GenerationError("max_tokens must be at least 1")
        if len(request.prompt) + request.max_tokens > self.context:
            raise ContextTooLong(len(request.prompt), request.max_tokens, self.context)
        problem = request.sampling.problem()
        if problem:
            raise GenerationError(problem)
        default = Sampling()
        for name in ("top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            if getattr(request.sampling, name) != getattr(default, name):
                raise Unsupported(f"{name} is not supported by this ring yet")
        return _Run(self, request)

    def health(self) -> dict:
        """Each stage's node, its layers and whether it answers now."""
        stages = self.ring.stages

        def check(st) -> dict:
            row = {"node": st.peer.name, "address": st.peer.address,
                   "layers": [st.start, st.end]}
            try:
                row["state"] = st.peer.health(timeout=2.0).state
            except PeerError as e:
                row["state"], row["error"] = "unreachable", str(e)
            return row

        with ThreadPoolExecutor(len(stages)) as pool:
            rows = list(pool.map(check, stages))
        running, queued = self._admission.counts
        ok = all(r["state"] == "ready" for r in rows)
        return {"status": "ok" if ok else "degraded", "model": self.name, "stages": rows,
                "running": running, "queued": queued, "context": self.context,
                "max_sessions": self.max_sessions}

    def close(self) -> None:
        for node in self.ring.pipeline.nodes:
            node.peer.close()


def chat_request(engine: Engine, messages: list[dict], max_tokens: int,
                sampling: Optional[Sampling] = None) -> GenerationRequest:
    """A chat through the model's template as a request (stop ids: the model's EOS)."""
    prompt = tuple(engine.chat.encode(messages))
    return GenerationRequest(prompt, max_tokens, sampling or Sampling(),
                             tuple(engine.chat.stop_ids))
