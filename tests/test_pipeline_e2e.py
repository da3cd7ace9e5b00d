"""The distributed pipeline against single-process mlx-lm, token for token,
over real daemon processes on loopback."""

import json
import subprocess
import sys

import pytest

from clusterd.coordinator.cluster import connect, load_ring, ranges_from_counts
from clusterd.coordinator.pipeline import GenerationStats, Pipeline, Sampling
from clusterd.models.stage import read_config
from reference import mlx_lm_greedy, mlx_lm_text

NEW_TOKENS = 64
CHUNK = 16  # small prefill chunks so a 40-token prompt spans three of them
PROMPTS = {
    "one-token": [5],
    "few-tokens": [17, 300, 42, 9, 1000],
    "multi-chunk": [(i * 37 + 11) % 1500 + 2 for i in range(40)],
}


def splits(num_layers: int) -> dict[str, list[int]]:
    half = num_layers // 2
    return {
        "1-node": [num_layers],
        "2-even": [half, num_layers - half],
        "2-uneven": [1, num_layers - 1],
        "3-one-layer-middle": [num_layers - 3, 1, 2],
        "3-uneven": [1, num_layers - 2, 1],
    }


def generate(addresses, model, counts, prompt):
    nodes = connect(addresses[: len(counts)])
    stages = load_ring(model, nodes, ranges_from_counts(counts))
    stats = GenerationStats()
    tokens = list(Pipeline(stages, prefill_step_size=CHUNK).generate(
        prompt, NEW_TOKENS, Sampling(temperature=0.0), stop_ids=[1], stats=stats))
    for n in nodes:
        n.peer.close()
    return tokens, stats


@pytest.fixture(scope="module")
def deepseek(synthetic):
    return synthetic("deepseek_v3", "tiny")


@pytest.mark.parametrize("split_name", ["1-node", "2-even", "2-uneven", "3-one-layer-middle",
                                        "3-uneven"])
@pytest.mark.parametrize("prompt_name", list(PROMPTS))
def test_deepseek_matches_mlx_lm(three_nodes, deepseek, split_name, prompt_name):
    num_layers = read_config(deepseek)["num_hidden_layers"]
    counts = splits(num_layers)[split_name]
    prompt = PROMPTS[prompt_name]
    tokens, stats = generate(three_nodes.addresses, deepseek, counts, prompt)
    expected = mlx_lm_greedy(deepseek, prompt, NEW_TOKENS, CHUNK, stop_ids=(1,))
    assert len(expected) == NEW_TOKENS, "pick a prompt the reference does not stop early on"
    assert tokens == expected
    assert stats.prompt_tokens == len(prompt)
    assert stats.finish_reason == "length"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("prompt_name", ["few-tokens", "multi-chunk"])
def test_distill_bases_match_mlx_lm_on_two_nodes(three_nodes, synthetic, arch, prompt_name):
    model = synthetic(arch, "tiny")
    num_layers = read_config(model)["num_hidden_layers"]
    prompt = PROMPTS[prompt_name]
    tokens, _ = generate(three_nodes.addresses, model, [num_layers // 2, num_layers - num_layers // 2],
                         prompt)
    assert tokens == mlx_lm_greedy(model, prompt, NEW_TOKENS, CHUNK, stop_ids=(1,))
    assert len(tokens) == NEW_TOKENS


def test_cli_run_json_matches_mlx_lm(three_nodes, deepseek):
    """`clusterd run --json` end to end: chat template, default split, report."""
    from mlx_lm.utils import load_tokenizer

    out = subprocess.run(
        [sys.executable, "-m", "clusterd", "run", str(deepseek), *sum(
            (["--peer", a] for a in three_nodes.addresses), []),
         "--prompt", "Why is the sky blue?", "--max-tokens", str(NEW_TOKENS), "--temp", "0",
         "--json"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    tok = load_tokenizer(deepseek)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}],
                                     add_generation_prompt=True)
    assert report["prompt_tokens"] == len(prompt)
    assert report["tokens"] == mlx_lm_greedy(deepseek, prompt, NEW_TOKENS, 2048,
                                             stop_ids=tuple(tok.eos_token_ids))
    assert report["text"] == mlx_lm_text(tok, report["tokens"])
    stages = report["stages"]
    assert [s["node"] for s in stages] == ["node0", "node1", "node2"]
    assert stages[0]["layers"][0] == 0
    assert stages[-1]["layers"][1] == read_config(deepseek)["num_hidden_layers"]
    assert all(a["layers"][1] == b["layers"][0] for a, b in zip(stages, stages[1:]))
    assert all(s["memory_bytes"] > 0 for s in stages)
    assert report["ttft_s"] > 0 and report["decode_tok_s"] > 0


def test_seeded_sampling_matches_mlx_lm_with_the_same_seed(three_nodes, deepseek):
    """temp 0.6 / top-p 0.95 with a seed: the last stage draws exactly what
    mlx-lm draws with the same seed and sampler, and another seed differs."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    from reference import _model

    prompt = PROMPTS["few-tokens"]
    nodes = connect(three_nodes.addresses)
    stages = load_ring(deepseek, nodes, ranges_from_counts([2, 2, 2]))
    pipe = Pipeline(stages, prefill_step_size=CHUNK)
    runs = {seed: list(pipe.generate(prompt, 32, Sampling(0.6, 0.95, seed=seed)))
            for seed in (7, 8)}
    model = _model(str(deepseek))
    mx.random.seed(7)
    expected = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=32,
                                            prefill_step_size=CHUNK,
                                            sampler=make_sampler(0.6, 0.95))]
    assert runs[7] == expected
    assert runs[8] != runs[7]


def test_streamed_text_is_the_decoded_tokens(deepseek):
    """What `run` streams to the terminal, piece by piece, is the decoded answer."""
    from clusterd.coordinator.chat import Chat

    chat = Chat(deepseek)
    tokens = mlx_lm_greedy(deepseek, PROMPTS["multi-chunk"], NEW_TOKENS, CHUNK)
    pieces = list(chat.stream_text(iter(tokens)))
    assert len(pieces) > 1
    assert "".join(pieces) == mlx_lm_text(chat.tokenizer, tokens) != ""
