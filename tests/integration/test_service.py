"""Service behaviour of a real ``tayori serve``: limits, timeouts, PROXY, a full disk,
signals (drain, reload), dropping privileges, and the command-line tools."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import Client, Tayori, envelopes_by_id, free_port, queued_id, tayori_cli, wait_for

MESSAGE = b"Subject: service\r\n\r\nhello\r\n"
MakeTayori = Callable[..., Tayori]


def test_connections_per_ip_limit(make_tayori: MakeTayori) -> None:
    server = make_tayori(limits={"max_connections_per_ip": 2})
    first, second = server.client(), server.client()
    try:
        first.expect(220)
        second.expect(220)
        with server.client() as third:
            reply = third.reply()
            assert (reply.code, reply.status) == (421, "4.7.0")
            assert third.closed()
        first.close()

        def admitted() -> bool:
            with server.client() as fourth:
                return fourth.reply().code == 220

        wait_for(admitted, what="a place to free up after the first session ended")
    finally:
        first.close()
        second.close()


def test_total_connection_limit(make_tayori: MakeTayori) -> None:
    server = make_tayori(limits={"max_connections": 1})
    with server.client() as first:
        first.expect(220)
        with server.client() as second:
            assert second.reply().code == 421


def test_idle_client_gets_421(make_tayori: MakeTayori) -> None:
    server = make_tayori(limits={"command_timeout": "300ms", "data_timeout": "300ms"})
    with server.client() as client:
        client.greeting_and_ehlo()
        reply = client.reply()  # nothing sent: the server gives up
        assert (reply.code, reply.status) == (421, "4.4.2")
        assert client.closed()
    with server.client() as client:
        client.greeting_and_ehlo()
        client.expect_cmd("MAIL FROM:<a@example.net>", 250)
        client.expect_cmd("RCPT TO:<u@tayori.test>", 250)
        client.expect_cmd("DATA", 354)
        client.send(b"Subject: slow\r\n")
        assert client.reply().code == 421  # stalled in DATA
    wait_for(lambda: not any((server.spool / "incoming").iterdir()), what="draft removal")
    assert server.envelopes() == []


def _proxy_v2(source: str, port: int) -> bytes:
    body = socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 25)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 25\r\n",
    _proxy_v2("198.51.100.7", 40000),
])
def test_proxy_protocol_sets_the_client_address(make_tayori: MakeTayori, header: bytes) -> None:
    server = make_tayori(listen={"proxy_protocol": True}, trusted=["198.51.100.0/24"])
    with server.client() as client:
        client.send(header)
        client.greeting_and_ehlo()
        queue_id = queued_id(client.send_message("a@example.net", ["far@example.com"], MESSAGE))
    assert b"([198.51.100.7])" in server.body(queue_id)
    assert envelopes_by_id(server)[queue_id].client_address == "198.51.100.7"
    assert "client=[198.51.100.7]:40000" in server.log()


def test_proxy_protocol_garbage_is_dropped(make_tayori: MakeTayori) -> None:
    server = make_tayori(listen={"proxy_protocol": True})
    with server.client() as client:
        client.send(b"EHLO not-a-proxy\r\n")
        assert client.closed()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                            capture_output=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_gives_452_and_recovers(small_disk: Path) -> None:
    server = Tayori(small_disk / "tayori", limits={"max_message_size": "20M"}).start()
    try:
        big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 4000  # 4 MB > 3 MB disk
        with server.client() as client:
            client.greeting_and_ehlo()
            reply = client.send_message("a@example.net", ["u@tayori.test"], big)
            assert (reply.code, reply.status) == (452, "4.3.1")
            client.expect_cmd("NOOP", 250)  # the session goes on
            # space returned (the failed draft is gone): mail is accepted again
            reply = client.send_message("a@example.net", ["u@tayori.test"], MESSAGE)
            assert reply.code == 250
        assert len(server.envelopes()) == 1
        assert "spool write failed" in server.log()
    finally:
        server.stop()


def test_sigterm_drains_running_sessions(make_tayori: MakeTayori) -> None:
    server = make_tayori()
    with server.client() as client:
        client.greeting_and_ehlo()
        client.expect_cmd("MAIL FROM:<a@example.net>", 250)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining" in server.log(), what="drain to start")
        with pytest.raises(OSError):
            Client(server.host, server.port, timeout=2)  # no longer accepting
        client.expect_cmd("RCPT TO:<u@tayori.test>", 250)
        client.expect_cmd("DATA", 354)
        client.send(MESSAGE + b".\r\n")
        queue_id = queued_id(client.expect(250))
        client.expect_cmd("QUIT", 221)
    assert server.process.wait(30) == 0
    server.process = None
    assert queue_id in envelopes_by_id(server)


def test_drain_timeout_closes_idle_sessions_with_421(make_tayori: MakeTayori) -> None:
    server = make_tayori(limits={"drain_timeout": "500ms"})
    with server.client() as client:
        client.greeting_and_ehlo()
        assert server.stop() == 0
        reply = client.reply()
        assert (reply.code, reply.status) == (421, "4.3.2")


def test_sighup_reloads_and_keeps_old_config_when_invalid(make_tayori: MakeTayori) -> None:
    server = make_tayori(limits={"max_recipients": 5})
    assert server.process is not None
    server.limits = {"max_recipients": 1}
    server.config_path.write_text(server.config_text())
    server.process.send_signal(signal.SIGHUP)
    wait_for(server.reloaded, what="every worker to reload")
    with server.client() as client:
        client.greeting_and_ehlo()
        client.expect_cmd("MAIL FROM:<a@example.net>", 250)
        client.expect_cmd("RCPT TO:<u@tayori.test>", 250)
        assert client.cmd("RCPT TO:<v@tayori.test>").code == 452
    server.config_path.write_text("[limits]\nmax_recipients = -3\n")
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload-failed" in server.log(), what="reload failure")
    assert "max_recipients" in server.log()
    with server.client() as client:  # still serving, with the previous config
        client.greeting_and_ehlo()
        client.expect_cmd("MAIL FROM:<a@example.net>", 250)
        client.expect_cmd("RCPT TO:<u@tayori.test>", 250)
        assert client.cmd("RCPT TO:<v@tayori.test>").code == 452


def test_binds_port_25_then_drops_privileges() -> None:
    if os.geteuid() != 0:
        pytest.skip("binding port 25 and changing user needs root")
    nobody = pwd.getpwnam("nobody")
    root = Path(tempfile.mkdtemp(prefix="tayori-priv-"))  # traversable by nobody
    root.chmod(0o755)
    server = Tayori(root, host="127.0.0.25", port=25, user="nobody").start()
    try:
        assert server.process is not None
        status = Path(f"/proc/{server.process.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(nobody.pw_uid)] * 4
        assert "privileges-dropped user=nobody" in server.log()
        with server.client() as client:
            client.greeting_and_ehlo()
            assert client.send_message("a@example.net", ["u@tayori.test"], MESSAGE).code == 250
        assert (server.spool / "messages").stat().st_uid == nobody.pw_uid
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(f'[[listen]]\naddress = "127.0.0.1:{free_port()}"\n')
    result = tayori_cli("check-config", "-c", str(good))
    assert result.returncode == 0 and "OK" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[[listen]]\naddress = "127.0.0.1:25"\n[limits]\nmax_message_size = "5X"\n')
    result = tayori_cli("check-config", "-c", str(bad))
    assert result.returncode == 1
    assert f"{bad}: limits.max_message_size:" in result.stderr
    assert "allowed:" in result.stderr and "Traceback" not in result.stderr
    result = tayori_cli("check-config", "-c", str(tmp_path / "missing.toml"))
    assert result.returncode == 1 and "cannot read" in result.stderr
    assert tayori_cli("check-config").returncode == 0  # the embedded default


def test_serve_reports_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "t.toml"
        config.write_text(f'spool = "spool"\n[[listen]]\naddress = "127.0.0.1:{port}"\n')
        result = tayori_cli("serve", "-c", str(config))
    assert result.returncode == 1
    assert "cannot listen" in result.stderr and "Traceback" not in result.stderr


def test_queue_list_and_show(tayori: Tayori) -> None:
    with tayori.client() as client:
        client.greeting_and_ehlo()
        client.expect_cmd("MAIL FROM:<a@example.net> RET=HDRS", 250)
        client.expect_cmd("RCPT TO:<u@tayori.test> NOTIFY=FAILURE", 250)
        client.expect_cmd("DATA", 354)
        client.send(b"Subject: listed\r\nMessage-ID: <m1@example.net>\r\n\r\nx\r\n.\r\n")
        queue_id = queued_id(client.expect(250))
    config = str(tayori.config_path)
    listing = tayori_cli("queue", "list", "-c", config)
    assert listing.returncode == 0 and queue_id in listing.stdout and "a@example.net" in \
        listing.stdout
    as_json = tayori_cli("queue", "list", "--json", "-c", config)
    assert f'"queue_id": "{queue_id}"' in as_json.stdout
    show = tayori_cli("queue", "show", queue_id, "-c", config)
    assert show.returncode == 0
    assert "NOTIFY=FAILURE" in show.stdout and "Subject: listed" in show.stdout
    assert "RET=HDRS" in show.stdout
    missing = tayori_cli("queue", "show", "NOSUCHID", "-c", config)
    assert missing.returncode == 1 and "no message" in missing.stderr
    assert "message_id=<m1@example.net>" in tayori.log()


def test_a_second_tayori_on_the_same_spool_is_refused(tayori: Tayori, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text(tayori.config_text().replace(str(tayori.port), str(free_port())))
    result = tayori_cli("serve", "-c", str(other))
    assert result.returncode == 1
    assert "in use by another tayori" in result.stderr
