"""`clusterd serve MODEL`: the ring behind the OpenAI and Ollama APIs."""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Sequence

import click

from clusterd.cli.models import confirm
from clusterd.cli.ring import (OPEN_ERRORS, open_ring_from_flags, open_rings_from_flags,
                               ring_options)
from clusterd.coordinator.engine import DEFAULT_QUEUE
from clusterd.coordinator.ring import RingOptions, model_source, open_engine, open_ring
from clusterd.coordinator.rings import Wanted
from clusterd.serve.app import ServeConfig, create_app
from clusterd.serve.body import Limits
from clusterd.serve.router import Router, Served
from clusterd.serve.server import Server

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_SESSIONS = 4  # requests decoding at once per model (--sessions)


def _err(text: str) -> None:
    click.echo(text, err=True)


def served_name(model: str) -> str:
    return os.path.basename(str(model).rstrip("/"))


def _also_wanted(also: Sequence[str], also_peers: Sequence[str], quant: Optional[str]
                 ) -> tuple[list[Wanted], list[str]]:
    """--also MODEL[@NODE] -> (models placed beside MODEL on its nodes, models
    on the --also-peer nodes). Without @NODE a model goes on the --also-peer
    nodes when there are any, else where the planner finds room."""
    beside, own = [], []
    for spec in also:
        model, at, node = spec.partition("@")
        if at and (not node.strip() or "," in node):
            raise click.UsageError(
                f"--also {spec}: give one node after @ (a node name or HOST:PORT); for nodes "
                "of its own, use --also-peer HOST:PORT")
        if not at and also_peers:
            own.append(model)
        else:
            beside.append(Wanted(served_name(model), model_source(model, quant, _err),
                                 node.strip() or None))
    return beside, own


def _open_own(model: str, addresses: Sequence[str], taken: set[str], ring_args: dict,
              queue: int) -> Served:
    """An --also model on the --also-peer nodes, a ring of its own."""
    shared = taken.intersection(addresses)
    if shared:
        raise click.UsageError(f"--also-peer {', '.join(sorted(shared))} already holds "
                               f"another model's layers; to place {model} beside them, "
                               "leave out --also-peer (the planner finds room)")
    source = model_source(model, ring_args["quant"], _err)
    opts = RingOptions(context=ring_args["context"],
                       sessions=ring_args["sessions"] or DEFAULT_SESSIONS,
                       prefill_step_size=ring_args["prefill_step_size"],
                       prompt_cache_tokens=ring_args["prompt_cache_tokens"],
                       yes=ring_args["yes"], ask_above=ring_args["ask_above"], show=True)
    name = served_name(model)
    ring = open_ring(source, addresses, opts, _err, confirm)
    taken.update(addresses)
    return Served(name, open_engine(ring, name, queue_limit=queue, on_note=_err))


def _open_models(also: Sequence[str], also_peers: Sequence[str], queue: int,
                 ring_args: dict, models: list[Served]) -> None:
    """Every model, into `models` as it opens (so a failure closes those
    already open)."""
    # Which model goes where is checked before anything is loaded.
    beside, own = _also_wanted(also, also_peers, ring_args["quant"])
    if beside and ring_args["split"]:
        raise click.UsageError("--split forces one model's layers; with --also MODEL beside "
                               "it the planner places both (leave out --split, or give the "
                               "--also model nodes of its own with --also-peer)")
    name = served_name(ring_args["model"])
    flags = dict(**ring_args, show=True, say=_err, default_sessions=DEFAULT_SESSIONS)
    if beside:
        rings = open_rings_from_flags(name, beside, **flags)
    else:
        rings = [open_ring_from_flags(**flags)]
    for n, ring in zip([name] + [w.name for w in beside], rings):
        models.append(Served(n, open_engine(ring, n, queue_limit=queue, on_note=_err)))
    taken = {st.peer.address for r in rings for st in r.stages}
    for model in own:
        models.append(_open_own(model, also_peers, taken, ring_args, queue))


@click.command()
@ring_options
@click.option("--also", "also", multiple=True, metavar="MODEL[@NODE]",
              help="Serve another model too (requests choose by their `model`), on the same "
                   "nodes where the planner finds room, or on NODE (a node name or HOST:PORT). "
                   "Repeatable.")
@click.option("--also-peer", "also_peers", multiple=True, metavar="HOST:PORT",
              help="Nodes of their own for the --also models given without @NODE.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback exposes the model to the LAN: "
                   "set an API key.")
@click.option("--http-port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="HTTP port (0 picks a free one).")
@click.option("--api-key", default=None, envvar="CLUSTERD_API_KEY",
              help="Require `Authorization: Bearer KEY` (or set CLUSTERD_API_KEY).")
@click.option("--max-tokens", default=None, type=click.IntRange(1),
              help="Cap for requests that give no max_tokens [default: what is left of "
                   "--context after the prompt].")
@click.option("--queue", default=DEFAULT_QUEUE, show_default=True, type=click.IntRange(0),
              help="Requests that may wait for room in a ring; more get a 503.")
@click.option("--read-timeout", default=30.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds a client has to send a request's head, and again its body.")
@click.option("--max-body", default=4 * 2**20, show_default=True, type=click.IntRange(1024),
              help="Largest request body in bytes.")
def serve(also, also_peers, host, http_port, api_key, max_tokens, queue, read_timeout,
          max_body, **ring_args):
    """Load MODEL across the nodes and serve the OpenAI API (/v1) and the
    Ollama API (/api) until Ctrl-C."""
    logging.basicConfig(level="INFO", stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if host not in LOOPBACK and not api_key:
        _err(f"warning: serving on {host} without --api-key: anyone on the network can use it")
    models: list[Served] = []
    try:
        _open_models(also, also_peers, queue, ring_args, models)
        router = Router(models)
    except OPEN_ERRORS as e:
        _close(models)
        raise click.ClickException(str(e)) from None
    except click.UsageError:
        _close(models)
        raise
    except ValueError as e:  # two models under one name
        _close(models)
        raise click.ClickException(str(e)) from None
    limits = Limits(max_body_bytes=max_body, read_timeout_s=read_timeout)
    app = create_app(router, ServeConfig(limits=limits, api_key=api_key, max_tokens=max_tokens))
    try:
        server = Server(app, host, http_port, limits)
    except OSError as e:
        router.close()
        raise click.ClickException(f"cannot listen on {host}:{http_port}: {e}") from None
    url = f"http://{host}:{server.port}"
    click.echo(f"clusterd serving {', '.join(m.name for m in models)} on {url}/v1 "
               f"(OpenAI) and {url}/api (Ollama)")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        router.close()


def _close(models: Sequence[Served]) -> None:
    for m in models:
        m.engine.close()
