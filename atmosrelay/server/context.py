"""What an SMTP listener's sessions share (server/session.py): the services they call, the
limits they keep, and the in-flight byte budget."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from atmosrelay.accounts.api_keys import KeyChecker
from atmosrelay.accounts.store import AsyncStore
from atmosrelay.queue.store import QueueStore
from atmosrelay.smtp import Capabilities
from atmosrelay.submission import Pipeline

if TYPE_CHECKING:
    from atmosrelay.inbound.session import InboundSettings

log = logging.getLogger("atmosrelay.smtp")


class Budget:
    """Bytes held by messages still being received, across all sessions (452 4.3.1 when full)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n


@attrs.define(eq=False)
class SessionContext:
    """What every session shares."""

    hostname: str
    operator_domain: str
    capabilities: Capabilities
    tls_context: ssl.SSLContext
    keys: KeyChecker
    store: AsyncStore
    queue: QueueStore
    pipeline: Pipeline
    budget: Budget
    idle_timeout: float = 60.0
    data_timeout: float = 600.0
    min_data_rate: int = 4096  # bytes per second, extending the data phase's deadline
    max_session_time: float = 3600.0
    auto_tls_window: float = 0.2  # an auto listener's wait for a TLS ClientHello
    max_recipients: int = 100
    trusted_did: str = ""
    inbound: InboundSettings | None = None  # what the inbound listener's sessions share
    on_data_reply: Callable[[float], None] = lambda s: None  # end of data -> reply written, s
    shutdown: trio.Event = attrs.field(factory=trio.Event)
    waiting: set[trio.CancelScope] = attrs.field(factory=set)  # sessions waiting for a command

    journal_failure_reported: bool = False
    tls_failures: int = 0  # handshakes that failed or timed out (implicit and STARTTLS)

    def journal_failed(self) -> bool:
        """True once the journal is poisoned; the first caller to see it logs it, once."""
        if not self.queue.journal.poisoned:
            return False
        if not self.journal_failure_reported:
            self.journal_failure_reported = True
            log.critical(
                "the journal failed an fsync or a write: no mail is accepted (421 4.3.0) "
                "until the relay is restarted, which re-reads the disk; check the disk and "
                "the kernel log"
            )
        return True

    def request_shutdown(self) -> None:
        """Sessions waiting for a command answer 421 4.3.2 now; those in DATA finish first."""
        self.shutdown.set()
        for scope in list(self.waiting):
            scope.cancel()
