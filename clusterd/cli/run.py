"""`clusterd run MODEL`: load MODEL across the nodes and generate."""

import functools
import json
import sys

import click

from clusterd.cli.cluster_options import discovered_addresses, discovery_options
from clusterd.cli.models import ERRORS as FETCH_ERRORS
from clusterd.cli.models import fetch_options, files_for_plan, model_source
from clusterd.coordinator.chat import Chat
from clusterd.coordinator.cluster import connect, load_ring
from clusterd.coordinator.pipeline import GenerationError, GenerationStats, Pipeline, Sampling
from clusterd.models.stage import StageLoadError, read_config


def _err(text: str) -> None:
    click.echo(text, err=True)


@click.command()
@click.argument("model")
@fetch_options
@click.option("--peer", "peers", multiple=True, metavar="HOST:PORT",
              help="A node to use (repeat; the ring follows this order). "
                   "Without --peer, the nodes mDNS finds are used.")
@click.option("--split", default=None, metavar="N,N,...", help="Force layers per node, e.g. 3,2,1.")
@click.option("--prompt", default=None, help="One-shot prompt; without it, an interactive chat.")
@click.option("--max-tokens", default=512, show_default=True, type=click.IntRange(1))
@click.option("--temp", default=0.6, show_default=True, type=click.FloatRange(0.0),
              help="Sampling temperature (0 = greedy).")
@click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0.0, 1.0))
@click.option("--seed", default=None, type=int, help="Seed for sampling.")
@click.option("--raw", is_flag=True, help="Tokenize the prompt as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end.")
@click.option("--prefill-step-size", default=2048, show_default=True, type=click.IntRange(1))
@click.option("--context", default=4096, show_default=True, type=click.IntRange(1),
              help="Context length the split reserves KV cache for.")
@functools.partial(discovery_options, with_peer=False)
def run(model, quant, yes, ask_above, peers, split, prompt, max_tokens, temp, top_p, seed, raw,
        as_json, prefill_step_size, context, interfaces, no_mdns, browse_timeout):
    """Split MODEL across the nodes and generate. MODEL is a name from
    `clusterd models` (with --quant), a repository id, or a model folder every
    node can read. Nodes fetch what they lack first (see `clusterd pull`)."""
    try:
        source = model_source(model, quant, _err)
        if source.local_dir is not None:
            read_config(source.local_dir)  # a bad folder fails before any node is asked
        addresses = list(peers) or discovered_addresses(
            interfaces=interfaces, no_mdns=no_mdns, browse_timeout=browse_timeout)
        nodes = connect(addresses)
        model_dir, model_id, ranges = files_for_plan(
            source, nodes, split, context, yes=yes, ask_above=ask_above,
            show=not as_json, say=_err, prefill_step_size=prefill_step_size)
        config = read_config(model_dir)
        stages = load_ring(model_dir, nodes, ranges, on_loaded=None if as_json else _say_loaded,
                           model_id=model_id)
        chat = Chat(model_dir)
    except (StageLoadError, *FETCH_ERRORS) as e:
        raise click.ClickException(str(e)) from None

    pipeline = Pipeline(stages, prefill_step_size=prefill_step_size)
    sampling = Sampling(temperature=temp, top_p=top_p, seed=seed)
    if prompt is None:
        _interactive(pipeline, chat, max_tokens, sampling, raw)
        return
    stats = GenerationStats()
    ids = chat.encode([{"role": "user", "content": prompt}], raw=raw)
    try:
        tokens = pipeline.generate(ids, max_tokens, sampling, chat.stop_ids, stats)
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
        click.echo(json.dumps(_report(stats, stages, chat, config)))
    else:
        _err(f"[{stats.prompt_tokens} prompt tokens, TTFT {stats.ttft_s:.2f}s, "
             f"{len(stats.tokens)} tokens at {stats.decode_tok_s:.1f} tok/s, {stats.finish_reason}]")


def _say_loaded(node, reply) -> None:
    s = reply.shard
    _err(f"node {node.info.name}: layers [{s.start_layer}, {s.end_layer}) loaded, "
         f"{s.weight_bytes / 2**20:.1f} MiB in {s.load_seconds:.1f}s")


def _report(stats, stages, chat, config) -> dict:
    return {
        "tokens": stats.tokens,
        "text": chat.decode(stats.tokens),
        "prompt_tokens": stats.prompt_tokens,
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


def _interactive(pipeline, chat, max_tokens, sampling, raw) -> None:
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
        stats = GenerationStats()
        try:
            for piece in chat.stream_text(
                    pipeline.generate(chat.encode(history, raw=raw), max_tokens, sampling,
                                      chat.stop_ids, stats)):
                click.echo(piece, nl=False)
                sys.stdout.flush()
        except GenerationError as e:
            raise click.ClickException(str(e)) from None
        click.echo()
        history.append({"role": "assistant", "content": chat.decode(stats.tokens)})
