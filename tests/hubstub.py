"""A stand-in for the Hugging Face hub: a real HTTP server on loopback that
answers the requests huggingface_hub makes, from local folders.

    GET  /api/models/{repo}/revision/{rev}?blobs=True   model info with file sizes and hashes
    HEAD /{repo}/resolve/{rev}/{path}                   metadata: X-Repo-Commit, ETag /
                                                        X-Linked-Etag, X-Linked-Size; LFS
                                                        files (weights) redirect to /cdn/
    GET  /{repo}/resolve/{rev}/{path}, /cdn/{sha256}    content, with Range (206)

Every request is logged, and faults can be planted per file: cut the
connection after N bytes, serve slowly, or serve a flipped byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse


@dataclass
class HubFile:
    path: str
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_sha1(self) -> str:
        return hashlib.sha1(b"blob %d\x00" % len(self.data) + self.data).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha1


@dataclass
class Repo:
    repo_id: str
    commit: str
    files: dict[str, HubFile]


@dataclass
class Logged:
    method: str
    path: str
    range: Optional[str]
    file: Optional[str] = None  # repo path whose content (or metadata) was asked for
    sent: int = 0  # content bytes sent


@dataclass
class Faults:
    cut_after: dict[str, int] = field(default_factory=dict)  # first GET stops after N bytes
    bytes_per_s: dict[str, float] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)


class HubStandIn:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.log: list[Logged] = []
        self.faults = Faults()
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None

    # -- setup ------------------------------------------------------------------
    def add_repo(self, repo_id: str, folder: Path, commit: str) -> Repo:
        files = {}
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                rel = p.relative_to(folder).as_posix()
                files[rel] = HubFile(rel, p.read_bytes(), lfs=rel.endswith(".safetensors"))
        self.repos[repo_id] = Repo(repo_id, commit, files)
        return self.repos[repo_id]

    def __enter__(self) -> "HubStandIn":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- what was asked ---------------------------------------------------------
    def content_requests(self) -> list[Logged]:
        """GETs that sent file content (not metadata)."""
        with self._lock:
            return [e for e in self.log if e.method == "GET" and e.file and e.sent > 0]

    def files_asked(self) -> set[str]:
        """Every repo path whose content or metadata was requested."""
        with self._lock:
            return {e.file for e in self.log if e.file}

    def clear(self) -> None:
        with self._lock:
            self.log.clear()

    def _record(self, entry: Logged) -> None:
        with self._lock:
            self.log.append(entry)

    def find(self, repo_id: str, rev: str) -> Optional[Repo]:
        repo = self.repos.get(repo_id)
        if repo is None or rev not in ("main", repo.commit):
            return None
        return repo

    def by_sha(self, sha: str) -> Optional[HubFile]:
        for repo in self.repos.values():
            for f in repo.files.values():
                if f.lfs and f.sha256 == sha:
                    return f
        return None


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)$")
_CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")


def _handler(hub: HubStandIn):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def do_HEAD(self):
            self._route(head=True)

        def do_GET(self):
            self._route(head=False)

        def _route(self, head: bool):
            path = unquote(urlparse(self.path).path)
            entry = Logged("HEAD" if head else "GET", path, self.headers.get("Range"))
            hub._record(entry)
            if m := _INFO.match(path):
                return self._info(m["repo"], m["rev"])
            if m := _RESOLVE.match(path):
                repo = hub.find(m["repo"], m["rev"])
                if repo is None:
                    return self._error(404, "RepoNotFound" if m["repo"] not in hub.repos
                                       else "RevisionNotFound")
                f = repo.files.get(m["path"])
                if f is None:
                    return self._error(404, "EntryNotFound")
                entry.file = f.path
                headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{f.git_sha1}"'}
                if f.lfs:  # like the hub: LFS content lives elsewhere
                    headers.update({"X-Linked-Etag": f'"{f.sha256}"',
                                    "X-Linked-Size": str(len(f.data)),
                                    "Location": f"{hub.url}/cdn/{f.sha256}",
                                    "Content-Length": "0"})
                    return self._send(302, headers)
                return self._content(f, headers, head, entry)
            if m := _CDN.match(path):
                f = hub.by_sha(m["sha"])
                if f is None:
                    return self._error(404, "EntryNotFound")
                entry.file = f.path
                return self._content(f, {"ETag": f'"{f.sha256}"'}, head, entry)
            return self._error(404, "NotFound")

        def _info(self, repo_id: str, rev: str):
            repo = hub.find(repo_id, rev)
            if repo is None:
                return self._error(404, "RepoNotFound" if repo_id not in hub.repos
                                   else "RevisionNotFound")
            siblings = []
            for f in repo.files.values():
                s = {"rfilename": f.path, "size": len(f.data), "blobId": f.git_sha1}
                if f.lfs:
                    s["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}
                siblings.append(s)
            body = json.dumps({"_id": repo_id, "id": repo_id, "modelId": repo_id,
                               "sha": repo.commit, "siblings": siblings}).encode()
            self._send(200, {"Content-Type": "application/json",
                             "Content-Length": str(len(body))}, body)

        def _content(self, f: HubFile, headers: dict, head: bool, entry: Logged):
            data = f.data
            if f.path in hub.faults.corrupt:
                data = bytearray(data)
                data[len(data) // 2] ^= 0xFF
                data = bytes(data)
            start, status = 0, 200
            if m := re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or ""):
                start, status = int(m[1]), 206
                end = int(m[2]) + 1 if m[2] else len(data)
                data = data[start:end]
                headers["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{len(f.data)}"
            headers["Content-Length"] = str(len(data))
            headers.setdefault("Accept-Ranges", "bytes")
            if head:
                return self._send(status, headers)
            self._send(status, headers)
            cut = hub.faults.cut_after.pop(f.path, None)
            rate = hub.faults.bytes_per_s.get(f.path)
            step = 16 * 1024
            for i in range(0, len(data), step):
                piece = data[i:i + step]
                if cut is not None and entry.sent + len(piece) > cut:
                    piece = piece[: cut - entry.sent]
                    self.wfile.write(piece)
                    entry.sent += len(piece)
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # mid-body: the client sees a broken download
                    return
                try:
                    self.wfile.write(piece)
                except (BrokenPipeError, ConnectionResetError):
                    return
                entry.sent += len(piece)
                if rate:
                    time.sleep(len(piece) / rate)

        def _error(self, status: int, code: str):
            body = json.dumps({"error": code}).encode()
            self._send(status, {"X-Error-Code": code, "Content-Type": "application/json",
                                "Content-Length": str(len(body))}, body)

        def _send(self, status: int, headers: dict, body: bytes = b""):
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)

    return Handler


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_safetensors(path, nbytes: int) -> None:
    """A valid safetensors file of one uint8 tensor of random bytes."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}})
    header += " " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header.encode())
        f.write(os.urandom(nbytes))
