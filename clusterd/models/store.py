"""A node's model store: the Hugging Face cache layout, so what mlx-lm or
`huggingface-cli download` already fetched is found, and what clusterd fetches
is found by them.

    <root>/models--<org>--<name>/
        refs/main                   commit of the snapshot clusterd uses
        snapshots/<commit>/<path>   symlink to ../../blobs/<blob>
        blobs/<blob>                content; <blob> is the sha256 for weights
        blobs/<blob>.incomplete     a transfer in progress (resumable)

<root> is $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub,
the same rules huggingface_hub follows.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

COMMIT = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# org/name, or a bare legacy name; no "..", no leading dot or slash.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
# Snapshot name when files came only from peers and no commit is known: it
# keeps the cache usable by huggingface_hub (refs/main points at it).
LOCAL_REVISION = "clusterd-local"


class StoreError(ValueError):
    """A model reference or path that the store refuses; the message says why."""


def default_root() -> Path:
    """Where huggingface_hub keeps its cache, read from the environment now
    (not at import), so a daemon started with HF_HUB_CACHE uses it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(hf_home).expanduser() / "hub"


def is_repo_id(text: str) -> bool:
    name = text.split("@", 1)[0]
    return bool(_REPO_ID.match(name)) and ".." not in name


@dataclass(frozen=True)
class ModelRef:
    """A repository id, optionally pinned: "org/name" or "org/name@<commit or branch>"."""

    repo_id: str
    revision: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        repo, _, rev = text.strip().partition("@")
        if not is_repo_id(repo):
            raise StoreError(f"{text!r} is not a repository id (expected org/name)")
        if rev and not re.match(r"^[\w.-]+$", rev):
            raise StoreError(f"{text!r}: bad revision {rev!r}")
        return cls(repo, rev or None)

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def safe_relpath(path: str) -> str:
    """A file path inside a model folder, or StoreError. Refuses absolute
    paths, '..', backslashes and empty parts before touching the disk."""
    if not path or "\x00" in path or "\\" in path or path.startswith("/"):
        raise StoreError(f"path {path!r} is not a relative path inside the model folder")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"path {path!r} is outside the model folder")
    return path


class ModelStore:
    def __init__(self, root: Optional[Path] = None):
        self.root = Path(root) if root is not None else default_root()

    def __repr__(self) -> str:
        return f"ModelStore({self.root})"

    # -- reading ----------------------------------------------------------------
    def repo_dir(self, repo_id: str) -> Path:
        if not is_repo_id(repo_id):
            raise StoreError(f"{repo_id!r} is not a repository id")
        return self.root / ("models--" + repo_id.replace("/", "--"))

    def commit(self, ref: ModelRef) -> Optional[str]:
        """The snapshot clusterd uses for ref: the pinned commit, else the one
        refs/<revision or main> names, else the newest snapshot."""
        repo = self.repo_dir(ref.repo_id)
        if ref.revision and COMMIT.match(ref.revision):
            return ref.revision if (repo / "snapshots" / ref.revision).is_dir() else None
        ref_file = repo / "refs" / (ref.revision or "main")
        if ref_file.is_file():
            name = ref_file.read_text().strip()
            if name and "/" not in name and (repo / "snapshots" / name).is_dir():
                return name
        if ref.revision:
            return None
        snaps = [p for p in (repo / "snapshots").glob("*") if p.is_dir()]
        return max(snaps, key=lambda p: p.stat().st_mtime).name if snaps else None

    def snapshot(self, ref: ModelRef) -> Optional[Path]:
        commit = self.commit(ref)
        return self.repo_dir(ref.repo_id) / "snapshots" / commit if commit else None

    def file(self, ref: ModelRef, path: str) -> Optional[Path]:
        """The file behind `path` of the model, or None when this store lacks
        it. StoreError when it resolves outside the repository's folder (a
        symlink planted to serve other files)."""
        safe_relpath(path)
        snap = self.snapshot(ref)
        if snap is None:
            return None
        candidate = snap / path
        if not candidate.is_file():
            return None
        real = candidate.resolve()
        if not real.is_relative_to(self.repo_dir(ref.repo_id).resolve()):
            raise StoreError(f"{path} of {ref} is outside the model store")
        return candidate

    def files(self, ref: ModelRef) -> Iterator[str]:
        """Every file path of the model's snapshot (relative, '/'-separated)."""
        snap = self.snapshot(ref)
        if snap is None:
            return
        for p in sorted(snap.rglob("*")):
            if p.is_file():
                yield p.relative_to(snap).as_posix()

    def repos(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name[len("models--"):].replace("--", "/")
                      for p in self.root.glob("models--*") if p.is_dir())

    # -- writing ----------------------------------------------------------------
    def blob_path(self, repo_id: str, blob: str) -> Path:
        if not re.match(r"^[0-9a-f]{40,64}$", blob):
            raise StoreError(f"blob name {blob!r} is not a hash")
        return self.repo_dir(repo_id) / "blobs" / blob

    def partial_path(self, repo_id: str, blob: str) -> Path:
        # The name huggingface_hub < 1.0 used for its resumable downloads.
        return self.blob_path(repo_id, blob).with_name(blob + ".incomplete")

    def writable_snapshot(self, ref: ModelRef, commit: Optional[str] = None) -> str:
        """The snapshot new files go into: the one already in use (so a model
        never ends up split over two snapshots), else `commit`, else a local
        name. refs/main is written when absent."""
        current = self.commit(ref)
        name = current or commit or (ref.revision if ref.revision and COMMIT.match(ref.revision)
                                     else LOCAL_REVISION)
        repo = self.repo_dir(ref.repo_id)
        (repo / "snapshots" / name).mkdir(parents=True, exist_ok=True)
        ref_file = repo / "refs" / (ref.revision if ref.revision and not COMMIT.match(
            ref.revision) else "main")
        if not ref_file.exists():
            ref_file.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(ref_file, name)
        return name

    @contextmanager
    def writing(self, repo_id: str, blob: str,
                cancel: Optional[threading.Event] = None) -> Iterator[Optional[BinaryIO]]:
        """blobs/<blob>.incomplete opened for appending, locked against other
        processes sharing this store (a coordinator and a node on one Mac,
        several daemons on one machine). Yields None when the blob is already
        complete, e.g. another process finished it while this one waited.
        InterruptedError when `cancel` is set while waiting."""
        partial, final = self.partial_path(repo_id, blob), self.blob_path(repo_id, blob)
        partial.parent.mkdir(parents=True, exist_ok=True)
        while True:
            if final.is_file():
                yield None
                return
            with open(partial, "ab") as f:
                while True:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if cancel is not None and cancel.is_set():
                            raise InterruptedError("cancelled while another process "
                                                   f"was fetching {blob}") from None
                        time.sleep(0.2)
                # The holder we waited for may have renamed our file into place:
                # write only while the name still refers to the file we locked.
                try:
                    same = os.stat(partial).st_ino == os.fstat(f.fileno()).st_ino
                except FileNotFoundError:
                    same = False
                if same and not final.is_file():
                    yield f
                    return

    def install(self, ref: ModelRef, commit: str, path: str, blob: str, data: Path) -> Path:
        """Move a verified file `data` into blobs/<blob> and link
        snapshots/<commit>/<path> to it. Atomic: readers see the old state or
        the whole new file, never a part."""
        safe_relpath(path)
        blob_file = self.blob_path(ref.repo_id, blob)
        blob_file.parent.mkdir(parents=True, exist_ok=True)
        if blob_file.is_file() and blob_file.stat().st_size == data.stat().st_size:
            data.unlink()  # same content already stored (blob names are hashes)
        else:
            os.replace(data, blob_file)
        return self.link(ref, commit, path, blob)

    def link(self, ref: ModelRef, commit: str, path: str, blob: str) -> Path:
        """snapshots/<commit>/<path> -> blobs/<blob>, replacing any old link."""
        safe_relpath(path)
        blob_file = self.blob_path(ref.repo_id, blob)
        link = self.repo_dir(ref.repo_id) / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(blob_file, link.parent)
        tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
        tmp.unlink(missing_ok=True)
        try:
            os.symlink(target, tmp)
        except OSError:  # filesystems without symlinks: a hard link, else a copy
            try:
                os.link(blob_file, tmp)
            except OSError:
                shutil.copyfile(blob_file, tmp)
        os.replace(tmp, link)
        return link

    def remove(self, ref: ModelRef, path: str) -> None:
        """Drop a bad file (its link and the blob behind it) so it is fetched again."""
        safe_relpath(path)
        snap = self.snapshot(ref)
        if snap is None:
            return
        link = snap / path
        repo = self.repo_dir(ref.repo_id).resolve()
        if link.is_symlink():
            real = link.resolve()
            if real.is_relative_to(repo) and real.parent.name == "blobs":
                real.unlink(missing_ok=True)
        link.unlink(missing_ok=True)

    def import_folder(self, repo_id: str, folder: Path, commit: Optional[str] = None) -> Path:
        """Copy a model folder into the store (blobs named by sha256), e.g.
        files carried over by hand. Returns the snapshot folder."""
        from clusterd.models.files import sha256_file

        ref = ModelRef(repo_id)
        name = self.writable_snapshot(ref, commit)
        folder = Path(folder)
        for src in sorted(folder.rglob("*")):
            if not src.is_file():
                continue
            digest = sha256_file(src)
            tmp = _temp_beside(self.blob_path(repo_id, digest))
            shutil.copyfile(src, tmp)
            self.install(ref, name, src.relative_to(folder).as_posix(), digest, tmp)
        return self.repo_dir(repo_id) / "snapshots" / name


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name[:16]}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def _write_atomic(path: Path, text: str) -> None:
    tmp = _temp_beside(path)
    tmp.write_text(text)
    os.replace(tmp, path)
