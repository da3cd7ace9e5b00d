"""PeerHandle: the coordinator's client for one node. Every call has a
deadline, and a failure becomes a PeerError that names the node."""

import threading
import time
from typing import Iterator, Optional, Sequence

import grpc

from clusterd.security import explain_rpc_error
from clusterd.wire import clusterd_pb2 as pb
from clusterd.wire import clusterd_pb2_grpc as rpc
from clusterd.wire.channel import open_channel

INFO_TIMEOUT_S = 5.0
LOAD_TIMEOUT_S = 3600.0  # a real R1 stage is ~130 GB read from disk
PREPARE_TIMEOUT_S = 48 * 3600.0  # ~130 GB from the hub on a slow line
PREPARE_IDLE_S = 60.0  # nodes report every 2 s while fetching


class PeerError(RuntimeError):
    """A node refused or failed a call; the message names the node."""

    def __init__(self, address: str, message: str, code: Optional[grpc.StatusCode] = None):
        super().__init__(message)
        self.address = address
        self.code = code


class PeerHandle:
    def __init__(self, address: str, interceptors: Sequence[object] = ()):
        self.address = address
        self.name = address  # replaced by the node's own name after info()
        self._channel = open_channel(address, interceptors)
        self._stub = rpc.NodeStub(self._channel)
        self._lock = threading.Lock()
        self._event_calls: dict[str, grpc.Future] = {}

    def __repr__(self) -> str:
        return f"PeerHandle({self.name}@{self.address})"

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request, timeout: float):
        try:
            return getattr(self._stub, method)(request, timeout=timeout)
        except grpc.RpcError as e:
            raise self._error(method, e) from None

    def _error(self, method: str, e: grpc.RpcError) -> PeerError:
        code = e.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            who = self.address if self.name == self.address else f"{self.name} ({self.address})"
            text = explain_rpc_error(e, who)
        elif code == grpc.StatusCode.UNAVAILABLE:
            text = f"node {self.name} ({self.address}) is unreachable: {e.details()}"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            text = f"node {self.name} ({self.address}) did not answer {method} in time"
        else:
            text = f"node {self.name} ({self.address}) refused {method}: {e.details()}"
        return PeerError(self.address, text, code)

    def info(self) -> pb.NodeInfo:
        info = self._call("Info", pb.InfoRequest(), INFO_TIMEOUT_S)
        self.name = info.name or self.address
        return info

    def health(self, timeout: float = INFO_TIMEOUT_S) -> pb.HealthReply:
        return self._call("Health", pb.HealthRequest(), timeout)

    def load_shard(self, stage: pb.StageSpec) -> pb.LoadShardReply:
        return self._call("LoadShard", pb.LoadShardRequest(stage=stage), LOAD_TIMEOUT_S)

    def unload(self, shard: str = "") -> pb.UnloadReply:
        """One shard by name, or (empty) every shard the node holds."""
        return self._call("Unload", pb.UnloadRequest(shard=shard), 60.0)

    def open_session(self, request: pb.OpenSessionRequest) -> pb.OpenSessionReply:
        return self._call("OpenSession", request, 30.0)

    def forward(self, act: pb.Activation) -> None:
        self._call("Forward", act, 60.0)

    def end_session(self, session_id: str, keep_tokens: Sequence[int] = ()) -> None:
        self._call("EndSession", pb.EndSessionRequest(session_id=session_id,
                                                      keep_tokens=list(keep_tokens)), 10.0)

    def events(self, client_id: str) -> Iterator[pb.TokenEvent]:
        """Every event of this client's sessions on the node, until the
        stream is closed (close_events) or fails. No overall deadline: the
        caller watches node health while it waits."""
        call = self._stub.Events(pb.EventsRequest(client_id=client_id))
        with self._lock:
            self._event_calls[client_id] = call
        try:
            yield from call
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise self._error("Events", e) from None
        finally:
            with self._lock:
                self._event_calls.pop(client_id, None)
            call.cancel()

    def close_events(self, client_id: str) -> None:
        with self._lock:
            call = self._event_calls.pop(client_id, None)
        if call is not None:
            call.cancel()

    def shutdown(self) -> None:
        self._call("Shutdown", pb.ShutdownRequest(), 10.0)

    # -- weight files -----------------------------------------------------------
    def list_files(self, model: str, paths: Sequence[str] = (),
                   with_sha256: bool = False) -> list[pb.FileEntry]:
        # Hashing a file the node has never hashed reads all of it: a long deadline.
        timeout = 600.0 if with_sha256 else 60.0
        return list(self._call("ListFiles", pb.ListFilesRequest(
            model=model, paths=list(paths), with_sha256=with_sha256), timeout).files)

    def prepare_files(self, request: pb.PrepareFilesRequest) -> Iterator[pb.PrepareProgress]:
        """The node's progress until it has every file or gives up. The node
        reports at least every few seconds; silence for PREPARE_IDLE_S means
        it is gone, and the call is cancelled."""
        call = self._stub.PrepareFiles(request, timeout=PREPARE_TIMEOUT_S)
        last = [time.monotonic()]
        done = threading.Event()

        def watch() -> None:
            while not done.wait(1.0):
                if time.monotonic() - last[0] > PREPARE_IDLE_S:
                    call.cancel()
                    return

        threading.Thread(target=watch, name="prepare-watch", daemon=True).start()
        try:
            for msg in call:
                last[0] = time.monotonic()
                yield msg
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and not done.is_set():
                raise PeerError(self.address, f"node {self.name} ({self.address}) stopped "
                                f"reporting while fetching files", e.code()) from None
            raise self._error("PrepareFiles", e) from None
        finally:
            done.set()
            call.cancel()
