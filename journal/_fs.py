"""The file-system surface the journal uses, and its implementation on the real OS.

Every byte the journal reads or writes goes through ``FS`` and ``File``, so the same journal
code runs on ``OsFS`` in production and on ``journal.testing.CrashableMemFS`` / ``FaultFS`` in
tests. The surface is small on purpose: the journal only appends, truncates a torn tail,
reads by offset, and creates, lists, removes and fsyncs files and directories.

All platform-specific code lives in this module.
"""

from __future__ import annotations

import errno
import os
import posixpath
import sys
from collections.abc import Iterable
from typing import Protocol


class File(Protocol):
    """An open file. Writes always go to the end of the file."""

    def append(self, data: bytes) -> None:
        """Write all of ``data`` at the end of the file (partial writes are retried)."""

    def pread(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset``; fewer only at the end of the file."""

    def size(self) -> int: ...

    def truncate(self, size: int) -> None: ...

    def sync(self) -> None:
        """Make the file's data and size durable (fdatasync where it exists)."""

    def close(self) -> None: ...


class FS(Protocol):
    def create(self, path: str) -> File:
        """Create a new, empty file; FileExistsError if it exists. Not durable until the
        directory holding it is synced."""

    def open(self, path: str) -> File:
        """Open an existing file for reading and appending."""

    def read_file(self, path: str) -> bytes: ...

    def listdir(self, path: str) -> list[str]: ...

    def exists(self, path: str) -> bool: ...

    def mkdir(self, path: str) -> None:
        """Create one directory (its parent must exist); do nothing if it exists. Not
        durable until the parent directory is synced."""

    def remove(self, path: str) -> None: ...

    def rename(self, src: str, dst: str) -> None: ...

    def sync_dir(self, path: str) -> None:
        """Make the directory's entries (creations, removals, renames) durable."""


def _sync_fd(fd: int) -> None:
    if sys.platform == "darwin":  # pragma: no cover - fsync on macOS does not reach the platter
        import fcntl

        fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
    elif hasattr(os, "fdatasync"):
        # fdatasync also flushes the metadata needed to read the data back (the size).
        os.fdatasync(fd)
    else:  # pragma: no cover
        os.fsync(fd)


class OsFile:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            if written == 0:  # pragma: no cover - write(2) returns an error instead
                raise OSError(errno.EIO, "write wrote nothing")
            view = view[written:]

    def pread(self, offset: int, size: int) -> bytes:
        chunks = []
        while size > 0:
            chunk = os.pread(self._fd, size, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)

    def sync(self) -> None:
        _sync_fd(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class OsFS:
    """The real file system. Files are opened O_APPEND, so every write lands at the end."""

    def create(self, path: str) -> OsFile:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        return OsFile(os.open(path, flags, 0o600))

    def open(self, path: str) -> OsFile:
        flags = os.O_RDWR | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        return OsFile(os.open(path, flags))

    def read_file(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def mkdir(self, path: str) -> None:
        try:
            os.mkdir(path, mode=0o700)
        except FileExistsError:
            if not os.path.isdir(path):
                raise

    def remove(self, path: str) -> None:
        os.remove(path)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def sync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_file(fs: FS, path: str, parts: Iterable[bytes], *, durable: bool) -> None:
    """Write ``parts`` to ``path`` under a temporary name, then rename it over ``path``: a
    reader finds the old file or the new one whole, never a mix. ``durable``: the file and
    its directory are fsynced too, so the new one survives a power cut (without, a cut may
    leave it empty or torn, which its reader must detect). Raises OSError."""
    tmp = path + ".tmp"
    if fs.exists(tmp):
        fs.remove(tmp)  # left by a write that did not finish
    f = fs.create(tmp)
    try:
        for part in parts:
            f.append(part)
        if durable:
            f.sync()
    finally:
        f.close()
    fs.rename(tmp, path)
    if durable:
        fs.sync_dir(posixpath.dirname(path) or ".")
