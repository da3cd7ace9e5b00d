"""File access inside a model repository folder that no symlink can lead out
of: every step below the repository is opened relative to the directory
before it, with O_NOFOLLOW, so what is checked is what is opened (no window
between a check and an open in which a link can be flipped).

The one kind of symlink followed is the Hugging Face cache's own,
snapshots/<commit>/<path> -> ../../blobs/<blob>: its target is read (not
followed), must name an entry of the repository's blobs folder, and that
entry is opened from the blobs folder itself, again without following links.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeEntry(OSError):
    """A symlink, or something other than a file or folder, where the store
    allows none; the message names the entry (relative to the repository)."""


@dataclass(frozen=True)
class Entry:
    """A file of a snapshot, opened: `fd` is owned by the caller."""

    fd: int
    size: int
    mtime_ns: int
    blob: Optional[str]  # the blob it links to, or None for a plain file


def open_dir(base_fd: int, parts: Sequence[str], *, create: bool = False) -> int:
    """The folder base/parts[0]/parts[1]/..., every step a real folder (a
    symlink on the way is UnsafeEntry). With `create`, missing ones are made."""
    fd = os.dup(base_fd)
    try:
        for i, part in enumerate(parts):
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                step = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeEntry(e.errno, "not a folder (a symlink?)",
                                      "/".join(parts[: i + 1])) from None
                raise
            os.close(fd)
            fd = step
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def opened_dir(base_fd: int, parts: Sequence[str], *, create: bool = False) -> Iterator[int]:
    fd = open_dir(base_fd, parts, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


def blob_of_link(target: str, link_dir: Sequence[str]) -> Optional[str]:
    """The blob a snapshot link names ("../../blobs/<blob>" from
    snapshots/<commit>/), judged by the text alone; None for anything else."""
    resolved = posixpath.normpath(posixpath.join(*link_dir, target)) if link_dir else target
    if target.startswith("/") or "\x00" in target:
        return None
    head, _, blob = resolved.partition("/")
    if head != "blobs" or not blob or "/" in blob or blob in (".", ".."):
        return None
    return blob


def open_entry(repo_fd: int, snap_parts: Sequence[str], rel_parts: Sequence[str]
               ) -> Optional[Entry]:
    """Open snapshots/.../<rel path> for reading: a plain file, or a link
    into blobs. None when absent or a folder; UnsafeEntry when it is a
    symlink anywhere else or not a regular file."""
    rel = "/".join(rel_parts)
    try:
        dir_fd = open_dir(repo_fd, [*snap_parts, *rel_parts[:-1]])
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        name = rel_parts[-1]
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        blob = None
        if stat.S_ISLNK(st.st_mode):
            blob = blob_of_link(os.readlink(name, dir_fd=dir_fd),
                                [*snap_parts, *rel_parts[:-1]])
            if blob is None:
                raise UnsafeEntry(errno.EPERM, "a symlink out of the repository's blobs", rel)
            with opened_dir(repo_fd, ["blobs"]) as blobs_fd:
                fd = _open_file(blob, blobs_fd, rel)
        elif stat.S_ISREG(st.st_mode):
            fd = _open_file(name, dir_fd, rel)
        elif stat.S_ISDIR(st.st_mode):
            return None
        else:
            raise UnsafeEntry(errno.EPERM, "not a regular file", rel)
    finally:
        os.close(dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # what was opened, not what was looked at
        os.close(fd)
        raise UnsafeEntry(errno.EPERM, "not a regular file", rel)
    return Entry(fd, st.st_size, st.st_mtime_ns, blob)


def _open_file(name: str, dir_fd: int, rel: str) -> int:
    try:
        return os.open(name, READ_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise UnsafeEntry(errno.ENOENT, "a link to a blob that is not there", rel) from None
    except OSError as e:
        if e.errno == errno.ELOOP:  # swapped for a symlink since it was looked at
            raise UnsafeEntry(e.errno, "a symlink where a file was", rel) from None
        raise


def walk_files(snap_fd: int) -> Iterator[str]:
    """Relative paths of the entries below a snapshot that are not folders,
    never descending into a symlinked folder."""
    for dirpath, _dirs, files, _fd in os.fwalk(".", dir_fd=snap_fd, follow_symlinks=False):
        base = "" if dirpath == "." else dirpath[2:] + "/"
        for name in files:
            yield base + name


def replace_in(dir_fd: int, src: str, dst: str) -> None:
    os.replace(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def write_text_in(dir_fd: int, name: str, text: str) -> None:
    """Atomically (a temporary name, then one rename), never through a link."""
    tmp = f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644, dir_fd=dir_fd)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    replace_in(dir_fd, tmp, name)
