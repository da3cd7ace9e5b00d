"""`clusterd down`: stop node daemons (this Mac's, or the ones named)."""

import time

import click
import psutil

from clusterd.coordinator.peers import PeerError, PeerHandle
from clusterd.home import clusterd_home
from clusterd.node import runfile


@click.command()
@click.option("--peer", "peers", multiple=True, metavar="HOST:PORT",
              help="Stop this node (repeat). Default: every daemon started from this Mac's "
                   "clusterd folder.")
@click.option("--timeout", default=15.0, show_default=True, help="Seconds to wait for each exit.")
def down(peers, timeout):
    """Unregister, cancel in-flight work, free memory and exit."""
    if peers:
        targets = [(p, None) for p in peers]
    else:
        targets = [(r.address, r.pid) for r in runfile.running(clusterd_home())]
        if not targets:
            click.echo("No clusterd daemon is running from this Mac's clusterd folder.")
            return
    failed = []
    for address, pid in targets:
        peer = PeerHandle(address)
        try:
            peer.shutdown()
        except PeerError as e:
            failed.append(str(e))
            continue
        finally:
            peer.close()
        if pid is not None and not _wait_exit(pid, timeout):
            failed.append(f"node at {address} (pid {pid}) did not exit within {timeout:.0f}s")
            continue
        click.echo(f"stopped the node at {address}")
    if failed:
        raise click.ClickException("; ".join(failed))


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False
