"""What `run` and `serve` share on the command line: the options that choose
a model and its nodes, turned into a call of coordinator.ring.open_ring."""

import functools
from typing import Callable, Sequence

import click

from clusterd.cli.cluster_options import discovered_addresses, discovery_options
from clusterd.cli.models import confirm, fetch_options
from clusterd.coordinator.ring import (OPEN_ERRORS, Ring, RingOptions, model_source, open_engine,
                                       open_ring)
from clusterd.coordinator.rings import Wanted, open_rings

__all__ = ["OPEN_ERRORS", "open_engine", "open_ring_from_flags", "open_rings_from_flags",
           "ring_options"]


def ring_options(f):
    """MODEL, --quant/--yes/--ask-above, --peer, --split, --context,
    --prefill-step-size and the discovery flags."""
    for option in reversed([
        click.argument("model"),
        fetch_options,
        click.option("--peer", "peers", multiple=True, metavar="HOST:PORT",
                     help="A node to use (repeat; the ring follows this order). "
                          "Without --peer, the nodes mDNS finds are used."),
        click.option("--split", default=None, metavar="N,N,...",
                     help="Force layers per node, e.g. 3,2,1."),
        click.option("--context", default=4096, show_default=True, type=click.IntRange(1),
                     help="Tokens per session (prompt + answer) the split reserves KV cache "
                          "for; longer requests are refused."),
        click.option("--sessions", default=None, type=click.IntRange(1, 1024),
                     help="Sessions at once (every stage reserves their KV cache; more "
                          "requests wait). Default: 1 for run, 4 for serve."),
        click.option("--prompt-cache", "prompt_cache_tokens", default=None,
                     type=click.IntRange(0), metavar="TOKENS",
                     help="Tokens of finished sessions each stage keeps for reuse "
                          "(default: one context's worth; 0: none)."),
        click.option("--prefill-step-size", default=2048, show_default=True,
                     type=click.IntRange(1)),
        click.option("--draft", default="auto", show_default=True,
                     type=click.Choice(["auto", "mtp", "ngram", "none"]),
                     help="Speculative drafts: the model's MTP layer (mtp fetches it; auto "
                          "uses it when it is already here and fits), prompt lookup (ngram), "
                          "or none."),
        click.option("--mtp-from", default=None, metavar="FOLDER|REPO",
                     help="The original checkpoint to take the MTP layer from (default: the "
                          "catalog's, e.g. deepseek-ai/DeepSeek-R1)."),
        functools.partial(discovery_options, with_peer=False),
    ]):
        f = option(f)
    return f


def _setup(*, model, quant, yes, ask_above, peers, split, context, sessions,
           prompt_cache_tokens, prefill_step_size, draft, mtp_from, interfaces, no_mdns,
           browse_timeout, show: bool, say: Callable[[str], None], default_sessions: int):
    """The flags as (model source, node addresses, options, rediscover)."""
    source = model_source(model, quant, say)
    addresses = list(peers) or discovered_addresses(
        interfaces=interfaces, no_mdns=no_mdns, browse_timeout=browse_timeout)
    opts = RingOptions(split=split, context=context, sessions=sessions or default_sessions,
                       prefill_step_size=prefill_step_size,
                       prompt_cache_tokens=prompt_cache_tokens, draft=draft, mtp_from=mtp_from,
                       yes=yes, ask_above=ask_above, show=show)

    def rediscover() -> list[str]:
        # The --peer list, or whatever mDNS finds now (quietly: it runs in the background).
        return list(peers) or discovered_addresses(
            interfaces=interfaces, no_mdns=no_mdns, browse_timeout=browse_timeout,
            say=lambda text: None)

    return source, addresses, opts, rediscover


def open_ring_from_flags(*, show: bool, say: Callable[[str], None], default_sessions: int = 1,
                         **flags) -> Ring:
    """Raises one of OPEN_ERRORS with a message for the user."""
    source, addresses, opts, rediscover = _setup(show=show, say=say,
                                                 default_sessions=default_sessions, **flags)
    return open_ring(source, addresses, opts, say, confirm, rediscover)


def open_rings_from_flags(name: str, also: Sequence[Wanted], *, show: bool,
                          say: Callable[[str], None], default_sessions: int = 1,
                          **flags) -> list[Ring]:
    """MODEL (served as `name`) and the `also` models on the same nodes, as
    the planner places them (coordinator.rings); one Ring each, MODEL's first."""
    source, addresses, opts, rediscover = _setup(show=show, say=say,
                                                 default_sessions=default_sessions, **flags)
    return open_rings([Wanted(name, source), *also], addresses, opts, say, confirm, rediscover)
