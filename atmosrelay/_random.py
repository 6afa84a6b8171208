"""Randomness for ids (queue ids, Message-IDs, DSN boundaries), drawn in bulk."""

from __future__ import annotations

import secrets
import threading


class _RandomPool:
    """os.urandom in 64 KiB draws: one getrandom() call per 6,500 queue ids rather than one
    each (a syscall costs ~13 us on the development VM, a measurable share of a message)."""

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        self._lock = threading.Lock()  # a DSN may be built in a worker thread

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._pos + n > len(self._buf):
                self._buf, self._pos = secrets.token_bytes(65536), 0
            out = self._buf[self._pos : self._pos + n]
            self._pos += n
            return out


RANDOM = _RandomPool()
