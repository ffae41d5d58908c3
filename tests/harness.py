"""Test harness: a real ``tayori serve`` process on loopback, and a raw SMTP client.

Everything waits by polling with a deadline; every socket operation has a timeout.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tayori.queue.spool import Envelope, read_envelopes

SHARED = Path(__file__).resolve().parents[2] / "shared" / "testdata"
TIMEOUT = 10.0


def shared_data(*parts: str) -> Path:
    """A path under ../shared/testdata; skips the test when the suites are absent."""
    import pytest

    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"external test data not present: {path} (CI has ../shared/testdata)")
    return path


testdata = shared_data  # the older name


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Any, timeout: float = TIMEOUT, interval: float = 0.02,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def toml_table(header: str, values: dict[str, Any]) -> str:
    lines = [header] + [f"{k} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def tayori_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``tayori ARGS...`` (the CLI) and return what it did."""
    return subprocess.run([sys.executable, "-m", "tayori", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def which_peer(name: str) -> str:
    """Path of a peer program (swaks, smtp-source...), or skip the test."""
    import pytest

    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip(f"{name} is not installed (scripts/install-peers installs it)")
    raise AssertionError  # unreachable


OFFLINE_DNS = {"nameservers": ["127.0.0.1:9"], "timeout": "1s"}
"""A test that names no DNS gets none: nothing leaves the machine (the system's resolver
is not on loopback), and a lookup fails at once."""
NO_SENDER_CHECKS = ("[spf]\ncheck = false\n[dkim]\nverify = false\n[dmarc]\ncheck = false\n"
                    "[arc]\nverify = false\n")
"""...and checks no sender's SPF, DKIM, DMARC or ARC (they need DNS)."""


@dataclass
class Tayori:
    """A ``tayori serve`` process with its own config, spool and log under ``root``."""

    root: Path
    port: int = 0
    host: str = "127.0.0.1"
    limits: dict[str, Any] = field(default_factory=dict)
    smtp: dict[str, Any] = field(default_factory=dict)
    listen: dict[str, Any] = field(default_factory=dict)
    trusted: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    local_domains: list[str] = field(default_factory=lambda: ["tayori.test", "localhost"])
    extra: str = ""
    deliver: bool = False           # receive-only tests keep what they queued
    queue: dict[str, Any] = field(default_factory=dict)
    dns: dict[str, Any] = field(default_factory=dict)
    remote: dict[str, Any] = field(default_factory=dict)   # [actions.remote] options
    local: dict[str, Any] = field(default_factory=dict)    # [actions.local] options
    tables: dict[str, Any] = field(default_factory=dict)   # more [tables]
    hostname: str = "mx.tayori.test"
    user: str = ""
    workers: int = 0                 # 0: one per core, as in production
    process: subprocess.Popen[bytes] | None = None

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def log_path(self) -> Path:
        return self.root / "tayori.log"

    @property
    def config_path(self) -> Path:
        return self.root / "tayori.toml"

    def config_text(self) -> str:
        if not self.port:
            self.port = free_port(self.host)
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        parts = [
            f'hostname = "{self.hostname}"\nspool = "{self.spool}"\nuser = "{self.user}"\n'
            f"workers = {self.workers}\n",
            toml_table("[log]", {"level": "debug", "file": str(self.log_path)}),
            toml_table("[[listen]]", {"address": address, **self.listen}),
            toml_table("[limits]", {"drain_timeout": 5, **self.limits}),
            toml_table("[smtp]", self.smtp),
            toml_table("[queue]", {"suspended": not self.deliver, **self.queue}),
            toml_table("[dns]", self.dns or OFFLINE_DNS),
            "" if self.dns else NO_SENDER_CHECKS,
            toml_table("[tables]", {"local_domains": self.local_domains,
                                    "trusted_networks": self.trusted, **self.tables}),
            toml_table("[actions.local]", {"deliver": "maildir", "path": "mail/{domain}/{user}/",
                                           **self.local}),
            toml_table("[actions.remote]", {"deliver": "mx", **self.remote}),
            '[[match]]\nto = "local_domains"\naction = "local"\n',
            '[[match]]\nfrom = "trusted_networks"\nto = "any"\naction = "remote"\n',
            self.extra,
        ]
        return "\n".join(parts)

    def start(self) -> Tayori:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.root / "stderr.log", "ab") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tayori", "serve", "-c", str(self.config_path)],
                stdout=subprocess.DEVNULL, stderr=stderr)
        wait_for(lambda: self._started(offset), what="tayori to start")
        return self

    def _started(self, offset: int) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"tayori exited with {self.process.returncode}: "
                                 + (self.root / "stderr.log").read_text())
        if not self.log_path.exists():
            return False
        with open(self.log_path, "rb") as handle:
            handle.seek(offset)
            return b" started " in handle.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        process = self.process
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(sig)
        try:
            return process.wait(timeout)
        finally:
            self.process = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def worker_count(self) -> int:
        """How many worker processes serve (from the ``started`` log line)."""
        match = re.search(r" started .*workers=(\d+)", self.log())
        return int(match.group(1)) if match else 1

    def reloaded(self) -> bool:
        """True once every worker has reloaded its config after a SIGHUP."""
        return self.log().count(" reloaded ") >= self.worker_count()

    def envelopes(self) -> list[Envelope]:
        return list(read_envelopes(str(self.spool)))

    def body(self, queue_id: str) -> bytes:
        return (self.spool / "messages" / queue_id).read_bytes()

    def client(self, timeout: float = TIMEOUT) -> Client:
        return Client(self.host, self.port, timeout)


def strip_received(body: bytes) -> bytes:
    """The message as the client sent it: tayori's own Received header removed."""
    assert body.startswith(b"Received: "), body[:80]
    match = re.match(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", body)
    assert match
    return body[match.end():]


@dataclass
class Reply:
    code: int
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def status(self) -> str:
        return self.lines[-1].split(" ", 1)[0] if self.lines else ""

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class Client:
    """A deliberately dumb SMTP client: sends exactly the bytes it is given."""

    def __init__(self, host: str, port: int, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()

    def starttls(self, server_hostname: str = "mx.tayori.test") -> None:
        """Switch this connection to TLS (after a 220 to STARTTLS); trusts any certificate."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.file.close()
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def line(self, text: str) -> None:
        self.send(text.encode("utf-8") + b"\r\n")

    def reply(self) -> Reply:
        lines = []
        while True:
            raw = self.file.readline(4096)
            if not raw:
                raise ConnectionError("connection closed while waiting for a reply"
                                      + (f" (after {lines})" if lines else ""))
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            code, sep, rest = int(text[:3]), text[3:4], text[4:]
            lines.append(rest)
            if sep != "-":
                return Reply(code, lines)

    def cmd(self, text: str) -> Reply:
        self.line(text)
        return self.reply()

    def expect(self, code: int, text: str | None = None) -> Reply:
        reply = self.reply()
        assert reply.code == code, f"expected {code}, got {reply}"
        if text is not None:
            assert text in reply.text, f"expected {text!r} in {reply}"
        return reply

    def closed(self, timeout: float = TIMEOUT) -> bool:
        """True when the server has closed the connection (EOF within ``timeout``)."""
        self.sock.settimeout(timeout)
        try:
            return self.file.read(65536) == b"" or self.file.read(65536) == b""
        except (TimeoutError, ConnectionResetError):
            return False

    def greeting_and_ehlo(self, name: str = "client.test") -> Reply:
        self.expect(220)
        return self.expect_cmd(f"EHLO {name}", 250)

    def expect_cmd(self, text: str, code: int) -> Reply:
        reply = self.cmd(text)
        assert reply.code == code, f"{text!r}: expected {code}, got {reply}"
        return reply

    def send_message(self, sender: str, recipients: list[str], data: bytes) -> Reply:
        """MAIL, RCPT..., DATA with ``data`` (already dot-stuffed, ending CRLF)."""
        self.expect_cmd(f"MAIL FROM:<{sender}>", 250)
        for rcpt in recipients:
            self.expect_cmd(f"RCPT TO:<{rcpt}>", 250)
        self.expect_cmd("DATA", 354)
        self.send(data + b".\r\n")
        return self.reply()


def queued_id(reply: Reply) -> str:
    match = re.search(r"queued as (\w+)", reply.text)
    assert match, str(reply)
    return match.group(1)


def envelopes_by_id(tayori: Tayori) -> dict[str, Envelope]:
    return {env.queue_id: env for env in tayori.envelopes()}


@contextlib.contextmanager
def running(tayori: Tayori) -> Iterator[Tayori]:
    tayori.start()
    try:
        yield tayori
    finally:
        if tayori.process is not None:
            tayori.stop()
