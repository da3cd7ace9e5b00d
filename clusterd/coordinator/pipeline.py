"""One generation through a ring of loaded stages.

The coordinator opens the session on every stage, sends the prompt to the
first stage in chunks (mlx-lm's schedule: all but the last token in chunks of
prefill_step_size, then the last token alone), and then only listens: the
last stage samples and sends each token to the first stage itself.
"""

import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from clusterd.coordinator.generation import GenerationError, GenerationStats, Sampling
from clusterd.coordinator.peers import PeerError, PeerHandle
from clusterd.wire import clusterd_pb2 as pb

HEALTH_EVERY_S = 2.0


@dataclass(frozen=True)
class LoadedStage:
    peer: PeerHandle
    start: int
    end: int
    weight_bytes: int


class Pipeline:
    def __init__(self, stages: Sequence[LoadedStage], prefill_step_size: int = 2048,
                 session_timeout_s: float = 300.0):
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self.stages = list(stages)
        self.prefill_step_size = prefill_step_size
        self.session_timeout_s = session_timeout_s

    def generate(self, prompt: Sequence[int], max_tokens: int, sampling: Sampling,
                 stop_ids: Sequence[int] = (), stats: Optional[GenerationStats] = None
                 ) -> Iterator[int]:
        """Yield generated token ids as the last stage samples them."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = len(prompt)
        sid = uuid.uuid4().hex
        t0 = time.monotonic()
        events: "queue.Queue[tuple[int, object]]" = queue.Queue()
        opened: list[LoadedStage] = []
        try:
            self._open(sid, max_tokens, sampling, stop_ids, opened)
            for i, st in enumerate(self.stages):
                threading.Thread(target=_listen, args=(i, st.peer, sid, events),
                                 daemon=True).start()
            self._send_prompt(sid, list(prompt))
            t_first = None
            for token, done_reason in self._events(events):
                now = time.monotonic()
                if t_first is None:
                    t_first = now
                    stats.ttft_s = now - t0
                stats.decode_s = now - t_first
                if done_reason == "stop":
                    stats.finish_reason = "stop"
                    return  # the stop token itself is not part of the answer
                stats.tokens.append(token)
                yield token
                if done_reason:
                    stats.finish_reason = done_reason
                    return
        finally:
            for st in opened:
                try:
                    st.peer.end_session(sid)
                except PeerError:
                    pass  # already gone; its own timeout frees the session

    def _open(self, sid, max_tokens, sampling, stop_ids, opened) -> None:
        n = len(self.stages)
        # Downstream first, so no stage forwards to a stage that lacks the session.
        for i in reversed(range(n)):
            nxt = "" if n == 1 else self.stages[(i + 1) % n].peer.address
            req = pb.OpenSessionRequest(
                session_id=sid, next_address=nxt, max_tokens=max_tokens,
                stop_token_ids=list(stop_ids), timeout_seconds=self.session_timeout_s,
                sampling=pb.SamplingParams(
                    temperature=sampling.temperature, top_p=sampling.top_p,
                    has_seed=sampling.seed is not None, seed=sampling.seed or 0))
            self.stages[i].peer.open_session(req)
            opened.append(self.stages[i])

    def _send_prompt(self, sid: str, prompt: list[int]) -> None:
        first = self.stages[0].peer
        pos = 0
        while len(prompt) - pos > 1:
            n = min(self.prefill_step_size, len(prompt) - pos - 1)
            first.forward(pb.Activation(session_id=sid, step=pos,
                                        tokens=pb.TokenIds(ids=prompt[pos:pos + n])))
            pos += n
        first.forward(pb.Activation(session_id=sid, step=pos,
                                    tokens=pb.TokenIds(ids=prompt[pos:]), sample=True))

    def _events(self, events) -> Iterator[tuple[int, str]]:
        last = len(self.stages) - 1
        next_check = time.monotonic() + HEALTH_EVERY_S
        while True:
            try:
                i, ev = events.get(timeout=0.25)
            except queue.Empty:
                if time.monotonic() >= next_check:
                    self._check_health()
                    next_check = time.monotonic() + HEALTH_EVERY_S
                continue
            if isinstance(ev, PeerError):
                raise GenerationError(str(ev))
            if ev.finish_reason == "error":
                raise GenerationError(ev.error or f"node {self.stages[i].peer.name} failed")
            if i == last:
                yield ev.token, (ev.finish_reason if ev.done else "")

    def _check_health(self) -> None:
        for st in self.stages:
            try:
                st.peer.health(timeout=HEALTH_EVERY_S)
            except PeerError as e:
                raise GenerationError(f"{e} (it held layers [{st.start}, {st.end}))") from None


def _listen(i: int, peer: PeerHandle, sid: str, events: "queue.Queue") -> None:
    try:
        for ev in peer.stream_tokens(sid):
            events.put((i, ev))
            if ev.done:
                return
    except PeerError as e:
        events.put((i, e))
