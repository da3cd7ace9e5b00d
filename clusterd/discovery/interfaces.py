"""Which local IPv4 addresses mDNS uses.

`--interface` takes an address ("192.168.1.20") or an interface name ("en0",
"bridge0" for Thunderbolt Bridge). Only IPv4 is used for mDNS: every Mac LAN
and Thunderbolt Bridge has it (169.254.x.x when nothing else), and one family
keeps each node to one answer per interface.
"""

from __future__ import annotations

import ipaddress
import platform
import subprocess
from typing import Iterable, Optional, Sequence

import ifaddr


class InterfaceError(ValueError):
    pass


def local_ipv4() -> list[tuple[str, str, int]]:
    """(interface name, address, prefix length) of every local IPv4 address."""
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                out.append((adapter.nice_name, ip.ip, ip.network_prefix))
    return out


def resolve_interfaces(choices: Optional[Iterable[str]]) -> Optional[list[str]]:
    """IPv4 addresses for `--interface` values, None for "all interfaces".
    Unknown names and addresses are errors that list what exists, so a typo
    does not silently fall back to advertising everywhere."""
    if not choices:
        return None
    local = local_ipv4()
    out: list[str] = []
    for choice in choices:
        choice = choice.strip()
        try:
            addr = str(ipaddress.IPv4Address(choice))
            found = [addr] if any(a == addr for _, a, _ in local) else []
        except ValueError:
            found = [a for name, a, _ in local if name == choice]
        if not found:
            have = ", ".join(f"{name} {a}" for name, a, _ in local) or "none"
            raise InterfaceError(f"no IPv4 interface '{choice}' on this machine (have: {have})")
        out.extend(a for a in found if a not in out)
    return out


def advertised_addresses(interfaces: Optional[Sequence[str]]) -> list[str]:
    """Addresses to put in the A records: the chosen interfaces, else every
    non-loopback IPv4 address (loopback only when there is nothing else)."""
    if interfaces:
        return list(interfaces)
    addrs = [a for _, a, _ in local_ipv4() if not ipaddress.IPv4Address(a).is_loopback]
    return addrs or ["127.0.0.1"]


def rank_addresses(addresses: Sequence[str], interfaces: Optional[Sequence[str]]) -> tuple[str, ...]:
    """A node's addresses, those on the same subnet as one of our chosen (or
    all) interfaces first: that is the path traffic will actually take."""
    nets = []
    for _, a, prefix in local_ipv4():
        if interfaces and a not in interfaces:
            continue
        nets.append(ipaddress.IPv4Network(f"{a}/{prefix}", strict=False))

    def reachable(addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in n for n in nets if ip.version == 4)

    return tuple(sorted(addresses, key=lambda a: not reachable(a)))


def parse_hardware_ports(text: str) -> dict[str, str]:
    """`networksetup -listallhardwareports` -> {device: port name}, e.g.
    {"en0": "Ethernet", "en1": "Wi-Fi", "bridge0": "Thunderbolt Bridge"}."""
    kinds: dict[str, str] = {}
    port = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Hardware Port":
            port = value.strip()
        elif key.strip() == "Device" and port:
            kinds[value.strip()] = port
            port = None
    return kinds


def interface_kinds() -> dict[str, str]:
    """What each interface is (Wi-Fi, Ethernet, Thunderbolt Bridge) on a Mac;
    empty elsewhere or when networksetup does not answer."""
    if platform.system() != "Darwin":
        return {}
    try:
        out = subprocess.run(["networksetup", "-listallhardwareports"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return parse_hardware_ports(out.stdout) if out.returncode == 0 else {}
