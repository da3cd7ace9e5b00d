"""Node daemons started on this machine, as separate processes on loopback:
what `clusterd demo` and `clusterd bench` run on, and what tests use."""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from clusterd.home import clusterd_home
from clusterd.security import SECRET_ENV, load_secret

READY = re.compile(r"listening on (\S+)")


@dataclass
class LocalNode:
    proc: subprocess.Popen
    address: str
    log_path: Path
    name: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """SIGTERM by PID, then SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode


def start_node(workdir: Path, name: str, *, extra: Sequence[str] = (),
               env: Optional[dict] = None, prefix: Sequence[str] = (),
               host: str = "127.0.0.1", mdns: bool = False, timeout: float = 60.0,
               port: int = 0) -> LocalNode:
    """Start `clusterd up` on a free port and wait for its ready line.
    Without `mdns` the node is found by address and advertises nothing."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    cmd = [*prefix, sys.executable, "-m", "clusterd", "up", "--host", host, "--port", str(port),
           "--link-port", "0",
           "--name", name, *([] if mdns else ["--no-mdns"]), *extra]
    proc_env = {**os.environ, **(env or {})}
    if "CLUSTERD_HOME" not in (env or {}):
        # Its own folder, hence its own node id, even when this process has
        # CLUSTERD_HOME set (tests do): shared ids are reported as duplicates.
        proc_env["CLUSTERD_HOME"] = str(workdir / f"home-{name}")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=proc_env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = READY.search(line)
        if m:
            return LocalNode(proc, m.group(1), log_path, name)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"node {name} did not start:\n{log_path.read_text()}")


@dataclass
class LocalCluster:
    """A context manager that always stops what it started."""

    count: int
    workdir: Optional[Path] = None
    extra: Sequence[str] = ()
    prefix: str = "local"  # node names: local0, local1, ...
    node_extra: Sequence[Sequence[str]] = ()  # flags of node i only, e.g. its --memory-limit
    nodes: list[LocalNode] = field(default_factory=list)

    def __enter__(self) -> "LocalCluster":
        self._root = self.workdir or Path(tempfile.mkdtemp(prefix="clusterd-local-"))
        try:
            for i in range(self.count):
                node = start_node(self._root, f"{self.prefix}{i}", extra=self._extra(i),
                                  env=self._env())
                self.nodes.append(node)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _extra(self, i: int) -> list[str]:
        return [*self.extra, *(self.node_extra[i] if i < len(self.node_extra) else ())]

    @staticmethod
    def _env() -> dict:
        # Each node has its own folder (its own node id) but this Mac's secret.
        return {SECRET_ENV: load_secret(clusterd_home(), create=True)}

    def restart(self, i: int) -> LocalNode:
        """Start node i again (after it stopped or was killed), same name,
        folder and port, as a Mac coming back would."""
        old = self.nodes[i]
        old.stop()
        port = int(old.address.rsplit(":", 1)[1])
        self.nodes[i] = start_node(self._root, old.name, extra=self._extra(i),
                                   env=self._env(), port=port)
        return self.nodes[i]

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
