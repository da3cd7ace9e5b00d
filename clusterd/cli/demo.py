"""`clusterd demo`: the whole path on this machine, with no weights and no
network: a synthetic DeepSeek-V3-architecture model, three local daemons, a
prompt through them, and a check against single-process mlx-lm."""

import sys
import time

import click

from clusterd.coordinator.chat import Chat
from clusterd.coordinator.cluster import connect, load_ring, plan_ranges
from clusterd.coordinator.pipeline import GenerationStats, Pipeline, Sampling
from clusterd.local_cluster import LocalCluster
from clusterd.models.synthetic import build_synthetic_model, stderr_progress
from clusterd.reference import mlx_lm_greedy


def say(text: str = "") -> None:
    click.echo(text)
    sys.stdout.flush()


@click.command()
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 8))
@click.option("--preset", default="small", show_default=True,
              type=click.Choice(["tiny", "small", "bench"]), help="Synthetic model size.")
@click.option("--prompt", default="Explain pipeline parallelism in one paragraph.")
@click.option("--max-tokens", default=48, show_default=True, type=click.IntRange(1, 4096))
def demo(nodes, preset, prompt, max_tokens):
    """Run a synthetic model across local daemons and check it against mlx-lm."""
    say(f"1. Building a synthetic DeepSeek-V3-architecture model ({preset}; random weights, "
        "cached after the first run)")
    model = build_synthetic_model("deepseek_v3", preset, seed=0, progress=stderr_progress)
    say(f"   {model}")
    say(f"2. Starting {nodes} node daemons on 127.0.0.1 (separate processes)")
    with LocalCluster(nodes) as cluster:
        for n in cluster.nodes:
            say(f"   {n.name}: pid {n.pid}, {n.address}")
        ring = connect(cluster.addresses)
        ranges = plan_ranges(model, ring, None, on_note=lambda t: say(f"   {t}"))
        say("3. Loading each node's layers (only its own tensors are read)")
        t0 = time.monotonic()
        stages = load_ring(model, ring, ranges)
        say(f"   loaded in {time.monotonic() - t0:.1f}s")
        for st in stages:
            say(f"   {st.peer.name}: layers [{st.start:>2}, {st.end:>2})  "
                f"{st.weight_bytes / 2**20:7.1f} MiB")
        chat = Chat(model)
        ids = chat.encode([{"role": "user", "content": prompt}])
        say(f"4. Generating {max_tokens} tokens, greedy, for a {len(ids)}-token prompt "
            "(the weights are random, so the text is noise)")
        stats = GenerationStats()
        text = "".join(chat.stream_text(Pipeline(stages).generate(
            ids, max_tokens, Sampling(temperature=0.0), chat.stop_ids, stats)))
        # Random weights mostly pick R1's placeholder ids, which decode to nothing.
        say(f"   text: {text[:200]!r}")
        say(f"   ids:  {stats.tokens[:16]}{' ...' if len(stats.tokens) > 16 else ''}")
        say(f"   TTFT {stats.ttft_s * 1000:.0f} ms, decode {stats.decode_tok_s:.1f} tok/s, "
            f"{len(stats.tokens)} tokens")
    say("5. Checking the tokens against single-process mlx-lm on the same model")
    expected = mlx_lm_greedy(model, ids, max_tokens, stop_ids=chat.stop_ids)
    same = sum(a == b for a, b in zip(stats.tokens, expected))
    if stats.tokens != expected:
        raise click.ClickException(
            f"MISMATCH: {same} of {len(expected)} tokens agree with mlx-lm")
    say(f"   identical: {len(expected)} of {len(expected)} tokens match mlx-lm")
    say("Every daemon this demo started has stopped.")
