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
