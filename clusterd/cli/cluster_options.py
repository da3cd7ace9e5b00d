"""Options shared by the commands that join or find a cluster: mDNS
interfaces, --peer, --no-mdns, TLS, and the node's identity and secret."""

from __future__ import annotations

import functools
import ipaddress
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import click

from clusterd.discovery import DiscoveryResult, InterfaceError, PeerError, discover, resolve_interfaces
from clusterd.home import clusterd_home
from clusterd.node.identity import load_identity
from clusterd.security import SECRET_ENV, SecretError, load_secret, secret_path, tls_from_environment
from clusterd.wire import PROTOCOL_VERSION

DEFAULT_PORT = 50051


def interfaces_from_flags(values: Sequence[str]) -> Optional[list[str]]:
    try:
        return resolve_interfaces(values)
    except InterfaceError as e:
        raise click.BadParameter(str(e), param_hint="--interface") from None


def interface_option(f):
    return click.option(
        "--interface", "interfaces", multiple=True, metavar="ADDR",
        help="Use mDNS only on this interface (address or name such as en0; repeatable).")(f)


# -- `clusterd up` -------------------------------------------------------------


def node_options(f):
    """--interface, --no-mdns, --tls-*, --new-id for `clusterd up`."""
    for option in reversed([
        interface_option,
        click.option("--no-mdns", is_flag=True, help="Do not advertise; clients use --peer."),
        click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Serve TLS with this certificate (PEM) [default: <clusterd folder>/tls/cert.pem]."),
        click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Private key of --tls-cert (PEM)."),
        click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="CA that signed the other nodes' certificates, for node-to-node calls."),
        click.option("--new-id", is_flag=True,
                     help="Give this node a new id (after copying a clusterd folder or cloning a machine)."),
    ]):
        f = option(f)
    return f


def _specific_host(host: str) -> Optional[str]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return None if ip.is_unspecified else str(ip)


def node_settings(host: str, *, interfaces: Sequence[str], no_mdns: bool, tls_cert: Optional[Path],
                  tls_key: Optional[Path], tls_ca: Optional[Path], new_id: bool) -> dict[str, Any]:
    """DaemonConfig fields for `clusterd up`; tells the user what was created."""
    home = clusterd_home()
    ident = load_identity(home, new=new_id)
    warning = ident.moved_warning()
    if warning and not new_id:
        click.echo(f"warning: {warning}", err=True)
    created = SECRET_ENV not in os.environ and not secret_path(home).exists()
    try:
        secret = load_secret(home, create=True)
    except SecretError as e:
        raise click.ClickException(str(e)) from None
    if created:
        click.echo(
            f"Created the cluster secret in {secret_path(home)}. Every Mac of the cluster needs "
            f"the same one: run `clusterd secret` here and `clusterd secret --set -` on the "
            f"others (or set {SECRET_ENV} everywhere).", err=True)
    tls = tls_from_environment(home, cert=tls_cert, key=tls_key, ca=tls_ca)
    if (tls.cert is None) != (tls.key is None):
        raise click.UsageError("TLS needs both --tls-cert and --tls-key")
    # Listening on one address means advertising only there, too.
    specific = _specific_host(host)
    chosen = interfaces_from_flags(interfaces) or ([specific] if specific else None)
    return {"node_id": ident.node_id, "secret": secret, "mdns": not no_mdns,
            "interfaces": tuple(chosen) if chosen else None, "tls": tls}


# -- client commands -----------------------------------------------------------


def discovery_options(f, *, with_peer: bool = True):
    """--interface, --peer, --no-mdns, --timeout for commands that find nodes."""
    opts = [
        interface_option,
        click.option("--no-mdns", is_flag=True, help="Do not browse mDNS; use --peer only."),
        click.option("--timeout", "browse_timeout", default=2.0, show_default=True,
                     type=click.FloatRange(0.1, 60), help="Seconds to browse mDNS."),
    ]
    if with_peer:
        opts.insert(1, click.option(
            "--peer", "peers", multiple=True, metavar="HOST:PORT",
            help="A node to add without mDNS (repeatable; for networks that block multicast)."))
    for option in reversed(opts):
        f = option(f)
    return f


def probe_node(address: str, timeout: float = 3.0):
    """Health, then Info, over an authenticated channel; a PeerError names
    the node and says what is wrong (unreachable, wrong secret, ...)."""
    from clusterd.coordinator.peers import PeerHandle

    peer = PeerHandle(address)
    try:
        peer.health(timeout=timeout)
        return peer.info()
    finally:
        peer.close()


def find_nodes(*, interfaces: Sequence[str], peers: Sequence[str], no_mdns: bool,
               browse_timeout: float, expect: Optional[int] = None) -> DiscoveryResult:
    if no_mdns and not peers:
        raise click.UsageError("--no-mdns needs at least one --peer HOST:PORT")
    try:
        return discover(
            probe_node, timeout=browse_timeout, interfaces=interfaces_from_flags(interfaces),
            peers=peers, mdns=not no_mdns, default_port=DEFAULT_PORT,
            protocol_version=PROTOCOL_VERSION, expect=expect)
    except PeerError as e:
        raise click.BadParameter(str(e), param_hint="--peer") from None


def with_errors(f):
    """Secret and interface problems as one-line errors, not tracebacks."""
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except (SecretError, InterfaceError) as e:
            raise click.ClickException(str(e)) from None
    return wrapper


def discovered_addresses(*, interfaces: Sequence[str], no_mdns: bool, browse_timeout: float,
                         say=lambda text: click.echo(text, err=True)) -> list[str]:
    """For `run` without --peer: the usable nodes mDNS finds, in a stable
    order (by name); why the others cannot be used goes to `say`."""
    if no_mdns:
        raise click.UsageError("--no-mdns needs at least one --peer HOST:PORT")
    result = find_nodes(interfaces=interfaces, peers=(), no_mdns=False, browse_timeout=browse_timeout)
    for line in result.problems():
        say(f"skipping: {line}")
    usable = result.usable()
    if not usable:
        raise click.ClickException(
            "no usable nodes found by mDNS" + (f" ({len(result.reports)} found, none usable)"
                                               if result.reports else "")
            + ". Start `clusterd up` on each Mac, or pass --peer HOST:PORT if this network "
              "blocks multicast.")
    say("nodes: " + ", ".join(n.label for n in usable))
    return [n.address for n in usable]
