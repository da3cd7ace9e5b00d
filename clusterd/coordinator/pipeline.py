"""The coordinator's side of a loaded ring: one Events stream per node for
all of this coordinator's sessions, sessions opened on every stage at once,
prompts sent to the first stage in chunks (mlx-lm's schedule: all but the
last token in chunks of prefill_step_size, then the last token alone). After
that the coordinator only listens: the last stage samples and sends each
token to the first stage itself.

`Pipeline.generate` is one generation at a time on top of it (bench, demo,
tests); the engine runs many at once on the same RingClient."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

from clusterd.coordinator.generation import (GenerationError, GenerationRequest,
                                             GenerationStats, Sampling)
from clusterd.coordinator.peers import PeerError, PeerHandle
from clusterd.wire import clusterd_pb2 as pb

HEALTH_EVERY_S = 2.0

# route(stage index, event or the failure of that stage's stream)
Route = Callable[[int, Union[pb.TokenEvent, PeerError]], None]


@dataclass(frozen=True)
class LoadedStage:
    peer: PeerHandle
    start: int
    end: int
    weight_bytes: int
    shard: str = ""
    drafts: str = ""  # last stage: what its sessions draft with ("mtp" | "ngram")
    drafts_note: str = ""  # why not the MTP layer, when it was asked for


def sampling_params(s: Sampling) -> pb.SamplingParams:
    return pb.SamplingParams(
        temperature=s.temperature, top_p=s.top_p, has_seed=s.seed is not None,
        seed=s.seed or 0, top_k=s.top_k, min_p=s.min_p,
        repetition_penalty=s.repetition_penalty, presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty)


class RingClient:
    def __init__(self, stages: Sequence[LoadedStage], session_timeout_s: float = 300.0):
        if not stages:
            raise ValueError("a ring needs at least one stage")
        self.stages = list(stages)
        self.client_id = uuid.uuid4().hex
        self.session_timeout_s = session_timeout_s
        self._routes: dict[str, Route] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._pool = ThreadPoolExecutor(max(4, 2 * len(self.stages)),
                                        thread_name_prefix="ring-call")
        for i, st in enumerate(self.stages):
            threading.Thread(target=self._listen, args=(i, st.peer), daemon=True,
                             name=f"events {st.peer.address}").start()

    def _listen(self, i: int, peer: PeerHandle) -> None:
        try:
            for ev in peer.events(self.client_id):
                with self._lock:
                    route = self._routes.get(ev.session_id)
                if route is not None:
                    route(i, ev)
            error = PeerError(peer.address, f"node {peer.name} ({peer.address}) closed its "
                              "event stream")
        except PeerError as e:
            error = e
        if self._closed.is_set():
            return
        with self._lock:
            routes = list(self._routes.values())
        for route in routes:
            route(i, error)

    def open(self, sid: str, req: GenerationRequest, route: Route,
             draft: Optional[pb.DraftParams] = None) -> int:
        """Open the session on every stage; the prompt tokens every stage can
        take from its prompt cache."""
        with self._lock:
            self._routes[sid] = route
        n = len(self.stages)

        def one(i: int) -> int:
            st = self.stages[i]
            nxt = "" if n == 1 else self.stages[(i + 1) % n].peer.address
            return st.peer.open_session(pb.OpenSessionRequest(
                session_id=sid, next_address=nxt, shard=st.shard, client_id=self.client_id,
                max_tokens=req.max_tokens, stop_token_ids=list(req.stop_ids),
                timeout_seconds=self.session_timeout_s, prompt=list(req.prompt),
                sampling=sampling_params(req.sampling), draft=draft)).cached_tokens

        try:
            return min(self._pool.map(one, range(n)))
        except PeerError:
            self.end(sid)
            raise

    def send_prompt(self, sid: str, prompt: Sequence[int], start: int, step: int) -> None:
        first = self.stages[0]
        prompt = list(prompt)
        pos = start
        while len(prompt) - pos > 1:
            n = min(step, len(prompt) - pos - 1)
            first.peer.forward(self._chunk(first, sid, pos, prompt[pos:pos + n], False))
            pos += n
        first.peer.forward(self._chunk(first, sid, pos, prompt[pos:], True))

    @staticmethod
    def _chunk(st: LoadedStage, sid: str, pos: int, ids: list[int], sample: bool):
        return pb.Activation(shard=st.shard, group=0, width=len(ids), sample=sample,
                             rows=[pb.Row(session_id=sid, position=pos)],
                             tokens=pb.TokenIds(ids=ids))

    def end(self, sid: str, keep_tokens: Sequence[int] = ()) -> None:
        """End the session on every stage at once; with `keep_tokens` (what
        its caches hold) the stages keep them in their prompt caches."""
        with self._lock:
            self._routes.pop(sid, None)

        def one(st: LoadedStage) -> None:
            try:
                st.peer.end_session(sid, keep_tokens)
            except PeerError:
                pass  # already gone; its own timeout frees the session

        if self._closed.is_set():  # a ring replaced after a node loss: end it where it lives
            for st in self.stages:
                one(st)
        else:
            list(self._pool.map(one, self.stages))

    def check_health(self) -> None:
        for st in self.stages:
            try:
                st.peer.health(timeout=HEALTH_EVERY_S)
            except PeerError as e:
                raise GenerationError(f"{e} (it held layers [{st.start}, {st.end}))") from None

    def close(self) -> None:
        self._closed.set()
        self._pool.shutdown(wait=False)
        for st in self.stages:
            st.peer.close_events(self.client_id)


class Pipeline:
    """One generation at a time through a ring (no admission, no healing)."""

    def __init__(self, stages: Sequence[LoadedStage], prefill_step_size: int = 2048,
                 session_timeout_s: float = 300.0):
        self.ring = RingClient(stages, session_timeout_s)
        self.stages = self.ring.stages
        self.prefill_step_size = prefill_step_size

    def generate(self, prompt: Sequence[int], max_tokens: int, sampling: Sampling,
                 stop_ids: Sequence[int] = (), stats: Optional[GenerationStats] = None
                 ) -> Iterator[int]:
        """Yield generated token ids as the last stage samples them."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        stats = stats if stats is not None else GenerationStats()
        req = GenerationRequest(tuple(prompt), max_tokens, sampling, tuple(stop_ids))
        stats.prompt_tokens = len(prompt)
        sid = uuid.uuid4().hex
        events: "queue.Queue" = queue.Queue()
        t0 = time.monotonic()
        try:
            stats.cached_tokens = self.ring.open(sid, req, lambda i, ev: events.put((i, ev)))
            self.ring.send_prompt(sid, prompt, stats.cached_tokens, self.prefill_step_size)
            yield from follow(self.ring, events, stats, t0)
        finally:
            self.ring.end(sid, [*prompt, *stats.tokens])

    def close(self) -> None:
        self.ring.close()


def follow(ring: RingClient, events: "queue.Queue", stats: GenerationStats, t0: float,
           cancelled: Callable[[], bool] = lambda: False) -> Iterator[int]:
    """Tokens of one session from its route's queue until it is done; a
    failure raises GenerationError naming the node."""
    last = len(ring.stages) - 1
    next_check = time.monotonic() + HEALTH_EVERY_S
    while not cancelled():
        try:
            i, ev = events.get(timeout=0.25)
        except queue.Empty:
            if time.monotonic() >= next_check:
                ring.check_health()
                next_check = time.monotonic() + HEALTH_EVERY_S
            continue
        if ev is None:  # cancelled
            return
        if isinstance(ev, PeerError):
            raise GenerationError(str(ev))
        if ev.finish_reason == "error":
            raise GenerationError(ev.error or f"node {ring.stages[i].peer.name} failed")
        if i != last:
            continue
        now = time.monotonic()
        if not stats.first_token_at and (ev.tokens or ev.done):
            stats.first_token_at = now
            stats.ttft_s = now - t0
        stats.decode_s = now - (stats.first_token_at or now)
        stats.trips += 1
        stats.drafted += ev.drafted
        stats.accepted += ev.accepted
        if ev.drafted:
            stats.draft_trips.append((ev.drafted, ev.accepted))
        for t in ev.tokens:
            stats.tokens.append(t)
            yield t
        if ev.done:
            stats.finish_reason = ev.finish_reason
            return
