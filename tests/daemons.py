"""Start real `clusterd up` processes for tests and stop them by PID."""

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

CLUSTERD = [sys.executable, "-m", "clusterd"]
READY = re.compile(r"listening on (\S+)")


@dataclass
class DaemonProcess:
    proc: subprocess.Popen
    address: str
    log_path: Path
    name: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_daemon(tmp: Path, name: str, *, extra: Sequence[str] = (), env: Optional[dict] = None,
                 prefix: Sequence[str] = (), host: str = "127.0.0.1",
                 timeout: float = 60.0) -> DaemonProcess:
    """Start one daemon on a free port and wait for its ready line."""
    log_path = tmp / f"{name}.log"
    cmd = [*prefix, *CLUSTERD, "up", "--host", host, "--port", "0", "--name", name, *extra]
    proc_env = {**os.environ, **(env or {})}
    proc_env.setdefault("CLUSTERD_HOME", str(tmp / f"home-{name}"))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=proc_env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = READY.search(line)
        if m:
            return DaemonProcess(proc, m.group(1), log_path, name)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"daemon {name} did not start:\n{log_path.read_text()}")


@dataclass
class Cluster:
    daemons: list[DaemonProcess] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return [d.address for d in self.daemons]

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()
