"""`clusterd run MODEL`: load MODEL across the nodes and generate."""

import json
import sys

import click

from clusterd.cli.ring import OPEN_ERRORS, open_engine, open_ring_from_flags, ring_options
from clusterd.coordinator.chat import Prompt
from clusterd.coordinator.generation import GenerationError, GenerationRequest, Sampling
from clusterd.serve.reasoning import ReasoningParser, split_reasoning


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
@click.option("--hide-reasoning", is_flag=True,
              help="Show only the answer, not the reasoning before it (R1 and its distills).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end.")
def run(prompt, max_tokens, temp, top_p, seed, raw, hide_reasoning, as_json, **ring_args):
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
        _interactive(engine, chat, max_tokens, sampling, raw, hide_reasoning)
        return
    p = _prompt(chat, [{"role": "user", "content": prompt}], raw)
    try:
        gen = engine.submit(GenerationRequest(p.ids, max_tokens, sampling, tuple(chat.stop_ids)))
        stats, tokens = gen.stats, iter(gen)
        if as_json:
            list(tokens)
        else:
            _show(chat, tokens, p.opens_reasoning, hide_reasoning)
    except GenerationError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps({**_report(stats, ring.stages, chat, config, p.opens_reasoning),
                               "recoveries": stats.recoveries}))
    else:
        _err(f"[{stats.prompt_tokens} prompt tokens, TTFT {stats.ttft_s:.2f}s, "
             f"{len(stats.tokens)} tokens at {stats.decode_tok_s:.1f} tok/s, {stats.finish_reason}]")


def _prompt(chat, messages: list[dict], raw: bool) -> Prompt:
    if raw:
        return Prompt(tuple(chat.encode_text(messages[-1]["content"])), False)
    return chat.prompt(messages)


def _show(chat, tokens, opens_reasoning: bool, hide: bool) -> str:
    """Stream the reasoning (dimmed, or not at all) and then the answer;
    returns the answer."""
    parser = ReasoningParser(opens_reasoning)
    shown, answer = False, ""

    def echo(reasoning: str, content: str) -> None:
        nonlocal shown, answer
        if reasoning and not hide:
            click.echo(click.style(reasoning, dim=True), nl=False)
            shown = True
        if content:
            if shown and not answer:
                click.echo("\n")  # the answer starts on a line of its own
            click.echo(content, nl=False)
            answer += content
        sys.stdout.flush()

    for piece in chat.stream_text(tokens):
        echo(*parser.feed(piece))
    echo(*parser.finish())
    click.echo()
    return answer


def _report(stats, stages, chat, config, opens_reasoning: bool) -> dict:
    text = chat.decode(stats.tokens)
    reasoning, content = split_reasoning(text, opens_reasoning)
    return {
        "tokens": stats.tokens,
        "text": text,
        "reasoning": reasoning,
        "content": content,
        "prompt_tokens": stats.prompt_tokens,
        "cached_tokens": stats.cached_tokens,
        "trips": stats.trips, "drafted": stats.drafted, "accepted": stats.accepted,
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


def _interactive(engine, chat, max_tokens, sampling, raw, hide_reasoning) -> None:
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
        p = _prompt(chat, history, raw)
        try:
            # Each turn reuses the stages' caches of the turns before (prompt cache).
            gen = engine.submit(GenerationRequest(
                p.ids, min(max_tokens, engine.context - len(p.ids)), sampling,
                tuple(chat.stop_ids)))
            answer = _show(chat, gen, p.opens_reasoning, hide_reasoning)
        except GenerationError as e:
            raise click.ClickException(str(e)) from None
        # The template drops an earlier answer's reasoning: keep the answer.
        history.append({"role": "assistant", "content": answer})
