"""Malformed and hostile requests, over raw sockets where no client library
would send them: every one gets a 4xx with a message naming the problem,
the server stays up, and the next good request is answered."""

import json
import socket
import threading
import time

import pytest

from serving import rawhttp
from serving.conftest import CONTEXT, QUESTION
from serving.serverproc import KEY

CHAT = "/v1/chat/completions"
ASK = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def port(serving):
    return serving.server.port


@pytest.fixture(scope="module")
def good(serving):
    """A request that must be answered after each bad one."""
    def check(port):
        reply = rawhttp.get(port, "/v1/models")
        assert reply.status == 200, reply
        assert len(reply.json()["data"]) == 2
    return check


def chat(serving, **fields) -> dict:
    return {"model": serving.r1.name, "messages": ASK, "max_tokens": 4, **fields}


# -- numbers out of range, NaN, huge ints ------------------------------------

HUGE = [2**31, 2**32, 2**63, 2**64, 10**30, 10**100]


@pytest.mark.parametrize("value", HUGE)
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_huge_max_tokens_is_a_400_with_the_room(serving, port, good, field, value):
    reply = rawhttp.post(port, CHAT, chat(serving, **{field: value}) if field == "max_tokens"
                         else {**chat(serving), "max_tokens": None, field: value})
    assert reply.status == 400
    assert f"context of {CONTEXT} tokens" in reply.message and "new tokens fit" in reply.message
    good(port)


@pytest.mark.parametrize("value", [2**63, 2**64, 10**30, -1, -(2**70)])
def test_seed_out_of_range_is_named(serving, port, good, value):
    reply = rawhttp.post(port, CHAT, chat(serving, seed=value))
    assert reply.status == 400 and reply.message.startswith("seed:"), reply.message
    good(port)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty",
                                   "frequency_penalty", "min_p"])
def test_non_finite_numbers_are_named(serving, port, good, field, literal):
    raw = json.dumps(chat(serving))[:-1] + f', "{field}": {literal}}}'
    reply = rawhttp.post(port, CHAT, raw.encode())
    assert reply.status == 400 and reply.message.startswith(f"{field}:"), reply.message
    good(port)


@pytest.mark.parametrize("field, value", [
    ("temperature", 2.5), ("temperature", -0.1), ("temperature", 1e308), ("top_p", 1.5),
    ("top_p", -1), ("presence_penalty", 3), ("frequency_penalty", -2.5), ("min_p", 2),
    ("top_k", -1), ("repetition_penalty", 11), ("max_tokens", 0), ("max_tokens", -5),
    ("n", 0), ("top_logprobs", -1),
])
def test_out_of_range_values_are_named(serving, port, good, field, value):
    reply = rawhttp.post(port, CHAT, chat(serving, **{field: value}))
    assert reply.status == 400 and reply.message.startswith(f"{field}:"), reply.message
    good(port)


def test_an_int_too_long_to_parse_is_a_400(serving, port, good):
    raw = json.dumps(chat(serving))[:-1] + ', "seed": ' + "9" * 5000 + "}"
    reply = rawhttp.post(port, CHAT, raw.encode())
    assert reply.status == 400 and "not valid JSON" in reply.message
    good(port)


# -- wrong types in every field ----------------------------------------------

SAMPLES = {"string": "x", "integer": 3, "float": 0.5, "boolean": True, "list": [1],
           "object": {"a": 1}}

FIELDS = {  # field -> the kinds of JSON value it takes
    "model": {"string"}, "messages": {"list"}, "max_tokens": {"integer"},
    "max_completion_tokens": {"integer"}, "temperature": {"float", "integer"},
    "top_p": {"float", "integer"}, "seed": {"integer"}, "stop": {"string", "list"},
    "stream": {"boolean"}, "stream_options": {"object"},
    "presence_penalty": {"float", "integer"}, "frequency_penalty": {"float", "integer"},
    "top_k": {"integer"}, "min_p": {"float", "integer"},
    "repetition_penalty": {"float", "integer"}, "n": {"integer"}, "user": {"string"},
    "metadata": {"object"}, "store": {"boolean"}, "logprobs": {"boolean"},
    "top_logprobs": {"integer"}, "logit_bias": {"object"}, "response_format": {"object"},
    "parallel_tool_calls": {"boolean"}, "tools": {"list"}, "modalities": {"list"},
    "service_tier": {"string"},
}
WRONG = [(f, kind) for f, kinds in FIELDS.items() for kind in SAMPLES
         if kind not in kinds and not (kind == "integer" and "float" in kinds)]


@pytest.mark.parametrize("field, kind", WRONG)
def test_wrong_types_are_named(serving, port, good, field, kind):
    reply = rawhttp.post(port, CHAT, chat(serving, **{field: SAMPLES[kind]}))
    assert reply.status == 400, reply
    assert field.strip() in reply.message and reply.json()["error"]["param"] is not None
    good(port)


@pytest.mark.parametrize("messages, named", [
    ([], "messages"),
    ("hi", "messages"),
    ([1], "messages[0]"),
    ([{"content": "x"}], "messages[0].role"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "tool", "content": "x", "tool_call_id": "1"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content"),
    ([{"role": "user", "content": [5]}], "messages[0].content"),
    ([{"role": "user", "content": "x", "colour": "red"}], "messages[0].colour"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}],
     "messages[0].tool_calls"),
    ([{"role": "user", "content": "x"}, {"role": "user", "content": {"text": "y"}}],
     "messages[1].content"),
])
def test_bad_messages_are_named(serving, port, good, messages, named):
    reply = rawhttp.post(port, CHAT, chat(serving, messages=messages))
    assert reply.status == 400 and named in reply.message, reply.message
    good(port)


@pytest.mark.parametrize("stop", [["a"] * 17, [""], ["x" * 300], [1], {"a": 1}])
def test_bad_stop_lists_are_named(serving, port, good, stop):
    reply = rawhttp.post(port, CHAT, chat(serving, stop=stop))
    assert reply.status == 400 and reply.message.startswith("stop"), reply.message
    good(port)


@pytest.mark.parametrize("name", ["temprature", "best_of", "echo", "prompt", "foo"])
def test_unknown_parameters_are_named(serving, port, good, name):
    reply = rawhttp.post(port, CHAT, chat(serving, **{name: 1}))
    assert reply.status == 400
    assert reply.message == f"Unrecognized request argument supplied: {name}"
    good(port)


@pytest.mark.parametrize("param, value", [
    ("n", 3), ("tools", [{"type": "function"}]), ("tool_choice", "required"),
    ("response_format", {"type": "json_schema"}), ("logprobs", True), ("top_logprobs", 1),
    ("logit_bias", {"1": 5}), ("reasoning_effort", "high"), ("audio", {}),
    ("modalities", ["audio"]), ("prediction", {})])
def test_unsupported_parameters_are_named(serving, port, good, param, value):
    reply = rawhttp.post(port, CHAT, chat(serving, **{param: value}))
    assert reply.status == 400 and param in reply.message, reply.message
    good(port)


COMPLETIONS = "/v1/completions"


@pytest.mark.parametrize("body, named", [
    ({"prompt": "x"}, "model"),
    ({"model": "M"}, "prompt"),
    ({"model": "M", "prompt": 5}, "prompt"),
    ({"model": "M", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "M", "prompt": [1, 2, 3]}, "prompt"),
    ({"model": "M", "prompt": "x", "echo": True}, "echo"),
    ({"model": "M", "prompt": "x", "best_of": 2}, "best_of"),
    ({"model": "M", "prompt": "x", "logprobs": 2}, "logprobs"),
    ({"model": "M", "prompt": "x", "suffix": "y"}, "suffix"),
    ({"model": "M", "prompt": "x", "max_tokens": "9"}, "max_tokens"),
    ({"model": "M", "prompt": "x", "messages": []}, "messages"),
    ({"model": "M", "prompt": "", "max_tokens": 2}, "prompt"),
])
def test_bad_completions_are_named(serving, port, good, body, named):
    body = {k: (serving.r1.name if v == "M" else v) for k, v in body.items()}
    reply = rawhttp.post(port, COMPLETIONS, body)
    assert reply.status == 400 and named in reply.message, reply.message
    good(port)


# -- bodies: not JSON, not an object, too deep, too large --------------------

@pytest.mark.parametrize("raw, words", [
    (b"{", "not valid JSON"),
    (b'{"model": "x",}', "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"a string"', "must be a JSON object"),
    (b"42", "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (b"   ", "empty"),
    (b"model=x&messages=y", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nests 100000 levels"),
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nests 50000 levels"),
    (b'{"model": "x", "messages": ' + b"[" * 40 + b"]" * 40 + b"}", "nests 41 levels"),
    # Brackets inside a string do not nest (5000 of them, escaped quotes between).
    (b'{"model": "x", "messages": [], "user": "' + b'\\"[' * 5000 + b'"}', "messages"),
])
def test_bodies_that_are_not_json_objects(port, good, raw, words):
    reply = rawhttp.post(port, CHAT, raw)
    assert reply.status == 400 and words in reply.message, reply.message
    good(port)


def test_a_body_over_the_limit_is_a_413(serving, port, good):
    body = json.dumps(chat(serving, messages=[{"role": "user", "content": "x" * 2**20}]))
    # Declared: refused before the body is read (so only its start is sent).
    reply = rawhttp.send(port, rawhttp.head("POST", CHAT, body.encode()) + body[:100].encode())
    assert reply.status == 413 and str(2**20) in reply.message
    # Chunked: refused once more than the limit has arrived.
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in
                      (body[i:i + 65536].encode() for i in range(0, len(body), 65536)))
    reply = rawhttp.send(port, rawhttp.head("POST", CHAT, extra="Transfer-Encoding: chunked\r\n")
                         + chunks + b"0\r\n\r\n")
    assert reply.status == 413 and str(2**20) in reply.message
    good(port)


@pytest.mark.parametrize("path", [CHAT, "/api/chat", "/api/generate", COMPLETIONS])
def test_a_prompt_beyond_the_context_is_a_400(serving, port, good, path):
    long = "sky " * 800
    body = ({"model": serving.r1.name, "prompt": long} if path in ("/api/generate", COMPLETIONS)
            else {"model": serving.r1.name, "messages": [{"role": "user", "content": long}]})
    reply = rawhttp.post(port, path, {**body, "stream": path.startswith("/api")})
    assert reply.status == 400 and f"context of {CONTEXT} tokens" in reply.message
    good(port)


# -- models, paths, methods, keys --------------------------------------------

@pytest.mark.parametrize("path, body", [
    (CHAT, {"model": "gpt-4o", "messages": ASK}),
    (COMPLETIONS, {"model": "gpt-4o", "prompt": "x"}),
    ("/api/chat", {"model": "llama3:8b", "messages": ASK}),
    ("/api/generate", {"model": "llama3", "prompt": "x"}),
    ("/api/show", {"model": "llama3"}),
])
def test_unknown_models_are_a_404_naming_them(serving, port, good, path, body):
    reply = rawhttp.post(port, path, body)
    assert reply.status == 404 and body["model"] in reply.message
    assert serving.r1.name in reply.message  # and what is served
    good(port)


@pytest.mark.parametrize("method, path, status", [
    ("GET", CHAT, 405), ("PUT", "/v1/models", 405), ("DELETE", "/api/chat", 405),
    ("GET", "/v1/embeddings", 404), ("POST", "/api/pull", 404), ("GET", "/admin", 404),
    ("GET", "/v1/models/nope", 404), ("POST", "/api/tags", 405),
])
def test_wrong_paths_and_methods(port, good, method, path, status):
    reply = rawhttp.send(port, rawhttp.head(method, path))
    assert reply.status == status and path.rsplit("/", 1)[1] in reply.message
    good(port)


@pytest.mark.parametrize("auth", [None, "", "Bearer", "Bearer wrong", "Basic " + KEY, KEY + "x"])
@pytest.mark.parametrize("path", ["/v1/models", CHAT, "/api/tags", "/health"])
def test_a_missing_or_wrong_key_is_a_401(port, good, auth, path):
    extra = f"Authorization: {auth}\r\n" if auth is not None else ""
    reply = rawhttp.send(port, rawhttp.head("GET", path, key=None, extra=extra))
    assert reply.status == 401 and "API key" in reply.message
    good(port)


# -- HTTP framing over raw sockets -------------------------------------------

@pytest.mark.parametrize("length", ["abc", "-1", "1e3", "0x10", "12 3", "+5", "١٢", "9" * 40])
def test_bad_content_length_is_a_400(port, good, length):
    data = rawhttp.head("POST", CHAT, length=length) + b"{}"
    reply = rawhttp.send(port, data)
    assert reply.status == 400 and "malformed HTTP request" in reply.message, reply
    good(port)


@pytest.mark.parametrize("length", [str(2**20 + 1), str(10**12), str(10**18)])
def test_a_huge_content_length_is_a_413(port, good, length):
    reply = rawhttp.send(port, rawhttp.head("POST", CHAT, length=length) + b"{}")
    assert reply.status == 413 and reply.headers.get("connection") == "close"
    good(port)


@pytest.mark.parametrize("data", [
    b"GARBAGE\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    b"Content-Length: 3\r\n\r\n{}",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\n\r\n",  # no Host
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS hello
])
def test_malformed_http_is_a_400(port, good, data):
    reply = rawhttp.send(port, data)
    assert reply.status == 400 and "malformed HTTP request" in reply.message
    good(port)


@pytest.mark.parametrize("what", ["header", "path"])
def test_a_request_head_over_the_limit_is_a_431(port, good, what):
    big = "a" * (20 * 2**10)
    data = (f"GET /{big} HTTP/1.1\r\nHost: x\r\n\r\n" if what == "path"
            else f"GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").encode()
    reply = rawhttp.send(port, data)
    assert reply.status == 431 and "larger than" in reply.message
    good(port)


@pytest.mark.parametrize("status, bad", [
    (401, lambda body: rawhttp.head("POST", CHAT, body, key="wrong") + body),
    (404, lambda body: rawhttp.head("POST", "/v1/nowhere", body) + body),
    (405, lambda body: rawhttp.head("POST", "/v1/models", body) + body),
    (400, lambda body: rawhttp.head("POST", CHAT, body) + body),
])
def test_unread_bodies_do_not_become_the_next_request(serving, port, status, bad):
    # The body is a whole HTTP request: if it were parsed as one, the good
    # request after it would get the wrong reply.
    smuggled = b"GET /api/version HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " \
               + KEY.encode() + b"\r\n\r\n"
    with rawhttp.connect(port) as sock:
        sock.sendall(bad(smuggled))
        assert rawhttp.read_reply(sock).status == status
        sock.sendall(rawhttp.head("GET", "/v1/models"))
        reply = rawhttp.read_reply(sock)
        assert reply.status == 200 and reply.json()["object"] == "list"
        sock.sendall(rawhttp.head("GET", "/v1/models/" + serving.r1.name))
        assert rawhttp.read_reply(sock).json()["id"] == serving.r1.name


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sends before closing; fails if it keeps it open."""
    sock.settimeout(seconds)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("sent", [
    b"",
    b"POST /v1/chat/comp",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le",
])
def test_a_half_sent_head_is_dropped_after_the_read_timeout(port, good, sent):
    with rawhttp.connect(port) as sock:
        sock.sendall(sent)
        data = _closed_within(sock, 20)
    assert data.startswith(b"HTTP/1.1 408") and b"request head" in data
    good(port)


def test_a_half_sent_body_is_dropped_after_the_read_timeout(port, good):
    with rawhttp.connect(port) as sock:
        sock.sendall(rawhttp.head("POST", CHAT, length="100") + b'{"model": ')
        data = _closed_within(sock, 20)
    assert data.startswith(b"HTTP/1.1 408") and b"body did not arrive" in data
    good(port)


def test_many_half_sent_requests_are_all_dropped(port, good):
    socks = [rawhttp.connect(port) for _ in range(24)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         if i % 2 else rawhttp.head("POST", CHAT, length="50") + b"{")
        good(port)  # served meanwhile
        results = [None] * len(socks)

        def wait(i):
            results[i] = _closed_within(socks[i], 20)

        threads = [threading.Thread(target=wait, args=(i,)) for i in range(len(socks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert all(r is not None and r.startswith(b"HTTP/1.1 408") for r in results), results
    finally:
        for sock in socks:
            sock.close()
    good(port)


def test_a_client_closing_mid_body_leaves_the_server_up(serving, port, good):
    for _ in range(5):
        with rawhttp.connect(port) as sock:
            sock.sendall(rawhttp.head("POST", CHAT, length="1000") + b'{"model": "')
        time.sleep(0.05)
    good(port)


def test_still_answering_after_it_all(serving, openai_client):
    _, content, _, _ = serving.r1.chat_reference(ASK, 8)
    reply = openai_client.chat.completions.create(model=serving.r1.name, messages=ASK,
                                                  max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == content
    assert serving.server.proc.poll() is None


# -- the Ollama face ---------------------------------------------------------

OLLAMA_FIELDS = {  # path -> {field: a wrong value}
    "/api/chat": {"model": 5, "messages": "hi", "stream": "yes", "options": [1],
                  "think": 1, "keep_alive": None, "format": "json", "tools": "x",
                  "logprobs": "no"},
    "/api/generate": {"model": [], "prompt": 5, "system": 5, "raw": "yes", "suffix": "y",
                      "template": "{{ .Prompt }}", "context": [1, 2], "images": ["aGk="],
                      "width": 512, "stream": 0, "options": "hot"},
}
OLLAMA_CASES = [(p, f, v) for p, fields in OLLAMA_FIELDS.items() for f, v in fields.items()
                if v is not None]


@pytest.mark.parametrize("path, field, value", OLLAMA_CASES)
def test_ollama_fields_are_named(serving, port, good, path, field, value):
    base = ({"model": serving.r1.name, "messages": ASK} if path == "/api/chat"
            else {"model": serving.r1.name, "prompt": "x"})
    reply = rawhttp.post(port, path, {**base, field: value})
    assert reply.status == 400 and field in reply.message, reply.message
    assert isinstance(reply.json()["error"], str)  # Ollama's shape
    good(port)


OPTION_VALUES = {"temperature": ["hot", 3, -1], "top_p": ["x", 2], "seed": ["x", 2**64, -2],
                 "num_predict": ["x", 0, -3, 1.5], "stop": [5, [1]], "top_k": ["x", -1],
                 "num_ctx": ["x"], "mirostat": [2], "penalize_newline": [True],
                 "no_such_option": [1]}


@pytest.mark.parametrize("option, value", [(o, v) for o, vs in OPTION_VALUES.items()
                                           for v in vs])
def test_ollama_options_are_named(serving, port, good, option, value):
    reply = rawhttp.post(port, "/api/chat", {"model": serving.r1.name, "messages": ASK,
                                             "options": {option: value}})
    assert reply.status == 400 and f"options.{option}" in reply.message, reply.message
    good(port)


@pytest.mark.parametrize("messages, named", [
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": "x", "images": ["aGk="]}], "messages[0].images"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}],
     "messages[0].tool_calls"),
    ([{"role": "tool", "content": "42"}], "messages[0].role"),
])
def test_ollama_messages_are_named(serving, port, good, messages, named):
    reply = rawhttp.post(port, "/api/chat", {"model": serving.r1.name, "messages": messages})
    assert reply.status == 400 and named in reply.message, reply.message
    good(port)
