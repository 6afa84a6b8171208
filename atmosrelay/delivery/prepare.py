"""What a message becomes on its way out: per-recipient List-Unsubscribe, then DKIM.

    bulk message, one recipient per copy:  List-Unsubscribe + List-Unsubscribe-Post (RFC 8058)
                                           with a token bound to the member and the recipient
    member's message:                      signed by the member's domain (RSA ``<stem>r`` and
                                           Ed25519 ``<stem>e``) and by the operator domain
    DSN (null sender), or a sender domain
    no longer enrolled:                    signed by the operator domain only

The headers are added before signing, so the signatures cover them. Runs in a worker thread
(``Dispatcher`` calls it through ``trio.to_thread``): the store is thread-safe, and the
signers are cached per domain. A cached signer is looked at again after ``SIGNER_TTL``
seconds or when the account store changed (so a rotated or removed domain key takes effect
without a restart), and rebuilt only when the domain's keys did change: parsing a private key
is the costliest step of signing (OpenSSL checks an RSA key on load, holding the GIL) and the
store changes every second while counters are flushed.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import attrs

from atmosrelay._files import write_private
from atmosrelay.accounts.dkim_keys import OperatorKey
from atmosrelay.accounts.store import NotFound, Store
from atmosrelay.message.dkim import Signer, SigningKey
from atmosrelay.message.headers import unsubscribe_headers
from atmosrelay.queue.state import QueuedMessage, domain_of

SIGNER_TTL: Final = 60.0


@attrs.frozen
class Signing:
    """What preparing a message needs to know of it (small: the delivery process gets it
    with every attempt)."""

    sender: str  # "" for a DSN
    did: str
    bulk: bool

    @classmethod
    def of(cls, msg: QueuedMessage) -> Signing:
        record = msg.record
        return cls(record.sender, record.did, record.bulk)


class Preparer:
    def __init__(
        self,
        store: Store,
        operator: OperatorKey,
        *,
        unsubscribe_secret: bytes,
        unsubscribe_url: str,
    ) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._building = threading.Lock()
        # domain -> (look again after, store generation, the keys it was built from, signer)
        self._signers: dict[str, tuple[float, int, tuple[SigningKey, ...], Signer]] = {}
        self.set_operator(operator)
        self.unsubscribe_secret = unsubscribe_secret
        self.unsubscribe_url = unsubscribe_url
        # moves when the account store changes (the relay's KeyChecker.generation): a DKIM
        # rotation activated, a domain removed, reach the next message within its poll
        self.generation: Callable[[], int] = lambda: 0

    def set_operator(self, operator: OperatorKey) -> None:
        """Sign with this operator key from the next message on (a rotation activated)."""
        self.operator = SigningKey(operator.domain, operator.selector, "rsa", operator.key.private)
        self.operator_only = Signer([self.operator])
        with self._lock:
            self._signers = {}

    def __call__(self, sign: Signing, recipients: tuple[str, ...], body: bytes) -> bytes:
        if sign.bulk and sign.sender and len(recipients) == 1:
            body = (
                unsubscribe_headers(
                    secret=self.unsubscribe_secret,
                    did=sign.did,
                    recipient=recipients[0],
                    base_url=self.unsubscribe_url,
                    mailto_domain=self.operator.domain,
                )
                + body
            )
        signer = self.signer(domain_of(sign.sender)) if sign.sender else self.operator_only
        return signer.sign(body) + body

    def in_hand(self, sign: Signing) -> bool:
        """Whether preparing this message would find its signer cached and current: no
        account store read, no key parsed, so only hashing and signing are left (the delivery
        process then prepares it without a worker thread)."""
        if not sign.sender:
            return True
        now, generation = time.monotonic(), self.generation()
        with self._lock:
            cached = self._signers.get(domain_of(sign.sender))
        return cached is not None and cached[0] > now and cached[1] == generation

    def signer(self, domain: str) -> Signer:
        """The member domain's two keys and the operator's; the operator's alone when the
        domain is not enrolled (any more)."""
        now, generation = time.monotonic(), self.generation()
        with self._lock:
            cached = self._signers.get(domain)
        if cached is not None and cached[0] > now and cached[1] == generation:
            return cached[3]
        with self._building:  # one thread parses; the others wanted the same keys
            with self._lock:
                cached = self._signers.get(domain)
            if cached is not None and cached[0] > now and cached[1] == generation:
                return cached[3]
            return self._build(domain, now, generation, cached)

    def _build(
        self,
        domain: str,
        now: float,
        generation: int,
        cached: tuple[float, int, tuple[SigningKey, ...], Signer] | None,
    ) -> Signer:
        try:
            enrolled = self.store.domain(domain)
        except NotFound:
            keys: tuple[SigningKey, ...] = (self.operator,)
        else:
            stem = enrolled.dkim_selector_stem
            keys = (
                SigningKey(domain, stem + "r", "rsa", enrolled.dkim_rsa_private),
                SigningKey(domain, stem + "e", "ed25519", enrolled.dkim_ed25519_private),
                self.operator,
            )
        if cached is not None and cached[2] == keys:
            signer = cached[3]  # the same keys: nothing to parse again
        else:
            signer = self.operator_only if keys == (self.operator,) else Signer(list(keys))
        with self._lock:
            self._signers[domain] = (now + SIGNER_TTL, generation, keys, signer)
        return signer


def load_or_create_secret(path: Path) -> bytes:
    """The unsubscribe token key: 32 random bytes in ``path`` (mode 0600), made on first
    use and fsynced, so tokens in mail already sent stay valid across restarts."""
    if not path.exists():
        write_private(path, secrets.token_bytes(32))
    secret = path.read_bytes()
    if len(secret) < 16:
        raise ValueError(f"{path}: the unsubscribe key is shorter than 16 bytes")
    return secret
