"""The engine: one loaded ring behind a submit() that every face uses.

It checks a request against the ring's limits (context, sampling ranges),
admits it when the ring has room for another session (the plan's
--sessions; else it waits in a bounded queue, in arrival order), and runs
it with the others at once: the stages batch the sessions' steps. When a
node drops out, the first generation to notice heals the ring (re-plan on
the nodes left, reload, go on) and every generation replays its tokens on
the new ring; when the model can no longer be placed, requests get
RingUnavailable naming the missing nodes while the ring re-forms itself in
the background as soon as enough nodes are back."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Callable, Iterator, Optional, Protocol, Sequence

from clusterd.coordinator.generation import (ContextTooLong, GenerationError,
                                             GenerationRequest, GenerationStats, QueueFull,
                                             RingUnavailable, Sampling)
from clusterd.coordinator.peers import PeerError
from clusterd.coordinator.pipeline import LoadedStage, RingClient, follow
from clusterd.wire import clusterd_pb2 as pb

log = logging.getLogger("clusterd.engine")

DEFAULT_QUEUE = 64
INTERLEAVE_STEP = 128  # prompt chunk size while other sessions decode
LOOKUP_DRAFTS = 3  # prompt-lookup drafts per trip
MTP_DRAFTS = 1  # the MTP layer predicts the token after next
REFORM_EVERY_S = 3.0
HEALTH_TIMEOUT_S = 3.0
MAX_RECOVERIES = 3  # per generation


class Placer(Protocol):
    """What the engine needs to heal and re-form its ring (coordinator.ring)."""

    nodes: list  # each with .peer (PeerHandle)

    def replan(self, nodes: list) -> list[LoadedStage]:
        """Plan, fetch files and load on `nodes`; raises PeerError or
        ValueError (e.g. SplitError) when the model cannot be placed."""

    def rediscover(self) -> list:
        """Nodes reachable now (mDNS or the --peer list), connected."""


class _Admission:
    """At most `slots` running, at most `limit` waiting, served in arrival order."""

    def __init__(self, slots: int, limit: int):
        self.slots, self.limit = slots, limit
        self._cond = threading.Condition()
        self._running = 0
        self._waiting: list[object] = []

    def check(self) -> None:
        with self._cond:
            if len(self._waiting) >= self.limit and self._running >= self.slots:
                raise QueueFull(len(self._waiting), self.limit, self._running)

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
    """One request (a Generation): admitted, opened on every stage, its
    tokens followed, ended everywhere at the end (caches kept for reuse)."""

    def __init__(self, engine: "Engine", request: GenerationRequest):
        self._engine = engine
        self._request = request
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._live: Optional[tuple[RingClient, str, "queue.Queue"]] = None
        self.stats = GenerationStats(prompt_tokens=len(request.prompt))

    def cancel(self) -> None:
        """End the generation on every stage now, from any thread."""
        self._cancelled.set()
        with self._lock:
            live, self._live = self._live, None
        if live is not None:
            ring, sid, events = live
            events.put((0, None))
            ring.end(sid)

    def __iter__(self) -> Iterator[int]:
        eng, req, stats = self._engine, self._request, self.stats
        t0 = time.monotonic()
        eng._admission.enter(self, self._cancelled)
        try:
            stats.queued_s = time.monotonic() - t0
            while not self._cancelled.is_set():
                ring, epoch = eng._current()
                done = len(stats.tokens)
                attempt = replace(req, prompt=(*req.prompt, *stats.tokens),
                                  max_tokens=req.max_tokens - done)
                sid = uuid.uuid4().hex
                events: "queue.Queue" = queue.Queue()
                with self._lock:
                    self._live = (ring, sid, events)
                try:
                    cached = ring.open(sid, attempt, lambda i, ev: events.put((i, ev)),
                                       eng._draft(req.draft))
                    if not done:
                        stats.cached_tokens = cached
                    ring.send_prompt(sid, attempt.prompt, cached, eng._prompt_step())
                    yield from follow(ring, events, stats, t0, self._cancelled.is_set)
                    if self._cancelled.is_set():
                        stats.finish_reason = "cancelled"
                    return
                except (GenerationError, PeerError) as e:
                    if self._cancelled.is_set():
                        stats.finish_reason = "cancelled"
                        return
                    if stats.recoveries >= MAX_RECOVERIES:
                        raise GenerationError(f"{e}; gave up after {stats.recoveries} "
                                              "recoveries") from None
                    eng._recover(epoch, e)  # raises when the ring cannot heal
                    stats.recoveries += 1
                finally:
                    with self._lock:
                        self._live = None
                    ring.end(sid, [*attempt.prompt, *stats.tokens[done:]])
        finally:
            eng._admission.leave()


class Engine:
    def __init__(self, ring, *, name: str, context: int, max_sessions: int = 1,
                 queue_limit: int = DEFAULT_QUEUE, prefill_step_size: int = 2048,
                 placer: Optional[Placer] = None, draft: str = "none",
                 on_note: Callable[[str], None] = lambda text: None):
        """`draft`: what requests draft by default ("auto", "ngram", "none")."""
        """`ring`: coordinator.ring.Ring (its client, chat and placer)."""
        self.ring = ring
        self.name = name
        self.context = context
        self.max_sessions = max_sessions
        self.prefill_step_size = prefill_step_size
        self._placer = placer if placer is not None else getattr(ring, "placer", None)
        self._on_note = on_note
        self.draft = draft
        self._admission = _Admission(max_sessions, queue_limit)
        self._lock = threading.Lock()  # state: ring client, epoch, down
        self._healing = threading.Lock()  # one recovery at a time
        self._epoch = 0
        self._down: Optional[RingUnavailable] = None
        self._reformer: Optional[threading.Thread] = None
        self._closed = threading.Event()

    @property
    def chat(self):
        return self.ring.chat

    @property
    def stages(self) -> list[LoadedStage]:
        return self.ring.client.stages

    def submit(self, request: GenerationRequest) -> _Run:
        """Raises an AdmissionError (ContextTooLong, QueueFull, RingUnavailable)
        or GenerationError (a bad parameter) before anything runs; the
        returned Generation waits for room when iterated."""
        if not request.prompt:
            raise GenerationError("the prompt is empty")
        if request.max_tokens < 1:
            raise GenerationError("max_tokens must be at least 1")
        if len(request.prompt) + request.max_tokens > self.context:
            raise ContextTooLong(len(request.prompt), request.max_tokens, self.context)
        problem = request.sampling.problem()
        if problem:
            raise GenerationError(problem)
        if request.draft not in ("", "auto", "ngram", "none", "mtp"):
            raise GenerationError(f"draft must be auto, mtp, ngram or none (got {request.draft!r})")
        with self._lock:
            if self._down is not None:
                raise self._down
        self._admission.check()
        return _Run(self, request)

    def _current(self) -> tuple[RingClient, int]:
        with self._lock:
            if self._down is not None:
                raise self._down
            return self.ring.client, self._epoch

    def _draft(self, asked: str) -> Optional[pb.DraftParams]:
        """The drafts a request gets: its own choice, else the engine's; the
        MTP layer when the last stage holds it (one draft: what it was trained
        for), else prompt lookup."""
        kind = self.draft if asked in ("", "auto") else asked
        if kind == "none":
            return None
        if kind in ("auto", "mtp") and self.stages[-1].drafts == "mtp":
            return pb.DraftParams(kind="mtp", tokens=MTP_DRAFTS)
        return pb.DraftParams(kind="ngram", tokens=LOOKUP_DRAFTS)

    def _prompt_step(self) -> int:
        running, _ = self._admission.counts
        # Alone, mlx-lm's schedule (exact); beside decoding sessions, smaller
        # chunks so their next tokens are never far away.
        return self.prefill_step_size if running <= 1 else min(self.prefill_step_size,
                                                                 INTERLEAVE_STEP)

    # -- healing ----------------------------------------------------------------
    def _recover(self, epoch: int, error: Exception) -> None:
        with self._healing:
            with self._lock:
                if self._epoch != epoch:
                    return  # another generation healed the ring already
                if self._down is not None:
                    raise self._down
            if self._placer is None:
                raise GenerationError(str(error))
            nodes = list(self._placer.nodes)
            dead = _dead(nodes)
            if not dead:
                raise GenerationError(str(error))  # not a node loss: nothing to heal
            names = ", ".join(f"{n.peer.name} ({n.peer.address})" for n in dead)
            survivors = [n for n in nodes if n not in dead]
            self._on_note(f"node {names} dropped out; re-planning on the {len(survivors)} "
                          "node(s) left and replaying the running sessions")
            try:
                if not survivors:
                    raise ValueError("no node is left")
                stages = self._placer.replan(survivors)
            except (PeerError, ValueError) as e:
                down = RingUnavailable(
                    f"node {names} dropped out and the model cannot be placed without it "
                    f"({e}); the ring re-forms by itself once enough nodes are back",
                    missing=[n.peer.name for n in dead])
                with self._lock:
                    self._down = down
                self._start_reformer()
                raise down from None
            with self._lock:
                self._swap(stages, survivors)

    def _swap(self, stages: list[LoadedStage], nodes: list) -> None:
        old = self.ring.client
        self.ring.client = RingClient(stages, old.session_timeout_s)
        self._placer.nodes = nodes
        self._epoch += 1
        old.close()

    def _start_reformer(self) -> None:
        if self._reformer is None or not self._reformer.is_alive():
            self._reformer = threading.Thread(target=self._reform, name="re-form", daemon=True)
            self._reformer.start()

    def _reform(self) -> None:
        while not self._closed.wait(REFORM_EVERY_S):
            try:
                nodes = self._placer.rediscover()
                stages = self._placer.replan(nodes)
            except Exception as e:  # noqa: BLE001 (not back yet: try again later)
                log.info("ring not re-formed yet: %s", e)
                continue
            with self._lock:
                self._swap(stages, nodes)
                self._down = None
            self._on_note("the ring is back: " + ", ".join(
                f"{st.peer.name} [{st.start}, {st.end})" for st in stages))
            return

    # -- reporting ----------------------------------------------------------------
    def health(self) -> dict:
        """Each stage's node, its layers and whether it answers now."""
        with self._lock:
            down = self._down
        running, queued = self._admission.counts
        base = {"model": self.name, "running": running, "queued": queued,
                "context": self.context, "max_sessions": self.max_sessions}
        if down is not None:
            return {**base, "status": "down", "error": str(down), "missing": list(down.missing),
                    "stages": []}
        stages = self.stages

        def check(st: LoadedStage) -> dict:
            row = {"node": st.peer.name, "address": st.peer.address,
                   "layers": [st.start, st.end], "shard": st.shard}
            try:
                row["state"] = st.peer.health(timeout=2.0).state
            except PeerError as e:
                row["state"], row["error"] = "unreachable", str(e)
            return row

        with ThreadPoolExecutor(len(stages)) as pool:
            rows = list(pool.map(check, stages))
        ok = all(r["state"] == "ready" for r in rows)
        return {**base, "status": "ok" if ok else "degraded", "stages": rows,
                "missing": [r["node"] for r in rows if r["state"] == "unreachable"]}

    def close(self) -> None:
        self._closed.set()
        self.ring.client.close()


def _dead(nodes: Sequence) -> list:
    def alive(node) -> bool:
        try:
            node.peer.health(timeout=HEALTH_TIMEOUT_S)
            return True
        except PeerError:
            return False

    if not nodes:
        return []
    with ThreadPoolExecutor(len(nodes)) as pool:
        flags = list(pool.map(alive, nodes))
    return [n for n, ok in zip(nodes, flags) if not ok]


def chat_request(engine: Engine, messages: list[dict], max_tokens: int,
                 sampling: Optional[Sampling] = None) -> GenerationRequest:
    """A chat through the model's template as a request (stop ids: the model's EOS)."""
    prompt = tuple(engine.chat.encode(messages))
    return GenerationRequest(prompt, max_tokens, sampling or Sampling(),
                             tuple(engine.chat.stop_ids))
