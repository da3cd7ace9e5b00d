"""One generation as the faces see it: the engine's blocking token stream,
run on a thread of its own, turned into text events on the event loop.
Between the two sit the detokenizer, the reasoning parser and the stop
matcher, so every face gets the same reasoning/content split and stops."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Iterator, Union

from clusterd.coordinator.generation import GenerationError, GenerationRequest, GenerationStats
from clusterd.coordinator.peers import PeerError
from clusterd.serve.errors import ApiError, from_generation_error, node_unreachable
from clusterd.serve.reasoning import ReasoningParser
from clusterd.serve.stops import StopMatcher

log = logging.getLogger("clusterd.serve")


@dataclass(frozen=True)
class Job:
    request: GenerationRequest
    stops: tuple[str, ...] = ()  # strings that end the answer (not part of it)
    split_reasoning: bool = False  # chat answers: reasoning apart from content
    starts_inside: bool = False  # the prompt leaves the model inside <think>


@dataclass(frozen=True)
class Delta:
    reasoning: str = ""
    content: str = ""


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (end of answer or a stop string) | "length"
    stats: GenerationStats
    reasoning_tokens: int
    reasoned: bool  # the answer has a reasoning part (possibly empty)


@dataclass(frozen=True)
class Failed:
    error: ApiError


Event = Union[Delta, Finished, Failed]


@dataclass(frozen=True)
class Collected:
    """A whole answer, for the faces that do not stream."""

    reasoning: str
    content: str
    end: Finished


class Answer:
    """Submit at construction (admission errors raise there, before any
    reply); iterate events with next(); cancel() ends the generation on every
    stage (a client that left)."""

    def __init__(self, engine, job: Job):
        self._engine = engine
        self._job = job
        self._generation = engine.submit(job.request)
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._stop = threading.Event()
        self._tokens_seen = 0
        threading.Thread(target=self._run, name="clusterd-answer", daemon=True).start()

    def cancel(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._generation.cancel()

    async def next(self) -> Event:
        return await self._events.get()

    async def collect(self) -> Collected:
        reasoning, content = [], []
        while True:
            ev = await self.next()
            if isinstance(ev, Delta):
                reasoning.append(ev.reasoning)
                content.append(ev.content)
            elif isinstance(ev, Failed):
                raise ev.error
            else:
                return Collected("".join(reasoning), "".join(content), ev)

    # -- the worker thread ----------------------------------------------------
    def _put(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the server's loop is gone: nobody is listening
            self.cancel()

    def _counted(self, tokens: Iterator[int]) -> Iterator[int]:
        for t in tokens:
            self._tokens_seen += 1
            yield t

    def _left(self) -> None:
        log.info("%s: the client left; generation cancelled after %d tokens",
                 self._engine.name, self._tokens_seen)

    def _run(self) -> None:
        job, chat = self._job, self._engine.chat
        parser = ReasoningParser(job.starts_inside) if job.split_reasoning else None
        stops = StopMatcher(job.stops)
        tokens = iter(self._generation)
        pieces = chat.stream_pieces(self._counted(tokens))
        reasoning_tokens, seen, matched = 0, 0, False
        try:
            for piece in pieces:
                if self._stop.is_set():
                    return self._left()
                # One piece per token, and one more after the last token.
                token_piece, seen = self._tokens_seen != seen, self._tokens_seen
                was_reasoning = parser is not None and parser.in_reasoning
                r, c = parser.feed(piece) if parser else ("", piece)
                if token_piece and parser and (was_reasoning or parser.in_reasoning):
                    reasoning_tokens += 1
                c, matched = stops.feed(c)
                if r or c:
                    self._put(Delta(r, c))
                if matched:
                    self._generation.cancel()
                    break
            if not matched:
                r, c = parser.finish() if parser else ("", "")
                c, matched = stops.feed(c)
                c += stops.finish()
                matched = stops.matched  # a stop held back to the end
                if r or c:
                    self._put(Delta(r, c))
            stats = self._generation.stats
            reason = "stop" if matched else (stats.finish_reason or "stop")
            self._put(Finished(reason, stats, reasoning_tokens,
                               parser is not None and parser.reasoned))
        except GenerationError as e:
            if self._stop.is_set():  # cancelled while it waited for room
                return self._left()
            self._put(Failed(from_generation_error(e, running=True)))
        except PeerError as e:  # a node that cannot be reached names itself
            self._put(Failed(node_unreachable(str(e))))
        except Exception as e:  # a bug must still answer the client, and be logged
            log.exception("generation failed")
            self._put(Failed(ApiError(500, f"internal error: {type(e).__name__}: {e}")))
        finally:
            pieces.close()
            close = getattr(tokens, "close", None)
            if close is not None:
                close()  # ends the session on every stage, even when the answer stopped early
