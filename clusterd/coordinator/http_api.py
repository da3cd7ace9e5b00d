"""An OpenAI-compatible HTTP API over a loaded ring, so chat apps and
scripts can talk to the cluster: GET /v1/models, POST /v1/chat/completions
(streamed as server-sent events with "stream": true), GET /health.

Plain HTTP without TLS: it binds to 127.0.0.1 unless told otherwise, and
requires `Authorization: Bearer <key>` when started with an API key."""

import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Optional

from clusterd.coordinator.chat import Chat
from clusterd.coordinator.generation import (GenerationError, GenerationRequest,
                                             GenerationStats, Sampling)

log = logging.getLogger("clusterd.http")

MAX_BODY_BYTES = 4 * 2**20


class BadRequest(ValueError):
    pass


@dataclass(frozen=True)
class Completion:
    """What one request asks for, validated."""

    messages: list[dict]
    max_tokens: int
    sampling: Sampling
    stream: bool


def parse_request(body: bytes, default_max_tokens: int) -> Completion:
    try:
        req = json.loads(body or b"{}")
    except ValueError as e:
        raise BadRequest(f"the body is not JSON: {e}") from None
    if not isinstance(req, dict):
        raise BadRequest("the body must be a JSON object")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise BadRequest("each message needs a 'role' (system, user or assistant) and a "
                             "string 'content'")
    max_tokens = req.get("max_tokens", req.get("max_completion_tokens", default_max_tokens))
    temperature = req.get("temperature", 0.6)
    top_p = req.get("top_p", 0.95)
    seed = req.get("seed")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest("'max_tokens' must be a positive integer")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise BadRequest("'temperature' must be a number >= 0")
    if not isinstance(top_p, (int, float)) or not 0 <= top_p <= 1:
        raise BadRequest("'top_p' must be a number in [0, 1]")
    if seed is not None and (not isinstance(seed, int) or seed < 0):
        raise BadRequest("'seed' must be a non-negative integer")
    return Completion(
        messages=[{"role": m["role"], "content": m["content"]} for m in messages],
        max_tokens=max_tokens, sampling=Sampling(float(temperature), float(top_p), seed),
        stream=bool(req.get("stream", False)))


class ChatService:
    """Turns validated completions into tokens through the ring."""

    def __init__(self, pipeline: Any, chat: Chat, model_name: str, default_max_tokens: int):
        self.pipeline = pipeline  # the Engine
        self.chat = chat
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens

    def pieces(self, c: Completion, stats: GenerationStats) -> Iterator[str]:
        ids = self.chat.encode(c.messages)
        gen = self.pipeline.submit(GenerationRequest(tuple(ids), c.max_tokens, c.sampling,
                                                     tuple(self.chat.stop_ids)))
        gen.stats = stats
        stats.prompt_tokens = len(ids)
        return self.chat.stream_text(gen)


def make_handler(service: ChatService, api_key: Optional[str]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # to our logger, not stderr
            log.info("%s %s", self.address_string(), fmt % args)

        def _send_json(self, status: int, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            self._send_json(status, {"error": {"message": message, "type": "invalid_request_error"
                                               if status < 500 else "server_error"}})

        def _authorized(self) -> bool:
            if api_key is None:
                return True
            given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if hmac.compare_digest(given.encode(), api_key.encode()):
                return True
            self._error(HTTPStatus.UNAUTHORIZED, "missing or wrong API key")
            return False

        def do_GET(self):
            if not self._authorized():
                return
            if self.path == "/v1/models":
                self._send_json(200, {"object": "list", "data": [
                    {"id": service.model_name, "object": "model", "owned_by": "clusterd"}]})
            elif self.path == "/health":
                self._send_json(200, {"status": "ok", "model": service.model_name})
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such path {self.path}")

        def do_POST(self):
            if not self._authorized():
                return
            if self.path != "/v1/chat/completions":
                self._error(HTTPStatus.NOT_FOUND, f"no such path {self.path}")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
                return
            try:
                c = parse_request(self.rfile.read(length), service.default_max_tokens)
            except BadRequest as e:
                self._error(HTTPStatus.BAD_REQUEST, str(e))
                return
            rid = f"chatcmpl-{uuid.uuid4().hex}"
            if c.stream:
                self._stream(rid, c)
            else:
                self._complete(rid, c)

        def _complete(self, rid: str, c: Completion) -> None:
            stats = GenerationStats()
            try:
                text = "".join(service.pieces(c, stats))
            except GenerationError as e:
                self._error(HTTPStatus.BAD_GATEWAY, str(e))
                return
            self._send_json(200, {
                "id": rid, "object": "chat.completion", "created": int(time.time()),
                "model": service.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": stats.finish_reason or "stop"}],
                "usage": _usage(stats)})

        def _stream(self, rid: str, c: Completion) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            stats = GenerationStats()

            def chunk(delta: dict, finish: Optional[str] = None, **extra) -> None:
                obj = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                       "model": service.model_name,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
                self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
                self.wfile.flush()

            try:
                chunk({"role": "assistant"})
                for piece in service.pieces(c, stats):
                    chunk({"content": piece})
                chunk({}, stats.finish_reason or "stop", usage=_usage(stats))
            except GenerationError as e:
                self.wfile.write(f"data: {json.dumps({'error': {'message': str(e)}})}\n\n"
                                 .encode())
            except (BrokenPipeError, ConnectionResetError):
                return  # the client left; the pipeline's session is ended by its generator
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


def _usage(stats: GenerationStats) -> dict:
    n = len(stats.tokens)
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": n,
            "total_tokens": stats.prompt_tokens + n}


class ApiServer:
    def __init__(self, service: ChatService, host: str, port: int, api_key: Optional[str] = None):
        self.httpd = ThreadingHTTPServer((host, port), make_handler(service, api_key))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.25)

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
