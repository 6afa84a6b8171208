"""atproto identities: DID and handle syntax, and handle -> DID resolution.

DIDs: ``did:plc:`` followed by 24 base32 characters (a-z, 2-7), or ``did:web:`` followed by
a hostname (atproto allows no path and no port on did:web). Anything else is INVALID_DID.

Handles follow the atproto handle spec: a hostname of at least two labels, each 1-63 of
[A-Za-z0-9-] not starting or ending with "-", the last not starting with a digit, at most
253 characters, compared and stored in lower case. Reserved TLDs (.local, .arpa, .invalid,
.localhost, .internal, .example, .onion, .alt) are refused; .test is allowed for testing.

Resolution: the DNS TXT record ``_atproto.<handle>`` holding ``did=<DID>``, exactly one
(atproto: several is an error), then optionally HTTPS ``https://<handle>/.well-known/atproto-did``.
Results are cached for ``cache_ttl`` seconds, failures too (briefly), on trio's clock.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Sequence
from typing import Final

import attrs
import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver
import trio

DID_PLC: Final = re.compile(r"did:plc:[a-z2-7]{24}")
_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
RESERVED_TLDS: Final = frozenset(
    {"local", "arpa", "invalid", "localhost", "internal", "example", "onion", "alt"}
)
MAX_HANDLE: Final = 253
FAILURE_CACHE_TTL: Final = 30.0  # a handle that did not resolve is retried this soon


class InvalidDID(ValueError):
    code = "INVALID_DID"


class InvalidHandle(ValueError):
    code = "INVALID_HANDLE"


class ResolutionError(Exception):
    """A handle or record could not be resolved; the message says what was found."""


def hostname_ok(name: str, *, min_labels: int = 2) -> bool:
    if not name or len(name) > MAX_HANDLE or name.endswith("."):
        return False
    labels = name.split(".")
    if len(labels) < min_labels or not all(_LABEL.fullmatch(x) for x in labels):
        return False
    return not labels[-1][0].isdigit()


def validate_did(did: str) -> str:
    """Return the DID if it is a did:plc or did:web we accept; raise InvalidDID."""
    if DID_PLC.fullmatch(did):
        return did
    if did.startswith("did:web:"):
        host = did[len("did:web:") :]
        if hostname_ok(host):
            return did
        raise InvalidDID(f"{did!r}: did:web must name a hostname (no path, no port)")
    if did.startswith("did:plc:"):
        raise InvalidDID(f"{did!r}: did:plc takes 24 characters of a-z and 2-7")
    raise InvalidDID(f"{did!r}: only did:plc: and did:web: identities are accepted")


def normalize_handle(handle: str) -> str:
    """Lower-case and validate an atproto handle; raise InvalidHandle."""
    h = handle.strip().lower()
    if h.startswith("@"):
        h = h[1:]
    if not hostname_ok(h):
        raise InvalidHandle(
            f"{handle!r} is not a valid handle (a hostname such as alice.example.com)"
        )
    if h.rsplit(".", 1)[-1] in RESERVED_TLDS:
        raise InvalidHandle(f"{handle!r} uses a reserved top-level domain")
    return h


@attrs.frozen
class DnsSettings:
    """Where and how to ask. Empty ``nameservers`` means the system's resolver."""

    nameservers: tuple[tuple[str, int], ...] = ()
    timeout: float = 5.0


def make_resolver(settings: DnsSettings) -> dns.asyncresolver.Resolver:
    if not settings.nameservers:
        resolver = dns.asyncresolver.Resolver()
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [host for host, _ in settings.nameservers]
        resolver.port = settings.nameservers[0][1]
    resolver.lifetime = settings.timeout
    resolver.timeout = settings.timeout
    return resolver


async def txt_records(resolver: dns.asyncresolver.Resolver, name: str) -> list[str]:
    """Every TXT record at ``name``, each record's strings joined (RFC 7208 3.3 style).

    Raises ResolutionError saying what happened: NXDOMAIN, no TXT record, or a timeout.
    """
    try:
        answer = await resolver.resolve(name, "TXT", raise_on_no_answer=True)
    except dns.resolver.NXDOMAIN:
        raise ResolutionError(f"{name} does not exist (NXDOMAIN)") from None
    except dns.resolver.NoAnswer:
        raise ResolutionError(f"{name} exists but has no TXT record") from None
    except (dns.exception.Timeout, dns.resolver.LifetimeTimeout):
        raise ResolutionError(f"no answer for {name} within {resolver.lifetime:g} s") from None
    except dns.resolver.NoNameservers as exc:
        raise ResolutionError(f"no nameserver answered for {name}: {exc.msg}") from None
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]


@attrs.define
class _Cached:
    did: str | None
    error: str | None
    expires: float


class HandleResolver:
    """Handle -> DID, by DNS then (if enabled) HTTPS, cached with a TTL on trio's clock."""

    def __init__(
        self,
        dns_settings: DnsSettings = DnsSettings(),
        *,
        cache_ttl: float = 300.0,
        https: bool = False,
        https_port: int = 443,
        https_context: ssl.SSLContext | None = None,
    ) -> None:
        self._resolver = make_resolver(dns_settings)
        self.cache_ttl = cache_ttl
        self.https = https
        self.https_port = https_port
        self.https_context = https_context or ssl.create_default_context()
        self._cache: dict[str, _Cached] = {}

    async def resolve(self, handle: str) -> str:
        """The DID the handle claims. Raises InvalidHandle or ResolutionError."""
        handle = normalize_handle(handle)
        now = trio.current_time()
        hit = self._cache.get(handle)
        if hit is not None and hit.expires > now:
            if hit.did is None:
                raise ResolutionError(hit.error or "unresolvable")
            return hit.did
        try:
            did = await self._resolve_dns(handle)
        except ResolutionError as dns_error:
            if not self.https:
                self._cache[handle] = _Cached(None, str(dns_error), now + FAILURE_CACHE_TTL)
                raise
            try:
                did = await self._resolve_https(handle)
            except ResolutionError as https_error:
                message = f"{dns_error}; and over HTTPS: {https_error}"
                self._cache[handle] = _Cached(None, message, now + FAILURE_CACHE_TTL)
                raise ResolutionError(message) from None
        self._cache[handle] = _Cached(did, None, now + self.cache_ttl)
        return did

    async def _resolve_dns(self, handle: str) -> str:
        name = f"_atproto.{handle}"
        found = [t for t in await txt_records(self._resolver, name) if t.startswith("did=")]
        if not found:
            raise ResolutionError(f"{name} has TXT records but none starts with did=")
        if len(found) > 1:
            raise ResolutionError(f"{name} has {len(found)} did= records; atproto allows one")
        return validate_did(found[0][len("did=") :].strip())

    async def _resolve_https(self, handle: str) -> str:
        answer = await self._resolver.resolve(handle, "A")
        address = answer[0].address
        body = await trio.to_thread.run_sync(
            _https_get, address, self.https_port, handle, self.https_context
        )
        try:
            return validate_did(body.strip())
        except InvalidDID as exc:
            raise ResolutionError(f"https://{handle}/.well-known/atproto-did: {exc}") from None


def _https_get(address: str, port: int, host: str, context: ssl.SSLContext) -> str:
    """A minimal HTTPS GET of /.well-known/atproto-did (blocking; run in a worker thread)."""
    try:
        with (
            socket.create_connection((address, port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            request = (
                f"GET /.well-known/atproto-did HTTP/1.1\r\nHost: {host}\r\n"
                "Accept: text/plain\r\nConnection: close\r\n\r\n"
            )
            tls.sendall(request.encode("ascii"))
            data = b""
            while len(data) < 65536:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                data += chunk
    except (OSError, ssl.SSLError) as exc:
        raise ResolutionError(f"https://{host}/.well-known/atproto-did: {exc}") from None
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise ResolutionError(
            f"https://{host}/.well-known/atproto-did: {status.decode(errors='replace')}"
        )
    return body.decode("utf-8", "replace")


def username_candidates(username: str) -> Sequence[str]:
    """How a username at AUTH may be read: a DID as is, or a handle in normal form."""
    if username.startswith("did:"):
        return (username,)
    try:
        return (normalize_handle(username),)
    except InvalidHandle:
        return ()
