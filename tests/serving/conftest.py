"""One `clusterd serve` for the serving tests: a synthetic R1 that ends its
reasoning (see thinking.py) on two daemons, and a synthetic distill (Qwen2
base) on a third of its own (--also-peer), both behind one server."""

import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlx_lm.utils import load_tokenizer

from clusterd.local_cluster import LocalCluster
from reference import mlx_lm_greedy, mlx_lm_sampled, mlx_lm_text
from serving.serverproc import KEY, ServeProcess, start_serve
from serving.thinking import make_thinking, think_end_id

CONTEXT = 512
QUESTION = "Why is the sky blue?"


@dataclass(frozen=True)
class Model:
    path: Path
    prefill_step_size: int = 2048  # as the server was started with

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def tokenizer(self):
        return load_tokenizer(self.path)

    def prompt(self, messages) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        tok = self.tokenizer
        return mlx_lm_greedy(self.path, prompt, max_tokens, self.prefill_step_size,
                             stop_ids=tuple(tok.eos_token_ids))

    def text(self, tokens: list[int]) -> str:
        return mlx_lm_text(self.tokenizer, tokens)

    def chat_reference(self, messages, max_tokens: int) -> tuple[str, str, list[int], int]:
        """(reasoning, content, tokens, prompt length) as mlx-lm has them: R1's
        template opens <think>, so the reasoning is what comes before </think>."""
        prompt = self.prompt(messages)
        tokens = self.greedy(prompt, max_tokens)
        reasoning, _, content = self.text(tokens).partition("</think>")
        return reasoning.strip(), content.lstrip(), tokens, len(prompt)

    def sampled_reference(self, messages, max_tokens: int, **params) -> str:
        """The whole text (reasoning and answer) mlx-lm samples with `params`."""
        tokens = mlx_lm_sampled(self.path, self.prompt(messages), max_tokens, context=CONTEXT,
                                stop_ids=tuple(self.tokenizer.eos_token_ids), **params)
        return self.text(tokens)


@dataclass(frozen=True)
class Serving:
    server: ServeProcess
    r1: Model  # emits </think> after a few tokens
    distill: Model
    cluster: LocalCluster

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="package")
def serving(synthetic, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    base = synthetic("deepseek_v3", "tiny")
    tok = load_tokenizer(base)
    question = tok.apply_chat_template([{"role": "user", "content": QUESTION}],
                                       add_generation_prompt=True)
    # Greedy decoding's fourth token becomes </think>: a few tokens of reasoning.
    fourth = mlx_lm_greedy(base, question, 4, 2048)[3]
    r1 = Model(make_thinking(base, tmp / "r1-thinking", fourth, think_end_id(tok)))
    distill = Model(synthetic("qwen2", "tiny"))
    with LocalCluster(3, workdir=tmp / "nodes", prefix="node") as cluster:
        a = cluster.addresses
        server = start_serve(r1.path, a[:2], tmp / "serve.log", "--context", str(CONTEXT),
                             "--also", str(distill.path), "--also-peer", a[2],
                             "--read-timeout", "2", "--queue", "2", "--max-body", str(2**20),
                             "--sessions", "1")  # one at a time: the queue tests count on it
        try:
            yield Serving(server, r1, distill, cluster)
        finally:
            assert server.stop() == 0, server.log()


@pytest.fixture(scope="package")
def openai_client(serving):
    import openai
    return openai.OpenAI(base_url=f"{serving.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="package")
def ollama_client(serving):
    import ollama
    return ollama.Client(host=serving.url, headers={"Authorization": f"Bearer {KEY}"},
                         timeout=60)


def concurrently(*calls):
    """Run the calls on threads at once; their results, in order."""
    results = [None] * len(calls)

    def run(i):
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results
