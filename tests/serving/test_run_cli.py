"""`clusterd run` shows R1's reasoning, then the answer (--hide-reasoning
shows the answer alone), and --json reports them apart; checked against
mlx-lm on the synthetic R1 that ends its reasoning. It runs on the nodes the
server uses: same model, same split, so nothing is reloaded."""

import json
import subprocess
import sys

import pytest

from serving.conftest import CONTEXT, QUESTION

ASK = [{"role": "user", "content": QUESTION}]


def run(serving, *extra: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "clusterd", "run", str(serving.r1.path),
         *sum((["--peer", a] for a in serving.cluster.addresses[:2]), []),
         "--prompt", QUESTION, "--max-tokens", "24", "--temp", "0", "--context", str(CONTEXT),
         *extra],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("hide", [False, True])
def test_reasoning_then_answer(serving, hide):
    reasoning, content, _, _ = serving.r1.chat_reference(ASK, 24)
    shown = run(serving, *(["--hide-reasoning"] if hide else []))
    assert shown == (f"{content}\n" if hide else f"{reasoning}\n\n{content}\n")


def test_json_reports_reasoning_and_content_apart(serving):
    reasoning, content, tokens, prompt_len = serving.r1.chat_reference(ASK, 24)
    report = json.loads(run(serving, "--json"))
    assert report["tokens"] == tokens and report["prompt_tokens"] == prompt_len
    assert (report["reasoning"], report["content"]) == (reasoning, content)
    assert report["text"] == serving.r1.text(tokens)
