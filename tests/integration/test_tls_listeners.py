"""TLS on the receiving side: smtps (implicit TLS), SNI, the oldest version accepted,
client certificates, and new certificates after SIGHUP."""

from __future__ import annotations

import signal
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from certs import TestCa
from harness import Tayori, wait_for


def handshake(tayori: Tayori, *, server_name: str = "mx.tayori.test", implicit: bool = True,
              context: ssl.SSLContext | None = None) -> tuple[ssl.SSLSocket, bytes]:
    """A TLS connection to tayori (after STARTTLS unless ``implicit``) and the first
    reply read over TLS (the greeting, or the STARTTLS reply's successor: EHLO's)."""
    if context is None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection((tayori.host, tayori.port), timeout=10)
    if not implicit:
        file = raw.makefile("rb")
        file.readline()
        raw.sendall(b"EHLO client.test\r\n")
        while not file.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\n")
        assert file.readline().startswith(b"220 ")
    sock = context.wrap_socket(raw, server_hostname=server_name)
    if not implicit:
        sock.sendall(b"EHLO client.test\r\n")
    return sock, sock.recv(4096)


def subject(sock: ssl.SSLSocket) -> str:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


@pytest.fixture
def ca(tmp_path: Path) -> TestCa:
    return TestCa(tmp_path)


def test_smtps_speaks_tls_from_the_first_byte(make_tayori: Callable[..., Tayori]) -> None:
    tayori = make_tayori(listen={"mode": "smtps"})
    sock, greeting = handshake(tayori)
    with sock:
        assert greeting.startswith(b"220 mx.tayori.test ESMTP")
        sock.sendall(b"EHLO client.test\r\n")
        ehlo = sock.recv(4096)
        assert b"250 " in ehlo and b"STARTTLS" not in ehlo
    plain = socket.create_connection((tayori.host, tayori.port), timeout=10)
    with plain:   # a client that does not start TLS gets no greeting
        plain.sendall(b"EHLO client.test\r\n")
        plain.settimeout(5)
        with pytest.raises((TimeoutError, ConnectionError, OSError)):
            data = plain.recv(4096)
            assert not data.startswith(b"220")
            raise ConnectionError


def test_sni_picks_the_certificate_for_the_name_asked(make_tayori: Callable[..., Tayori],
                                                       ca: TestCa) -> None:
    default = ca.issue("mx.tayori.test", ["mx.tayori.test"])
    other = ca.issue("mail.example.org", ["mail.example.org", "*.example.net"])
    tayori = make_tayori(listen={"mode": "smtps", "tls_cert": str(default.cert),
                                 "tls_key": str(default.key)},
                         extra=f'[[certificate]]\ncert = "{other.cert}"\nkey = "{other.key}"\n')
    for name, expected in (("mail.example.org", "CN=mail.example.org"),
                           ("smtp.example.net", "CN=mail.example.org"),
                           ("a.b.example.net", "CN=mx.tayori.test"),
                           ("unknown.test", "CN=mx.tayori.test")):
        sock, _ = handshake(tayori, server_name=name)
        with sock:
            assert subject(sock) == expected, name


def test_old_tls_versions_are_refused(make_tayori: Callable[..., Tayori]) -> None:
    tayori = make_tayori(listen={"mode": "smtps", "tls_min_version": "1.3"})
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(tayori, context=context)
    sock, greeting = handshake(tayori)
    with sock:
        assert sock.version() == "TLSv1.3" and greeting.startswith(b"220 ")


def test_a_client_certificate_is_checked_and_logged(make_tayori: Callable[..., Tayori],
                                                    ca: TestCa) -> None:
    client = ca.issue("client.example.org")
    tayori = make_tayori(listen={"tls_client_certs": "optional", "tls_client_ca": str(ca.cert)})
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.load_cert_chain(client.cert, client.key)
    sock, reply = handshake(tayori, implicit=False, context=context)
    with sock:
        assert reply.startswith(b"250")
    wait_for(lambda: "client_certificate='CN=client.example.org'" in tayori.log(),
             what="the client certificate in the log")
    stranger = TestCa(ca.directory / "..", "another CA").issue("stranger")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.load_cert_chain(stranger.cert, stranger.key)
    try:   # TLS 1.3: the client may see the refusal as a closed connection
        sock, reply = handshake(tayori, implicit=False, context=context)
        sock.close()
    except (ssl.SSLError, ConnectionError):
        reply = b""
    assert not reply.startswith(b"250")
    wait_for(lambda: "certificate verify failed" in tayori.log(), what="the refusal")


def test_a_renewed_certificate_is_used_after_sighup(make_tayori: Callable[..., Tayori],
                                                    ca: TestCa) -> None:
    first = ca.issue("mx.tayori.test", ["mx.tayori.test"])
    tayori = make_tayori(listen={"mode": "smtps", "tls_cert": str(first.cert),
                                 "tls_key": str(first.key)})
    sock, _ = handshake(tayori)
    with sock:
        serial = x509.load_der_x509_certificate(sock.getpeercert(True) or b"").serial_number
    renewed = ca.issue("mx.tayori.test", ["mx.tayori.test"])
    first.cert.write_bytes(renewed.cert.read_bytes())
    first.key.write_bytes(renewed.key.read_bytes())
    assert tayori.process is not None
    tayori.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in tayori.log(), what="the reload")

    def new_serial() -> bool:
        sock, _ = handshake(tayori)
        with sock:
            return x509.load_der_x509_certificate(
                sock.getpeercert(True) or b"").serial_number != serial

    wait_for(new_serial, what="the renewed certificate")
