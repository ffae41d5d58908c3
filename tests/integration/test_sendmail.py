"""The sendmail command against a running tayori: -t as cron and PHP call it, -f, Bcc,
the dot rule, -bs, mailq, -q, newaliases, and the errors with their sysexits codes.

Tests marked ``needs_pickup`` wait for the daemon to take the message from the maildrop
into the queue; they are skipped while the queue manager does not call
``maildrop.pickup``. The others need no daemon at all, or only its queue.
"""

from __future__ import annotations

import inspect
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import TIMEOUT, Tayori, wait_for
from tayori.queue import maildrop
from tayori.queue.spool import Envelope


def _pickup_wired() -> bool:
    from tayori.queue import manager

    return re.search(r"maildrop\.pickup\(|\bpickup\(", inspect.getsource(manager)) is not None


needs_pickup = pytest.mark.skipif(
    not _pickup_wired(),
    reason="the daemon does not pick up the maildrop yet (tayori.queue.manager has no "
           "maildrop.pickup call)")

CONFIG = """\
hostname = "mx.sendmail.test"
spool = "spool"
[limits]
max_message_size = "{size}"
[[listen]]
address = "127.0.0.1:2525"
[tables]
local_domains = ["sendmail.test"]
[actions.local]
deliver = "maildir"
path = "mail/{{domain}}/{{user}}/"
[[match]]
to = "local_domains"
action = "local"
"""


def run_sendmail(*args: str, data: bytes = b"", stdin: int | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    environment = {k: v for k, v in os.environ.items() if k != "TAYORI_CONFIG"}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "tayori", "sendmail", *args],
                          input=None if stdin is not None else data, stdin=stdin,
                          capture_output=True, timeout=60, check=False, env=environment)


def standalone(tmp_path: Path, size: str = "1M", ensure: bool = True) -> str:
    """A config (and maildrop) with no daemon: for the errors."""
    path = tmp_path / "tayori.toml"
    path.write_text(CONFIG.format(size=size))
    if ensure:
        maildrop.ensure(str(tmp_path / "spool"))
    return str(path)


def one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    text = result.stderr.decode()
    assert "Traceback" not in text
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sendmail: "), text
    return lines[0]


def queued_one(tayori: Tayori, count: int = 1) -> list[Envelope]:
    return wait_for(lambda: len(tayori.envelopes()) >= count and tayori.envelopes(),
                    what="the daemon to pick the message up")


def head(body: bytes) -> list[str]:
    return body.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")


def field(body: bytes, name: str) -> list[str]:
    return [line for line in head(body) if line.lower().startswith(name.lower() + ":")]


# --- as programs call it -----------------------------------------------------------------


@needs_pickup
def test_php_style_t_reads_recipients_and_removes_bcc(tayori: Tayori) -> None:
    message = (b"To: Bob <bob@tayori.test>\nCc: carol@tayori.test\nBcc: secret@tayori.test\n"
               b"Subject: from PHP\n\nHello.\n.\nStill the message with -i.\n")
    result = run_sendmail("-C", str(tayori.config_path), "-t", "-i", data=message)
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == b""
    (env,) = queued_one(tayori)
    assert [r.address for r in env.recipients] == [
        "bob@tayori.test", "carol@tayori.test", "secret@tayori.test"]
    assert env.protocol == "local"
    body = tayori.body(env.queue_id)
    assert body.startswith(b"Received: by mx.tayori.test (tayori, from userid ")
    assert b"secret" not in body and not field(body, "Bcc")
    assert field(body, "Message-ID") == [f"Message-ID: <{env.queue_id}@mx.tayori.test>"]
    assert len(field(body, "Date")) == 1
    (from_line,) = field(body, "From")
    assert from_line.endswith("@mx.tayori.test>") or from_line.endswith("@mx.tayori.test")
    assert body.endswith(b"\r\n\r\nHello.\r\n.\r\nStill the message with -i.\r\n")


@needs_pickup
def test_a_local_user_cannot_bring_our_authentication_results(tayori: Tayori) -> None:
    message = (b"Authentication-Results: mx.tayori.test; dkim=pass header.d=bank.example\n"
               b"Authentication-Results: other.example; spf=pass smtp.mailfrom=x.example\n"
               b"From: a@tayori.test\nTo: bob@tayori.test\nSubject: forged\n\nbody\n")
    assert run_sendmail("-C", str(tayori.config_path), "-t", data=message).returncode == 0
    (env,) = queued_one(tayori)
    body = tayori.body(env.queue_id)
    assert field(body, "Authentication-Results") == [
        "Authentication-Results: other.example; spf=pass smtp.mailfrom=x.example"]
    assert body.startswith(b"Received: by mx.tayori.test (tayori, from userid ")
    assert body.endswith(b"\r\n\r\nbody\r\n")


@needs_pickup
def test_cron_style_invocation(tayori: Tayori) -> None:
    # cron: sendmail -FCronDaemon -i -B8BITMIME -oem USER, with its own header fields
    message = (b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> date\n"
               b"Content-Type: text/plain; charset=UTF-8\n\nMon Jan  1 00:00:00 UTC 2024\n")
    result = run_sendmail("-C", str(tayori.config_path), "-FCronDaemon", "-i", "-B8BITMIME",
                          "-oem", "root", data=message)
    assert result.returncode == 0, result.stderr
    (env,) = queued_one(tayori)
    assert [r.address for r in env.recipients] == ["root@mx.tayori.test"]
    body = tayori.body(env.queue_id)
    assert field(body, "From") == ["From: root (Cron Daemon)"]      # kept, not added
    assert b"for <root@mx.tayori.test>;" in body


@needs_pickup
def test_f_sets_the_envelope_sender_and_f_name_the_from(tayori: Tayori) -> None:
    result = run_sendmail("-C", str(tayori.config_path), "-f", "bounces@tayori.test",
                          "-F", "Build Robot", "dev@tayori.test", data=b"Subject: ci\n\nok\n")
    assert result.returncode == 0, result.stderr
    (env,) = queued_one(tayori)
    assert env.sender == "bounces@tayori.test"
    assert field(tayori.body(env.queue_id), "From") == [
        "From: Build Robot <bounces@tayori.test>"]


@needs_pickup
def test_without_i_a_lone_dot_ends_the_message(tayori: Tayori) -> None:
    result = run_sendmail("-C", str(tayori.config_path), "-fme@tayori.test", "bob@tayori.test",
                          data=b"Subject: dots\n\nfirst\n..\n.\nnot sent\n")
    assert result.returncode == 0, result.stderr
    (env,) = queued_one(tayori)
    assert tayori.body(env.queue_id).endswith(b"\r\n\r\nfirst\r\n..\r\n")


@needs_pickup
def test_queued_when_the_daemon_starts_later(make_tayori: Callable[..., Tayori],
                                             tmp_path: Path) -> None:
    server = make_tayori()
    server.stop()
    result = run_sendmail("-C", str(server.config_path), "bob@tayori.test",
                          data=b"Subject: waited\n\nx\n")
    assert result.returncode == 0, result.stderr
    assert maildrop.waiting(str(server.spool)) == 1
    server.start()
    (env,) = queued_one(server)
    assert maildrop.waiting(str(server.spool)) == 0
    assert field(server.body(env.queue_id), "Subject") == ["Subject: waited"]


# --- -bs ---------------------------------------------------------------------------------


class Pipe:
    """sendmail -bs as a child process, spoken to one command at a time."""

    def __init__(self, config: Path) -> None:
        environment = {k: v for k, v in os.environ.items() if k != "TAYORI_CONFIG"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tayori", "sendmail", "-C", str(config), "-bs"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=environment)
        self._buffer = b""

    def reply(self) -> tuple[int, str]:
        assert self.process.stdout is not None
        lines = []
        deadline = time.monotonic() + TIMEOUT
        while True:
            while b"\r\n" not in self._buffer:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([self.process.stdout], [], [], max(left, 0))
                if not ready:
                    raise AssertionError(f"no reply from sendmail -bs (so far {lines})")
                data = os.read(self.process.stdout.fileno(), 4096)
                if not data:
                    raise AssertionError(f"sendmail -bs closed its output (after {lines})")
                self._buffer += data
            line, self._buffer = self._buffer.split(b"\r\n", 1)
            text = line.decode()
            lines.append(text)
            if text[3:4] != "-":
                return int(text[:3]), "\n".join(lines)

    def send(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def cmd(self, line: str, code: int) -> str:
        self.send(line.encode() + b"\r\n")
        got, text = self.reply()
        assert got == code, f"{line!r}: expected {code}, got {text}"
        return text

    def close(self) -> int:
        if self.process.stdin is not None:
            self.process.stdin.close()
        status = self.process.wait(TIMEOUT)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        return status


def test_bs_dialog(tayori: Tayori) -> None:
    maildrop.ensure(str(tayori.spool))      # the daemon makes it too, once wired
    session = Pipe(tayori.config_path)
    try:
        code, greeting = session.reply()
        assert code == 220 and "mx.tayori.test" in greeting
        ehlo = session.cmd("EHLO app.local", 250)
        assert "PIPELINING" in ehlo and "SIZE" in ehlo and "STARTTLS" not in ehlo
        session.cmd("MAIL FROM:<app@tayori.test>", 250)
        session.cmd("RCPT TO:<bob@tayori.test>", 250)
        session.cmd("RCPT TO:<not an address>", 501)
        session.cmd("DATA", 354)
        session.send(b"Subject: -bs\r\n\r\n..leading dot\r\n.\r\n")
        code, text = session.reply()
        assert code == 250, text
        drop_id = re.search(r"queued as (\w+)", text)
        assert drop_id
        session.cmd("NOOP", 250)
        session.cmd("QUIT", 221)
    finally:
        status = session.close()
    assert status == 0
    queue_id = drop_id.group(1)
    if _pickup_wired():
        env = wait_for(lambda: {e.queue_id: e for e in tayori.envelopes()}.get(queue_id),
                       what="the -bs message to be queued")
        assert env.sender == "app@tayori.test"
        assert [r.address for r in env.recipients] == ["bob@tayori.test"]
        assert tayori.body(queue_id).endswith(b"\r\n\r\n.leading dot\r\n")
        assert env.helo == "app.local"
    else:
        drop_file = tayori.spool / "maildrop" / f"D{queue_id}"
        assert drop_file.read_bytes().endswith(b"\n.leading dot\r\n")


def test_bs_with_bare_lf_and_eof_without_quit(tayori: Tayori) -> None:
    maildrop.ensure(str(tayori.spool))
    result = run_sendmail("-C", str(tayori.config_path), "-bs", data=(
        b"HELO me\nMAIL FROM:<>\nRCPT TO:<bob@tayori.test>\nDATA\nx\n.\n"))
    assert result.returncode == 0
    codes = [line[:3] for line in result.stdout.decode().split("\r\n") if line]
    assert codes == ["220", "250", "250", "250", "354", "250"], result.stdout


# --- mailq, -q, newaliases ---------------------------------------------------------------


def test_mailq_lists_the_queue(tayori: Tayori) -> None:
    empty = run_sendmail("-C", str(tayori.config_path), "-bp")
    assert empty.returncode == 0, empty.stderr
    assert b"Queue is empty." in empty.stdout
    with tayori.client() as client:
        client.greeting_and_ehlo()
        reply = client.send_message("alice@tayori.test", ["bob@tayori.test"],
                                    b"Subject: q\r\n\r\nx\r\n")
        assert reply.code == 250
    queue_id = re.search(r"queued as (\w+)", reply.text)
    assert queue_id
    listing = run_sendmail("-C", str(tayori.config_path), "-bp")
    assert listing.returncode == 0
    assert queue_id.group(1).encode() in listing.stdout
    assert b"bob@tayori.test" in listing.stdout
    # the mailq console script is the same thing
    script = subprocess.run(
        [sys.executable, "-c", "import sys; from tayori.sendmail import mailq_main; "
                               "sys.exit(mailq_main())", "-C", str(tayori.config_path)],
        capture_output=True, timeout=60, check=False)
    assert script.returncode == 0 and queue_id.group(1).encode() in script.stdout


def test_mailq_counts_the_maildrop(tmp_path: Path) -> None:
    config = standalone(tmp_path)
    assert run_sendmail("-C", config, "bob@sendmail.test", data=b"x\n").returncode == 0
    listing = run_sendmail("-C", config, "-bp")
    assert listing.returncode == 0
    assert b"1 message(s) in the maildrop" in listing.stdout


def test_q_flushes_the_queue(tayori: Tayori) -> None:
    with tayori.client() as client:
        client.greeting_and_ehlo()
        assert client.send_message("a@tayori.test", ["b@tayori.test"], b"x\r\n").code == 250
    result = run_sendmail("-C", str(tayori.config_path), "-q")
    assert result.returncode == 0, result.stderr
    assert b"due now" in result.stdout


def test_newaliases_has_nothing_to_do() -> None:
    for args in (["-bi"], ["-I"]):
        result = run_sendmail(*args)
        assert result.returncode == 0
        assert b"reloads them" in result.stdout
    script = subprocess.run([sys.executable, "-c", "import sys; from tayori.sendmail import "
                             "newaliases_main; sys.exit(newaliases_main())"],
                            capture_output=True, timeout=60, check=False)
    assert script.returncode == 0 and b"nothing to do" in script.stdout


# --- errors and exit codes -----------------------------------------------------------


def test_no_recipients_is_64(tmp_path: Path) -> None:
    config = standalone(tmp_path)
    result = run_sendmail("-C", config, data=b"Subject: x\n\ny\n")
    assert result.returncode == 64
    assert "no recipients" in one_line_error(result)
    result = run_sendmail("-C", config, "-t", data=b"Subject: no To\n\ny\n")
    assert result.returncode == 64
    assert "no recipients" in one_line_error(result)
    assert maildrop.waiting(str(tmp_path / "spool")) == 0


def test_bad_options_are_64(tmp_path: Path) -> None:
    config = standalone(tmp_path)
    for args in (["-Z", "bob@sendmail.test"], ["bob@sendmail.test", "-f"], ["-bd"]):
        result = run_sendmail("-C", config, *args, data=b"x\n")
        assert result.returncode == 64, args
        one_line_error(result)


def test_ignored_legacy_options_are_accepted(tmp_path: Path) -> None:
    config = standalone(tmp_path)
    result = run_sendmail("-C", config, "-oem", "-oee", "-odb", "-odi", "-oQ/var/spool/x", "-B",
                          "8BITMIME", "-N", "never", "-R", "hdrs", "-V", "envid", "-X", "/tmp/l",
                          "-oi", "-v", "-U", "bob@sendmail.test", data=b"x\n")
    assert result.returncode == 0, result.stderr
    assert b"queued as" in result.stderr        # -v
    assert maildrop.waiting(str(tmp_path / "spool")) == 1


@pytest.mark.parametrize("args", [
    ["bad@@address.test"], ["-f", "also bad@@x", "bob@sendmail.test"],
    ["-t"],   # with a bad To
])
def test_a_bad_address_is_65(tmp_path: Path, args: list[str]) -> None:
    config = standalone(tmp_path)
    result = run_sendmail("-C", config, *args, data=b"To: a@@b.test\n\nx\n")
    assert result.returncode == 65
    assert "bad" in one_line_error(result)
    assert maildrop.waiting(str(tmp_path / "spool")) == 0


def test_too_big_is_65(tmp_path: Path) -> None:
    config = standalone(tmp_path, size="1K")
    result = run_sendmail("-C", config, "-i", "bob@sendmail.test", data=b"y" * 2000 + b"\n")
    assert result.returncode == 65
    assert "too big" in one_line_error(result)
    assert os.listdir(tmp_path / "spool" / "maildrop") == []


def test_unroutable_recipient_is_67(tmp_path: Path) -> None:
    config = standalone(tmp_path)
    result = run_sendmail("-C", config, "bob@sendmail.test", "far@elsewhere.test", data=b"x\n")
    assert result.returncode == 67
    assert "far@elsewhere.test" in one_line_error(result)
    assert maildrop.waiting(str(tmp_path / "spool")) == 0


def test_unreadable_stdin_is_66(tmp_path: Path) -> None:
    config = standalone(tmp_path)
    write_only = os.open(str(tmp_path / "sink"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        result = run_sendmail("-C", config, "bob@sendmail.test", stdin=write_only)
    finally:
        os.close(write_only)
    assert result.returncode == 66
    assert "standard input" in one_line_error(result)
    closed = subprocess.run(
        [sys.executable, "-m", "tayori", "sendmail", "-C", config, "bob@sendmail.test"],
        stdin=subprocess.DEVNULL, preexec_fn=lambda: os.close(0),
        capture_output=True, timeout=60, check=False)
    assert closed.returncode == 66
    assert "standard input" in one_line_error(closed)
    assert maildrop.waiting(str(tmp_path / "spool")) == 0


def test_missing_maildrop_is_75(tmp_path: Path) -> None:
    config = standalone(tmp_path, ensure=False)
    result = run_sendmail("-C", config, "bob@sendmail.test", data=b"x\n")
    assert result.returncode == 75
    assert "does not exist" in one_line_error(result)


@pytest.mark.parametrize("problem", ["missing", "syntax", "invalid"])
def test_bad_config_is_78(tmp_path: Path, problem: str) -> None:
    path = tmp_path / "tayori.toml"
    if problem == "syntax":
        path.write_text("hostname = \n")
    elif problem == "invalid":
        path.write_text('hostname = "x"\n')       # no listener
    result = run_sendmail("-C", str(path), "bob@sendmail.test", data=b"x\n")
    assert result.returncode == 78
    assert "configuration error" in one_line_error(result)
    env_result = run_sendmail("bob@sendmail.test", data=b"x\n",
                              env={"TAYORI_CONFIG": str(path)})
    assert env_result.returncode == 78


def test_unknown_local_user_is_67(tayori: Tayori, tmp_path: Path) -> None:
    """With a users table, a local recipient that does not exist is refused at once."""
    (tmp_path / "users").write_text("bob\n")
    config = tmp_path / "users.toml"
    config.write_text(tayori.config_path.read_text().replace(
        '[actions.local]\n', '[actions.local]\nusers = "users"\n').replace(
        '[tables]\n', f'[tables]\nusers = {{ file = "{tmp_path / "users"}" }}\n'))
    result = run_sendmail("-C", str(config), "nobody@tayori.test", data=b"x\n")
    assert result.returncode == 67
    assert "no such local user" in one_line_error(result)
    assert run_sendmail("-C", str(config), "bob@tayori.test", data=b"x\n").returncode == 0
