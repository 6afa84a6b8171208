"""The server's TLS context: the configured certificate, or a self-signed one generated in the
data directory on first start (with a warning: clients must be told to trust it)."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from atmosrelay._files import write_private


def generate_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """Write ``cert.pem`` and ``key.pem`` (mode 0600) for ``hostname``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def server_context(
    cert: str, key: str, *, data_dir: Path, hostname: str
) -> tuple[ssl.SSLContext, str | None]:
    """(context, warning). With no certificate configured, a self-signed one is generated in
    ``<data_dir>/tls`` on first start and reused after; the warning says so."""
    warning = None
    if not cert or not key:
        directory = data_dir / "tls"
        cert_path, key_path = directory / "cert.pem", directory / "key.pem"
        if not (cert_path.exists() and key_path.exists()):
            cert_path, key_path = generate_self_signed(directory, hostname)
        cert, key = str(cert_path), str(key_path)
        warning = (
            f"no TLS certificate configured: using the self-signed {cert} for {hostname}; "
            "set [smtp] tls_cert and tls_key for production"
        )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx, warning
