"""`clusterd up`: one node daemon, in the foreground until SIGINT/SIGTERM or
a Shutdown RPC (`clusterd down`)."""

import logging
import os
import signal
import sys
import threading
import uuid
from concurrent import futures
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import grpc

from clusterd.discovery import Advertiser
from clusterd.home import clusterd_home
from clusterd.models.store import ModelStore
from clusterd.node import runfile
from clusterd.node.clock import node_clock
from clusterd.node.executor import Executor
from clusterd.node.guard import CallGuard, Limits
from clusterd.node.link import LinkError
from clusterd.node.resources import probe
from clusterd.node.service import NodeService
from clusterd.node.watch import ResourceWatch
from clusterd.node.sources import NodeFiles
from clusterd.proofs import AuthServerInterceptor, NodeIdentity, new_boot_id
from clusterd.security import ClientSecurity, TlsFiles, load_secret, server_credentials
from clusterd.wire import clusterd_pb2_grpc as rpc
from clusterd.wire.channel import MAX_MESSAGE_BYTES, open_channel, server_options

log = logging.getLogger("clusterd.node")

SESSION_SWEEP_S = 5.0
# A stop: running calls get GRACE_S to finish, the compute thread
# COMPUTE_STOP_S to stop (it checks for a stop between layers), threads
# THREADS_S to end. The whole stop stays within a few seconds.
GRACE_S = 1.0
COMPUTE_STOP_S = 3.0
THREADS_S = 2.0


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
    limits: Limits = Limits()
    # Where the previous stage's link connects: None means the gRPC port + 1
    # (one known pair of ports to allow in a firewall), or any free port when
    # the gRPC port is picked at random; 0 means any free port.
    link_port: Optional[int] = None


class NextHops:
    """One long-lived channel per next-stage address: no per-token setup.
    Each channel learns its node's Hello once (see clusterd/proofs.py)."""

    def __init__(self, interceptors: Sequence[object] = (),
                 security: Optional[ClientSecurity] = None):
        self._interceptors = interceptors
        self._security = security
        self._stubs: dict[str, rpc.NodeStub] = {}
        self._channels: list[grpc.Channel] = []
        self._lock = threading.Lock()

    def __call__(self, address: str) -> rpc.NodeStub:
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                channel = open_channel(address, self._interceptors, self._security)
                self._channels.append(channel)
                stub = self._stubs[address] = rpc.NodeStub(channel)
            return stub

    def close(self) -> None:
        with self._lock:
            channels, self._channels, self._stubs = self._channels, [], {}
        for channel in channels:
            channel.close()


class PortError(RuntimeError):
    pass


class Daemon:
    def __init__(self, config: DaemonConfig):
        self.config = config
        self.name = config.name
        self.stop_requested = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopped = False
        self._threads: list[threading.Thread] = []
        # Every RPC, node to node included, carries proof of the cluster
        # secret, bound to this node and this start of it.
        secret = config.secret or load_secret(clusterd_home(), create=True)
        identity = NodeIdentity(config.node_id or uuid.uuid4().hex, new_boot_id())
        self.boot_id = identity.boot_id
        limits = config.limits
        clock = node_clock()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=limits.max_workers, thread_name_prefix="rpc"),
            options=server_options(),
            interceptors=[AuthServerInterceptor(secret, identity, node_label=repr(self.name),
                                                clock=clock),
                          CallGuard(repr(self.name), limits)],
            maximum_concurrent_rpcs=limits.max_workers,
        )
        self.port = self._bind(config)
        self.hops = NextHops(security=ClientSecurity(secret, config.tls))
        # Links to the next stage listen where gRPC does (a specific address
        # when given, else every interface), with the same TLS files.
        link_port = config.link_port
        if link_port is None:
            link_port = self.port + 1 if config.port else 0
        try:
            self.executor = Executor(self.name, self.hops, host=config.host, tls=config.tls,
                                     max_frame_bytes=MAX_MESSAGE_BYTES, link_port=link_port)
        except LinkError as e:
            self.server.stop(0)
            raise PortError(f"{e}: another program uses it; choose another --link-port") \
                from None
        self.resources = probe(config.memory_limit)
        self.service = NodeService(
            node_id=identity.node_id, boot_id=identity.boot_id, name=self.name, port=self.port,
            resources=self.resources, executor=self.executor, on_shutdown=self.stop_requested.set,
            on_change=self._announce_change,
            # Weight transfers to other nodes use the same secret-bearing channels.
            files=NodeFiles(self.name, ModelStore(), clusterd_home() / "hashes", self.hops))
        self.service.probe_via(self.hops, tls=config.tls.client_enabled, clock=clock)
        self.advertiser: Optional[Advertiser] = None
        # mDNS work (registration ~2 s, re-announcements) runs on one thread,
        # in order, off the RPC threads: a LoadShard reply never waits on it.
        self._mdns = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mdns")
        rpc.add_NodeServicer_to_server(self.service, self.server)

    def _bind(self, config: DaemonConfig) -> int:
        address = f"{config.host}:{config.port}"
        try:
            if config.tls.server_enabled:
                port = self.server.add_secure_port(address, server_credentials(config.tls))
            else:
                port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpc raises this when it cannot bind
            port = 0
        if port == 0:
            raise PortError(f"cannot listen on {address}: the port is in use (another "
                            "`clusterd up`?) or the address is not one of this Mac's; "
                            "stop the other daemon or choose another --port")
        return port

    def _thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def start(self) -> None:
        self.server.start()
        self._thread(self._sweep_sessions, "sweeper")
        ResourceWatch(self.service, lambda: probe(self.config.memory_limit), self._announce_change,
                      self.stop_requested).start()
        if self.config.mdns:
            self.advertiser = Advertiser(self.service.info(), port=self.port, boot=self.boot_id,
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
            for sid in self.executor.expire():
                log.info("session %s timed out; its caches are freed", sid)
            self.executor.events.sweep()  # events no coordinator came to read

    def stop(self) -> None:
        """Stop in order, within a few seconds whatever is running: leave
        mDNS, refuse new calls and cancel running ones, stop the compute
        thread, close channels to other nodes, end this daemon's threads."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        log.info("stopping")
        self.stop_requested.set()
        self.service.stopping()
        # Unregister from mDNS first, so clients stop picking this node.
        self._mdns.shutdown(wait=True, cancel_futures=True)
        if self.advertiser is not None:
            try:
                self.advertiser.close()
            except Exception as e:
                log.warning("mDNS unregister failed: %s", e)
        done = self.server.stop(grace=GRACE_S)
        self.service.wired.release()
        # Bounded: a stop must not wait on a load or step that runs long.
        stopper = threading.Thread(target=self.executor.stop, name="compute-stop", daemon=True)
        stopper.start()
        stopper.join(COMPUTE_STOP_S)
        if stopper.is_alive():
            log.warning("the compute thread did not stop within %.0f s", COMPUTE_STOP_S)
        done.wait(GRACE_S + 1.0)
        self.hops.close()
        for thread in self._threads:
            thread.join(THREADS_S)

    def wait(self) -> None:
        # A timed wait lets the main thread run signal handlers promptly.
        while not self.stop_requested.wait(0.5):
            pass


def end_process(status: int) -> None:
    """Exit at once, after an orderly stop, without Python's finalization.

    Why not return from main: Python 3.11 ends the daemon threads still alive
    at finalization with pthread_exit as soon as they next take the GIL. A
    thread coming back from MLX or gRPC native code (the compute thread in a
    long kernel, a handler waiting on it, grpc's polling threads) unwinds
    through C++ frames that forbid it, and the process dies with SIGABRT
    ("terminate called without an active exception"; pytorch/pytorch#38228,
    pybind/pybind11#2215); non-daemon RPC threads blocked on the compute
    thread would instead hold the exit for as long as a load runs. Everything
    that needed an orderly end has had it (sessions ended, the server stopped,
    mDNS goodbye sent, channels closed, logs flushed below); what is left is
    memory and sockets, which the OS frees."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def run_forever(config: DaemonConfig, announce) -> int:
    daemon = Daemon(config)
    daemon.start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: daemon.stop_requested.set())
    record = runfile.write(clusterd_home(), daemon.port, config.host, config.name)
    try:
        announce(daemon)
        daemon.wait()
    finally:
        daemon.stop()
        runfile.remove(record)
    end_process(0)
    return 0
