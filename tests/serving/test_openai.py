"""The OpenAI face through the official `openai` client, against real
daemons; every answer checked against single-process mlx-lm."""

import time

import openai
import pytest

from serving import rawhttp
from serving.conftest import CONTEXT, QUESTION, concurrently
from serving.serverproc import KEY

ASK = [{"role": "user", "content": QUESTION}]


def streamed(chunks) -> dict:
    out = {"role": None, "reasoning_content": "", "reasoning": "", "content": "",
           "finish_reason": None, "usage": None, "chunks": 0}
    for ch in chunks:
        out["chunks"] += 1
        if ch.usage is not None:
            out["usage"] = ch.usage
        for choice in ch.choices:
            d = choice.delta
            out["role"] = out["role"] or d.role
            out["content"] += d.content or ""
            extra = d.model_extra or {}
            out["reasoning_content"] += extra.get("reasoning_content") or ""
            out["reasoning"] += extra.get("reasoning") or ""
            out["finish_reason"] = choice.finish_reason or out["finish_reason"]
    return out


def test_chat_matches_mlx_lm_with_reasoning_apart(serving, openai_client):
    r1 = serving.r1
    reasoning, content, tokens, prompt_len = r1.chat_reference(ASK, 24)
    assert reasoning and content  # the model reasons, closes </think>, then answers
    reply = openai_client.chat.completions.create(model=r1.name, messages=ASK, max_tokens=24,
                                                  temperature=0)
    msg = reply.choices[0].message
    assert msg.content == content
    assert msg.model_extra["reasoning_content"] == msg.model_extra["reasoning"] == reasoning
    assert reply.choices[0].finish_reason == ("length" if len(tokens) == 24 else "stop")
    u = reply.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (
        prompt_len, len(tokens), prompt_len + len(tokens))
    think_end = r1.tokenizer.convert_tokens_to_ids("</think>")
    assert u.completion_tokens_details.reasoning_tokens == tokens.index(think_end) + 1
    # Other tests may have asked the same: the prompt cache then holds all but its last token.
    assert u.prompt_tokens_details.cached_tokens in (0, prompt_len - 1)


def test_second_turn_prefills_only_the_new_tokens(serving, openai_client):
    """A long first turn, then a second: the second reuses the first's caches on
    every stage (cached_tokens) and answers exactly as a cold mlx-lm run does."""
    r1 = serving.r1
    first = [{"role": "user", "content": "Tell me about the sea. " * 30}]
    one = openai_client.chat.completions.create(model=r1.name, messages=first, max_tokens=8,
                                                temperature=0)
    assert one.usage.prompt_tokens > 200
    second = [*first, {"role": "assistant", "content": one.choices[0].message.content},
              {"role": "user", "content": "And the sky?"}]
    reasoning, content, tokens, prompt_len = r1.chat_reference(second, 8)
    two = openai_client.chat.completions.create(model=r1.name, messages=second, max_tokens=8,
                                                temperature=0)
    cached = two.usage.prompt_tokens_details.cached_tokens
    assert one.usage.prompt_tokens - 3 <= cached < prompt_len, (cached, prompt_len)
    assert two.choices[0].message.content == content
    assert two.choices[0].message.model_extra["reasoning_content"] == reasoning


def test_streamed_chat_matches_mlx_lm(serving, openai_client):
    r1 = serving.r1
    reasoning, content, tokens, prompt_len = r1.chat_reference(ASK, 24)
    out = streamed(openai_client.chat.completions.create(
        model=r1.name, messages=ASK, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert out["role"] == "assistant"
    assert out["content"] == content
    assert out["reasoning_content"] == out["reasoning"] == reasoning
    assert out["finish_reason"] in ("length", "stop")
    assert (out["usage"].prompt_tokens, out["usage"].completion_tokens) == (prompt_len,
                                                                            len(tokens))


def _stop_across_tokens(r1, tokens) -> tuple[str, str]:
    """A stop string made of the end of one answer token and the start of
    the next, and the answer mlx-lm's text gives up to it."""
    think_end = r1.tokenizer.convert_tokens_to_ids("</think>")
    answer = tokens[tokens.index(think_end) + 1:]
    pieces = [r1.text(answer[:i + 1])[len(r1.text(answer[:i])):] for i in range(len(answer))]
    for a, b in zip(pieces, pieces[1:]):
        if len(a) >= 2 and len(b) >= 2 and a.isprintable() and b.isprintable():
            stop = a[-2:] + b[:2]
            content = r1.text(tokens).partition("</think>")[2].lstrip()
            return stop, content[:content.find(stop)]
    raise AssertionError(f"no two printable answer tokens in {pieces}")


def test_stop_string_spanning_two_tokens(serving, openai_client):
    r1 = serving.r1
    _, full, tokens, _ = r1.chat_reference(ASK, 48)
    stop, expected = _stop_across_tokens(r1, tokens)
    assert stop not in expected and full.startswith(expected + stop)
    reply = openai_client.chat.completions.create(model=r1.name, messages=ASK, max_tokens=48,
                                                  temperature=0, stop=[stop, "never-there"])
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "stop"
    out = streamed(openai_client.chat.completions.create(
        model=r1.name, messages=ASK, max_tokens=48, temperature=0, stop=stop, stream=True))
    assert out["content"] == expected and out["finish_reason"] == "stop"


def test_earlier_answers_are_sent_back_without_their_reasoning(serving, openai_client):
    r1 = serving.r1
    earlier = "<think>\nLet me see.\n</think>\n\nBecause of scattering."
    # mlx-lm gets what the chat template makes of the history (it drops the reasoning).
    history = [*ASK, {"role": "assistant", "content": earlier},
               {"role": "user", "content": "Are you sure?"}]
    reasoning, content, tokens, prompt_len = r1.chat_reference(history, 16)
    sent = [{"role": "developer", "content": "Answer briefly."}, *ASK,
            {"role": "assistant", "content": [{"type": "text", "text": earlier}],
             "reasoning_content": "Let me see."},
            {"role": "user", "content": [{"type": "text", "text": "Are you "},
                                         {"type": "text", "text": "sure?"}]}]
    with_system = [{"role": "system", "content": "Answer briefly."}, *history]
    r_sys, c_sys, t_sys, p_sys = r1.chat_reference(with_system, 16)
    reply = openai_client.chat.completions.create(model=r1.name, messages=sent, max_tokens=16,
                                                  temperature=0)
    assert reply.usage.prompt_tokens == p_sys
    assert reply.choices[0].message.content == c_sys
    assert reply.choices[0].message.model_extra["reasoning_content"] == r_sys
    assert p_sys > prompt_len  # the developer message is the system prompt


def test_plain_completion_matches_mlx_lm(serving, openai_client):
    r1 = serving.r1
    prompt = "The weather was cold"
    ids = list(r1.tokenizer.encode(prompt))
    text = r1.text(r1.greedy(ids, 12))
    reply = openai_client.completions.create(model=r1.name, prompt=prompt, max_tokens=12,
                                             temperature=0)
    assert reply.choices[0].text == text  # no template, no reasoning split
    assert reply.usage.prompt_tokens == len(ids)
    chunks = list(openai_client.completions.create(model=r1.name, prompt=prompt, max_tokens=12,
                                                   temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_models_are_listed_and_found(serving, openai_client):
    names = {m.id for m in openai_client.models.list()}
    assert names == {serving.r1.name, serving.distill.name}
    assert openai_client.models.retrieve(serving.distill.name).id == serving.distill.name
    with pytest.raises(openai.NotFoundError) as e:
        openai_client.models.retrieve("gpt-4o")
    assert "gpt-4o" in e.value.message and serving.r1.name in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        openai_client.chat.completions.create(model="gpt-4o", messages=ASK)
    assert e.value.body["param"] == "model"


@pytest.mark.parametrize("param, value", [
    ("n", 2),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"),
    ("response_format", {"type": "json_object"}),
    ("logprobs", True),
    ("top_logprobs", 3),
    ("logit_bias", {"42": 10}),
    ("functions", [{"name": "f", "parameters": {}}]),
    ("function_call", {"name": "f"}),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("reasoning_effort", "low"),
    ("verbosity", "low"),
    ("web_search_options", {}),
])
def test_unsupported_parameters_are_a_400_naming_them(serving, openai_client, param, value):
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model=serving.r1.name, messages=ASK, max_tokens=4,
                                              **{param: value})
    assert e.value.body["param"] == param
    assert param in e.value.message and "not supported" in e.value.message


@pytest.mark.parametrize("params", [
    {"temperature": 0, "repetition_penalty": 1.3}, {"temperature": 0, "presence_penalty": 1.5},
    {"temperature": 0, "frequency_penalty": 1.0}, {"temperature": 1.0, "top_k": 3, "seed": 3},
    {"temperature": 1.0, "min_p": 0.2, "seed": 11}, {"temperature": 0.7, "top_p": 0.5, "seed": 5}])
def test_sampling_parameters_are_honoured(serving, openai_client, params):
    """Penalties, top_k, min_p, top_p with a seed: the text mlx-lm samples with
    its own sampler and logits processors on the same prompt and seed."""
    ref = dict(params)
    ref["seed"] = ref.get("seed", 0)
    expected = serving.r1.sampled_reference(ASK, 12, **ref)
    standard = {k: v for k, v in params.items() if k in ("temperature", "top_p", "seed",
                                                         "presence_penalty",
                                                         "frequency_penalty")}
    extra = {k: v for k, v in params.items() if k not in standard}
    reply = openai_client.chat.completions.create(model=serving.r1.name, messages=ASK,
                                                  max_tokens=12, extra_body=extra, **standard)
    msg = reply.choices[0].message
    reasoning = msg.model_extra["reasoning_content"]
    whole = f"{reasoning}</think>{msg.content}" if "</think>" in expected else reasoning
    assert whole.replace("</think>", "").strip() == expected.replace("</think>", "").strip()


def test_harmless_parameters_are_accepted(serving, openai_client):
    reasoning, content, _, _ = serving.r1.chat_reference(ASK, 8)
    reply = openai_client.chat.completions.create(
        model=serving.r1.name, messages=ASK, max_tokens=8, temperature=0, user="u-1",
        metadata={"k": "v"}, store=False, n=1, response_format={"type": "text"},
        tool_choice="none", parallel_tool_calls=False, seed=7)
    assert reply.choices[0].message.model_extra["reasoning_content"] == reasoning


def test_a_prompt_beyond_the_context_is_a_400_with_the_room(serving, openai_client):
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(
            model=serving.r1.name, messages=[{"role": "user", "content": "sky " * 800}])
    assert f"context of {CONTEXT} tokens" in e.value.message
    prompt_len = len(serving.r1.prompt(ASK))
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model=serving.r1.name, messages=ASK,
                                              max_tokens=CONTEXT)
    assert f"at most {CONTEXT - prompt_len} new tokens fit" in e.value.message
    assert e.value.body["param"] == "max_tokens"


def _health(port: int) -> dict:
    return rawhttp.get(port, "/health").json()["models"][0]


def _wait_idle(port: int, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = _health(port)
        if row["running"] == 0 and row["queued"] == 0:
            return row
        time.sleep(0.1)
    raise AssertionError(f"still busy: {row}")


def test_a_full_queue_is_a_503_and_clients_that_leave_are_cancelled(serving, openai_client):
    port = serving.server.port
    long = dict(model=serving.r1.name, messages=ASK, max_tokens=CONTEXT - 32, temperature=0)
    running = openai_client.chat.completions.create(**long, stream=True)
    next(iter(running))  # generating
    # Two more wait for the ring (the queue holds two): raw sockets, unread.
    body = rawhttp.json.dumps({**long, "stream": True}).encode()
    waiting = [rawhttp.connect(port) for _ in range(2)]
    for sock in waiting:
        sock.sendall(rawhttp.head("POST", "/v1/chat/completions", body) + body)
    deadline = time.monotonic() + 30
    while _health(port)["queued"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(openai.InternalServerError) as e:
        openai_client.chat.completions.create(**long)
    assert e.value.status_code == 503
    assert "2 waiting" in e.value.message and "queue holds 2" in e.value.message
    for sock in waiting:
        sock.close()
    running.close()  # the client leaves mid-stream
    _wait_idle(port)
    log = serving.server.log()
    assert log.count("the client left") >= 3, log[-3000:]


def test_a_client_that_stops_waiting_cancels_its_generation(serving):
    port = serving.server.port
    slow = openai.OpenAI(base_url=f"{serving.url}/v1", api_key=KEY, max_retries=0, timeout=1.0)
    before = serving.server.log().count("the client left")
    with pytest.raises(openai.APITimeoutError):
        slow.chat.completions.create(model=serving.r1.name, messages=ASK,
                                     max_tokens=CONTEXT - 32, temperature=0)
    _wait_idle(port)
    assert serving.server.log().count("the client left") == before + 1


def test_concurrent_requests_each_get_their_own_answer(serving, openai_client):
    r1 = serving.r1
    asks = [[{"role": "user", "content": q}] for q in (QUESTION, "What is 17 times 23?")]
    expected = [r1.chat_reference(a, 12)[1] for a in asks]
    got = concurrently(*(
        lambda a=a: openai_client.chat.completions.create(
            model=r1.name, messages=a, max_tokens=12, temperature=0).choices[0].message.content
        for a in asks))
    assert got == expected
