"""Small files the relay must not lose or expose: keys and secrets it generates once, and
the data directory's lock."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically and durably: a temporary file,
    fsynced, renamed over ``path``, then the directory fsynced. A crash leaves the old
    file or the new one, never half of a key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class DataDirLocked(Exception):
    """Another relay runs on this data directory (two writers would corrupt the journal)."""


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold ``<data_dir>/relay.lock`` (flock, released by the kernel even on kill -9)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "relay.lock"
    f = path.open("a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise DataDirLocked(
            f"another relay is running on {data_dir} (it holds {path}); stop it first"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f
