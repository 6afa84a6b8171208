"""API keys: issue, verify, revoke, with a verified-key cache and brute-force brakes.

Format: ``atmos_`` + 32 random bytes in URL-safe base64 (43 characters), 49 octets in all,
inside bcrypt's 72-octet limit. The key id is the first 8 characters after ``atmos_``: not
secret (it is how a key is looked up, listed and revoked) and leaving 35 characters, over 200
bits, unknown. At rest: the bcrypt hash only (cost 12 by default). The key is shown once.

Verifying never stalls the event loop: bcrypt runs in worker threads (at most
``bcrypt_concurrency`` at once). A successful check is remembered for ``cache_ttl`` seconds in
a bounded cache keyed by HMAC-SHA256(process secret, username, key), never the key itself, so
an app opening a hundred connections pays for one bcrypt. Revoking drops the key's entries at
once; a revocation made by another process (the operator CLI) is noticed through SQLite's
``data_version`` within ``revocation_poll`` seconds (``watch_revocations``).

``generation`` counts changes to the account store that may end what an open session was
allowed: a key revoked here, or any write by another process (the CLI's ``key revoke``,
``member suspend|remove``, ``domain remove``). Sessions compare it at each MAIL, an integer
comparison, and look the member and the key up again only when it moved.

Brute force (the policy, with its figures, is in docs/security.md): failures are scored per
client address (an IPv4 address; an IPv6 address's /64, which one host commonly holds whole)
and per account (the DID the username names, so a handle and its DID share one score; the
lowercased username when it names no member). Scores decay with a half-life. Past
``free_failures`` each failure is answered only after an escalating delay, by the worse of
the two scores. Past ``lockout_score`` the *address* is locked out for ``lockout_seconds``:
everything from it is refused at once, with no bcrypt. An account is never locked: anyone who
knows a member's DID could otherwise lock the member out from anywhere. So the right key from
an address that has not failed always works, and an account's score only slows the failures
made against it. Unknown usernames cost a bcrypt too, so timing does not tell which exist.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
from collections import OrderedDict
from typing import Final

import attrs
import bcrypt
import trio

from atmosrelay.accounts.identity import username_candidates
from atmosrelay.accounts.store import AsyncStore, Store
from atmosrelay.settings import integer, number

PREFIX: Final = "atmos_"
KEY_ID_LENGTH: Final = 8
SECRET_LENGTH: Final = 43  # base64url of 32 bytes, unpadded


@attrs.frozen
class AuthSettings:
    """API keys: the hash's cost, the cache of verified keys, and how failed AUTH is slowed
    and then locked out (docs/security.md)."""

    bcrypt_cost: int = integer(
        12, 4, 31, note="work factor of API key hashes (2^12 rounds, ~0.25 s here)"
    )
    cache_ttl: float = number(300.0, 0, note="seconds a verified key is remembered")
    cache_size: int = integer(10_000, 1)
    free_failures: float = number(
        3.0, 0, note="failures per address or account before answers are delayed"
    )
    base_delay: float = number(0.5, 0, note="first delay, doubling per further failure ...")
    max_delay: float = number(8.0, 0, note="... up to this")
    lockout_score: float = number(
        10.0, 1, note="failures (decayed) that lock a client address (IPv6: its /64) out"
    )
    lockout_seconds: float = number(900.0, 0)
    half_life: float = number(
        600.0, 1, note="failures are forgotten by half every this many seconds"
    )
    # not settings: the machine's cores (more only queues in the kernel), and how often a
    # revoked key is looked for
    bcrypt_concurrency: int = 2
    revocation_poll: float = 1.0


@attrs.frozen
class IssuedKey:
    key_id: str
    did: str
    secret: str = attrs.field(repr=False)


@attrs.frozen
class Verified:
    did: str
    key_id: str
    cached: bool


@attrs.frozen
class Refused:
    reason: str  # for logs, never for the peer: "unknown-user", "bad-key", "locked-out", ...
    retry_after: float  # seconds until another attempt may succeed (0: any time)


def new_secret() -> str:
    """A fresh key. Its id (the first characters after the prefix) never starts with ``-``
    or ``_``, so an operator can paste it as a command-line argument (``key revoke ID``)
    without it being read as an option."""
    while True:
        body = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii").rstrip("=")
        if body[0] not in "-_":
            return PREFIX + body


def key_id_of(secret: str) -> str | None:
    """The key id of a well-formed key, else None."""
    if not secret.startswith(PREFIX) or len(secret) != len(PREFIX) + SECRET_LENGTH:
        return None
    return secret[len(PREFIX) : len(PREFIX) + KEY_ID_LENGTH]


def issue(store: Store, did: str, *, cost: int) -> IssuedKey:
    """Create a key for ``did`` (blocking: bcrypt). The secret is returned once, never stored."""
    store.member(did)
    for _ in range(5):
        secret = new_secret()
        key_id = key_id_of(secret)
        assert key_id is not None
        try:
            store.key(key_id)
        except Exception:
            hashed = bcrypt.hashpw(secret.encode("ascii"), bcrypt.gensalt(cost))
            store.add_key(key_id, did, hashed)
            return IssuedKey(key_id, did, secret)
    raise RuntimeError("could not find a free key id")  # 48 random bits: never in practice


@attrs.define
class _Score:
    value: float = 0.0
    at: float = 0.0
    locked_until: float = 0.0

    def current(self, now: float, half_life: float) -> float:
        return self.value * 0.5 ** ((now - self.at) / half_life) if self.value else 0.0


MAX_SCORES: Final = 100_000  # addresses and accounts with failures on record, at most


def address_key(ip: str) -> str:
    """What a client address is scored as: an IPv4 address as itself (also when it arrives
    IPv4-mapped, ``::ffff:192.0.2.1``), an IPv6 address as its /64 prefix."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


_BCRYPT_ALPHABET: Final = b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def dummy_hash(cost: int) -> bytes:
    """A well-formed bcrypt hash of ``cost`` that no secret matches, made without hashing:
    checking a secret against it costs what checking a real key costs (bcrypt hashes the
    secret with the salt and cost the string names, then compares), so an unknown username
    answers as slowly as a wrong key. Hashing a random secret instead took 0.22 s of the
    event loop at every start."""
    tail = bytes(_BCRYPT_ALPHABET[b % 64] for b in secrets.token_bytes(31))
    return bcrypt.gensalt(cost) + tail


class KeyChecker:
    """Verifies (username, key) pairs for the relay. Times come from trio's clock."""

    def __init__(self, store: AsyncStore, settings: AuthSettings = AuthSettings()) -> None:
        self.store = store
        self.settings = settings
        self._cache_secret = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, tuple[str, str, float]] = OrderedDict()
        self._by_key: dict[str, set[bytes]] = {}
        self._scores: dict[str, _Score] = {}
        self._bcrypt = trio.CapacityLimiter(settings.bcrypt_concurrency)
        # What an unknown username is checked against: same cost, so same time
        self._dummy = dummy_hash(settings.bcrypt_cost)
        self.bcrypt_calls = 0
        self.generation = 0

    # -- the cache ------------------------------------------------------------------------
    def _digest(self, username: str, secret: str) -> bytes:
        message = username.encode("utf-8") + b"\0" + secret.encode("utf-8", "replace")
        return hmac.new(self._cache_secret, message, hashlib.sha256).digest()

    def forget_key(self, key_id: str) -> None:
        """Drop every cached verification of ``key_id`` (call on revocation)."""
        for digest in self._by_key.pop(key_id, ()):
            self._cache.pop(digest, None)

    def forget_all(self) -> None:
        self._cache.clear()
        self._by_key.clear()

    def _remember(self, digest: bytes, did: str, key_id: str, now: float) -> None:
        self._cache[digest] = (did, key_id, now + self.settings.cache_ttl)
        self._by_key.setdefault(key_id, set()).add(digest)
        while len(self._cache) > self.settings.cache_size:
            old, (_, old_key, _) = self._cache.popitem(last=False)
            self._by_key.get(old_key, set()).discard(old)

    # -- brute force ------------------------------------------------------------------------
    def _locked(self, address: str, now: float) -> float:
        score = self._scores.get(address)
        return max(0.0, score.locked_until - now) if score is not None else 0.0

    def _bump(self, name: str, now: float) -> _Score:
        score = self._scores.pop(name, None) or _Score()
        score.value = score.current(now, self.settings.half_life) + 1.0
        score.at = now
        self._scores[name] = score  # most recently failed last: the oldest go first
        while len(self._scores) > MAX_SCORES:
            del self._scores[next(iter(self._scores))]
        return score

    def _fail(self, address: str, account: str, now: float) -> float:
        """Record a failure; lock the address past the lockout score (never the account);
        return the delay before answering it."""
        st = self.settings
        by_address = self._bump(address, now)
        by_account = self._bump(account, now)
        # Scores decay while delays are served, so they sit just below whole numbers:
        # round, or each level would take one failure more than documented.
        if round(by_address.value) >= st.lockout_score:
            by_address.locked_until = now + st.lockout_seconds
        worst = max(by_address.value, by_account.value)
        if round(worst) <= st.free_failures:
            return 0.0
        doublings = max(0, round(worst - st.free_failures - 1))
        return float(min(st.max_delay, st.base_delay * 2.0**doublings))

    def _succeed(self, address: str, account: str) -> None:
        score = self._scores.get(address)
        if score is not None and score.locked_until == 0.0:
            del self._scores[address]
        self._scores.pop(account, None)

    # -- verification -----------------------------------------------------------------------
    async def verify(self, username: str, secret: str, client_ip: str) -> Verified | Refused:
        """Check a key. A refusal is returned after its delay has been served."""
        now = trio.current_time()
        address = f"ip:{address_key(client_ip)}"
        locked = self._locked(address, now)
        if locked > 0:
            return Refused("locked-out", locked)
        digest = self._digest(username, secret)
        hit = self._cache.get(digest)
        if hit is not None and hit[2] > now:
            self._cache.move_to_end(digest)
            return Verified(hit[0], hit[1], cached=True)
        did, result = await self._verify_cold(username, secret)
        account = f"did:{did}" if did is not None else f"user:{username.lower()}"
        now = trio.current_time()
        if isinstance(result, Verified):
            self._remember(digest, result.did, result.key_id, now)
            self._succeed(address, account)
            return result
        delay = self._fail(address, account, now)
        if delay:
            await trio.sleep(delay)
        return Refused(result, self._locked(address, trio.current_time()))

    async def _verify_cold(self, username: str, secret: str) -> tuple[str | None, Verified | str]:
        """(the DID the username names, or None; the verdict)."""
        candidates = username_candidates(username)
        did = None
        if candidates:
            name = candidates[0]
            if name.startswith("did:"):
                did = name if await self._member_exists(name) else None
            else:
                did = await self.store.run(self.store.sync.did_for_handle, name)
        key_id = key_id_of(secret)
        key = None
        if did is not None and key_id is not None:
            keys = await self.store.run(self.store.sync.keys, did)
            key = next((k for k in keys if k.key_id == key_id and k.revoked_at is None), None)
        hashed = key.bcrypt_hash if key is not None else self._dummy
        ok = await self._checkpw(secret, hashed)
        if key is None or did is None:
            return did, "unknown-user" if did is None else "bad-key"
        if not ok:
            return did, "bad-key"
        await self.store.run(self.store.sync.touch_key, key.key_id)
        return did, Verified(did, key.key_id, cached=False)

    async def _member_exists(self, did: str) -> bool:
        try:
            await self.store.run(self.store.sync.member, did)
        except Exception:
            return False
        return True

    async def _checkpw(self, secret: str, hashed: bytes) -> bool:
        self.bcrypt_calls += 1
        data = secret.encode("utf-8", "replace")[:72]
        return await trio.to_thread.run_sync(bcrypt.checkpw, data, hashed, limiter=self._bcrypt)

    async def revoke(self, key_id: str) -> None:
        await self.store.run(self.store.sync.revoke_key, key_id)
        self.forget_key(key_id)
        self.generation += 1

    def changed(self) -> None:
        """This process wrote the account store (SQLite's data_version only moves for the
        writes of other connections): sessions look again at their next MAIL."""
        self.generation += 1

    async def still_valid(self, did: str, key_id: str) -> bool:
        """Whether ``key_id`` is a live (unrevoked) key of ``did`` now."""
        keys = await self.store.run(self.store.sync.keys, did)
        return any(k.key_id == key_id and k.revoked_at is None for k in keys)

    async def watch_revocations(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run forever: when another process changes the database, drop cached entries of
        revoked keys and move ``generation`` on. Start it in the relay's nursery."""
        version = await self.store.run(self.store.sync.data_version)
        task_status.started()
        while True:
            await trio.sleep(self.settings.revocation_poll)
            now_version = await self.store.run(self.store.sync.data_version)
            if now_version != version:
                version = now_version
                for key_id in await self.store.run(self.store.sync.revoked_keys):
                    self.forget_key(key_id)
                self.generation += 1
