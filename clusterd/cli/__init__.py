"""The `clusterd` command. Each subcommand lives in its own module."""

import click


@click.group()
@click.version_option(package_name="clusterd")
def main() -> None:
    """Run very large models across the pooled memory of several Macs."""


from clusterd.cli.up import up  # noqa: E402

main.add_command(up)

from clusterd.cli.run import run  # noqa: E402

main.add_command(run)

from clusterd.cli.nodes import nodes, secret, status  # noqa: E402

main.add_command(nodes)
main.add_command(status)
main.add_command(secret)

from clusterd.cli.demo import demo  # noqa: E402

main.add_command(demo)
