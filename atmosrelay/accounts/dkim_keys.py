"""DKIM key pairs and the DNS records that publish them.

Every member domain gets two keys at enrollment (RFC 6376 RSA, RFC 8463 Ed25519), selectors
``<stem>r`` and ``<stem>e`` with the stem ``atmos<YYYYMMDD>`` of the enrollment day (UTC), so a
later rotation gets a new selector and both keys can be published side by side. Keys are
generated with OpenSSL (the ``cryptography`` package). Formats are the ones dkimpy signs with:
RSA as PKCS#1 PEM, Ed25519 as the base64 32-byte seed. TXT values longer than 255 octets are
split into several strings (RFC 7208 section 3.3 / RFC 1035), as a zone file needs them.

Private keys are never logged or shown: ``KeyPair.private`` has no repr.
"""

from __future__ import annotations

import base64
import datetime
import os
from pathlib import Path
from typing import Final

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from atmosrelay._files import write_private
from atmosrelay.message.dkim import parse_private

RSA_BITS: Final = 2048
TXT_STRING_MAX: Final = 255


@attrs.frozen
class KeyPair:
    algorithm: str  # "rsa" or "ed25519"
    private: str = attrs.field(repr=False)  # the format dkimpy signs with
    public_b64: str  # the p= value


def generate_rsa() -> KeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # PKCS#1, what dkimpy parses
        serialization.NoEncryption(),
    )
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return KeyPair("rsa", pem.decode("ascii"), base64.b64encode(spki).decode("ascii"))


def generate_ed25519() -> KeyPair:
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return KeyPair(
        "ed25519", base64.b64encode(seed).decode("ascii"), base64.b64encode(public).decode("ascii")
    )


def public_from_private(algorithm: str, private: str) -> str:
    """The p= value for a stored private key."""
    key = parse_private(algorithm, private)  # kept: the relay signs with it next
    if algorithm == "rsa":
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(spki).decode("ascii")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def selector_stem(day: datetime.date | None = None) -> str:
    day = day or datetime.datetime.now(datetime.UTC).date()
    return f"atmos{day:%Y%m%d}"


def dkim_record_value(algorithm: str, public_b64: str) -> str:
    return f"v=DKIM1; k={algorithm}; p={public_b64}"


def split_txt(value: str) -> tuple[str, ...]:
    """A TXT value as strings of at most 255 octets (ASCII here)."""
    return tuple(value[i : i + TXT_STRING_MAX] for i in range(0, len(value), TXT_STRING_MAX)) or (
        "",
    )


@attrs.frozen
class OperatorKey:
    domain: str
    selector: str
    key: KeyPair


def ensure_operator_key(directory: Path, domain: str) -> tuple[OperatorKey, bool]:
    """Load the operator's RSA key for ``d=<domain>`` from ``directory``, generating it on
    first start. Returns (key, created). The private file is mode 0600.

    Files: ``operator-selector`` names the signing selector; its key is ``operator-<selector>
    .pem``, or ``operator-rsa.pem`` for the first one. A rotation in progress adds
    ``operator-selector.next`` and the next key's file; activating it is one atomic rename
    of ``operator-selector.next`` over ``operator-selector`` (a crash leaves the old pair or
    the new pair in force, never a selector without its key)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_path = directory / "operator-rsa.pem"
    selector_path = directory / "operator-selector"
    created = False
    if not private_path.exists() and not selector_path.exists():
        pair = generate_rsa()
        write_private(private_path, pair.private.encode("ascii"))
        write_private(selector_path, (selector_stem() + "r\n").encode())
        created = True
    selector = (
        selector_path.read_text().strip() if selector_path.exists() else selector_stem() + "r"
    )
    return _operator_key(directory, domain, selector), created


def _key_path(directory: Path, selector: str) -> Path:
    rotated = directory / f"operator-{selector}.pem"
    return rotated if rotated.exists() else directory / "operator-rsa.pem"


def _operator_key(directory: Path, domain: str, selector: str) -> OperatorKey:
    path = _key_path(directory, selector)
    os.chmod(path, 0o600)
    private = path.read_text()
    return OperatorKey(
        domain, selector, KeyPair("rsa", private, public_from_private("rsa", private))
    )


def operator_rotation(directory: Path, domain: str) -> OperatorKey | None:
    """The next operator key of a rotation in progress, or None."""
    path = directory / "operator-selector.next"
    if not path.exists():
        return None
    return _operator_key(directory, domain, path.read_text().strip())


def start_operator_rotation(directory: Path, domain: str, next_stem: str) -> OperatorKey:
    """Make the next operator key (selector ``<next_stem>r``), or return the pending one."""
    pending = operator_rotation(directory, domain)
    if pending is not None:
        return pending
    selector = next_stem + "r"
    pair = generate_rsa()
    write_private(directory / f"operator-{selector}.pem", pair.private.encode("ascii"))
    write_private(directory / "operator-selector.next", (selector + "\n").encode())
    return OperatorKey(domain, selector, pair)


def activate_operator_rotation(directory: Path, domain: str) -> tuple[OperatorKey, str]:
    """Make the pending key the signing key; returns (the new key, the retired selector).
    Raises FileNotFoundError when no rotation is in progress."""
    current, _ = ensure_operator_key(directory, domain)
    pending = operator_rotation(directory, domain)
    if pending is None:
        raise FileNotFoundError("no operator DKIM rotation in progress")
    old_path = _key_path(directory, current.selector)
    os.replace(directory / "operator-selector.next", directory / "operator-selector")
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    old_path.unlink()  # after the switch: a crash before this leaves only a stale file
    return pending, current.selector
