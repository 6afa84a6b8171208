"""What an SMTP listener's sessions share (server/session.py): the services they call, the
limits they keep, the in-flight byte budget, and the watch on their waits.

**The watch.** A session waits for its peer until a deadline (server/session.py). It used to
enter a cancel scope with that deadline for every read: about 6 us of trio's bookkeeping a
read (the scope, its cancel status, the deadline heap), four reads a message on a kept
connection, seven a connection for one message per connection. Without them the accepting
process spent a sixth less CPU a message and accepted 1.16x as fast at 50 sessions of a
client that does not pipeline (bench/README.md, "twenty-first"). Now a session enters one
cancel scope for its whole life and, before each read, notes the read's deadline on itself
(``Waiting``); one task, ``watch``, sleeps until the earliest deadline noted and cancels the
scope of every session still waiting past its own. A session cancelled there is always
parked in that read (the deadline is noted only around it), so only reads are ever
cancelled, as before. Deadlines are exact: a read whose deadline is earlier than the
watch's next wake moves the wake (``wait_until``); otherwise a read costs two attribute
stores and a comparison. The watch runs for as long as the sessions do (runtime.py); a
session refuses to wait without it.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import attrs
import trio

from atmosrelay.accounts.api_keys import KeyChecker
from atmosrelay.accounts.store import AsyncStore
from atmosrelay.smtp import Capabilities
from atmosrelay.submission import Pipeline
from atmosrelay.submission.pipeline import Queue

if TYPE_CHECKING:
    from atmosrelay.inbound.session import InboundSettings

log = logging.getLogger("atmosrelay.smtp")


class Waiting(Protocol):
    """A session as the watch sees it."""

    wait_deadline: float | None  # while it waits for its peer: until when

    @property
    def waiting_for_command(self) -> bool:
        """Its wait is for a command (not inside DATA or BDAT)."""

    def expire(self) -> None:
        """End the wait now (cancels it; the session answers and closes)."""


class NotWatched(RuntimeError):
    """A session would wait for its peer with no ``SessionContext.watch`` running."""


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
    queue: Queue  # the QueueStore; in a session process, the hand-off (server/handoff.py)
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
    sessions: set[Waiting] = attrs.field(factory=set)  # every session running
    # Sessions in a data phase (DATA's 354 sent, or a first BDAT chunk) whose end of data
    # is not read yet: their records are on their way to the journal (``gather``).
    in_data: int = 0
    group_wait: float = 0.0
    # in a session process: tell the owner, whose journal waits (server/handoff.py)
    on_first_data: Callable[[], None] | None = None
    sessions_elsewhere: int = 0  # in the owner: its session processes' (their last reports)
    watched: bool = False  # ``watch`` is running
    _wake_at: float = math.inf  # when ``watch`` looks at the waits next
    _alarm: trio.CancelScope | None = None  # its sleep until then

    journal_failure_reported: bool = False
    tls_failures: int = 0  # handshakes that failed or timed out (implicit and STARTTLS)

    def gather(self) -> float:
        """The journal's ``gather`` (journal/_journal.py): how long its writer may wait for
        more records before it writes the batch it woke for. ``group_wait`` while other
        sessions are in a data phase (a session counts itself out when it has read its end
        of data, before it appends), else 0: a lone sender's record goes at once. The wait
        ends early when the last of them has read its end (``data_arrived``). Called in the
        writer thread: it reads one int."""
        return self.group_wait if self.in_data > 0 else 0.0

    def data_started(self) -> None:
        """A session's data phase began (DATA's 354 sent, or a first BDAT chunk)."""
        self.in_data += 1
        if self.in_data == 1 and self.on_first_data is not None:
            self.on_first_data()

    def data_arrived(self) -> None:
        """A session's data phase is over (its end read, or the transaction ended)."""
        self.in_data -= 1
        if self.in_data == 0:
            self.queue.journal.gathered()  # nothing more on its way: write what waits

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
        for session in self.sessions:
            if session.wait_deadline is not None and session.waiting_for_command:
                session.expire()

    def wait_until(self, deadline: float) -> None:
        """A session is about to wait for its peer until ``deadline``: ``watch`` wakes by
        then. Raises NotWatched when no ``watch`` runs (nothing would end the wait)."""
        if not self.watched:
            raise NotWatched("sessions wait for peers only while SessionContext.watch runs")
        if deadline < self._wake_at:
            self._wake_at = deadline
            if self._alarm is not None:
                self._alarm.deadline = deadline

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Cancel the wait of every session past its deadline, at its deadline; runs until
        cancelled (beside the sessions, for as long as any may wait). One at a time."""
        if self.watched:
            raise RuntimeError("SessionContext.watch is already running")
        self.watched = True
        task_status.started()
        try:
            while True:
                with trio.CancelScope(deadline=self._wake_at) as self._alarm:
                    await trio.sleep_forever()
                self._alarm = None
                now, wake = trio.current_time(), math.inf
                for session in self.sessions:  # expire() only cancels: the set stays as is
                    deadline = session.wait_deadline
                    if deadline is None:
                        continue
                    if deadline <= now:
                        session.expire()
                    elif deadline < wake:
                        wake = deadline
                self._wake_at = wake
        finally:
            self.watched, self._alarm, self._wake_at = False, None, math.inf
