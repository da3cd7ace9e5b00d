"""`clusterd run MODEL`: load MODEL across the nodes and generate."""

import json
import sys

import click

from clusterd.cli.ring import OPEN_ERRORS, open_engine, open_ring_from_flags, ring_options
from clusterd.coordinator.generation import GenerationError, GenerationRequest, Sampling


def _err(text: str) -> None:
    click.echo(text, err=True)


@click.command()
@ring_options
@click.option("--prompt", default=None, help="One-shot prompt; without it, an interactive chat.")
@click.option("--max-tokens", default=512, show_default=True, type=click.IntRange(1))
@click.option("--temp", default=0.6, show_default=True, type=click.FloatRange(0.0),
              help="Sampling temperature (0 = greedy).")
@click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0.0, 1.0))
@click.option("--seed", default=None, type=int, help="Seed for sampling.")
@click.option("--raw", is_flag=True, help="Tokenize the prompt as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end.")
def run(prompt, max_tokens, temp, top_p, seed, raw, as_json, **ring_args):
    """Split MODEL across the nodes and generate. MODEL is a name from
    `clusterd models` (with --quant), a repository id, or a model folder every
    node can read. Nodes fetch what they lack first (see `clusterd pull`).
    When a node drops out, the rest take over its layers if the model still
    fits, and the answer goes on."""
    try:
        ring = open_ring_from_flags(**ring_args, show=not as_json, say=_err)
    except OPEN_ERRORS as e:
        raise click.ClickException(str(e)) from None
    engine = open_engine(ring, str(ring_args["model"]), on_note=_err)
    chat, config = ring.chat, ring.config
    sampling = Sampling(temperature=temp, top_p=top_p, seed=seed)
    if prompt is None:
        _interactive(engine, chat, max_tokens, sampling, raw)
        return
    ids = chat.encode([{"role": "user", "content": prompt}], raw=raw)
    try:
        gen = engine.submit(GenerationRequest(tuple(ids), max_tokens, sampling,
                                              tuple(chat.stop_ids)))
        stats, tokens = gen.stats, iter(gen)
        if as_json:
            list(tokens)
        else:
            for piece in chat.stream_text(tokens):
                click.echo(piece, nl=False)
                sys.stdout.flush()
            click.echo()
    except GenerationError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps({**_report(stats, ring.stages, chat, config),
                               "recoveries": stats.recoveries}))
    else:
        _err(f"[{stats.prompt_tokens} prompt tokens, TTFT {stats.ttft_s:.2f}s, "
             f"{len(stats.tokens)} tokens at {stats.decode_tok_s:.1f} tok/s, {stats.finish_reason}]")


def _report(stats, stages, chat, config) -> dict:
    return {
        "tokens": stats.tokens,
        "text": chat.decode(stats.tokens),
        "prompt_tokens": stats.prompt_tokens,
        "cached_tokens": stats.cached_tokens,
        "ttft_s": stats.ttft_s,
        "decode_tok_s": stats.decode_tok_s,
        "finish_reason": stats.finish_reason,
        "model_type": config.get("model_type"),
        "stages": [
            {"node": st.peer.name, "address": st.peer.address, "layers": [st.start, st.end],
             "memory_bytes": st.weight_bytes}
            for st in stages
        ],
    }


def _interactive(engine, chat, max_tokens, sampling, raw) -> None:
    _err("Chat with the model. An empty line or Ctrl-D ends the chat.")
    history: list[dict] = []
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        if not line.strip():
            return
        history.append({"role": "user", "content": line})
        try:
            ids = chat.encode(history, raw=raw)
            gen = engine.submit(GenerationRequest(
                tuple(ids), min(max_tokens, engine.context - len(ids)), sampling,
                tuple(chat.stop_ids)))
            stats = gen.stats
            for piece in chat.stream_text(gen):
                click.echo(piece, nl=False)
                sys.stdout.flush()
        except GenerationError as e:
            raise click.ClickException(str(e)) from None
        click.echo()
        history.append({"role": "assistant", "content": chat.decode(stats.tokens)})
