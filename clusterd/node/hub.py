"""Weight files from the Hugging Face hub, one file at a time, only the files
asked for, resumable across interruptions and restarts.

Uses huggingface_hub's own calls (model_info, get_hf_file_metadata, http_get)
against $HF_ENDPOINT, and writes into the node's store like hf_hub_download.
Why not snapshot_download(allow_patterns=...): huggingface_hub >= 1.0 deletes a
partial download when the call fails, so an interrupted 5 GB shard starts over;
here the partial stays at blobs/<etag>.incomplete and the next attempt asks
for the rest with a Range request.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from clusterd.models.files import FileCheckError, check_file, check_safetensors
from clusterd.models.store import ModelRef, ModelStore

HUB_TIMEOUT_S = 30.0


class HubError(RuntimeError):
    """The hub refused or failed; the message says what and where."""


class HubUnreachable(HubError):
    """No route to the hub (offline, firewall, HF_HUB_OFFLINE)."""


class Cancelled(RuntimeError):
    pass


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    sha256: Optional[str]  # LFS files (all weights): the content's sha256
    blob_id: Optional[str]  # git blob sha1 (small files)


@dataclass(frozen=True)
class HubListing:
    repo_id: str
    commit: str
    files: dict[str, HubFile]


def endpoint() -> str:
    # Read now, not at import: huggingface_hub.constants freezes it at import.
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


class Hub:
    def __init__(self, url: Optional[str] = None, token: Optional[str] = None):
        self.url = url or endpoint()
        self.token = token

    def __repr__(self) -> str:
        return f"Hub({self.url})"

    def _explain(self, e: Exception, what: str) -> HubError:
        from huggingface_hub.errors import (GatedRepoError, OfflineModeIsEnabled,
                                            RepositoryNotFoundError, RevisionNotFoundError)
        if isinstance(e, OfflineModeIsEnabled):
            return HubUnreachable("HF_HUB_OFFLINE is set: the hub is not used")
        if _is_network_error(e):
            return HubUnreachable(f"cannot reach the Hugging Face hub at {self.url} ({what}): {e}")
        if isinstance(e, GatedRepoError):
            return HubError(f"{what}: the repository is gated; accept its terms on the hub "
                            "and `huggingface-cli login`")
        if isinstance(e, RevisionNotFoundError):
            return HubError(f"{what}: revision not found on the hub")
        if isinstance(e, RepositoryNotFoundError):
            return HubError(f"{what}: repository not found on the hub ({self.url})")
        return HubError(f"{what}: {type(e).__name__}: {e}")

    def listing(self, repo_id: str, revision: Optional[str] = None) -> HubListing:
        """The repository's files at `revision` (default main) with sizes and
        hashes: one model-info request."""
        if offline():
            raise HubUnreachable("HF_HUB_OFFLINE is set: the hub is not used")
        from huggingface_hub import HfApi
        try:
            info = HfApi(endpoint=self.url, token=self.token).model_info(
                repo_id, revision=revision or "main", files_metadata=True, timeout=HUB_TIMEOUT_S)
        except Exception as e:
            raise self._explain(e, f"listing {repo_id}") from None
        files = {}
        for s in info.siblings or []:
            files[s.rfilename] = HubFile(s.rfilename, int(s.size or 0),
                                         s.lfs.sha256 if s.lfs else None, s.blob_id)
        if not info.sha:
            raise HubError(f"the hub gave no commit for {repo_id}@{revision or 'main'}")
        return HubListing(repo_id, info.sha, files)

    def download(self, store: ModelStore, ref: ModelRef, commit: str, revision: str,
                 f: HubFile, on_bytes: Callable[[int], None],
                 cancel: Optional[threading.Event] = None) -> Path:
        """Fetch one file of `revision` into snapshot `commit` of the store.
        on_bytes gets the bytes already present first (a resumed partial), then
        each increment. Verified (size, hash, safetensors header) before it is
        renamed into place."""
        if offline():
            raise HubUnreachable("HF_HUB_OFFLINE is set: the hub is not used")
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(ref.repo_id, f.path, revision=revision, endpoint=self.url)
        headers = build_hf_headers(token=self.token, library_name="clusterd")
        try:
            meta = get_hf_file_metadata(url, token=self.token, timeout=HUB_TIMEOUT_S,
                                        endpoint=self.url)
        except Exception as e:
            raise self._explain(e, f"{ref.repo_id}/{f.path}") from None
        size = meta.size if meta.size is not None else f.size
        blob = (meta.etag or "").strip('"').lower() or f.sha256 or f.blob_id
        if f.sha256 and blob != f.sha256:
            blob = f.sha256  # the hub names LFS blobs by their sha256; keep the store consistent
        partial = store.partial_path(ref.repo_id, blob)
        with store.writing(ref.repo_id, blob, cancel) as raw:
            if raw is None:  # stored meanwhile (another process sharing this store)
                on_bytes(size)
                return store.link(ref, commit, f.path, blob)
            have = raw.seek(0, os.SEEK_END)
            if have > size:
                raw.truncate(0)
                have = 0
            hasher = _hasher(f, size)
            if have:
                _hash_prefix(hasher, partial, have)
            on_bytes(have)
            sink = _Sink(raw, hasher, on_bytes, cancel)
            try:
                http_get(meta.location, sink, resume_size=have, headers=headers,
                         expected_size=size, **_quiet_progress())
            except Cancelled:
                raise
            except Exception as e:
                raise self._explain(e, f"downloading {ref.repo_id}/{f.path}") from None
            raw.flush()
            digest = _finish(hasher, sink, partial, f, size)
            expected = f.sha256 or f.blob_id
            if expected and digest != expected:
                partial.unlink(missing_ok=True)
                raise HubError(f"{f.path} from the hub does not match its published hash; "
                               "it will be fetched again")
            try:
                # By the file's name: the partial's own name ends in .incomplete.
                (check_safetensors if f.path.endswith(".safetensors") else check_file)(
                    partial, size)
            except FileCheckError as e:
                partial.unlink(missing_ok=True)
                raise HubError(f"{f.path} from the hub: {e}") from None
            return store.install(ref, commit, f.path, blob, partial)


def _is_network_error(e: Exception) -> bool:
    # huggingface_hub's HTTP client changed (requests, httpx, httpx2); match any.
    for module in ("httpx2", "httpx", "requests"):
        try:
            m = importlib.import_module(module)
        except ImportError:
            continue
        kinds = tuple(getattr(m, n) for n in ("ConnectError", "TimeoutException", "NetworkError",
                                               "ConnectionError", "Timeout") if hasattr(m, n))
        if kinds and isinstance(e, kinds):
            return True
    return isinstance(e, (ConnectionError, TimeoutError))


def _hasher(f: HubFile, size: int):
    if f.sha256:
        return hashlib.sha256()
    return hashlib.sha1(b"blob %d\x00" % size)  # git's blob id, what the hub gives small files


def _hash_prefix(hasher, path: Path, n: int) -> None:
    with open(path, "rb") as fh:
        while n > 0:
            chunk = fh.read(min(n, 8 * 2**20))
            if not chunk:
                break
            hasher.update(chunk)
            n -= len(chunk)


def _finish(hasher, sink: "_Sink", partial: Path, f: HubFile, size: int) -> str:
    if not sink.rewound:
        return hasher.hexdigest()
    fresh = _hasher(f, size)  # the server ignored Range and http_get rewound: hash again
    _hash_prefix(fresh, partial, partial.stat().st_size)
    return fresh.hexdigest()


class _Sink:
    """The file object http_get writes to: hashes and counts as bytes arrive,
    and stops the download when the prepare is cancelled."""

    def __init__(self, raw, hasher, on_bytes, cancel):
        self.raw, self.hasher, self.on_bytes, self.cancel = raw, hasher, on_bytes, cancel
        self.rewound = False

    def write(self, data: bytes) -> int:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("cancelled")
        n = self.raw.write(data)
        self.hasher.update(data)
        self.on_bytes(len(data))
        return n

    def tell(self) -> int:
        return self.raw.tell()

    def seek(self, *args) -> int:
        self.rewound = True
        return self.raw.seek(*args)

    def truncate(self, *args) -> int:
        self.rewound = True
        return self.raw.truncate(*args)

    def flush(self) -> None:
        self.raw.flush()


class _QuietBar:
    """A progress bar that shows nothing: progress goes to the coordinator."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass

    def close(self):
        pass


def _quiet_progress() -> dict:
    from huggingface_hub.file_download import http_get
    params = inspect.signature(http_get).parameters
    if "tqdm_class" in params:
        return {"tqdm_class": _QuietBar}
    return {"_tqdm_bar": _QuietBar()}  # huggingface_hub < 1.0
