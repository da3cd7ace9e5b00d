"""Weight files node to node: the serving side of ListFiles / FetchFile, and
the receiving side of one file from one peer.

Serving: only files of the node's model store (a repository's snapshot;
symlinks may point into its blobs, nowhere else; each file is opened without
following links and served from that open file), to callers the server's
interceptor already checked for the cluster secret. Each file's sha256 is
computed once: a blob the hub or clusterd named by its sha256 needs no
hashing, any other file is hashed once and the result kept in the clusterd
folder.

Receiving: streamed into blobs/<sha256>.incomplete, resumed from its length
after an interruption, hashed as it arrives, and renamed into place only when
size, sha256 and safetensors header all check out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import grpc

from clusterd.messages import quoted
from clusterd.models.files import FileCheckError, check_file, check_safetensors, hash_fd
from clusterd.models.safe_fs import Entry
from clusterd.models.store import COMMIT, SHA256, ModelRef, ModelStore, StoreError, safe_relpath
from clusterd.wire import clusterd_pb2 as pb

log = logging.getLogger("clusterd.transfer")

DEFAULT_CHUNK = 2**20  # measured best of 256 KiB..4 MiB (benchmarks/transfer_speed.py)
MIN_CHUNK, MAX_CHUNK = 64 * 2**10, 16 * 2**20
STREAM_RETRIES = 3  # a broken stream resumes from where it stopped this many times


class CorruptSource(RuntimeError):
    """What a peer sent does not match what it announced."""


class Cancelled(RuntimeError):
    pass


# -- serving -------------------------------------------------------------------

class FileServer:
    def __init__(self, store: ModelStore, hash_cache: Path):
        self.store = store
        self.hash_cache = Path(hash_cache)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def sha256(self, entry: Entry, key: str) -> str:
        """The sha256 of an opened store file, computed at most once per
        (file, size, mtime). `key` names the file for the hash cache."""
        if entry.blob is not None and SHA256.match(entry.blob):
            return entry.blob  # content-addressed: the name is the hash
        digest = hashlib.sha1(key.encode()).hexdigest()
        cache = self.hash_cache / f"{digest}.json"
        stamp = {"path": key, "size": entry.size, "mtime_ns": entry.mtime_ns}
        with self._lock(digest):
            try:
                cached = json.loads(cache.read_text())
                if {k: cached.get(k) for k in stamp} == stamp and SHA256.match(cached["sha256"]):
                    return cached["sha256"]
            except (OSError, ValueError, KeyError, TypeError):
                pass
            hashes = hash_fd(entry.fd)
            if entry.blob is not None and COMMIT.match(entry.blob) \
                    and hashes.git_sha1 != entry.blob:
                # The hub names small files by their git blob id: this one changed on disk.
                raise CorruptSource(f"{entry.blob} does not match its blob id (corrupt on disk)")
            self.hash_cache.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps({**stamp, "sha256": hashes.sha256}))
            os.replace(tmp, cache)
            return hashes.sha256

    def _key(self, ref: ModelRef, path: str, entry: Entry) -> str:
        where = f"blobs/{entry.blob}" if entry.blob else f"snapshots/{path}"
        return f"{self.store.repo_dir(ref.repo_id)}/{where}"

    def list_files(self, request: pb.ListFilesRequest, context) -> pb.ListFilesReply:
        """The files of `paths` (all when empty) this node holds; absent files
        are left out, so an empty reply means "I have none of them". A file
        the store refuses (a link out of it) is left out with a warning."""
        try:
            ref = ModelRef.parse(request.model)
            paths = list(request.paths) or list(self.store.files(ref))
            for path in paths:
                safe_relpath(path)
        except StoreError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        out = []
        for path in paths:
            try:
                with self.store.opened(ref, path) as entry:
                    if entry is None:
                        continue
                    item = pb.FileEntry(path=path, size=entry.size)
                    if request.with_sha256:
                        item.sha256 = self.sha256(entry, self._key(ref, path, entry))
            except StoreError as e:
                log.warning("ListFiles: %s", e)
                continue
            except CorruptSource as e:
                context.abort(grpc.StatusCode.DATA_LOSS, str(e))
            out.append(item)
        return pb.ListFilesReply(files=out)

    def chunks(self, request: pb.FetchFileRequest, context) -> Iterator[pb.FileChunk]:
        try:
            ref = ModelRef.parse(request.model)
            with self.store.opened(ref, request.path) as entry:
                if entry is None:
                    context.abort(grpc.StatusCode.NOT_FOUND,
                                  f"{quoted(request.path)} of {ref} is not in this node's store")
                # What is served is the file opened and checked here, whatever
                # the name refers to by the time the bytes are read.
                yield from self._serve(entry, self.sha256(entry, self._key(ref, request.path,
                                                                             entry)),
                                       request, context)
        except StoreError as e:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except CorruptSource as e:
            context.abort(grpc.StatusCode.DATA_LOSS, str(e))

    def _serve(self, entry: Entry, sha: str, request: pb.FetchFileRequest,
               context) -> Iterator[pb.FileChunk]:
        size, offset = entry.size, request.offset
        if offset > size:
            context.abort(grpc.StatusCode.OUT_OF_RANGE,
                          f"offset {offset} is past the end of {quoted(request.path)} "
                          f"({size} bytes)")
        step = min(max(request.chunk_bytes or DEFAULT_CHUNK, MIN_CHUNK), MAX_CHUNK)
        first = True
        while context.is_active():
            data = os.pread(entry.fd, min(step, size - offset), offset) if offset < size else b""
            if data or first:
                yield pb.FileChunk(offset=offset, data=data, size=size,
                                   sha256=sha if first else "")
            first = False
            offset += len(data)
            if len(data) < step:
                return


# -- receiving -----------------------------------------------------------------

@dataclass(frozen=True)
class Offer:
    """A file as a peer announced it."""

    path: str
    size: int
    sha256: str


def fetch_from_peer(store: ModelStore, ref: ModelRef, commit: str, stub, address: str,
                    offer: Offer, on_bytes: Callable[[int], None],
                    cancel: Optional[threading.Event] = None,
                    chunk_bytes: int = DEFAULT_CHUNK) -> Path:
    """Fetch one file from one peer into snapshot `commit`. on_bytes gets the
    bytes already present first (a resumed partial), then each increment.
    Raises CorruptSource when the bytes do not match the peer's sha256 (the
    partial is dropped), grpc.RpcError when the peer keeps failing."""
    if not SHA256.match(offer.sha256):
        raise CorruptSource(f"{address} gave no sha256 for {offer.path}")
    partial = store.partial_path(ref.repo_id, offer.sha256)
    with store.writing(ref.repo_id, offer.sha256, cancel) as out:
        if out is None:  # the same content is already stored (another path or process)
            on_bytes(offer.size)
            return store.link(ref, commit, offer.path, offer.sha256)
        for attempt in range(2):
            have = out.seek(0, os.SEEK_END)
            if have > offer.size:
                out.truncate(0)
                have = 0
            if have:
                log.info("resuming %s from %s at byte %d of %d", offer.path, address, have,
                         offer.size)
            hasher = _hash_prefix(partial, have)
            started_at = have
            on_bytes(have)
            have = _receive(stub, ref, offer, have, out, hasher, on_bytes, cancel, chunk_bytes,
                            address)
            out.flush()  # what is checked below is read back from the file
            if have == offer.size and hasher.hexdigest() == offer.sha256:
                break
            out.truncate(0)
            on_bytes(-have)
            if attempt == 0 and started_at > 0:
                # The old partial may be what was wrong: once more, from zero.
                log.warning("%s: resumed copy does not verify; fetching it whole", offer.path)
                continue
            partial.unlink(missing_ok=True)
            raise CorruptSource(f"{offer.path} from {address} does not match the sha256 that "
                                "node announced: its copy is corrupt")
        try:
            (check_safetensors if offer.path.endswith(".safetensors") else check_file)(
                partial, offer.size)
        except FileCheckError as e:
            partial.unlink(missing_ok=True)
            raise CorruptSource(f"{offer.path} from {address}: {e}") from None
        return store.install(ref, commit, offer.path, offer.sha256, partial)


def _hash_prefix(path: Path, n: int):
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while n > 0 and (chunk := f.read(min(n, 8 * 2**20))):
            hasher.update(chunk)
            n -= len(chunk)
    return hasher


def _receive(stub, ref, offer, have, out, hasher, on_bytes, cancel, chunk_bytes, address) -> int:
    """Stream the rest of the file, resuming a broken stream a few times."""
    retries = STREAM_RETRIES
    while True:
        try:
            return _stream(stub, ref, offer, have, out, hasher, on_bytes, cancel, chunk_bytes)
        except _Broken as broken:
            have, e = broken.have, broken.error
            transient = e.code() in (grpc.StatusCode.UNAVAILABLE,
                                     grpc.StatusCode.DEADLINE_EXCEEDED,
                                     grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
            if not transient or retries == 0:
                raise e from None
            retries -= 1
            log.warning("stream of %s from %s broke at %d bytes (%s); resuming",
                        offer.path, address, have, e.code().name)
            # A restarting peer needs a moment; a dead one costs a few seconds at most.
            time.sleep(0.5 * 2 ** (STREAM_RETRIES - 1 - retries))


class _Broken(Exception):
    """A stream that failed after `have` bytes were written and hashed."""

    def __init__(self, have: int, error: grpc.RpcError):
        super().__init__(str(error))
        self.have, self.error = have, error


def _stream(stub, ref, offer, have, out, hasher, on_bytes, cancel, chunk_bytes) -> int:
    # A deadline that still lets a slow link (5 MB/s) finish the biggest shard.
    timeout = 120.0 + (offer.size - have) / 5e6
    call = stub.FetchFile(pb.FetchFileRequest(model=str(ref), path=offer.path, offset=have,
                                              chunk_bytes=chunk_bytes), timeout=timeout)
    first = True
    try:
        for chunk in _guard(call, lambda: have):
            if first and (chunk.size != offer.size or chunk.sha256 != offer.sha256):
                raise CorruptSource(f"{offer.path} changed on its node since it was listed")
            if chunk.offset != have:
                raise CorruptSource(f"{offer.path}: chunk at {chunk.offset}, expected {have}")
            first = False
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            out.write(chunk.data)
            hasher.update(chunk.data)
            have += len(chunk.data)
            on_bytes(len(chunk.data))
    finally:
        call.cancel()
    return have


def _guard(call, have: Callable[[], int]):
    """The call's chunks; an RpcError becomes _Broken with the bytes so far."""
    try:
        yield from call
    except grpc.RpcError as e:
        raise _Broken(have(), e) from None


def list_offers(stub, ref: ModelRef, paths: list[str], timeout: float = 600.0) -> list[Offer]:
    """What a peer holds of `paths`, with sizes and sha256 (which it may have
    to compute once: hence the long deadline)."""
    reply = stub.ListFiles(pb.ListFilesRequest(model=str(ref), paths=paths, with_sha256=True),
                           timeout=timeout)
    return [Offer(e.path, e.size, e.sha256) for e in reply.files]
