"""The baselines, measured in the same run as the layouts: single-process
mlx-lm on the same model directory, and mlx-lm's own pipeline parallelism
(`mlx.launch --backend ring`, the model's `pipeline()` split) with the same
stages. Both run mlx-lm's generate_step in long-lived worker processes
(clusterd/bench/mlx_worker.py) so the model is loaded once."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from clusterd.bench.runs import ProcessMemory, RunResult, SubjectInfo


class BaselineError(RuntimeError):
    """A baseline could not start or run; the message says why."""


def _free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """A starting port with `count` free ports after it (the ring backend
    listens on starting_port + rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            start = s.getsockname()[1]
        if start + count >= 65535:
            continue
        ok = True
        for p in range(start, start + count):
            with socket.socket() as s:
                try:
                    s.bind((host, p))
                except OSError:
                    ok = False
                    break
        if ok:
            return start
    raise BaselineError("no block of free ports for mlx.launch's ring backend")


class _Worker:
    """Talks the mlx_worker protocol with one or more child processes: each
    request goes to every child's stdin, and one answer per rank comes back."""

    def __init__(self, cmds: list[tuple[list[str], dict]], ranks: int, log_path: Path,
                 timeout: float):
        self.ranks = ranks
        self.log_path = log_path
        self._log = open(log_path, "w")
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.procs = []
        for cmd, env in cmds:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
            self.procs.append(proc)
            threading.Thread(target=self._read, args=(proc,), daemon=True).start()
        self.pids: list[int] = []
        self.ready = self._collect(timeout, "ready")
        self.pids = [r["pid"] for r in self.ready]

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _collect(self, timeout: float, what: str) -> list[dict]:
        """One JSON line per rank (other output, e.g. a launcher's, is skipped)."""
        got: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        while len(got) < self.ranks:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BaselineError(f"no {what} answer within {timeout:.0f}s; see {self.log_path}")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise BaselineError(f"a worker exited before its {what} answer:\n{self._tail()}")
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if "error" in obj:
                raise BaselineError(f"rank {obj.get('rank')}: {obj['error']}")
            got[int(obj.get("rank", 0))] = obj
        return [got[r] for r in sorted(got)]

    def _tail(self) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])

    def request(self, req: dict, timeout: float) -> list[dict]:
        line = json.dumps(req) + "\n"
        for proc in self.procs:
            proc.stdin.write(line)
            proc.stdin.flush()
        return self._collect(timeout, "generation")

    def stop(self) -> None:
        for proc in self.procs:
            try:
                if proc.poll() is None:
                    proc.stdin.write(json.dumps({"quit": True}) + "\n")
                    proc.stdin.close()
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        # Whatever still runs was started by us: stop it by its own PID.
        for pid in self.pids:
            _stop_pid(pid)
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._log.close()


def _stop_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


class MlxLm:
    """Single-process mlx-lm: the reference every layout is a ratio to."""

    def __init__(self, model_dir: Path, workdir: Path, timeout: float = 600.0):
        self.info = SubjectInfo("mlx-lm, 1 process", "mlx-lm", 1)
        self._timeout = timeout
        self._w = _Worker([([sys.executable, "-m", "clusterd.bench.mlx_worker", str(model_dir)], {})],
                          1, workdir / "mlx-lm.log", timeout)
        lo, hi = self._w.ready[0]["layers"]
        self.info.split = [hi - lo]
        self._last: list[dict] = self._w.ready

    def generate(self, prompt: Sequence[int], max_tokens: int,
                 prefill_step_size: int) -> RunResult:
        self._last = self._w.request({"prompt": list(prompt), "max_tokens": max_tokens,
                                      "prefill_step_size": prefill_step_size}, self._timeout)
        r = self._last[0]
        return RunResult(len(prompt), r["tokens"], r["token_times"])

    def op(self, name: str, **args) -> dict:
        """One of the serving measurements (clusterd/bench/mlx_batch.py) in this process."""
        self._last = self._w.request({"op": name, "args": args}, self._timeout)
        return self._last[0]

    def memory(self) -> list[ProcessMemory]:
        r = self._last[0]
        return [ProcessMemory("mlx-lm", r.get("rss_bytes", 0), 0, tuple(self._w.ready[0]["layers"]))]

    def close(self) -> None:
        self._w.stop()


def ring_launcher() -> Optional[str]:
    exe = Path(sys.executable).with_name("mlx.launch")
    return str(exe) if exe.exists() else shutil.which("mlx.launch")


class MlxRing:
    """mlx-lm's pipeline parallelism over the ring backend on loopback, one
    process per stage. By default the ranks are started the way
    `mlx.launch --backend ring --hosts 127.0.0.1 -n N` starts them (MLX_RANK,
    MLX_HOSTFILE with one 127.0.0.1:port per rank), without the launcher
    itself: its I/O relay busy-polls (select on always-writable pipes), which
    on a 2-core machine takes CPU from whatever runs next to it.
    via_launcher=True runs mlx.launch as is."""

    def __init__(self, model_dir: Path, counts: Sequence[int], workdir: Path,
                 timeout: float = 600.0, via_launcher: bool = False):
        n = len(counts)
        how = "mlx.launch" if via_launcher else "ring ranks"
        self.info = SubjectInfo(f"mlx-lm ring, {n} processes", "mlx-lm-ring", n, list(counts),
                                f"started as {how}")
        self._timeout = timeout
        port = _free_port_block(n)
        worker = [sys.executable, "-m", "clusterd.bench.mlx_worker", str(model_dir),
                  "--pipeline", "--split", ",".join(map(str, counts))]
        if via_launcher:
            launcher = ring_launcher()
            if launcher is None:
                raise BaselineError("mlx.launch is not installed next to this Python")
            cmds = [([launcher, "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(n),
                      "--starting-port", str(port), "--", *worker], {})]
        else:
            hostfile = workdir / f"mlx-ring-{n}-hosts.json"
            hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(n)]))
            cmds = [(worker, {"MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)}) for r in range(n)]
        self.command = cmds
        self._w = _Worker(cmds, n, workdir / f"mlx-ring-{n}.log", timeout)
        self._last = self._w.ready
        sizes = {r["size"] for r in self._w.ready}
        if sizes != {n}:
            self.close()
            raise BaselineError(f"the ring has size {sizes}, expected {n}")

    def generate(self, prompt: Sequence[int], max_tokens: int,
                 prefill_step_size: int) -> RunResult:
        self._last = self._w.request({"prompt": list(prompt), "max_tokens": max_tokens,
                                      "prefill_step_size": prefill_step_size}, self._timeout)
        # Every rank yields the same tokens (mlx-lm all-gathers the last hidden
        # state); rank 0 holds the last layers, so its clock is the output's.
        r = self._last[0]
        return RunResult(len(prompt), r["tokens"], r["token_times"])

    def memory(self) -> list[ProcessMemory]:
        by_rank = {r["rank"]: r for r in self._last}
        out = []
        for ready in self._w.ready:
            r = by_rank.get(ready["rank"], {})
            out.append(ProcessMemory(f"rank{ready['rank']}", r.get("rss_bytes", 0), 0,
                                     tuple(ready["layers"])))
        # Stage order (first layers first), like the clusterd layouts.
        return sorted(out, key=lambda m: m.layers)

    def close(self) -> None:
        self._w.stop()
