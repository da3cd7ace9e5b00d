"""`clusterd serve` as a real subprocess on 127.0.0.1, stopped by PID."""

import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

KEY = "test-key-123"


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log_path: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        return self.proc.returncode


def serve_command(model: Path, peers: Sequence[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "clusterd", "serve", str(model),
            *sum((["--peer", a] for a in peers), []), "--http-port", "0", "--api-key", KEY,
            *extra]


def start_serve(model: Path, peers: Sequence[str], log_path: Path, *extra: str) -> ServeProcess:
    cmd = serve_command(model, peers, *extra)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    m = re.search(r"on (http://[\d.]+:\d+)/v1", line)
    if not m:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"clusterd serve did not start: {line!r}\n{log_path.read_text()}")
    return ServeProcess(proc, m.group(1), log_path)


def run_serve(model: Path, peers: Sequence[str], *extra: str,
              timeout: float = 120) -> subprocess.CompletedProcess:
    """`clusterd serve` that is expected to stop by itself (a refusal)."""
    return subprocess.run(serve_command(model, peers, *extra), capture_output=True, text=True,
                          timeout=timeout)
