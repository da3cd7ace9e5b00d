"""`clusterd up`: one node daemon, in the foreground until SIGINT/SIGTERM or
a Shutdown RPC (`clusterd down`)."""

import logging
import signal
import threading
import uuid
from concurrent import futures
from dataclasses import dataclass, field
from typing import Optional, Sequence

import grpc

from clusterd.discovery import Advertiser
from clusterd.home import clusterd_home
from clusterd.models.store import ModelStore
from clusterd.node import runfile
from clusterd.node.clock import node_clock
from clusterd.node.executor import Executor
from clusterd.node.resources import probe
from clusterd.node.service import NodeService
from clusterd.node.watch import ResourceWatch
from clusterd.node.sources import NodeFiles
from clusterd.wire import clusterd_pb2_grpc as rpc
from clusterd.security import (AuthServerInterceptor, ClientSecurity, TlsFiles, load_secret,
                               server_credentials)
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
    # None: $CLUSTERD_SECRET or the clusterd folder's (created on first run).
    secret: Optional[str] = field(default=None, repr=False)
    mdns: bool = True
    interfaces: Optional[tuple[str, ...]] = None  # IPv4 addresses for mDNS; None: all
    tls: TlsFiles = TlsFiles()


class NextHops:
    """One long-lived channel per next-stage address: no per-token setup."""

    def __init__(self, interceptors: Sequence[object] = (),
                 security: Optional[ClientSecurity] = None):
        self._interceptors = interceptors
        self._security = security
        self._stubs: dict[str, rpc.NodeStub] = {}
        self._lock = threading.Lock()

    def __call__(self, address: str) -> rpc.NodeStub:
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                stub = rpc.NodeStub(open_channel(address, self._interceptors, self._security))
                self._stubs[address] = stub
            return stub


class Daemon:
    def __init__(self, config: DaemonConfig):
        self.config = config
        self.name = config.name
        self.stop_requested = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopped = False
        # Every RPC, node to node included, carries proof of the cluster secret.
        secret = config.secret or load_secret(clusterd_home(), create=True)
        hops = NextHops(security=ClientSecurity(secret, config.tls))
        clock = node_clock()
        self.executor = Executor(self.name, hops)
        self.resources = probe(config.memory_limit)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="rpc"),
            options=CHANNEL_OPTIONS,
            interceptors=[AuthServerInterceptor(secret, node_label=repr(self.name), clock=clock)],
        )
        address = f"{config.host}:{config.port}"
        if config.tls.server_enabled:
            self.port = self.server.add_secure_port(address, server_credentials(config.tls))
        else:
            self.port = self.server.add_insecure_port(address)
        self.service = NodeService(
            node_id=config.node_id or uuid.uuid4().hex, name=self.name, port=self.port,
            resources=self.resources, executor=self.executor, on_shutdown=self.stop_requested.set,
            on_change=self._announce_change,
            # Weight transfers to other nodes use the same secret-bearing channels.
            files=NodeFiles(self.name, ModelStore(), clusterd_home() / "hashes", hops))
        self.service.probe_via(hops, tls=config.tls.client_enabled, clock=clock)
        self.advertiser: Optional[Advertiser] = None
        # mDNS work (registration ~2 s, re-announcements) runs on one thread,
        # in order, off the RPC threads: a LoadShard reply never waits on it.
        self._mdns = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mdns")
        rpc.add_NodeServicer_to_server(self.service, self.server)

    def start(self) -> None:
        self.server.start()
        threading.Thread(target=self._sweep_sessions, name="sweeper", daemon=True).start()
        ResourceWatch(self.service, lambda: probe(self.config.memory_limit), self._announce_change,
                      self.stop_requested).start()
        if self.config.mdns:
            self.advertiser = Advertiser(self.service.info(), port=self.port,
                                         interfaces=self.config.interfaces,
                                         tls=self.config.tls.server_enabled)
            self._mdns.submit(self._advertise)

    def _advertise(self) -> None:
        try:
            self.advertiser.start()
        except Exception as e:  # no multicast here: --peer still works
            log.warning("mDNS advertisement failed (%s); clients need "
                        "--peer <this Mac's address>:%d", e, self.port)

    def _announce_change(self) -> None:
        if self.advertiser is not None:
            try:
                self._mdns.submit(self._reannounce)
            except RuntimeError:  # stopping: the record is about to go anyway
                pass

    def _reannounce(self) -> None:
        try:
            self.advertiser.update(self.service.info())  # the state now, not at submit time
        except Exception as e:
            log.warning("mDNS re-announcement failed: %s", e)

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
        # Unregister from mDNS first, so clients stop picking this node.
        self._mdns.shutdown(wait=True, cancel_futures=True)
        if self.advertiser is not None:
            try:
                self.advertiser.close()
            except Exception as e:
                log.warning("mDNS unregister failed: %s", e)
        done = self.server.stop(grace=2.0)
        self.service.wired.release()
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
    record = runfile.write(clusterd_home(), daemon.port, config.host, config.name)
    try:
        announce(daemon)
        daemon.wait()
        daemon.stop()
    finally:
        runfile.remove(record)
    return 0


class PortError(RuntimeError):
    pass
