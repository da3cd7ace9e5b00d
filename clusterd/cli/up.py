"""`clusterd up`: start this Mac's node daemon in the foreground."""

import logging
import socket
import sys

import click

from clusterd.cli.cluster_options import node_options, node_settings
from clusterd.node.daemon import DaemonConfig, PortError, run_forever
from clusterd.node.guard import Limits
from clusterd.node.resources import parse_size


def _size(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command()
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--port", default=50051, show_default=True, type=click.IntRange(0, 65535),
              help="gRPC port (0 picks a free one).")
@click.option("--link-port", default=None, type=click.IntRange(0, 65535),
              help="TCP port the previous stage's link connects to [default: --port + 1; "
                   "any free port when --port is 0].")
@click.option("--name", default=None, help="Node name shown to the cluster [default: hostname].")
@click.option("--memory-limit", "memory_limit", default=None, callback=_size, metavar="SIZE",
              help="Pretend this node has only SIZE usable (e.g. 48G), to keep memory for other work.")
@click.option("--max-calls-per-peer", default=Limits.max_calls_per_peer, show_default=True,
              type=click.IntRange(1, Limits.max_calls),
              help="Calls one address may have running at once; past it, RESOURCE_EXHAUSTED.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning"]))
@node_options
def up(host, port, link_port, name, memory_limit, max_calls_per_peer, log_level, **cluster):
    """Run the node daemon until Ctrl-C or `clusterd down`."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = DaemonConfig(host=host, port=port, link_port=link_port,
                          name=name or socket.gethostname(),
                          memory_limit=memory_limit,
                          limits=Limits(max_calls_per_peer=max_calls_per_peer),
                          **node_settings(host, **cluster))

    def announce(daemon):
        r = daemon.resources
        click.echo(
            f"clusterd node {daemon.name!r} listening on {host}:{daemon.port} "
            f"(stage links on {daemon.executor.link_server.port}; {r.chip}, "
            f"{r.usable_bytes / 2**30:.1f} GiB usable of {r.total_bytes / 2**30:.1f} GiB)",
        )
        sys.stdout.flush()

    try:
        run_forever(config, announce)
    except PortError as e:
        raise click.ClickException(str(e)) from None
