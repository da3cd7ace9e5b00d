"""The Ollama face through the official `ollama` client, against real
daemons; answers checked against single-process mlx-lm."""

import httpx
import ollama
import pytest

from serving.conftest import CONTEXT, QUESTION
from serving.serverproc import KEY

ASK = [{"role": "user", "content": QUESTION}]


def test_chat_matches_mlx_lm_with_thinking_apart(serving, ollama_client):
    r1 = serving.r1
    reasoning, content, tokens, prompt_len = r1.chat_reference(ASK, 24)
    reply = ollama_client.chat(model=f"{r1.name}:latest", messages=ASK,
                               options={"temperature": 0, "num_predict": 24}, stream=False)
    assert reply.message.role == "assistant"
    assert reply.message.thinking == reasoning
    assert reply.message.content == content
    assert reply.done and reply.done_reason == ("length" if len(tokens) == 24 else "stop")
    assert (reply.prompt_eval_count, reply.eval_count) == (prompt_len, len(tokens))
    assert reply.total_duration >= reply.eval_duration > 0
    assert reply.model == f"{r1.name}:latest"


def test_streamed_chat_matches_mlx_lm(serving, ollama_client):
    r1 = serving.r1
    reasoning, content, tokens, _ = r1.chat_reference(ASK, 24)
    parts = list(ollama_client.chat(model=r1.name, messages=ASK, stream=True,
                                    options={"temperature": 0, "num_predict": 24}))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.thinking or "" for p in parts) == reasoning
    assert "".join(p.message.content or "" for p in parts) == content
    assert parts[-1].eval_count == len(tokens)


def test_think_false_leaves_the_reasoning_out(serving, ollama_client):
    r1 = serving.r1
    _, content, _, _ = r1.chat_reference(ASK, 24)
    reply = ollama_client.chat(model=r1.name, messages=ASK, think=False,
                               options={"temperature": 0, "num_predict": 24})
    assert reply.message.thinking is None and reply.message.content == content
    parts = list(ollama_client.chat(model=r1.name, messages=ASK, think=False, stream=True,
                                    options={"temperature": 0, "num_predict": 24}))
    assert all(p.message.thinking is None for p in parts)
    assert "".join(p.message.content for p in parts) == content


def test_generate_templated_and_raw_match_mlx_lm(serving, ollama_client):
    r1 = serving.r1
    reasoning, content, _, _ = r1.chat_reference(
        [{"role": "system", "content": "Be brief."}, *ASK], 20)
    reply = ollama_client.generate(model=r1.name, prompt=QUESTION, system="Be brief.",
                                   options={"temperature": 0, "num_predict": 20})
    assert (reply.thinking, reply.response) == (reasoning, content)
    prompt = "The weather was cold"
    text = r1.text(r1.greedy(list(r1.tokenizer.encode(prompt)), 10))
    raw = ollama_client.generate(model=r1.name, prompt=prompt, raw=True,
                                 options={"temperature": 0, "num_predict": 10})
    assert raw.response == text and raw.thinking is None
    parts = list(ollama_client.generate(model=r1.name, prompt=prompt, raw=True, stream=True,
                                        options={"temperature": 0, "num_predict": 10}))
    assert "".join(p.response for p in parts) == text and parts[-1].done


def test_stop_option_and_num_predict(serving, ollama_client):
    r1 = serving.r1
    _, content, _, _ = r1.chat_reference(ASK, 40)
    stop = content[3:7]
    expected = content[:content.find(stop)]
    reply = ollama_client.chat(model=r1.name, messages=ASK,
                               options={"temperature": 0, "num_predict": 40, "stop": [stop]})
    assert reply.message.content == expected and reply.done_reason == "stop"
    short = ollama_client.chat(model=r1.name, messages=ASK,
                               options={"temperature": 0, "num_predict": 2})
    assert short.eval_count == 2 and short.done_reason == "length"


def test_load_time_options_are_accepted(serving, ollama_client):
    reasoning, _, _, _ = serving.r1.chat_reference(ASK, 6)
    reply = ollama_client.chat(model=serving.r1.name, messages=ASK, keep_alive="5m",
                               options={"temperature": 0, "num_predict": 6, "num_ctx": CONTEXT,
                                        "num_thread": 4, "use_mmap": True, "seed": -1})
    assert reply.message.thinking == reasoning


@pytest.mark.parametrize("kwargs, named", [
    ({"options": {"mirostat": 1}}, "options.mirostat"),
    ({"options": {"repeat_last_n": 32}}, "options.repeat_last_n"),
    ({"options": {"typical_p": 0.5}}, "options.typical_p"),
    ({"options": {"tfs_z": 0.9}}, "options.tfs_z"),
    ({"options": {"warp_drive": 9}}, "options.warp_drive"),
    ({"options": {"temperature": "hot"}}, "options.temperature"),
    ({"format": "json"}, "format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"think": "high"}, "think"),
    ({"logprobs": True}, "logprobs"),
])
def test_options_it_cannot_honour_are_a_400_naming_them(serving, ollama_client, kwargs, named):
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model=serving.r1.name, messages=ASK, **kwargs)
    assert e.value.status_code == 400
    assert named in e.value.error


def test_models_are_listed_shown_and_unknown_is_a_404(serving, ollama_client):
    tags = ollama_client.list()
    assert {m.model for m in tags.models} == {f"{serving.r1.name}:latest",
                                              f"{serving.distill.name}:latest"}
    assert all(m.size > 0 and m.details.quantization_level == "4bit" for m in tags.models)
    running = ollama_client.ps()
    assert {m.context_length for m in running.models} == {CONTEXT}
    shown = ollama_client.show(serving.r1.name)
    assert "<think>" in shown.template and "thinking" in shown.capabilities
    assert shown.modelinfo["general.architecture"] == "deepseek_v3"
    assert ollama_client.show(f"{serving.distill.name}:latest").details.family == "qwen2"
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model="llama3.2", messages=ASK)
    assert e.value.status_code == 404 and "llama3.2" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.show("llama3.2")
    assert e.value.status_code == 404


def test_empty_requests_load_and_version_answers(serving, ollama_client):
    loaded = ollama_client.chat(model=serving.r1.name, messages=[])
    assert loaded.done and loaded.done_reason == "load"
    assert ollama_client.generate(model=serving.r1.name).done_reason == "load"
    version = httpx.get(f"{serving.url}/api/version",
                        headers={"Authorization": f"Bearer {KEY}"}).json()["version"]
    assert version and version[0].isdigit()
