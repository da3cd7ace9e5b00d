"""`clusterd serve MODEL`: the ring behind an OpenAI-compatible HTTP API."""

import logging
import os
import sys

import click

from clusterd.cli.ring import OPEN_ERRORS, open_engine, open_ring_from_flags, ring_options
from clusterd.coordinator.http_api import ApiServer, ChatService


def _err(text: str) -> None:
    click.echo(text, err=True)


@click.command()
@ring_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback exposes the model to the LAN: "
                   "set an API key.")
@click.option("--http-port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="HTTP port (0 picks a free one).")
@click.option("--api-key", default=None, envvar="CLUSTERD_API_KEY",
              help="Require `Authorization: Bearer KEY` (or set CLUSTERD_API_KEY).")
@click.option("--max-tokens", default=2048, show_default=True, type=click.IntRange(1),
              help="Default when a request gives no max_tokens.")
def serve(host, http_port, api_key, max_tokens, **ring_args):
    """Load MODEL across the nodes and serve /v1/chat/completions until Ctrl-C."""
    logging.basicConfig(level="INFO", stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        _err(f"warning: serving on {host} without --api-key: anyone on the network can use it")
    try:
        ring = open_ring_from_flags(**ring_args, show=True, say=_err, default_sessions=4)
    except OPEN_ERRORS as e:
        raise click.ClickException(str(e)) from None
    name = os.path.basename(str(ring_args["model"]).rstrip("/"))
    try:
        server = ApiServer(ChatService(open_engine(ring, name, on_note=_err), ring.chat, name,
                                       max_tokens), host,
                           http_port, api_key)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{http_port}: {e}") from None
    click.echo(f"clusterd serving {name} on http://{host}:{server.port}/v1")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
