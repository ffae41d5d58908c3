"""deliver.client against scripted servers on loopback, for what a real peer won't do."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from pathlib import Path

import pytest

from tayori.deliver.client import ClientSettings, Connection, HopError, Target, TlsFallback


class Scripted:
    """A server on loopback that answers each command line by its first word."""

    def __init__(self, answers: dict[bytes, bytes], greeting: bytes = b"220 ready\r\n",
                 tls: ssl.SSLContext | None = None) -> None:
        self.answers, self.greeting, self.tls = answers, greeting, tls
        self.writers: list[asyncio.StreamWriter] = []
        self.heard: list[bytes] = []

    async def __aenter__(self) -> Target:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        return Target("peer.test", "127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in self.writers), return_exceptions=True)
        await self.server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        writer.write(self.greeting)
        with contextlib.suppress(OSError, ssl.SSLError):   # the client may hang up
            while line := await reader.readline():
                self.heard.append(line)
                verb = line.split()[0].upper()
                writer.write(self.answers.get(verb, b"500 what\r\n"))
                await writer.drain()
                if verb == b"STARTTLS" and self.tls is not None:
                    await writer.start_tls(self.tls)


async def opened(target: Target, **settings: str) -> Connection:
    connection = await asyncio.wait_for(
        Connection.open(target, ClientSettings(helo_name="tayori.test", **settings)), 10)
    await connection.quit()
    return connection


EHLO = b"250-peer.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"


@pytest.mark.parametrize(("policy", "error"), [("may", TlsFallback), ("encrypt", HopError)])
def test_data_after_the_starttls_reply_is_refused(policy: str, error: type[HopError]) -> None:
    """CVE-2011-0411: plaintext sent along with the 220 must never pass for TLS data."""
    async def main() -> HopError:
        answers = {b"EHLO": EHLO, b"STARTTLS": b"220 go ahead\r\n250 injected\r\n"}
        async with Scripted(answers) as target:
            try:
                await opened(target, tls=policy)
            except HopError as exc:
                return exc
        raise AssertionError("the connection was opened")

    failure = asyncio.run(main())
    assert type(failure) is error
    assert failure.reply.code == 451 and "after its STARTTLS reply" in failure.reply.text


def test_ehlo_refused_falls_back_to_helo() -> None:
    async def main() -> Connection:
        answers = {b"EHLO": b"502 5.5.1 no\r\n", b"HELO": b"250 peer.test\r\n",
                   b"QUIT": b"221 bye\r\n"}
        async with Scripted(answers) as target:
            return await opened(target)

    connection = asyncio.run(main())
    assert not connection.caps.extended and connection.server_name == "ready"


def test_greeting_5xx_is_a_hop_error() -> None:
    async def main() -> HopError:
        async with Scripted({}, greeting=b"554 5.7.1 go away\r\n") as target:
            try:
                await opened(target)
            except HopError as exc:
                return exc
        raise AssertionError("the connection was opened")

    assert asyncio.run(main()).reply.code == 554



def test_no_password_over_plain_text() -> None:
    """tls = may and no STARTTLS offered (or stripped by someone in between): the login
    is not sent; the attempt fails for now."""
    server = Scripted({b"EHLO": b"250-peer.test\r\n250 AUTH PLAIN LOGIN\r\n",
                       b"AUTH": b"235 ok\r\n", b"QUIT": b"221 bye\r\n"})

    async def main() -> HopError:
        async with server as target:
            try:
                await opened(target, tls="may", auth_user="u", auth_password="secret")
            except HopError as exc:
                return exc
        raise AssertionError("the connection was opened")

    assert asyncio.run(main()).reply.status == "4.7.0"
    assert not any(line.upper().startswith(b"AUTH") for line in server.heard)


def test_verify_to_an_address_checks_the_certificate_for_it(tmp_path: Path) -> None:
    """tls = verify to an IP address (a [192.0.2.1] relay): a certificate valid only for
    another name is refused, even from a trusted CA (here: the certificate itself)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=other.test",
                    "-addext", "subjectAltName=DNS:other.test"], check=True,
                   capture_output=True, timeout=60)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    server = Scripted({b"EHLO": b"250-peer.test\r\n250 STARTTLS\r\n",
                       b"STARTTLS": b"220 go ahead\r\n"}, tls=context)

    async def main() -> HopError:
        async with server as target:
            try:
                await opened(Target("127.0.0.1", "127.0.0.1", target.port), tls="verify",
                             tls_ca_file=str(cert))
            except HopError as exc:
                return exc
        raise AssertionError("a certificate for other.test passed for 127.0.0.1")

    failure = asyncio.run(main())
    assert failure.reply.status == "4.7.5"
