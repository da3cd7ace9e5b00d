"""Where a node gets the files of its stage, in order: its own store, the
other nodes of the cluster, the hub. Runs on a node for PrepareFiles, and in
the coordinator for the few small files (config, tokenizer) it needs itself.

With several peers holding a file, each peer has one stream and takes the
largest file it can serve that nobody fetches yet: fast peers take more, and
a failure on one peer hands the file to another, then to the hub.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import grpc

from clusterd.messages import bounded
from clusterd.models.files import FileCheckError, check_file, check_safetensors
from clusterd.models.store import COMMIT, ModelRef, ModelStore, StoreError, safe_relpath
from clusterd.node.hub import Cancelled as HubCancelled
from clusterd.node.hub import Hub, HubError
from clusterd.node.transfer import (DEFAULT_CHUNK, Cancelled, Offer,
                                    fetch_from_peer, list_offers)
from clusterd.wire import clusterd_pb2 as pb

log = logging.getLogger("clusterd.transfer")

HUB_STREAMS = 4
PROGRESS_INTERVAL_S = 0.25


class PrepareError(RuntimeError):
    """Files that could not be had from any source; the message lists them."""


class Progress:
    """Per-file progress as PrepareProgress messages, at most one per file
    every PROGRESS_INTERVAL_S (and always when a file starts or completes)."""

    def __init__(self, emit: Callable[[pb.PrepareProgress], None]):
        self._emit = emit
        self._lock = threading.Lock()
        self._files: dict[str, list] = {}  # path -> [done, total, source, last_sent]

    def start(self, path: str, total: int, source: str) -> None:
        with self._lock:
            self._files[path] = [0, total, source, 0.0]
            self._send(path)

    def add(self, path: str, n: int) -> None:
        with self._lock:
            state = self._files[path]
            state[0] += n
            if state[0] >= state[1] or time.monotonic() - state[3] >= PROGRESS_INTERVAL_S:
                self._send(path)

    def complete(self, path: str, total: int, source: str) -> None:
        with self._lock:
            self._files[path] = [total, total, source, 0.0]
            self._send(path)

    def _send(self, path: str) -> None:
        done, total, source, _ = self._files[path]
        self._files[path][3] = time.monotonic()
        self._emit(pb.PrepareProgress(path=path, done_bytes=done, total_bytes=total,
                                      source=source))

    def counter(self, path: str) -> Callable[[int], None]:
        return lambda n: self.add(path, n)


class _Snapshot:
    """The snapshot new files go into, chosen once, when the first file
    arrives (a hub commit names it when the store has none yet)."""

    def __init__(self, store: ModelStore, ref: ModelRef):
        self.store, self.ref = store, ref
        self._name: Optional[str] = None
        self._lock = threading.Lock()

    def current(self) -> Optional[str]:
        return self._name or self.store.commit(self.ref)

    def get(self, hub_commit: Optional[str] = None) -> str:
        with self._lock:
            if self._name is None:
                self._name = self.store.writable_snapshot(self.ref, hub_commit)
            return self._name


@dataclass
class _Queue:
    """Files waiting for a peer: each peer takes the largest it offers. A peer
    with nothing to take waits while files it could serve are in flight
    elsewhere: if that transfer fails, the file comes back to it."""

    offers: dict[str, dict[str, Offer]]  # path -> address -> offer
    taken: set = field(default_factory=set)
    done: set = field(default_factory=set)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def take(self, address: str, cancel: threading.Event) -> Optional[Offer]:
        with self.changed:
            while not cancel.is_set():
                mine = [o for p, o in self.offers.items() if address in o and p not in self.done]
                free = [o[address] for o in mine if o[address].path not in self.taken]
                if free:
                    best = max(free, key=lambda o: (o.size, o.path))
                    self.taken.add(best.path)
                    return best
                if not mine:
                    return None
                self.changed.wait(0.5)
            return None

    def finish(self, path: str) -> None:
        with self.changed:
            self.done.add(path)
            self.changed.notify_all()

    def give_back(self, path: str, address: str) -> None:
        """`address` failed at `path`: another peer may take it."""
        with self.changed:
            self.offers[path].pop(address, None)
            self.taken.discard(path)
            self.changed.notify_all()


class Preparer:
    def __init__(self, store: ModelStore, stub_for: Callable[[str], object],
                 hub: Optional[Hub] = None, chunk_bytes: int = DEFAULT_CHUNK):
        self.store = store
        self.stub_for = stub_for
        self.hub = hub or Hub()
        self.chunk_bytes = chunk_bytes

    def prepare(self, request: pb.PrepareFilesRequest, emit: Callable[[pb.PrepareProgress], None],
                cancel: Optional[threading.Event] = None) -> None:
        """Make every file of request.paths present and verified in the store,
        or raise PrepareError naming what is missing and why."""
        cancel = cancel or threading.Event()
        ref = ModelRef.parse(request.model)
        paths = sorted({safe_relpath(p) for p in request.paths})
        progress = Progress(emit)
        missing = [p for p in paths if not self._have(ref, p, progress)]
        snapshot = _Snapshot(self.store, ref)
        why: dict[str, list[str]] = {}
        peers = [a for a in dict.fromkeys(request.peer_addresses) if a]
        if missing and peers:
            missing = self._from_peers(ref, missing, peers, snapshot, progress, cancel, why)
        if missing and request.allow_hub:
            missing = self._from_hub(ref, missing, snapshot, progress, cancel, why)
        if cancel.is_set():
            raise PrepareError("cancelled")
        if missing:
            raise PrepareError(_describe_missing(ref, missing, why, bool(peers),
                                                 request.allow_hub))

    def _have(self, ref: ModelRef, path: str, progress: Progress) -> bool:
        try:
            file = self.store.file(ref, path)
        except StoreError as e:  # a planted link: fetched again, and never written through
            log.warning("local copy of %s refused (%s): fetching it again", path, e)
            return False
        if file is None:
            return False
        try:
            size = (check_safetensors if path.endswith(".safetensors") else check_file)(file)
        except FileCheckError as e:
            log.warning("local copy of %s is bad (%s): fetching it again", path, e)
            self.store.remove(ref, path)
            return False
        progress.complete(path, size, "local")
        return True

    # -- peers -------------------------------------------------------------------
    def _from_peers(self, ref, missing, peers, snapshot, progress, cancel, why) -> list[str]:
        def ask(address: str) -> list[Offer]:
            try:
                return list_offers(self.stub_for(address), ref, missing)
            except grpc.RpcError as e:
                for p in missing:
                    why.setdefault(p, []).append(f"peer {address}: {e.details() or e.code().name}")
                return []

        with ThreadPoolExecutor(len(peers)) as pool:
            answers = dict(zip(peers, pool.map(ask, peers)))
        offers: dict[str, dict[str, Offer]] = {}
        for address, listed in answers.items():
            for o in listed:
                if o.path in missing:
                    offers.setdefault(o.path, {})[address] = o
        if not offers:
            return missing
        for path, by_peer in offers.items():
            o = next(iter(by_peer.values()))
            progress.start(path, o.size, "peer " + next(iter(by_peer)))
        queue = _Queue(offers)

        def work(address: str) -> None:
            while (offer := queue.take(address, cancel)) is not None:
                progress.start(offer.path, offer.size, f"peer {address}")
                try:
                    fetch_from_peer(self.store, ref, snapshot.get(), self.stub_for(address),
                                    address, offer, progress.counter(offer.path), cancel,
                                    self.chunk_bytes)
                    queue.finish(offer.path)
                except Cancelled:
                    return
                except Exception as e:  # any failure hands the file to another source
                    text = e.details() if isinstance(e, grpc.RpcError) else str(e)
                    log.warning("%s from %s failed: %s", offer.path, address, text)
                    why.setdefault(offer.path, []).append(f"peer {address}: {text}")
                    queue.give_back(offer.path, address)

        holders = sorted({a for o in offers.values() for a in o})
        with ThreadPoolExecutor(len(holders)) as pool:
            list(pool.map(work, holders))
        return [p for p in missing if p not in queue.done]

    # -- hub ---------------------------------------------------------------------
    def _from_hub(self, ref, missing, snapshot, progress, cancel, why) -> list[str]:
        current = snapshot.current()
        revision = current if current and COMMIT.match(current) else (ref.revision or "main")
        try:
            listing = self.hub.listing(ref.repo_id, revision)
        except HubError as e:
            for p in missing:
                why.setdefault(p, []).append(f"hub: {e}")
            return missing
        absent = [p for p in missing if p not in listing.files]
        for p in absent:
            why.setdefault(p, []).append(f"hub: {ref.repo_id}@{listing.commit[:12]} has no {p}")
        todo = [listing.files[p] for p in missing if p in listing.files]
        for f in todo:
            progress.start(f.path, f.size, "hub")
        got: set[str] = set()

        def one(f) -> None:
            if cancel.is_set():
                return
            try:
                self.hub.download(self.store, ref, snapshot.get(listing.commit), listing.commit,
                                  f, progress.counter(f.path), cancel)
                got.add(f.path)
            except HubCancelled:
                return
            except Exception as e:  # reported with the missing files
                log.warning("%s from the hub failed: %s", f.path, e)
                why.setdefault(f.path, []).append(f"hub: {e}")

        # Largest first, so the long downloads start early.
        todo.sort(key=lambda f: -f.size)
        with ThreadPoolExecutor(max(1, min(HUB_STREAMS, len(todo)))) as pool:
            list(pool.map(one, todo))
        return [p for p in missing if p not in got]


def _describe_missing(ref: ModelRef, missing: Sequence[str], why: dict, peers: bool,
                      hub: bool) -> str:
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    lines = [f"{len(missing)} file(s) of {ref} missing: {shown}"]
    reasons = sorted({r for p in missing for r in why.get(p, [])})
    if not peers:
        reasons.append("no other node was asked")
    elif not any(r.startswith("peer") for r in reasons):
        reasons.append("no other node holds them")
    if not hub:
        reasons.append("the hub was not allowed")
    lines += [f"  - {r}" for r in reasons[:8]]
    return "\n".join(lines)


class NodeFiles:
    """The node's ListFiles / FetchFile / PrepareFiles, for NodeService to
    delegate to. One PrepareFiles per model at a time; a second waits."""

    HEARTBEAT_S = 2.0  # an idle progress message, so the coordinator can tell "slow" from "gone"

    def __init__(self, node_name: str, store: ModelStore, hash_cache, stub_for,
                 hub: Optional[Hub] = None):
        from clusterd.node.transfer import FileServer

        self.node_name = node_name
        self.store = store
        self.server = FileServer(store, hash_cache)
        self.preparer = Preparer(store, stub_for, hub)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def list_files(self, request, context):
        return self.server.list_files(request, context)

    def fetch_file(self, request, context):
        yield from self.server.chunks(request, context)

    def prepare_files(self, request: pb.PrepareFilesRequest, context):
        import queue as queue_mod

        try:
            ref = ModelRef.parse(request.model)
            for p in request.paths:
                safe_relpath(p)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        with self._guard:
            lock = self._locks.setdefault(ref.repo_id, threading.Lock())
        events: "queue_mod.Queue" = queue_mod.Queue()
        cancel = threading.Event()

        def run() -> None:
            try:
                with lock:
                    self.preparer.prepare(request, events.put, cancel)
                events.put(pb.PrepareProgress(finished=True))
            except PrepareError as e:
                events.put(pb.PrepareProgress(error=bounded(f"node {self.node_name}: {e}")))
            except OSError as e:  # the disk: full, read-only, ...
                log.exception("PrepareFiles failed")
                events.put(pb.PrepareProgress(
                    error=f"node {self.node_name}: preparing files failed: {e.strerror}"))
            except Exception:  # the node stays up and says where to look
                log.exception("PrepareFiles failed")
                events.put(pb.PrepareProgress(
                    error=f"node {self.node_name}: preparing files failed unexpectedly; the "
                          "node's log has the details"))
            finally:
                events.put(None)

        worker = threading.Thread(target=run, name="prepare", daemon=True)
        worker.start()
        try:
            while True:
                try:
                    msg = events.get(timeout=self.HEARTBEAT_S)
                except queue_mod.Empty:
                    if not context.is_active():
                        return
                    yield pb.PrepareProgress()
                    continue
                if msg is None:
                    return
                yield msg
        finally:
            cancel.set()  # the caller went away (or we are done): stop fetching

    # -- LoadShard support -------------------------------------------------------
    def stage_dir(self, spec: pb.StageSpec) -> Path:
        """The folder to load a stage from: model_id resolved in this node's
        store, else model_path as given. Raises ModelMissing when the store
        lacks the model."""
        if not spec.model_id:
            return Path(spec.model_path)
        ref = ModelRef.parse(spec.model_id)
        snap = self.store.snapshot(ref)
        if snap is None or not (snap / "config.json").is_file():
            raise ModelMissing(f"node {self.node_name} has no {ref} in its model store: "
                               f"run `clusterd pull {ref}` first")
        return snap


class ModelMissing(ValueError):
    """LoadShard names a model this node's store does not hold."""


class Stubs:
    """One channel per peer address, with this machine's cluster secret."""

    def __init__(self, security=None):
        self._security = security
        self._stubs: dict[str, object] = {}
        self._channels: list = []
        self._lock = threading.Lock()

    def __call__(self, address: str):
        from clusterd.wire import clusterd_pb2_grpc as rpc
        from clusterd.wire.channel import open_channel

        with self._lock:
            if address not in self._stubs:
                channel = open_channel(address, (), self._security)
                self._channels.append(channel)
                self._stubs[address] = rpc.NodeStub(channel)
            return self._stubs[address]

    def close(self) -> None:
        with self._lock:
            for c in self._channels:
                c.close()
            self._channels.clear()
            self._stubs.clear()
