"""`clusterd models`: the names `run`, `pull` and `plan` accept, with the size
of each quantization and whether this machine holds it. `clusterd pull`:
fetch every node's files for the current plan without running."""

from __future__ import annotations

import functools
import json
from typing import Optional

import click

from clusterd.cli.cluster_options import discovered_addresses, discovery_options
from clusterd.coordinator.cluster import connect
from clusterd.coordinator.ring import OPEN_ERRORS, RingOptions, model_source, place_files
from clusterd.models.files import FileCheckError, read_weight_map
from clusterd.models.store import ModelRef, ModelStore


def _size(ctx, param, value):
    from clusterd.node.resources import parse_size
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def fetch_options(f):
    """--quant, --yes, --ask-above: for commands that may download a model."""
    for option in reversed([
        click.option("--quant", default=None, metavar="Q",
                     help="For a model name: 3bit, 4bit or 8bit (see `clusterd models`)."),
        click.option("--yes", "-y", is_flag=True,
                     help="Download from the hub without asking, however large."),
        click.option("--ask-above", default="2G", show_default=True, callback=_size,
                     metavar="SIZE", help="Ask before downloading more than SIZE from the hub."),
    ]):
        f = option(f)
    return f


def confirm(text: str) -> bool:
    try:
        return click.confirm(text, default=False, err=True)
    except click.Abort:  # no answer (stdin closed): do not download
        return False


@click.command()
@click.argument("model")
@fetch_options
@click.option("--peer", "peers", multiple=True, metavar="HOST:PORT",
              help="A node to use (repeat; in ring order). Without --peer, mDNS finds them.")
@click.option("--split", default=None, metavar="N,N,...", help="Force layers per node, e.g. 3,2,1.")
@click.option("--context", default=4096, show_default=True, type=click.IntRange(1),
              help="Context length the split reserves KV cache for.")
@functools.partial(discovery_options, with_peer=False)
def pull(model, quant, yes, ask_above, peers, split, context, interfaces, no_mdns,
         browse_timeout):
    """Fetch each node's files of MODEL for the current plan, without running.

    Each node gets only the files of its own layers: from its own store, from
    another node that has them, or from the hub; each file comes from the
    internet at most once per cluster."""
    say = functools.partial(click.echo, err=True)
    try:
        source = model_source(model, quant, say)
        addresses = list(peers) or discovered_addresses(
            interfaces=interfaces, no_mdns=no_mdns, browse_timeout=browse_timeout)
        nodes = connect(addresses)
        opts = RingOptions(context=context, yes=yes, ask_above=ask_above)
        _, model_id, ranges = place_files(source, nodes, split, opts, say, confirm)
    except OPEN_ERRORS as e:
        raise click.ClickException(str(e)) from None
    if not model_id:
        say("a model folder is read where it is; nothing to fetch")
        return
    for node, r in zip(nodes, ranges):
        say(f"node {node.peer.name}: " + (f"layers [{r[0]}, {r[1]}) ready" if r
                                          else "not in the plan"))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(as_json):
    """Model names for run / pull / plan, size per quantization, and whether
    this machine's store holds them (a repository id or folder works too)."""
    from clusterd.models import catalog

    store = ModelStore()
    rows = []
    for name in catalog.names():
        entry = catalog.CATALOG[name]
        for pub in sorted(entry.published, key=lambda p: p.bits):
            rows.append({
                "name": name, "quant": f"{pub.bits}bit", "group_size": pub.group_size,
                "repo": pub.repo, "verified": pub.verified,
                "bytes": _weight_bytes(name, pub.bits, pub.group_size),
                "here": _presence(store, pub.repo) if pub.repo else "-",
                "description": entry.description,
            })
    if as_json:
        click.echo(json.dumps({"store": str(store.root), "models": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("name", "quant", "size", "here", "repository"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for r in rows:
        repo = r["repo"] or "(none published: mlx_lm.convert)"
        if r["repo"] and not r["verified"]:
            repo += " (unverified)"
        size = f"{r['bytes'] / 2**30:.1f} GiB" if r["bytes"] else "?"
        table.add_row(r["name"], r["quant"], size, r["here"], repo)
    console = Console(width=max(Console().width, 130))  # repository ids are long: never cut them
    console.print(table)
    console.print(f"store: {store.root}   (run: clusterd run NAME --quant Q; pull: clusterd pull "
                  "NAME --quant Q)", highlight=False)


def _weight_bytes(name: str, bits: int, group_size: int) -> Optional[int]:
    from clusterd.models import catalog
    from shard_planner.model_spec import Quantization, model_spec_from_config
    try:
        spec = model_spec_from_config(catalog.load_config(name), Quantization(bits, group_size),
                                      name=name)
        return spec.total_weight_bytes
    except Exception:  # an architecture the planner does not know: size unknown
        return None


def _presence(store: ModelStore, repo: str) -> str:
    """'yes', 'partial (k/n files)' or '-' for this machine's store."""
    snap = store.snapshot(ModelRef.parse(repo))
    if snap is None:
        return "-"
    try:
        weights = sorted(set(read_weight_map(snap).values()))
    except FileCheckError:
        return "partial (no index)"
    have = sum((snap / w).is_file() for w in weights)
    return "yes" if have == len(weights) else f"partial ({have}/{len(weights)} files)"
