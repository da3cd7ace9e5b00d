"""`clusterd serve`: an OpenAI-compatible API over real daemons, checked
against mlx-lm, with its key and bad requests."""

import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from mlx_lm.utils import load_tokenizer

from reference import mlx_lm_greedy, mlx_lm_text

KEY = "test-key-123"
QUESTION = "Why is the sky blue?"


@pytest.fixture(scope="module")
def server(three_nodes, synthetic):
    model = synthetic("deepseek_v3", "tiny")
    proc = subprocess.Popen(
        [sys.executable, "-m", "clusterd", "serve", str(model),
         *sum((["--peer", a] for a in three_nodes.addresses), []),
         "--http-port", "0", "--api-key", KEY],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    m = re.search(r"on (http://\S+/v1)", line)
    assert m, line
    yield m.group(1), model
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0


def post(url, body, key=KEY):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    return urllib.request.urlopen(req, timeout=120)


def expected_text(model, max_tokens):
    tok = load_tokenizer(model)
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}],
                                     add_generation_prompt=True)
    tokens = mlx_lm_greedy(model, prompt, max_tokens, 2048, stop_ids=tuple(tok.eos_token_ids))
    return mlx_lm_text(tok, tokens), len(prompt), len(tokens)


def test_completion_matches_mlx_lm(server):
    base, model = server
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24,
            "temperature": 0}
    reply = json.load(post(f"{base}/chat/completions", body))
    text, prompt_len, n = expected_text(model, 24)
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert reply["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": n,
                              "total_tokens": prompt_len + n}


def test_streamed_completion_matches_mlx_lm(server):
    base, model = server
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24,
            "temperature": 0, "stream": True}
    events = [line[len("data: "):] for line in post(f"{base}/chat/completions", body)
              .read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == expected_text(model, 24)[0]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_key_is_required(server):
    base, _ = server
    with pytest.raises(urllib.error.HTTPError) as e:
        post(f"{base}/chat/completions", {"messages": [{"role": "user", "content": "x"}]},
             key="wrong")
    assert e.value.code == 401


@pytest.mark.parametrize("body, problem", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
])
def test_bad_requests_are_named(server, body, problem):
    base, _ = server
    with pytest.raises(urllib.error.HTTPError) as e:
        post(f"{base}/chat/completions", body)
    assert e.value.code == 400
    assert problem in json.load(e.value)["error"]["message"]
    models = json.load(urllib.request.urlopen(urllib.request.Request(
        f"{base}/models", headers={"Authorization": f"Bearer {KEY}"}), timeout=10))
    assert models["data"][0]["object"] == "model"  # still serving
