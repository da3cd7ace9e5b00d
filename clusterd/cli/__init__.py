"""The `clusterd` command. Each subcommand lives in its own module."""

import click

from clusterd.cli.demo import demo
from clusterd.cli.doctor import doctor
from clusterd.cli.down import down
from clusterd.cli.models import models, pull
from clusterd.cli.nodes import nodes, secret, status
from clusterd.cli.plan import plan
from clusterd.cli.run import run
from clusterd.cli.selftest import selftest
from clusterd.cli.serve import serve
from clusterd.cli.up import up


@click.group()
@click.version_option(package_name="clusterd")
def main() -> None:
    """Run very large models across the pooled memory of several Macs."""


for command in (up, nodes, status, plan, models, pull, run, serve, demo, down, secret, doctor,
                selftest):
    main.add_command(command)

from clusterd.cli.bench import bench  # noqa: E402

main.add_command(bench)
