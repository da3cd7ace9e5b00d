"""Replies that end when the client leaves: a client that disconnects,
streamed or not, cancels its generation at once."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable, Mapping, Optional, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from clusterd.serve.answer import Answer, Delta, Failed

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its reply was ready."""


async def until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, answer, work: Awaitable[T]) -> T:
    """`work`'s result; if the client leaves first, the answer is cancelled
    and ClientGone raised."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        answer.cancel()
        raise ClientGone()
    finally:
        for t in (task, watch):
            t.cancel()


async def nothing(scope: Scope, receive: Receive, send: Send) -> None:
    """The reply to a client that has gone."""


class EventStream:
    """An ASGI response streaming `frames`; when the client disconnects the
    stream stops and the answer is cancelled."""

    def __init__(self, answer, frames: AsyncIterator[bytes], media_type: str,
                 headers: Optional[Mapping[str, str]] = None):
        self._answer = answer
        self._frames = frames
        self._headers = [(b"content-type", media_type.encode()),
                         (b"cache-control", b"no-cache"),
                         *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self._headers})
        async with anyio.create_task_group() as group:
            async def watch() -> None:
                await until_disconnected(receive)
                self._answer.cancel()
                group.cancel_scope.cancel()

            group.start_soon(watch)
            try:
                async for frame in self._frames:
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                self._answer.cancel()  # a no-op when the answer is complete
                group.cancel_scope.cancel()


async def respond(request: Request, answer: Answer, stream: bool, whole: Callable,
                  frames: Callable, media_type: str = "text/event-stream"):
    """The reply: whole(collected) as JSON, or frames(first event) streamed.
    A streamed reply waits for its first event, so a failure before any text
    still gets its own status code."""
    try:
        if not stream:
            collected = await unless_disconnected(request.receive, answer, answer.collect())
            return JSONResponse(whole(collected))
        first = await unless_disconnected(request.receive, answer, answer.next())
    except ClientGone:
        return nothing
    if isinstance(first, Failed):
        raise first.error
    return EventStream(answer, frames(first), media_type)


async def events(answer: Answer, first) -> AsyncIterator:
    ev = first
    while True:
        yield ev
        if not isinstance(ev, Delta):
            return
        ev = await answer.next()
