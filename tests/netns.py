"""Separate "hosts" on one Linux machine, for real mDNS between them.

A lab is one bridge namespace plus N host namespaces, each host joined to
the bridge by a veth pair with a private address (10.77.0.x/24). Every link
is created inside the lab's namespaces, never in the machine's own, so
nothing a test does reaches a real interface. Names carry the creating PID:
parallel runs never collide, and a later run deletes what a killed run left.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

CLUSTERD = [sys.executable, "-m", "clusterd"]
PREFIX = "cdt"  # every namespace a lab makes is named cdt<pid>x<random>-...
SUBNET = "10.77.0"


@dataclass(frozen=True)
class Host:
    index: int
    ns: str
    address: str  # in SUBNET, on the host's eth0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def skip_reason() -> Optional[str]:
    """Why namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root to get real mDNS between hosts)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is not installed"
    probe = f"{PREFIX}{os.getpid()}xprobe"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as e:
        return f"cannot create a network namespace: {getattr(e, 'stderr', '') or e}".strip()
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Delete namespaces left by lab runs whose process is gone."""
    out = _ip("netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX) or "x" not in name[len(PREFIX):]:
            continue
        pid = name[len(PREFIX):].split("x", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            _ip("netns", "del", name, check=False)


class Lab:
    """`with Lab(3) as lab:` three hosts on one bridge; everything created,
    processes included, is removed on exit, even after a failure."""

    def __init__(self, hosts: int) -> None:
        self.tag = f"{PREFIX}{os.getpid()}x{secrets.token_hex(2)}"
        self.bridge_ns = f"{self.tag}-br"
        self.hosts = [Host(i, f"{self.tag}-h{i}", f"{SUBNET}.{i + 1}") for i in range(hosts)]
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Lab":
        remove_stale()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _create(self) -> None:
        br = self.bridge_ns
        self._add_ns(br)
        # Snooping off: without a querier the bridge would drop mDNS joins.
        _ip("-n", br, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", br, "link", "set", "br0", "up")
        for h in self.hosts:
            self._add_ns(h.ns)
            # Created inside the bridge namespace, its peer moved straight
            # into the host's: no link ever exists in the machine's namespace.
            _ip("-n", br, "link", "add", f"v{h.index}", "type", "veth",
                "peer", "name", "eth0", "netns", h.ns)
            _ip("-n", br, "link", "set", f"v{h.index}", "master", "br0")
            _ip("-n", br, "link", "set", f"v{h.index}", "up")
            _ip("-n", h.ns, "addr", "add", f"{h.address}/24", "dev", "eth0")
            _ip("-n", h.ns, "link", "set", "eth0", "up")

    def command(self, host: Host, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", host.ns, *argv]

    def popen(self, host: Host, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start a process inside `host`; stopped (by PID) when the lab closes."""
        # `ip netns exec` execs the command, so this PID is the command's own.
        proc = subprocess.Popen(self.command(host, argv), **kw)
        self._procs.append(proc)
        return proc

    def run(self, host: Host, argv: Sequence[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, argv), capture_output=True, text=True,
                              timeout=timeout, **kw)

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        # Deleting a namespace deletes the links inside it.
        for name in reversed(self._namespaces):
            _ip("netns", "del", name, check=False)
        self._namespaces.clear()

    def namespaces(self) -> list[str]:
        return list(self._namespaces)


class LabNode:
    """`clusterd up` inside a lab host, on port 50051, with its own folder."""

    def __init__(self, lab, host, home: Path, name: str, env: dict, extra=()):
        self.host, self.home, self.name = host, home, name
        self.log_path = home.parent / f"{name}.log"
        cmd = [*CLUSTERD, "up", "--port", "50051", "--name", name, *extra]
        self.log_file = open(self.log_path, "w")
        self.proc = lab.popen(host, cmd, stdout=subprocess.PIPE, stderr=self.log_file, text=True,
                              env={**os.environ, "CLUSTERD_HOME": str(home), **env})
        line = self.proc.stdout.readline()
        assert "listening on" in line, f"{name} did not start:\n{self.log()}"
        self.address = f"{host.address}:50051"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)
        self.log_file.close()
