"""`clusterd up`: one node daemon, in the foreground until SIGINT/SIGTERM or
a Shutdown RPC (`clusterd down`)."""

import logging
import signal
import threading
import uuid
from concurrent import futures
from dataclasses import dataclass
from typing import Optional, Sequence

import grpc

from clusterd.node.executor import Executor
from clusterd.node.resources import probe
from clusterd.node.service import NodeService
from clusterd.wire import clusterd_pb2_grpc as rpc
from clusterd.wire.channel import CHANNEL_OPTIONS, open_channel

log = logging.getLogger("clusterd.node")

SESSION_SWEEP_S = 5.0


@dataclass(frozen=True)
class DaemonConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    name: str = ""
    memory_limit: Optional[int] = None
    node_id: str = ""


class NextHops:
    """One long-lived channel per next-stage address: no per-token setup."""

    def __init__(self, interceptors: Sequence[object] = ()):
        self._interceptors = interceptors
        self._stubs: dict[str, rpc.NodeStub] = {}
        self._lock = threading.Lock()

    def __call__(self, address: str) -> rpc.NodeStub:
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                stub = rpc.NodeStub(open_channel(address, self._interceptors))
                self._stubs[address] = stub
            return stub


class Daemon:
    def __init__(self, config: DaemonConfig):
        self.config = config
        self.name = config.name
        self.stop_requested = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopped = False
        self.executor = Executor(self.name, NextHops())
        self.resources = probe(config.memory_limit)
        # discovery/security hook: server interceptors and the advertiser.
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="rpc"),
            options=CHANNEL_OPTIONS,
        )
        self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        self.service = NodeService(
            node_id=config.node_id or uuid.uuid4().hex, name=self.name, port=self.port,
            resources=self.resources, executor=self.executor, on_shutdown=self.stop_requested.set)
        rpc.add_NodeServicer_to_server(self.service, self.server)

    def start(self) -> None:
        self.server.start()
        threading.Thread(target=self._sweep_sessions, name="sweeper", daemon=True).start()

    def _sweep_sessions(self) -> None:
        while not self.stop_requested.wait(SESSION_SWEEP_S):
            for sid in self.executor.sessions.expire():
                log.info("session %s timed out; its caches are freed", sid)

    def stop(self) -> None:
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        log.info("stopping")
        self.stop_requested.set()
        # discovery/security hook: unregister from mDNS first.
        done = self.server.stop(grace=2.0)
        self.executor.stop()
        done.wait(5.0)

    def wait(self) -> None:
        # A timed wait lets the main thread run signal handlers promptly.
        while not self.stop_requested.wait(0.5):
            pass


def run_forever(config: DaemonConfig, announce) -> int:
    try:
        daemon = Daemon(config)
    except RuntimeError as e:  # grpc raises this when the port is taken
        raise PortError(f"cannot listen on {config.host}:{config.port}: {e}") from e
    if daemon.port == 0:
        raise PortError(f"cannot listen on {config.host}:{config.port} (port in use?)")
    daemon.start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: daemon.stop_requested.set())
    announce(daemon)
    daemon.wait()
    daemon.stop()
    return 0


class PortError(RuntimeError):
    pass
