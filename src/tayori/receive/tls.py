"""TLS for the receiving side: server contexts, SNI, and the self-signed fallback.

Takes: a listener's certificate and key (PEM files), or none; its TLS settings
(:class:`TlsSettings`: oldest version, TLS 1.2 ciphers, client certificates); the
``[[certificate]]`` entries for SNI.
Promises: :func:`server_context` gives an ``ssl.SSLContext`` with TLS 1.2 (or 1.3) as
the minimum, forward-secret AEAD ciphers only for TLS 1.2 (:data:`DEFAULT_CIPHERS`,
unless configured), no compression, the server's cipher order; with client
certificates asked for, verified against the configured CAs. :class:`CertificateChoice`
picks another certificate's context when the client asks for one of its names (exact,
or ``*.example.org`` for one label); the listener installs it as the SNI callback.
With no files configured, :func:`self_signed` creates (once, mode 0600) and reuses an
ECDSA P-256 certificate for the host name under ``<spool>/tls/``, so the embedded
default can offer STARTTLS.
Contexts are built anew on every reload (SIGHUP), so renewed certificates are used by
new sessions.
Failure policy: unreadable or mismatched files, or a cipher list OpenSSL refuses, raise
:class:`TlsSetupError` naming the file or key; the service refuses to start (or keeps
the old contexts on reload).
Standards: RFC 3207 (STARTTLS), RFC 8314 (implicit TLS), RFC 8996 (no TLS 1.0/1.1),
RFC 6066 §3 (SNI).
"""

from __future__ import annotations

import datetime
import os
import ssl
from dataclasses import dataclass
from typing import Any

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
    client: str = ""    # a verified client certificate's subject

    def describe(self) -> str:
        text = f"version={self.version} cipher={self.cipher} bits={self.bits}"
        return f"{text} client_certificate={self.client!r}" if self.client else text


def info_of(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> TlsInfo | None:
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    if cipher is None:
        return None
    return TlsInfo(ssl_object.version() or cipher[1], cipher[0], cipher[2],
                   _subject(ssl_object.getpeercert()))


def _subject(peer: dict[str, Any] | None) -> str:
    """``CN=...,O=...`` of a verified client certificate ("" without one)."""
    if not peer:
        return ""
    parts = []
    for rdn in peer.get("subject", ()):
        for name, value in rdn:
            short = {"commonName": "CN", "organizationName": "O", "countryName": "C",
                     "organizationalUnitName": "OU"}.get(name, name)
            parts.append(f"{short}={value}")
    return ",".join(parts)


DEFAULT_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                   "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                   "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")
"""TLS 1.2 suites offered by default: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305
(TLS 1.3's suites are all of that kind and are not configured here)."""
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
           "required": ssl.CERT_REQUIRED}


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """A listener's TLS choices (config ``listen.tls_*``)."""

    min_version: str = "1.2"
    ciphers: str = ""
    client_certs: str = "none"
    client_ca: str = ""


def server_context(cert: str, key: str, settings: TlsSettings = TlsSettings()
                   ) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[settings.min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.set_ciphers(settings.ciphers or DEFAULT_CIPHERS)
    except ssl.SSLError:
        raise TlsSetupError(f"OpenSSL accepts none of the ciphers {settings.ciphers!r} "
                            "(listen.tls_ciphers)") from None
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"cannot load certificate {cert} with key {key}: {exc}") from None
    context.verify_mode = _VERIFY[settings.client_certs]
    if settings.client_certs != "none":
        try:
            context.load_verify_locations(settings.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsSetupError(f"cannot load client CA certificates {settings.client_ca}: "
                                f"{exc}") from None
    return context


@dataclass(frozen=True, slots=True)
class CertificateChoice:
    """A listener's context and the ``[[certificate]]`` contexts with their names."""

    default: ssl.SSLContext
    alternatives: tuple[tuple[tuple[str, ...], ssl.SSLContext], ...] = ()

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        """The context whose certificate serves ``server_name`` (SNI; None: none sent)."""
        if server_name:
            for names, other in self.alternatives:
                if any(name_matches(pattern, server_name) for pattern in names):
                    return other
        return self.default


def name_matches(pattern: str, name: str) -> bool:
    """``pattern`` (a host name, or ``*.`` and a domain for one more label) covers
    ``name``; case-insensitive."""
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


def certificate_names(cert: str) -> tuple[str, ...]:
    """The DNS names of a PEM certificate's subjectAltName (its first certificate)."""
    try:
        with open(cert, "rb") as handle:
            certificate = x509.load_pem_x509_certificate(handle.read())
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    except (OSError, ValueError) as exc:
        raise TlsSetupError(f"cannot read certificate {cert}: {exc}") from None
    return tuple(extension.value.get_values_for_type(x509.DNSName))


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
