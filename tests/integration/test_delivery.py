"""Delivery end to end: a running tayori, a DNS stub on loopback, MX hosts on 127.0.0.x:25.

Each test starts tayori with delivery on, its resolver pointed at a dnslib stub that
serves the test's zone, and scriptable SMTP peers (tayori.testing.peer) as the MX hosts
on other loopback addresses, port 25 (root, as in CI). Retries use a one-second
schedule: what is checked is the sequence of outcomes, never a timing.
"""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from delivery_helpers import can_bind_25
from harness import Tayori, free_port, queued_id, tayori_cli, wait_for
from tayori.errors import Reply
from tayori.smtp.server import EXTENSIONS_ALL
from tayori.testing.dnsstub import DnsStub
from tayori.testing.peer import SmtpPeer

MESSAGE = (b"From: Alice <alice@sender.test>\r\nTo: bob@dest.test\r\nSubject: hello\r\n"
           b"Message-ID: <m1@sender.test>\r\n\r\nHello Bob.\r\n.dotted line\r\n")


pytestmark = pytest.mark.skipif(not can_bind_25("127.0.0.2"),
                                reason="MX hosts listen on 127.0.0.x:25, which needs root")


@pytest.fixture
def peers() -> Iterator[Callable[..., SmtpPeer]]:
    with ExitStack() as stack:
        def make(host: str, **options: Any) -> SmtpPeer:
            return stack.enter_context(SmtpPeer(host, 25, **options))
        yield make


ZONE: dict[str, Any] = {
    "dest.test": {"MX": [(10, "mx1.dest.test"), (20, "mx2.dest.test")]},
    "mx1.dest.test": {"A": ["127.0.0.2"]},
    "mx2.dest.test": {"A": ["127.0.0.3"]},
    "sender.test": {"MX": [(10, "mx.sender.test")]},
    "mx.sender.test": {"A": ["127.0.0.4"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "broken.test": "SERVFAIL",
    "self.test": {"MX": [(10, "mx.tayori.test")]},
    "mx.tayori.test": {"A": ["127.0.0.9"]},
}


@pytest.fixture
def dns() -> Iterator[DnsStub]:
    with DnsStub(ZONE, ttl=1, negative_ttl=1) as stub:
        yield stub


@pytest.fixture
def mta(make_tayori: Callable[..., Tayori], dns: DnsStub) -> Callable[..., Tayori]:
    host, port = dns.address

    def make(**options: Any) -> Tayori:
        queue = {"retry": ["1s"], **options.pop("queue", {})}
        return make_tayori(deliver=True, dns={"nameservers": [f"{host}:{port}"],
                                              "timeout": "2s"},
                           queue=queue, remote={"tls": "none"}, **options)
    return make


def submit(tayori: Tayori, recipients: list[str], *, sender: str = "alice@sender.test",
           message: bytes = MESSAGE, mail_params: str = "",
           rcpt_params: str = "") -> str:
    with tayori.client() as client:
        client.greeting_and_ehlo()
        client.expect_cmd(f"MAIL FROM:<{sender}>{mail_params}", 250)
        for rcpt in recipients:
            client.expect_cmd(f"RCPT TO:<{rcpt}>{rcpt_params}", 250)
        client.expect_cmd("DATA", 354)
        client.send(message.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        return queued_id(client.reply())


def queue_empty(tayori: Tayori) -> bool:
    return not tayori.envelopes()


def body_of(received: bytes) -> bytes:
    """The message without tayori's Received header (the first field)."""
    assert received.startswith(b"Received: ")
    end = received.index(b"\r\n", 0)
    while received[end + 2:end + 3] in (b" ", b"\t"):
        end = received.index(b"\r\n", end + 2)
    return received[end + 2:]


def test_delivered_to_primary_mx_byte_identical(mta: Callable[..., Tayori],
                                                peers: Callable[..., SmtpPeer]) -> None:
    mx1 = peers("127.0.0.2")
    tayori = mta()
    queue_id = submit(tayori, ["bob@dest.test", "carol@dest.test"])
    [got] = mx1.wait_for_messages(1)
    assert got.sender == "alice@sender.test"
    assert got.recipients == ("bob@dest.test", "carol@dest.test")  # one shared attempt
    assert body_of(got.data) == MESSAGE
    wait_for(lambda: queue_empty(tayori), what="the queue to empty")
    log = tayori.log()
    assert f"delivered queue_id={queue_id}" in log and "mx1.dest.test[127.0.0.2]:25" in log


def test_primary_down_secondary_gets_it(mta: Callable[..., Tayori],
                                        peers: Callable[..., SmtpPeer]) -> None:
    mx2 = peers("127.0.0.3")
    tayori = mta()
    submit(tayori, ["bob@dest.test"])
    [got] = mx2.wait_for_messages(1)
    assert got.recipients == ("bob@dest.test",)
    assert "connect-failed" in tayori.log()


def test_primary_greeting_421_secondary_gets_it(mta: Callable[..., Tayori],
                                                peers: Callable[..., SmtpPeer]) -> None:
    peers("127.0.0.2", greeting=Reply(421, "4.3.2", "busy"))
    mx2 = peers("127.0.0.3")
    tayori = mta()
    submit(tayori, ["bob@dest.test"])
    mx2.wait_for_messages(1)


def test_all_down_deferred_then_delivered(mta: Callable[..., Tayori],
                                          peers: Callable[..., SmtpPeer]) -> None:
    tayori = mta()
    queue_id = submit(tayori, ["bob@dest.test"])
    wait_for(lambda: "deferred queue_id=" + queue_id in tayori.log(), what="a deferral")
    [env] = tayori.envelopes()
    assert env.recipients[0].state in ("deferred", "inflight", "queued")
    mx1 = peers("127.0.0.2")
    [got] = mx1.wait_for_messages(1)
    assert got.recipients == ("bob@dest.test",)
    wait_for(lambda: queue_empty(tayori), what="the queue to empty")


def test_soft_then_success(mta: Callable[..., Tayori], peers: Callable[..., SmtpPeer]) -> None:
    answers = [Reply(451, "4.3.0", "try later")]
    mx1 = peers("127.0.0.2", rcpt_reply=lambda address: answers.pop() if answers else None)
    tayori = mta()
    queue_id = submit(tayori, ["bob@dest.test"])
    [got] = mx1.wait_for_messages(1)
    log = tayori.log()
    assert f"deferred queue_id={queue_id}" in log
    assert got.recipients == ("bob@dest.test",)


def dsn_of(peer: SmtpPeer, count: int = 1) -> email.message.EmailMessage:
    messages = [m for m in peer.wait_for_messages(count) if m.sender == ""]
    assert messages, "no DSN arrived"
    parsed = email.message_from_bytes(messages[-1].data, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def test_hard_failure_bounces_with_dsn(mta: Callable[..., Tayori],
                                       peers: Callable[..., SmtpPeer]) -> None:
    def refuse(address: str) -> Reply | None:
        return Reply(550, "5.1.1", "no such user here") if address.startswith("bob") else None

    mx1 = peers("127.0.0.2", rcpt_reply=refuse)
    sender_mx = peers("127.0.0.4")
    tayori = mta()
    queue_id = submit(tayori, ["bob@dest.test", "carol@dest.test"],
                      rcpt_params=" ORCPT=rfc822;orig+2Bbob@dest.test")
    [delivered] = mx1.wait_for_messages(1)
    assert delivered.recipients == ("carol@dest.test",)
    dsn = dsn_of(sender_mx)
    [envelope] = [m for m in sender_mx.messages if m.sender == ""]
    assert envelope.recipients == ("alice@sender.test",)
    assert dsn["Auto-Submitted"] == "auto-replied"
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    human, status, original = dsn.iter_parts()
    assert "bob@dest.test" in human.get_content() and "no such user here" in human.get_content()
    fields = status.get_payload()
    assert fields[0]["Reporting-MTA"] == "dns; mx.tayori.test"
    assert fields[0]["X-Tayori-Queue-ID"] == queue_id
    [bob] = fields[1:]
    assert bob["Final-Recipient"] == "rfc822; bob@dest.test"
    assert bob["Original-Recipient"] == "rfc822; orig+bob@dest.test"
    assert bob["Action"] == "failed" and bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.dest.test"
    assert "550 5.1.1 no such user here" in bob["Diagnostic-Code"]
    assert original.get_content_type() == "message/rfc822"
    assert b"Hello Bob." in original.as_bytes()
    wait_for(lambda: queue_empty(tayori), what="the queue to empty")
    assert f"bounced queue_id={queue_id}" in tayori.log()


def test_no_dsn_for_null_sender_nor_notify_never(mta: Callable[..., Tayori],
                                                  peers: Callable[..., SmtpPeer]) -> None:
    peers("127.0.0.2", rcpt_reply=lambda address: Reply(550, "5.1.1", "unknown"))
    sender_mx = peers("127.0.0.4")
    tayori = mta()
    null = submit(tayori, ["bob@dest.test"], sender="")
    never = submit(tayori, ["bob@dest.test"], rcpt_params=" NOTIFY=NEVER")
    wait_for(lambda: queue_empty(tayori), what="both to bounce")
    log = tayori.log()
    assert f"bounced queue_id={null}" in log and f"bounced queue_id={never}" in log
    assert "dsn-dropped" in log
    assert sender_mx.transactions == []


def test_null_mx_bounces_at_once(mta: Callable[..., Tayori],
                                 peers: Callable[..., SmtpPeer]) -> None:
    sender_mx = peers("127.0.0.4")
    tayori = mta()
    submit(tayori, ["bob@nullmx.test"])
    dsn = dsn_of(sender_mx)
    [recipient] = dsn.get_payload()[1].get_payload()[1:]
    assert recipient["Status"] == "5.1.10"


def test_nxdomain_bounces(mta: Callable[..., Tayori], peers: Callable[..., SmtpPeer]) -> None:
    sender_mx = peers("127.0.0.4")
    tayori = mta()
    submit(tayori, ["bob@nowhere.test"])
    [recipient] = dsn_of(sender_mx).get_payload()[1].get_payload()[1:]
    assert recipient["Status"] == "5.1.2"


def test_servfail_defers_never_bounces(mta: Callable[..., Tayori],
                                       peers: Callable[..., SmtpPeer]) -> None:
    sender_mx = peers("127.0.0.4")
    tayori = mta()
    queue_id = submit(tayori, ["bob@broken.test"])
    wait_for(lambda: tayori.log().count(f"deferred queue_id={queue_id}") >= 2,
             what="two deferrals")
    assert "4.4.3" in tayori.log()
    assert sender_mx.transactions == []
    assert [r.state for r in tayori.envelopes()[0].recipients] != ["bounced"]


def test_mx_pointing_to_ourselves_is_a_loop(mta: Callable[..., Tayori],
                                            peers: Callable[..., SmtpPeer]) -> None:
    sender_mx = peers("127.0.0.4")
    tayori = mta()
    submit(tayori, ["bob@self.test"])
    [recipient] = dsn_of(sender_mx).get_payload()[1].get_payload()[1:]
    assert recipient["Status"] == "5.4.6"


def test_expiry_gives_a_dsn(mta: Callable[..., Tayori], peers: Callable[..., SmtpPeer]) -> None:
    sender_mx = peers("127.0.0.4")
    tayori = mta(queue={"lifetime": "3s"})
    queue_id = submit(tayori, ["bob@dest.test"])
    dsn = dsn_of(sender_mx)
    [recipient] = dsn.get_payload()[1].get_payload()[1:]
    assert recipient["Action"] == "failed" and recipient["Status"].startswith("4.")
    assert f"expired queue_id={queue_id}" in tayori.log()


def test_peer_without_dsn_relayed_notice(mta: Callable[..., Tayori],
                                         peers: Callable[..., SmtpPeer]) -> None:
    extensions = tuple(e for e in EXTENSIONS_ALL if e != "DSN")
    mx1 = peers("127.0.0.2", extensions=extensions)
    sender_mx = peers("127.0.0.4")
    tayori = mta()
    submit(tayori, ["bob@dest.test"], rcpt_params=" NOTIFY=SUCCESS,FAILURE")
    [got] = mx1.wait_for_messages(1)
    assert "NOTIFY" not in got.rcpt_params[0]
    [recipient] = dsn_of(sender_mx).get_payload()[1].get_payload()[1:]
    assert recipient["Action"] == "relayed"


def test_dsn_parameters_passed_on(mta: Callable[..., Tayori],
                                  peers: Callable[..., SmtpPeer]) -> None:
    mx1 = peers("127.0.0.2")
    sender_mx = peers("127.0.0.4")
    tayori = mta()
    submit(tayori, ["bob@dest.test"], mail_params=" RET=HDRS ENVID=abc+2B1",
           rcpt_params=" NOTIFY=SUCCESS ORCPT=rfc822;bob@dest.test")
    [got] = mx1.wait_for_messages(1)
    assert "RET=HDRS" in got.mail_params and "ENVID=abc+2B1" in got.mail_params
    assert "NOTIFY=SUCCESS" in got.rcpt_params[0]
    assert "ORCPT=rfc822;bob@dest.test" in got.rcpt_params[0]
    wait_for(lambda: queue_empty(tayori), what="the queue to empty")
    assert sender_mx.transactions == []


def test_queue_commands_hold_release_flush_delete(mta: Callable[..., Tayori],
                                                  peers: Callable[..., SmtpPeer]) -> None:
    tayori = mta(queue={"retry": ["1h"]})
    config = str(tayori.config_path)
    held = submit(tayori, ["bob@dest.test"])
    assert tayori_cli("queue", "hold", held, "-c", config).returncode == 0
    wait_for(lambda: "deferred queue_id=" + held in tayori.log() or
             tayori.envelopes()[0].recipients[0].state == "held", what="the hold")
    listing = tayori_cli("queue", "list", "-c", config).stdout
    assert held in listing and "held" in listing
    # down: the first attempt defers for an hour; flush makes it due now
    waiting = submit(tayori, ["carol@dest.test"])
    wait_for(lambda: f"deferred queue_id={waiting}" in tayori.log(), what="a deferral")
    listing = tayori_cli("queue", "list", "-c", config).stdout
    assert "attempts 1" in listing and "last: 451 4.4.1" in listing
    mx1 = peers("127.0.0.2")
    assert tayori_cli("queue", "flush", "-c", config).returncode == 0
    [got] = mx1.wait_for_messages(1)
    assert got.recipients == ("carol@dest.test",)        # held stays held
    assert tayori_cli("queue", "release", held, "-c", config).returncode == 0
    assert {m.recipients for m in mx1.wait_for_messages(2)} == {("carol@dest.test",),
                                                                ("bob@dest.test",)}
    wait_for(lambda: queue_empty(tayori), what="the queue to empty")


def test_queue_delete_with_and_without_dsn(mta: Callable[..., Tayori],
                                          peers: Callable[..., SmtpPeer]) -> None:
    sender_mx = peers("127.0.0.4")
    tayori = mta(queue={"retry": ["1h"]})
    config = str(tayori.config_path)
    quiet = submit(tayori, ["bob@dest.test"])
    told = submit(tayori, ["carol@dest.test"])
    wait_for(lambda: f"deferred queue_id={told}" in tayori.log(), what="a deferral")
    assert tayori_cli("queue", "delete", quiet, "-c", config).returncode == 0
    assert tayori_cli("queue", "delete", told, "--dsn", "-c", config).returncode == 0
    [recipient] = dsn_of(sender_mx).get_payload()[1].get_payload()[1:]
    assert recipient["Final-Recipient"] == "rfc822; carol@dest.test"
    assert "deleted" in recipient["Diagnostic-Code"]
    wait_for(lambda: queue_empty(tayori), what="the queue to empty")
    assert len(sender_mx.messages) == 1
    missing = tayori_cli("queue", "hold", "NOSUCHID", "-c", config)
    assert missing.returncode == 1 and "no message" in missing.stderr


def test_delay_warning_then_delivery(mta: Callable[..., Tayori],
                                     peers: Callable[..., SmtpPeer]) -> None:
    sender_mx = peers("127.0.0.4")
    tayori = mta(queue={"delay_warning": "1s"})
    queue_id = submit(tayori, ["bob@dest.test"])
    dsn = dsn_of(sender_mx)
    assert dsn["Subject"].startswith("Delayed Mail")
    [recipient] = dsn.get_payload()[1].get_payload()[1:]
    assert recipient["Action"] == "delayed" and recipient["Will-Retry-Until"]
    mx1 = peers("127.0.0.2")
    mx1.wait_for_messages(1)
    wait_for(lambda: queue_empty(tayori), what="the queue to empty")
    assert len(sender_mx.messages) == 1            # one notice, however many attempts
    assert f"delivered queue_id={queue_id}" in tayori.log()


def test_smarthost_with_auth(make_tayori: Callable[..., Tayori]) -> None:
    """A relay action logs in (AUTH PLAIN) before sending; aiosmtpd checks the login."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    received: list[tuple[str, bytes]] = []
    logins: list[bytes] = []

    class Handler:
        async def handle_DATA(self, server: object, session: Any, envelope: Any) -> str:
            received.append((session.authenticated and envelope.mail_from,
                             envelope.original_content))
            return "250 OK"

    def authenticator(server: object, session: object, envelope: object, mechanism: str,
                      data: object) -> AuthResult:
        assert isinstance(data, LoginPassword)
        logins.append(data.login)
        return AuthResult(success=data.login == b"relayuser" and data.password == b"s3cret")

    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port,
                            authenticator=authenticator, auth_require_tls=False)
    controller.start()
    try:
        tayori = make_tayori(deliver=True, remote={
            "deliver": "relay", "host": f"[127.0.0.1]:{port}", "tls": "none",
            "auth_user": "relayuser", "auth_password": "s3cret"})
        submit(tayori, ["bob@dest.test"])
        wait_for(lambda: received, what="the smarthost to receive the message")
    finally:
        controller.stop()
    assert logins == [b"relayuser"]
    assert received[0][0] == "alice@sender.test"
    assert body_of(received[0][1].replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")) \
        == MESSAGE


def test_failed_bounce_goes_to_the_postmaster_once(mta: Callable[..., Tayori],
                                                   peers: Callable[..., SmtpPeer]) -> None:
    """A DSN that cannot be delivered is reported to queue.postmaster; if that report
    fails as well, it is logged and dropped: never a loop."""
    peers("127.0.0.2", rcpt_reply=lambda address: Reply(550, "5.1.1", "unknown"))
    postmaster_mx = peers("127.0.0.4", rcpt_reply=lambda address: (
        None if address == "postmaster@sender.test" else Reply(550, "5.1.1", "gone")))
    tayori = mta(queue={"postmaster": "postmaster@sender.test"})
    submit(tayori, ["bob@dest.test"])
    [notice] = postmaster_mx.wait_for_messages(1)
    assert notice.sender == "" and notice.recipients == ("postmaster@sender.test",)
    wait_for(lambda: queue_empty(tayori), what="the queue to empty")
    assert len(postmaster_mx.messages) == 1
