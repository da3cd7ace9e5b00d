"""Every way a request fails, as one exception with its HTTP status, and how
each face writes it: OpenAI's `{"error": {message, type, param, code}}`,
Ollama's `{"error": message}`. Engine errors map here too."""

from __future__ import annotations

import json
from typing import Mapping, Optional

from pydantic import BaseModel, ValidationError

from clusterd.coordinator.generation import (ContextTooLong, GenerationError, QueueFull,
                                             RingUnavailable, Unsupported)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[Mapping[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 404:
            return "not_found_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def ollama_body(self) -> dict:
        return {"error": self.message}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param, code)


def unsupported(param: str, why: str = "") -> ApiError:
    text = f"{param} is not supported by clusterd" + (f": {why}" if why else "")
    return ApiError(400, text, param, "unsupported_parameter")


def from_generation_error(e: GenerationError, *, running: bool = False) -> ApiError:
    """An engine error as an HTTP error: admission refusals are the
    client's (4xx) or the ring's (503); other errors at submit are the
    request's (400), and while running a node's (502)."""
    if isinstance(e, ContextTooLong):
        param = "messages" if e.prompt_tokens >= e.context else "max_tokens"
        return ApiError(400, str(e), param, "context_length_exceeded")
    if isinstance(e, QueueFull):
        return ApiError(503, str(e), None, "queue_full", {"Retry-After": "5"})
    if isinstance(e, RingUnavailable):
        return ApiError(503, str(e), None, "ring_unavailable")
    if isinstance(e, Unsupported):
        word = str(e).split(" ", 1)[0]
        return ApiError(400, str(e), word if word.isidentifier() else None,
                        "unsupported_parameter")
    if running:
        return ApiError(502, str(e), None, "generation_failed")
    return ApiError(400, str(e), None, "invalid_request")


def node_unreachable(message: str) -> ApiError:
    return ApiError(503, message, None, "ring_unavailable")


def validated(model: type[BaseModel], body: dict):
    """`body` as a `model`, or a 400 naming the field."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from None


def from_validation_error(e: ValidationError) -> ApiError:
    """The first problem pydantic found, naming the field as a path
    (messages[0].content), in words a client can act on."""
    err = e.errors(include_url=False)[0]
    path = _path(err["loc"])
    kind, msg = err["type"], err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        if len(err["loc"]) == 1:
            return ApiError(400, f"Unrecognized request argument supplied: {path}", path,
                            "unknown_parameter")
        return ApiError(400, f"{path}: unknown field", path, "unknown_parameter")
    if kind == "missing":
        return ApiError(400, f"{path} is required", path, "missing_required_parameter")
    given = ("" if kind in ("value_error", "assertion_error")
             else f" (got {_short(err.get('input'))})")
    return ApiError(400, f"{path}: {msg}{given}" if path else f"{msg}{given}", path or None,
                    "invalid_value")


def _path(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not part.startswith(("function-", "list[", "dict[")):
            out += f".{part}" if out else part
    return out


def _short(value) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
