"""The Ollama face, beside the OpenAI one, so Open WebUI, the `ollama`
client and tools that speak Ollama work: /api/chat and /api/generate
(NDJSON streams unless "stream": false), /api/tags, /api/show, /api/ps,
/api/version. The reasoning goes to `thinking`, the answer to `content`
(or `response`); durations are in nanoseconds, as Ollama's are."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from importlib.metadata import version
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from clusterd.serve.admission import accept, chat_job, start, text_job
from clusterd.serve.answer import Delta, Finished
from clusterd.serve.body import read_json
from clusterd.serve.errors import bad_request, validated
from clusterd.serve.ollama_models import ChatRequest, GenerateRequest, ShowRequest
from clusterd.serve.openai_models import stop_list
from clusterd.serve.router import Served
from clusterd.serve.streaming import events, respond


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _line(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _final(end: Finished) -> dict:
    s = end.stats
    prompt_s = max(s.ttft_s - s.queued_s, 0.0)
    return {"done": True, "done_reason": end.finish_reason,
            "total_duration": _ns(s.ttft_s + s.decode_s), "load_duration": 0,
            "prompt_eval_count": s.prompt_tokens, "prompt_eval_duration": _ns(prompt_s),
            "eval_count": len(s.tokens), "eval_duration": _ns(s.decode_s)}


async def _answer(request: Request, req, served: Served, chat: bool):
    """/api/chat (chat=True) and /api/generate share all but their shape:
    `message: {content, thinking}` or `response` and `thinking`."""
    state = request.app.state
    opts = req.opts
    common = dict(max_tokens=opts.limit, sampling=opts.sampling(), stops=stop_list(opts.stop),
                  cap=state.config.max_tokens)
    if not chat and req.raw:
        if req.system:
            raise bad_request("system has no place in a raw prompt: put it in the prompt",
                              "system")
        answer = await start(served, text_job, req.prompt, **common)
    else:
        answer = await start(served, chat_job, req.chat(), **common)
    show = req.show_thinking

    def shaped(content: str, thinking: str) -> dict:
        out = {"model": req.model, "created_at": _now()}
        if chat:
            out["message"] = {"role": "assistant", "content": content}
            if thinking and show:
                out["message"]["thinking"] = thinking
        else:
            out["response"] = content
            if thinking and show:
                out["thinking"] = thinking
        return out

    def whole(c) -> dict:
        return {**shaped(c.content, c.reasoning), **_final(c.end)}

    async def frames(first) -> AsyncIterator[bytes]:
        async for ev in events(answer, first):
            if isinstance(ev, Delta):
                if ev.content or (ev.reasoning and show):
                    yield _line({**shaped(ev.content, ev.reasoning), "done": False})
            elif isinstance(ev, Finished):
                yield _line({**shaped("", ""), **_final(ev)})
            else:
                yield _line(ev.error.ollama_body())

    return await respond(request, answer, req.streamed, whole, frames, "application/x-ndjson")


def _loaded(req, chat: bool) -> JSONResponse:
    """An empty request loads the model in Ollama; a ring is loaded already."""
    body = {"model": req.model, "created_at": _now(), "done": True, "done_reason": "load"}
    body.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    return JSONResponse(body)


async def chat(request: Request):
    _, req, served = await accept(request, ChatRequest)
    if not req.messages:
        return _loaded(req, chat=True)
    return await _answer(request, req, served, chat=True)


async def generate(request: Request):
    _, req, served = await accept(request, GenerateRequest)
    if not req.prompt:
        return _loaded(req, chat=False)
    return await _answer(request, req, served, chat=False)


def _size(n) -> str:
    if not n:
        return ""
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def _details(m: Served) -> dict:
    return {"parent_model": "", "format": "mlx", "family": m.model_type,
            "families": [m.model_type], "quantization_level": m.quant,
            "parameter_size": _size(m.parameter_count)}


def _entry(m: Served) -> dict:
    created = datetime.fromtimestamp(m.created, timezone.utc).isoformat().replace("+00:00", "Z")
    return {"name": f"{m.name}:latest", "model": f"{m.name}:latest", "modified_at": created,
            "size": m.weight_bytes, "digest": m.digest, "details": _details(m)}


async def tags(request: Request):
    return JSONResponse({"models": [_entry(m) for m in request.app.state.router.models]})


async def ps(request: Request):
    # A ring stays loaded until `clusterd serve` stops: no expiry to report.
    far = (datetime.now(timezone.utc) + timedelta(days=3650)).isoformat().replace("+00:00", "Z")
    return JSONResponse({"models": [
        {**_entry(m), "expires_at": far, "size_vram": m.weight_bytes,
         "context_length": m.engine.context}
        for m in request.app.state.router.models]})


async def show(request: Request):
    limits = request.app.state.config.limits
    req: ShowRequest = validated(ShowRequest, await read_json(request, limits))
    name = req.model or req.name
    if not name:
        raise bad_request("model is required", "model", "missing_required_parameter")
    m = request.app.state.router.get(name)
    chat = m.engine.chat
    arch = m.model_type
    info = {"general.architecture": arch, f"{arch}.context_length": m.engine.context,
            f"{arch}.block_count": m.engine.ring.config.get("num_hidden_layers")}
    if m.parameter_count:
        info["general.parameter_count"] = m.parameter_count
    opens = chat.template is not None and "<think>" in chat.template
    return JSONResponse({
        "modelfile": f"# served by clusterd\nFROM {m.name}\n", "parameters": "",
        "template": chat.template or "", "details": _details(m), "model_info": info,
        "capabilities": ["completion", *(["thinking"] if opens else [])],
        "modified_at": _entry(m)["modified_at"]})


async def version_info(request: Request):
    return JSONResponse({"version": version("clusterd")})


routes = (
    Route("/api/chat", chat, methods=["POST"]),
    Route("/api/generate", generate, methods=["POST"]),
    Route("/api/tags", tags, methods=["GET"]),
    Route("/api/ps", ps, methods=["GET"]),
    Route("/api/show", show, methods=["POST"]),
    Route("/api/version", version_info, methods=["GET"]),
)
