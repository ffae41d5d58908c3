"""TLS for the receiving side: server contexts and the self-signed fallback certificate.

Takes: a listener's ``tls_cert``/``tls_key`` (PEM files), or none.
Promises: :func:`server_context` gives an ``ssl.SSLContext`` with TLS 1.2 as the minimum
and OpenSSL's default modern cipher list; with no files configured,
:func:`self_signed` creates (once, mode 0600) and reuses an ECDSA P-256 certificate for
the host name under ``<spool>/tls/``, so the embedded default can offer STARTTLS.
Failure policy: unreadable or mismatched files raise :class:`TlsSetupError` naming the
file; the service refuses to start (or keeps the old context on reload).
Standards: RFC 3207 (STARTTLS), RFC 8996 (no TLS 1.0/1.1).
"""

from __future__ import annotations

import datetime
import os
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class TlsSetupError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What the Received header and the log say about a session's TLS."""

    version: str
    cipher: str
    bits: int

    def describe(self) -> str:
        return f"version={self.version} cipher={self.cipher} bits={self.bits}"


def info_of(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> TlsInfo | None:
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    if cipher is None:
        return None
    return TlsInfo(ssl_object.version() or cipher[1], cipher[0], cipher[2])


def server_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"cannot load certificate {cert} with key {key}: {exc}") from None
    return context


def self_signed(directory: str, hostname: str) -> tuple[str, str]:
    """Paths of a self-signed certificate and key for ``hostname``, made when missing."""
    cert_path = os.path.join(directory, "selfsigned-cert.pem")
    key_path = os.path.join(directory, "selfsigned-key.pem")
    if os.path.exists(cert_path) and os.path.exists(key_path):
        return cert_path, key_path
    os.makedirs(directory, mode=0o700, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _write_private(path: str, data: bytes) -> None:
    temporary = path + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)
