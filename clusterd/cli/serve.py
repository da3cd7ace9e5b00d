"""`clusterd serve MODEL`: the ring behind the OpenAI and Ollama APIs."""

from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

import click

from clusterd.cli.cluster_options import find_nodes
from clusterd.cli.models import confirm
from clusterd.cli.ring import OPEN_ERRORS, open_ring_from_flags, ring_options
from clusterd.coordinator.engine import DEFAULT_QUEUE
from clusterd.coordinator.ring import RingOptions, model_source, open_engine, open_ring
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


def _also_nodes(spec: str, also_peers: Sequence[str], ring_args: dict) -> tuple[str, list[str]]:
    """MODEL[@NODE,NODE...] -> (model, addresses). A NODE is HOST:PORT or a
    node name mDNS finds; without @, the --also-peer nodes."""
    model, _, where = spec.partition("@")
    wanted = [w.strip() for w in where.split(",") if w.strip()] or list(also_peers)
    if not wanted:
        raise click.UsageError(
            f"--also {spec}: say which nodes hold it (--also {model}@HOST:PORT or --also-peer "
            "HOST:PORT); a node holds one model's layers at a time")
    names = [w for w in wanted if ":" not in w]
    by_name = {}
    if names:
        found = find_nodes(interfaces=ring_args["interfaces"], peers=(),
                           no_mdns=False, browse_timeout=ring_args["browse_timeout"])
        by_name = {n.name: n.address for n in found.usable()}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise click.UsageError(f"--also {spec}: mDNS found no usable node named "
                                   + ", ".join(missing))
    return model, [by_name.get(w, w) for w in wanted]


def _open_also(model: str, addresses: Sequence[str], taken: set[str], ring_args: dict,
               context: int, queue: int) -> Served:
    shared = taken.intersection(addresses)
    if shared:
        raise click.UsageError(f"--also {model}: {', '.join(sorted(shared))} already holds "
                               "another model's layers; give each model its own nodes")
    source = model_source(model, ring_args["quant"], _err)
    opts = RingOptions(context=context, sessions=ring_args["sessions"] or DEFAULT_SESSIONS,
                       prefill_step_size=ring_args["prefill_step_size"],
                       prompt_cache_tokens=ring_args["prompt_cache_tokens"],
                       yes=ring_args["yes"], ask_above=ring_args["ask_above"], show=True)
    ring = open_ring(source, addresses, opts, _err, confirm)
    taken.update(addresses)
    name = served_name(model)
    return Served(name, open_engine(ring, name, queue_limit=queue, on_note=_err))


@click.command()
@ring_options
@click.option("--also", "also", multiple=True, metavar="MODEL[@NODE,...]",
              help="Serve another model too, on its own nodes (HOST:PORT or node names); "
                   "requests choose by their `model`. Repeatable.")
@click.option("--also-peer", "also_peers", multiple=True, metavar="HOST:PORT",
              help="The nodes for an --also model given without @NODE.")
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
    context = ring_args["context"]
    # Where each --also model goes is checked before anything is loaded.
    extra = [_also_nodes(spec, also_peers, ring_args) for spec in also]
    models: list[Served] = []
    try:
        ring = open_ring_from_flags(**ring_args, show=True, say=_err,
                                    default_sessions=DEFAULT_SESSIONS)
        name = served_name(ring_args["model"])
        models.append(Served(name, open_engine(ring, name, queue_limit=queue, on_note=_err)))
        taken = {st.peer.address for st in ring.stages}
        for model, addresses in extra:
            models.append(_open_also(model, addresses, taken, ring_args, context, queue))
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
