"""Reading a request body within bounds: its size, the time it takes to
arrive, and how deep its JSON nests (checked on the raw bytes, before a
recursive parser sees it). Any problem is an ApiError naming it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import accumulate
from types import MappingProxyType

import anyio
from starlette.requests import ClientDisconnect, Request

from clusterd.serve.errors import ApiError, bad_request


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 4 * 2**20
    max_header_bytes: int = 16 * 2**10  # request line and headers together
    read_timeout_s: float = 30.0  # for the request head, and again for the body
    keep_alive_s: float = 5.0  # idle time between requests on a connection
    max_json_depth: int = 32
    max_connections: int = 256


_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')
# Every byte but the four brackets, to delete.
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH = MappingProxyType({ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1})


def json_depth(raw: bytes) -> int:
    """How deep the arrays and objects of `raw` nest, in linear time.
    Escapes go first (so strings hold no quote), then strings (so brackets in
    text do not count); what is left of invalid JSON the parser rejects."""
    bare = _STRING.sub(b"", _ESCAPE.sub(b"", raw)).translate(None, _NOT_BRACKET)
    return max(accumulate(_DEPTH[b] for b in bare), default=0)


def too_large(limits: Limits) -> ApiError:
    return ApiError(413, f"the request body is larger than {limits.max_body_bytes} bytes",
                    code="body_too_large", headers={"Connection": "close"})


async def read_body(request: Request, limits: Limits) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and int(declared) > limits.max_body_bytes:
        raise too_large(limits)  # h11 has checked that it is a number
    chunks, size = [], 0
    try:
        with anyio.fail_after(limits.read_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise too_large(limits)
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {limits.read_timeout_s:g} s",
                       code="read_timeout", headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise ApiError(400, "the client closed the connection before sending the body",
                       code="incomplete_body", headers={"Connection": "close"}) from None
    return b"".join(chunks)


async def read_json(request: Request, limits: Limits) -> dict:
    """The body as a JSON object."""
    raw = await read_body(request, limits)
    if not raw.strip():
        raise bad_request("the request body is empty: send a JSON object", code="invalid_json")
    depth = json_depth(raw)
    if depth > limits.max_json_depth:
        raise bad_request(f"the JSON body nests {depth} levels deep; at most "
                          f"{limits.max_json_depth} are accepted", code="invalid_json")
    try:
        # NaN and Infinity parse to floats here; the request models reject
        # them naming the field.
        body = json.loads(raw)
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not UTF-8: {e}", code="invalid_json") from None
    except ValueError as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(body).__name__}",
                          code="invalid_json")
    return body
