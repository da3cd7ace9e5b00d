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

Below a repository's folder no symlink is followed except the layout's own
(snapshot -> blobs), and nothing is written through one (models/safe_fs.py):
a link planted in a snapshot can neither serve a file from outside the
store nor make a transfer write outside it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

from clusterd.messages import quoted
from clusterd.models.safe_fs import (Entry, UnsafeEntry, blob_of_link, open_dir, open_entry,
                                     opened_dir, replace_in, walk_files, write_text_in)

log = logging.getLogger("clusterd.store")

COMMIT = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# org/name, or a bare legacy name; no "..", no leading dot or slash.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
# Snapshot name when files came only from peers and no commit is known: it
# keeps the cache usable by huggingface_hub (refs/main points at it).
LOCAL_REVISION = "clusterd-local"
# The hub's own limits (96 characters per name part); paths as filesystems allow.
MAX_REPO_ID_CHARS = 96 * 2 + 1
MAX_REVISION_CHARS = 128
MAX_PATH_CHARS = 1024
MAX_PART_BYTES = 255


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
        if len(repo) > MAX_REPO_ID_CHARS or not is_repo_id(repo):
            raise StoreError(f"{quoted(text)} is not a repository id (expected org/name)")
        if rev and (len(rev) > MAX_REVISION_CHARS or not re.match(r"^[\w.-]+$", rev)):
            raise StoreError(f"{quoted(text)}: bad revision {quoted(rev)}")
        return cls(repo, rev or None)

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def safe_relpath(path: str) -> str:
    """A file path inside a model folder, or StoreError. Refuses absolute
    paths, '..', backslashes and empty parts before touching the disk."""
    if not path or "\x00" in path or "\\" in path or path.startswith("/"):
        raise StoreError(f"path {quoted(path)} is not a relative path inside the model folder")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"path {quoted(path)} is outside the model folder")
    if len(path) > MAX_PATH_CHARS or any(len(p.encode()) > MAX_PART_BYTES for p in parts):
        raise StoreError(f"path {quoted(path)} is too long for a file of a model")
    return path


class ModelStore:
    def __init__(self, root: Optional[Path] = None):
        self.root = Path(root) if root is not None else default_root()

    def __repr__(self) -> str:
        return f"ModelStore({self.root})"

    # -- reading ----------------------------------------------------------------
    def repo_dir(self, repo_id: str) -> Path:
        if len(repo_id) > MAX_REPO_ID_CHARS or not is_repo_id(repo_id):
            raise StoreError(f"{quoted(repo_id)} is not a repository id")
        return self.root / ("models--" + repo_id.replace("/", "--"))

    @contextmanager
    def _repo(self, repo_id: str, create: bool = False) -> Iterator[Optional[int]]:
        """The repository folder, open (None when absent). The store's root
        and the repository folder may be symlinks (the owner's choice, e.g.
        a cache on another disk); nothing below is followed."""
        path = self.repo_dir(repo_id)
        if create:
            path.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            yield None
            return
        try:
            yield fd
        finally:
            os.close(fd)

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

    @contextmanager
    def opened(self, ref: ModelRef, path: str) -> Iterator[Optional[Entry]]:
        """The file behind `path` of the model, open for reading (its fd is
        closed on exit), or None when this store lacks it. StoreError when
        it is a symlink out of the repository's blobs (planted to serve
        other files) or not a regular file."""
        parts = safe_relpath(path).split("/")
        commit = self.commit(ref)
        if commit is None:
            yield None
            return
        with self._repo(ref.repo_id) as repo_fd:
            if repo_fd is None:
                yield None
                return
            try:
                entry = open_entry(repo_fd, ["snapshots", commit], parts)
            except UnsafeEntry:
                raise StoreError(f"{quoted(path)} of {ref} is outside the model store") from None
            try:
                yield entry
            finally:
                if entry is not None:
                    os.close(entry.fd)

    def file(self, ref: ModelRef, path: str) -> Optional[Path]:
        """Where `path` of the model is (checked as `opened` checks it), or
        None. For reading by path where a flipped link does no harm (a
        header check); serving uses `opened`."""
        with self.opened(ref, path) as entry:
            if entry is None:
                return None
        return self.snapshot(ref) / path

    def files(self, ref: ModelRef) -> Iterator[str]:
        """Every file path of the model's snapshot (relative, '/'-separated).
        An entry the store refuses (a link out of it) is skipped with a
        warning: one bad entry does not hide the others."""
        commit = self.commit(ref)
        if commit is None:
            return
        with self._repo(ref.repo_id) as repo_fd:
            if repo_fd is None:
                return
            try:
                snap_fd = open_dir(repo_fd, ["snapshots", commit])
            except (UnsafeEntry, FileNotFoundError, NotADirectoryError):
                log.warning("snapshot %s of %s is not a folder: skipped", commit[:12], ref)
                return
            try:
                names = sorted(walk_files(snap_fd))
            finally:
                os.close(snap_fd)
            for name in names:
                try:
                    entry = open_entry(repo_fd, ["snapshots", commit], name.split("/"))
                except UnsafeEntry as e:
                    log.warning("%s of %s skipped: %s", quoted(name), ref, e.strerror)
                    continue
                except OSError as e:
                    log.warning("%s of %s skipped: %s", quoted(name), ref, e.strerror)
                    continue
                if entry is not None:
                    os.close(entry.fd)
                    yield name

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
        branch = ref.revision if ref.revision and not COMMIT.match(ref.revision) else "main"
        with self._repo(ref.repo_id, create=True) as repo_fd, self._unsafe_is_error(ref):
            os.close(open_dir(repo_fd, ["snapshots", name], create=True))
            with opened_dir(repo_fd, ["refs"], create=True) as refs_fd:
                try:
                    os.stat(branch, dir_fd=refs_fd, follow_symlinks=False)
                except FileNotFoundError:
                    write_text_in(refs_fd, branch, name)
        return name

    @contextmanager
    def _unsafe_is_error(self, ref: ModelRef) -> Iterator[None]:
        try:
            yield
        except UnsafeEntry as e:
            raise StoreError(f"{quoted(e.filename)} in the store's folder of {ref} is a symlink "
                             "or not a folder: nothing is written through it") from None

    @contextmanager
    def writing(self, repo_id: str, blob: str,
                cancel: Optional[threading.Event] = None) -> Iterator[Optional[BinaryIO]]:
        """blobs/<blob>.incomplete opened for appending, locked against other
        processes sharing this store (a coordinator and a node on one Mac,
        several daemons on one machine). Yields None when the blob is already
        complete, e.g. another process finished it while this one waited.
        InterruptedError when `cancel` is set while waiting. Never opens
        through a symlink."""
        final = self.blob_path(repo_id, blob).name
        partial = self.partial_path(repo_id, blob).name
        ref = ModelRef(repo_id)
        with self._repo(repo_id, create=True) as repo_fd, self._unsafe_is_error(ref), \
                opened_dir(repo_fd, ["blobs"], create=True) as blobs_fd:
            while True:
                if _is_file_in(blobs_fd, final):
                    yield None
                    return
                fd = os.open(partial, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o644, dir_fd=blobs_fd)
                with os.fdopen(fd, "ab") as f:
                    while True:
                        try:
                            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                            break
                        except BlockingIOError:
                            if cancel is not None and cancel.is_set():
                                raise InterruptedError("cancelled while another process "
                                                       f"was fetching {blob}") from None
                            time.sleep(0.2)
                    # The holder we waited for may have renamed our file into
                    # place: write only while the name still is the file we locked.
                    try:
                        same = os.stat(partial, dir_fd=blobs_fd, follow_symlinks=False
                                       ).st_ino == os.fstat(f.fileno()).st_ino
                    except FileNotFoundError:
                        same = False
                    if same and not _is_file_in(blobs_fd, final):
                        yield f
                        return

    def install(self, ref: ModelRef, commit: str, path: str, blob: str, data: Path) -> Path:
        """Move a verified file `data` (best in the repository's blobs
        folder, as transfers leave it) into blobs/<blob> and link
        snapshots/<commit>/<path> to it. Atomic: readers see the old state or
        the whole new file, never a part."""
        safe_relpath(path)
        blob_name = self.blob_path(ref.repo_id, blob).name
        with self._repo(ref.repo_id, create=True) as repo_fd, self._unsafe_is_error(ref), \
                opened_dir(repo_fd, ["blobs"], create=True) as blobs_fd:
            data = Path(data)
            name = data.name
            if data.parent != self.blob_path(ref.repo_id, blob).parent:
                # From elsewhere (a path of this process's own): into blobs first.
                name = f".{blob_name[:16]}.{os.getpid()}.install"
                os.replace(data, name, dst_dir_fd=blobs_fd)
            size = os.stat(name, dir_fd=blobs_fd, follow_symlinks=False).st_size
            try:
                have = os.stat(blob_name, dir_fd=blobs_fd, follow_symlinks=False)
                same = stat.S_ISREG(have.st_mode) and have.st_size == size
            except FileNotFoundError:
                same = False
            if same:  # same content already stored (blob names are hashes)
                os.unlink(name, dir_fd=blobs_fd)
            else:
                replace_in(blobs_fd, name, blob_name)
        return self.link(ref, commit, path, blob)

    def link(self, ref: ModelRef, commit: str, path: str, blob: str) -> Path:
        """snapshots/<commit>/<path> -> blobs/<blob>, replacing any old link.
        Every folder on the way is a real one (made if missing): a folder
        symlink planted in the snapshot is an error, never followed."""
        parts = safe_relpath(path).split("/")
        blob_name = self.blob_path(ref.repo_id, blob).name
        if not COMMIT.match(commit) and not re.match(r"^[\w.-]+$", commit):
            raise StoreError(f"bad snapshot name {quoted(commit)}")
        dirs = ["snapshots", commit, *parts[:-1]]
        target = "../" * len(dirs) + "blobs/" + blob_name
        tmp = f".{parts[-1][:200]}.{os.getpid()}.link"
        with self._repo(ref.repo_id, create=True) as repo_fd, self._unsafe_is_error(ref), \
                opened_dir(repo_fd, dirs, create=True) as dir_fd, \
                opened_dir(repo_fd, ["blobs"], create=True) as blobs_fd:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            try:
                os.symlink(target, tmp, dir_fd=dir_fd)
            except OSError:  # filesystems without symlinks: a hard link, else a copy
                try:
                    os.link(blob_name, tmp, src_dir_fd=blobs_fd, dst_dir_fd=dir_fd,
                            follow_symlinks=False)
                except OSError:
                    _copy_in(blobs_fd, blob_name, dir_fd, tmp)
            replace_in(dir_fd, tmp, parts[-1])
        return self.repo_dir(ref.repo_id) / "snapshots" / commit / path

    def remove(self, ref: ModelRef, path: str) -> None:
        """Drop a bad file (its link and the blob behind it) so it is fetched again."""
        parts = safe_relpath(path).split("/")
        commit = self.commit(ref)
        if commit is None:
            return
        dirs = ["snapshots", commit, *parts[:-1]]
        with self._repo(ref.repo_id) as repo_fd:
            if repo_fd is None:
                return
            try:
                dir_fd = open_dir(repo_fd, dirs)
            except (UnsafeEntry, FileNotFoundError, NotADirectoryError):
                return
            try:
                try:
                    blob = blob_of_link(os.readlink(parts[-1], dir_fd=dir_fd), dirs)
                except OSError:
                    blob = None  # absent, or a plain file
                if blob is not None:
                    with opened_dir(repo_fd, ["blobs"]) as blobs_fd:
                        _unlink_in(blobs_fd, blob)
                _unlink_in(dir_fd, parts[-1])
            finally:
                os.close(dir_fd)

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


def _is_file_in(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _unlink_in(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _copy_in(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=dst_dir)
    with os.fdopen(fd_in, "rb") as fin, os.fdopen(fd_out, "wb") as fout:
        shutil.copyfileobj(fin, fout)


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name[:16]}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)
