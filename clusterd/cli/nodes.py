"""`clusterd nodes`, `clusterd status` and `clusterd secret`."""

from __future__ import annotations

import json
import os
import sys

import click
from rich.console import Console
from rich.table import Table

from clusterd.cli.cluster_options import discovery_options, find_nodes, with_errors
from clusterd.discovery import DiscoveryResult, NodeReport
from clusterd.home import clusterd_home
from clusterd.security import (SECRET_ENV, SecretError, fingerprint, load_secret, secret_path,
                               store_secret)

_STATUS_LABEL = {
    "refused": "wrong secret",
    "unreachable": "unreachable",
    "incompatible": "old version",
    "duplicate": "duplicate id",
    "failed": "error",
}


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "-"


def _state(r: NodeReport) -> str:
    if r.status == "ok":
        return r.node.state or "?"
    if r.status == "refused" and r.error and "missing on this side" in r.error:
        return "no secret here"
    return _STATUS_LABEL.get(r.status, r.status)


def _node_json(r: NodeReport, with_activity: bool) -> dict:
    n = r.node
    out = {
        "node_id": n.node_id, "name": n.name, "address": n.address, "addresses": list(n.addresses),
        "chip": n.chip, "total_memory_bytes": n.total_memory_bytes,
        "usable_memory_bytes": n.usable_memory_bytes, "bandwidth_gbs": n.bandwidth_gbs,
        "model": n.model or None,
        "layers": [n.start_layer, n.end_layer, n.num_layers] if n.model else None,
        "state": _state(r), "usable": r.usable, "status": r.status, "error": r.error,
        "source": n.source, "tls": n.tls,
    }
    if with_activity:
        info = r.info
        out["memory_held_bytes"] = int(info.memory_held_bytes) if info is not None else None
        out["rss_bytes"] = int(info.rss_bytes) if info is not None else None
        out["sessions"] = [
            {"session_id": s.session_id, "tokens": int(s.tokens), "kv_bytes": int(s.kv_bytes),
             "idle_seconds": round(s.idle_seconds, 1)}
            for s in (info.sessions if info is not None else ())
        ]
    return out


def _emit(result: DiscoveryResult, as_json: bool, with_activity: bool) -> None:
    if as_json:
        click.echo(json.dumps({
            "nodes": [_node_json(r, with_activity) for r in result.reports],
            "duplicates": [{"node_id": d.node_id, "addresses": [n.address for n in d.nodes]}
                           for d in result.duplicates],
            "problems": result.problems(),
        }, indent=2))
        return
    console = Console()
    if not result.reports:
        console.print("No nodes found. Start `clusterd up` on each Mac; if multicast is blocked "
                      "on this network, pass --peer HOST:PORT (or try --interface, --timeout).")
        return
    table = Table(box=None, header_style="bold")
    cols = ["name", "address", "chip", "RAM", "usable", "model", "layers", "state"]
    if with_activity:
        cols += ["held", "sessions", "tokens"]
    for c in cols:
        table.add_column(c, justify="right" if c in ("RAM", "usable", "held", "sessions", "tokens") else "left")
    for r in result.reports:
        n = r.node
        row = [n.name or "?", n.address, n.chip or "?", _gib(n.total_memory_bytes),
               _gib(n.usable_memory_bytes), n.model or "-",
               f"{n.start_layer}-{n.end_layer} of {n.num_layers}" if n.model else "-", _state(r)]
        if with_activity:
            info = r.info
            sessions = list(info.sessions) if info is not None else []
            row += [_gib(int(info.memory_held_bytes)) if info is not None else "-",
                    str(len(sessions)), str(sum(int(s.tokens) for s in sessions))]
        table.add_row(*row)
    console.print(table)
    usable = [r for r in result.reports if r.usable]
    total = sum(r.node.usable_memory_bytes for r in usable)
    console.print(f"{len(usable)} of {len(result.reports)} nodes usable, {_gib(total)} usable memory")
    for line in result.problems():
        click.echo(f"problem: {line}", err=True)


@click.command()
@discovery_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@with_errors
def nodes(interfaces, peers, no_mdns, browse_timeout, as_json):
    """List the nodes on the network (mDNS and --peer), each checked with an RPC."""
    _emit(find_nodes(interfaces=interfaces, peers=peers, no_mdns=no_mdns,
                     browse_timeout=browse_timeout), as_json, with_activity=False)


@click.command()
@discovery_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@with_errors
def status(interfaces, peers, no_mdns, browse_timeout, as_json):
    """Like `nodes`, plus what each node is doing: sessions and memory held."""
    _emit(find_nodes(interfaces=interfaces, peers=peers, no_mdns=no_mdns,
                     browse_timeout=browse_timeout), as_json, with_activity=True)


@click.command()
@click.option("--set", "new_value", metavar="SECRET|-",
              help="Store this secret (`-` reads it from stdin) in the clusterd folder.")
def secret(new_value):
    """Print the cluster secret, to give the same one to every Mac.

    \b
    On a Mac that has it:   clusterd secret | ssh other-mac clusterd secret --set -
    Or on each Mac:         export CLUSTERD_SECRET=...
    """
    home = clusterd_home()
    try:
        if new_value is not None:
            value = sys.stdin.readline() if new_value == "-" else new_value
            path = store_secret(home, value)
            click.echo(f"stored the cluster secret ({fingerprint(value.strip())}) in {path}; "
                       "restart `clusterd up` to use it", err=True)
            if os.environ.get(SECRET_ENV):
                click.echo(f"note: ${SECRET_ENV} is set and takes precedence over the file", err=True)
            return
        value = load_secret(home, create=True)
    except SecretError as e:
        raise click.ClickException(str(e)) from None
    origin = f"${SECRET_ENV}" if os.environ.get(SECRET_ENV) else str(secret_path(home))
    # The value alone on stdout, so it can be piped; the how-to on stderr.
    click.echo(value)
    click.echo(f"(cluster secret {fingerprint(value)} from {origin}; on each other Mac run "
               f"`clusterd secret --set -` and paste it, or set {SECRET_ENV})", err=True)
