"""`clusterd doctor [MODEL]`: check the cluster and say how to fix what is wrong."""

from __future__ import annotations

import json
import sys

import click

from clusterd.cli.cluster_options import discovery_options, interfaces_from_flags, with_errors
from clusterd.home import clusterd_home


@click.command()
@click.argument("model", required=False)
@click.option("--quant", default=None, metavar="Q",
              help="For a model name: 3bit, 4bit, 8bit (see `clusterd models`).")
@click.option("--context", default=4096, show_default=True, type=click.IntRange(1),
              help="Context the memory check reserves KV cache for.")
@click.option("--prefill-step-size", default=2048, show_default=True, type=click.IntRange(1))
@click.option("--rounds", default=20, show_default=True, type=click.IntRange(1, 1000),
              help="Timed round trips per ring neighbour.")
@click.option("--no-links-file", is_flag=True,
              help="Do not write the measured links to <clusterd folder>/links.json.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@discovery_options
@with_errors
def doctor(model, quant, context, prefill_step_size, rounds, no_links_file, as_json,
           interfaces, peers, no_mdns, browse_timeout):
    """Check the cluster: which nodes mDNS sees and over which interface,
    whether each node reaches the next in the ring, the cluster secret,
    clocks, TLS, versions and duplicate ids; with MODEL, memory and disk for
    it. Every finding comes with its fix; the exit status is 1 when something
    is wrong. The round trip and throughput between ring neighbours go to
    <clusterd folder>/links.json for `clusterd plan` and `run`."""
    from clusterd.doctor import run_doctor

    if no_mdns and not peers:
        raise click.UsageError("--no-mdns needs at least one --peer HOST:PORT")
    report = run_doctor(
        model=model, quant=quant, peers=peers, interfaces=interfaces_from_flags(interfaces),
        mdns=not no_mdns, browse_timeout=browse_timeout, context=context,
        prefill_step_size=prefill_step_size, rounds=rounds,
        home=None if no_links_file else clusterd_home())
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(report.text())
        if report.links_file:
            click.echo(f"measured links written to {report.links_file}")
    # Problems on stderr too, as `nodes` and `run` give theirs.
    for f in report.problems:
        click.echo(f"problem: {f.text}", err=True)
    sys.exit(0 if report.healthy else 1)
