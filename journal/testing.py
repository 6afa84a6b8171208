"""Public fakes for testing code that stands on the journal (like ``trio.testing``).

``CrashableMemFS``
    An in-memory file system that knows what is durable. A file's bytes become durable only
    when the file is synced; a directory entry (a creation, removal or rename) only when its
    directory is synced. ``crash_clone()`` returns the file system a machine would find after
    power loss: synced bytes and synced entries only, optionally with a random share of the
    unsynced 512-byte sectors kept, and the others zero or (``garbage=True``) random bytes.

``FaultFS``
    Wraps another FS and fails the Nth operation (optionally only counting one kind) with
    ``OSError(EIO)`` or ``OSError(ENOSPC)``. A failed ``append`` first writes half of its data,
    as a real short write followed by an error would. Every operation is recorded in ``log``.

Both are thread-safe: the journal's writer thread and readers use them concurrently.
"""

from __future__ import annotations

import errno
import posixpath
import random
import threading
from typing import Final

import attrs

from journal._fs import FS, File

SECTOR: Final = 512


@attrs.define(eq=False)
class _Inode:
    data: bytearray = attrs.field(factory=bytearray)
    synced: bytes = b""


@attrs.define(eq=False)
class _DirNode:
    entries: dict[str, _Inode | _DirNode] = attrs.field(factory=dict)
    synced: dict[str, _Inode | _DirNode] = attrs.field(factory=dict)


def _split(path: str) -> list[str]:
    norm = posixpath.normpath("/" + path)
    return [p for p in norm.split("/") if p]


class _MemFile:
    def __init__(self, fs: CrashableMemFS, inode: _Inode) -> None:
        self._fs = fs
        self._inode = inode
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise ValueError("I/O operation on closed file")

    def append(self, data: bytes) -> None:
        with self._fs._lock:
            self._check()
            self._inode.data += data

    def pread(self, offset: int, size: int) -> bytes:
        with self._fs._lock:
            self._check()
            return bytes(self._inode.data[offset : offset + size])

    def size(self) -> int:
        with self._fs._lock:
            self._check()
            return len(self._inode.data)

    def truncate(self, size: int) -> None:
        with self._fs._lock:
            self._check()
            del self._inode.data[size:]
            if len(self._inode.data) < size:
                self._inode.data += bytes(size - len(self._inode.data))

    def sync(self) -> None:
        with self._fs._lock:
            self._check()
            self._inode.synced = bytes(self._inode.data)
            self._fs.sync_count += 1

    def close(self) -> None:
        self._closed = True


class CrashableMemFS:
    """An in-memory FS that forgets what was never synced when it crashes."""

    def __init__(self) -> None:
        self._root = _DirNode()
        self._lock = threading.RLock()
        self.sync_count = 0  # file syncs so far: a clock for "crash after sync k"

    # -- lookups -----------------------------------------------------------------------
    def _dir(self, parts: list[str]) -> _DirNode:
        node: _Inode | _DirNode = self._root
        for part in parts:
            if not isinstance(node, _DirNode) or part not in node.entries:
                raise FileNotFoundError(errno.ENOENT, "no such directory", "/".join(parts))
            node = node.entries[part]
        if not isinstance(node, _DirNode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", "/".join(parts))
        return node

    def _parent(self, path: str) -> tuple[_DirNode, str]:
        parts = _split(path)
        if not parts:
            raise IsADirectoryError(errno.EISDIR, "is the root", path)
        return self._dir(parts[:-1]), parts[-1]

    def _inode(self, path: str) -> _Inode:
        parent, name = self._parent(path)
        node = parent.entries.get(name)
        if node is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        if not isinstance(node, _Inode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        return node

    # -- the FS protocol -------------------------------------------------------------
    def create(self, path: str) -> File:
        with self._lock:
            parent, name = self._parent(path)
            if name in parent.entries:
                raise FileExistsError(errno.EEXIST, "file exists", path)
            inode = _Inode()
            parent.entries[name] = inode
            return _MemFile(self, inode)

    def open(self, path: str) -> File:
        with self._lock:
            return _MemFile(self, self._inode(path))

    def read_file(self, path: str) -> bytes:
        with self._lock:
            return bytes(self._inode(path).data)

    def listdir(self, path: str) -> list[str]:
        with self._lock:
            return sorted(self._dir(_split(path)).entries)

    def exists(self, path: str) -> bool:
        with self._lock:
            try:
                parent, name = self._parent(path)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return not _split(path)
            return name in parent.entries

    def mkdir(self, path: str) -> None:
        with self._lock:
            parent, name = self._parent(path)
            child = parent.entries.setdefault(name, _DirNode())
            if not isinstance(child, _DirNode):
                raise FileExistsError(errno.EEXIST, "a file is in the way", path)

    def remove(self, path: str) -> None:
        with self._lock:
            parent, name = self._parent(path)
            if not isinstance(parent.entries.get(name), _Inode):
                raise FileNotFoundError(errno.ENOENT, "no such file", path)
            del parent.entries[name]

    def rename(self, src: str, dst: str) -> None:
        with self._lock:
            sparent, sname = self._parent(src)
            dparent, dname = self._parent(dst)
            if sname not in sparent.entries:
                raise FileNotFoundError(errno.ENOENT, "no such file", src)
            dparent.entries[dname] = sparent.entries.pop(sname)

    def sync_dir(self, path: str) -> None:
        with self._lock:
            node = self._dir(_split(path))
            node.synced = dict(node.entries)

    # -- crashing ---------------------------------------------------------------------
    def crash_clone(
        self, *, keep_unsynced: float = 0.0, garbage: bool = False, seed: int = 0
    ) -> CrashableMemFS:
        """The file system as found after a power cut at this instant.

        Synced directory entries and synced file bytes survive. Of each unsynced sector, a
        share ``keep_unsynced`` (0..1) keeps its newest bytes; the others hold their synced
        bytes, or zeros past the synced end, or with ``garbage`` random bytes. A file's size
        after the crash reaches at least its synced size and at most past the last sector kept
        (or written with garbage). ``seed`` makes the choice reproducible.
        """
        rng = random.Random(seed)
        with self._lock:
            clone = CrashableMemFS()
            memo: dict[int, _Inode] = {}
            clone._root = self._crash_dir(self._root, rng, keep_unsynced, garbage, memo)
            return clone

    def _crash_dir(
        self,
        node: _DirNode,
        rng: random.Random,
        keep: float,
        garbage: bool,
        memo: dict[int, _Inode],
    ) -> _DirNode:
        out = _DirNode()
        for name, child in sorted(node.synced.items()):
            if isinstance(child, _DirNode):
                new: _Inode | _DirNode = self._crash_dir(child, rng, keep, garbage, memo)
            else:
                if id(child) not in memo:
                    data = _crash_bytes(child.synced, bytes(child.data), rng, keep, garbage)
                    memo[id(child)] = _Inode(data=bytearray(data), synced=data)
                new = memo[id(child)]
            out.entries[name] = new
        out.synced = dict(out.entries)
        return out


def _crash_bytes(
    synced: bytes, current: bytes, rng: random.Random, keep: float, garbage: bool
) -> bytes:
    if synced == current or (keep <= 0.0 and not garbage):
        return synced
    if len(current) < len(synced):
        # An unsynced truncation: it either reached the disk or it did not.
        return current if rng.random() < keep else synced
    out = bytearray(synced)
    end = len(synced)
    first = (len(synced) // SECTOR) * SECTOR
    for start in range(first, len(current), SECTOR):
        stop = min(start + SECTOR, len(current))
        lo = max(start, len(synced))  # bytes before the synced end are never touched
        roll = rng.random()
        if roll < keep:
            chunk = current[lo:stop]
        elif garbage and roll < keep + (1.0 - keep) / 2:
            chunk = rng.randbytes(stop - lo)
        else:
            continue
        if len(out) < lo:
            out += bytes(lo - len(out))
        out[lo:stop] = chunk
        end = max(end, stop)
    return bytes(out[:end])


@attrs.frozen
class FaultRecord:
    index: int
    op: str
    path: str
    failed: bool


OPS: Final = (
    "create",
    "open",
    "read_file",
    "listdir",
    "exists",
    "mkdir",
    "remove",
    "rename",
    "sync_dir",
    "append",
    "pread",
    "size",
    "truncate",
    "sync",
    "close",
)


class _FaultFile:
    def __init__(self, fs: FaultFS, inner: File, path: str) -> None:
        self._fs = fs
        self._inner = inner
        self._path = path

    def append(self, data: bytes) -> None:
        if self._fs._hit("append", self._path):
            self._inner.append(data[: len(data) // 2])
            raise self._fs._error()
        self._inner.append(data)

    def pread(self, offset: int, size: int) -> bytes:
        self._fs._maybe_fail("pread", self._path)
        return self._inner.pread(offset, size)

    def size(self) -> int:
        self._fs._maybe_fail("size", self._path)
        return self._inner.size()

    def truncate(self, size: int) -> None:
        self._fs._maybe_fail("truncate", self._path)
        self._inner.truncate(size)

    def sync(self) -> None:
        self._fs._maybe_fail("sync", self._path)
        self._inner.sync()

    def close(self) -> None:
        self._fs._maybe_fail("close", self._path)
        self._inner.close()


class FaultFS:
    """Fails operation number ``fail_at`` (0-based, counting only ``only`` if given).

    ``fail_at=None`` fails nothing, which is how a test first counts a workload's operations
    (``len(fs.log)``) before running it once per operation. ``sticky=True`` keeps failing every
    counted operation from ``fail_at`` on, like a disk that went away.
    """

    def __init__(
        self,
        inner: FS,
        *,
        fail_at: int | None = None,
        only: str | None = None,
        error: int = errno.EIO,
        sticky: bool = False,
    ) -> None:
        if only is not None and only not in OPS:
            raise ValueError(f"unknown operation {only!r}; expected one of {', '.join(OPS)}")
        self.inner = inner
        self.fail_at = fail_at
        self.only = only
        self.errno = error
        self.sticky = sticky
        self.log: list[FaultRecord] = []
        self._counted = 0
        self._lock = threading.Lock()

    def _hit(self, op: str, path: str) -> bool:
        with self._lock:
            counted = self.only is None or op == self.only
            failed = False
            if counted:
                n = self._counted
                self._counted += 1
                if self.fail_at is not None:
                    failed = n == self.fail_at or (self.sticky and n > self.fail_at)
            self.log.append(FaultRecord(len(self.log), op, path, failed))
            return failed

    def _error(self) -> OSError:
        return OSError(self.errno, f"injected {errno.errorcode[self.errno]}")

    def _maybe_fail(self, op: str, path: str) -> None:
        if self._hit(op, path):
            raise self._error()

    @property
    def injected(self) -> bool:
        return any(r.failed for r in self.log)

    def create(self, path: str) -> File:
        self._maybe_fail("create", path)
        return _FaultFile(self, self.inner.create(path), path)

    def open(self, path: str) -> File:
        self._maybe_fail("open", path)
        return _FaultFile(self, self.inner.open(path), path)

    def read_file(self, path: str) -> bytes:
        self._maybe_fail("read_file", path)
        return self.inner.read_file(path)

    def listdir(self, path: str) -> list[str]:
        self._maybe_fail("listdir", path)
        return self.inner.listdir(path)

    def exists(self, path: str) -> bool:
        self._maybe_fail("exists", path)
        return self.inner.exists(path)

    def mkdir(self, path: str) -> None:
        self._maybe_fail("mkdir", path)
        self.inner.mkdir(path)

    def remove(self, path: str) -> None:
        self._maybe_fail("remove", path)
        self.inner.remove(path)

    def rename(self, src: str, dst: str) -> None:
        self._maybe_fail("rename", src)
        self.inner.rename(src, dst)

    def sync_dir(self, path: str) -> None:
        self._maybe_fail("sync_dir", path)
        self.inner.sync_dir(path)
