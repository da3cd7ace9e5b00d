"""The OpenAI face: POST /v1/chat/completions and /v1/completions (streamed
as server-sent events with "stream": true), GET /v1/models[/{id}].

A chat answer's reasoning goes to `reasoning_content` and `reasoning`
(both names are in use by clients), the rest to `content`. A streamed
answer that fails after its first chunk ends with an error event and
[DONE], so clients raise instead of taking a cut answer for a whole one."""

from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator, Callable, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from clusterd.serve.admission import accept, chat_job, start, text_job
from clusterd.serve.answer import Delta, Finished
from clusterd.serve.openai_models import ChatRequest, CompletionRequest, stop_list
from clusterd.serve.router import Served
from clusterd.serve.streaming import events, respond


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


DONE = b"data: [DONE]\n\n"


def usage(end: Finished) -> dict:
    s = end.stats
    n = len(s.tokens)
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": n,
            "total_tokens": s.prompt_tokens + n,
            "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": end.reasoning_tokens}}


class _Reply:
    """What every chunk of one reply shares."""

    def __init__(self, kind: str, prefix: str, model: str, include_usage: bool):
        self.kind, self.model, self.include_usage = kind, model, include_usage
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def body(self, choice: dict, **extra) -> dict:
        out = {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
               "system_fingerprint": None, "choices": [choice], **extra}
        if self.include_usage and "usage" not in extra:
            out["usage"] = None
        return out


async def _stream(answer, first, reply: _Reply, delta: Callable[[Delta], dict],
                  end: Callable[[str], dict], prelude: tuple = ()) -> AsyncIterator[bytes]:
    """Server-sent events: a chunk per piece, the finish, the usage if asked
    for, an error event if the answer fails midway, then [DONE]."""
    for choice in prelude:
        yield sse(reply.body(choice))
    async for ev in events(answer, first):
        if isinstance(ev, Delta):
            yield sse(reply.body(delta(ev)))
        elif isinstance(ev, Finished):
            yield sse(reply.body(end(ev.finish_reason)))
            if reply.include_usage:
                yield sse({**reply.body({}), "choices": [], "usage": usage(ev)})
        else:
            yield sse(ev.error.openai_body())
    yield DONE


def _sampling(req, state) -> dict:
    return dict(max_tokens=req.limit, sampling=req.sampling(), stops=stop_list(req.stop),
                cap=state.config.max_tokens)


async def chat_completions(request: Request):
    state, req, served = await accept(request, ChatRequest)
    answer = await start(served, chat_job, req.chat(), **_sampling(req, state))
    reply = _Reply("chat.completion.chunk" if req.stream else "chat.completion", "chatcmpl",
                   req.model, req.include_usage)

    def choice(finish: Optional[str] = None, **fields) -> dict:
        return {"index": 0, **fields, "logprobs": None, "finish_reason": finish}

    def whole(c) -> dict:
        reasoning: Optional[str] = c.reasoning if c.end.reasoned else None
        message = {"role": "assistant", "content": c.content, "reasoning_content": reasoning,
                   "reasoning": reasoning}
        return reply.body(choice(c.end.finish_reason, message=message), usage=usage(c.end))

    def delta(ev: Delta) -> dict:
        d = {}
        if ev.reasoning:
            d["reasoning_content"] = d["reasoning"] = ev.reasoning
        if ev.content:
            d["content"] = ev.content
        return choice(delta=d)

    def frames(first):
        return _stream(answer, first, reply, delta, lambda f: choice(f, delta={}),
                       prelude=(choice(delta={"role": "assistant", "content": ""}),))

    return await respond(request, answer, bool(req.stream), whole, frames)


async def completions(request: Request):
    state, req, served = await accept(request, CompletionRequest)
    answer = await start(served, text_job, req.text, **_sampling(req, state))
    reply = _Reply("text_completion", "cmpl", req.model, req.include_usage)

    def choice(text: str, finish: Optional[str] = None) -> dict:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    def whole(c) -> dict:
        return reply.body(choice(c.content, c.end.finish_reason), usage=usage(c.end))

    def frames(first):
        return _stream(answer, first, reply, lambda ev: choice(ev.content),
                       lambda f: choice("", f))

    return await respond(request, answer, bool(req.stream), whole, frames)


def _model(m: Served) -> dict:
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "clusterd"}


async def list_models(request: Request):
    return JSONResponse({"object": "list",
                         "data": [_model(m) for m in request.app.state.router.models]})


async def get_model(request: Request):
    return JSONResponse(_model(request.app.state.router.get(request.path_params["model_id"])))


routes = (
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
)
