"""Screening untrusted clients of a running tayori: DNS blocklists and allowlists at
connect (a loopback DNS answering 127.0.0.2 for the client), HELO syntax, reverse DNS,
rate limits, messages per connection and greylisting (kept across a restart).

The client is 127.0.0.1, which these tests keep out of the trusted networks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from harness import Tayori, wait_for
from tayori.testing.dnsstub import DnsStub

MakeTayori = Callable[..., Tayori]
CLIENT = "1.0.0.127"   # 127.0.0.1, reversed for the lists and in-addr.arpa


@pytest.fixture
def dns() -> Iterator[DnsStub]:
    zone: dict[str, Any] = {
        f"{CLIENT}.bl.test": {"A": ["127.0.0.2"], "TXT": ["listed: see https://bl.test"]},
        f"{CLIENT}.other-bl.test": {"A": ["127.0.0.4"]},
        f"{CLIENT}.wl.test": {"A": ["127.0.10.2"]},
        f"{CLIENT}.in-addr.arpa": {"PTR": ["client.test"]},
        "client.test": {"A": ["192.0.2.7"]},   # does not lead back: no FCrDNS
    }
    with DnsStub(zone) as stub:
        yield stub


def untrusted(make_tayori: MakeTayori, dns: DnsStub, sections: str = "",
              **options: Any) -> Tayori:
    host, port = dns.address
    return make_tayori(trusted=["192.0.2.0/24"], dns={"nameservers": [f"{host}:{port}"]},
                       extra=sections, **options)


def test_a_listed_client_is_refused_at_connect_naming_the_list(make_tayori: MakeTayori,
                                                                dns: DnsStub) -> None:
    tayori = untrusted(make_tayori, dns, '[dnsbl]\nzones = ["bl.test*2", "none.test"]\n'
                                         'threshold = 2\n')
    with tayori.client() as client:
        greeting = client.reply()
    assert (greeting.code, greeting.status) == (554, "5.7.1")
    assert "bl.test" in greeting.text and "listed: see https://bl.test" in greeting.text
    assert "dnsbl session=" in tayori.log()


def test_below_the_threshold_or_allowlisted_passes(make_tayori: MakeTayori,
                                                   dns: DnsStub) -> None:
    tayori = untrusted(make_tayori, dns, '[dnsbl]\nzones = ["other-bl.test"]\nthreshold = 2\n')
    with tayori.client() as client:
        assert client.reply().code == 220
    allowed = untrusted(make_tayori, dns, '[dnsbl]\nzones = ["bl.test"]\nallow = ["wl.test"]\n')
    with allowed.client() as client:
        assert client.reply().code == 220


def test_trusted_networks_and_submission_listeners_are_not_asked(make_tayori: MakeTayori,
                                                                  dns: DnsStub) -> None:
    host, port = dns.address
    trusted = make_tayori(dns={"nameservers": [f"{host}:{port}"]},
                          extra='[dnsbl]\nzones = ["bl.test"]\n')
    with trusted.client() as client:
        assert client.reply().code == 220
    submission = untrusted(make_tayori, dns, '[dnsbl]\nzones = ["bl.test"]\n',
                           listen={"mode": "submission"})
    with submission.client() as client:
        assert client.reply().code == 220
    assert dns.count(f"{CLIENT}.bl.test", "A") == 0


def test_helo_syntax_and_reverse_dns(make_tayori: MakeTayori, dns: DnsStub) -> None:
    tayori = untrusted(make_tayori, dns, smtp={"helo_syntax": True, "fcrdns": "reject"})
    with tayori.client() as client:
        client.reply()
        refused = client.cmd("EHLO localhost")
        assert (refused.code, refused.status) == (501, "5.5.2")
        client.expect_cmd("EHLO [127.0.0.1]", 250)
        no_rdns = client.cmd("MAIL FROM:<a@example.net>")
        assert (no_rdns.code, no_rdns.status) == (550, "5.7.25")
    assert "fcrdns session=" in tayori.log() and "result=fail" in tayori.log()


def test_rate_limits_and_messages_per_connection(make_tayori: MakeTayori,
                                                 dns: DnsStub) -> None:
    tayori = untrusted(make_tayori, dns, limits={"recipients_per_sender": "3/1h",
                                                 "messages_per_client": "3/1h",
                                                 "max_messages_per_connection": 2},
                       workers=1)   # the buckets are per worker process
    with tayori.client() as client:
        client.greeting_and_ehlo()
        client.expect_cmd("MAIL FROM:<a@example.net>", 250)
        for user in ("u", "v", "w"):
            client.expect_cmd(f"RCPT TO:<{user}@tayori.test>", 250)
        limited = client.cmd("RCPT TO:<x@tayori.test>")
        assert (limited.code, limited.status) == (450, "4.7.1")
        assert "<a@example.net>" in limited.text and "try again in" in limited.text
        client.expect_cmd("DATA", 354)
        client.send(b"Subject: one\r\n\r\nbody\r\n.\r\n")
        assert client.reply().code == 250
        client.expect_cmd("MAIL FROM:<b@example.net>", 250)
        client.expect_cmd("RCPT TO:<u@tayori.test>", 250)
        client.expect_cmd("DATA", 354)
        client.send(b"Subject: two\r\n\r\nbody\r\n.\r\n")
        assert client.reply().code == 250
        closing = client.cmd("MAIL FROM:<c@example.net>")
        assert (closing.code, closing.status) == (421, "4.7.0")
    with tayori.client() as client:   # a new session: the client's third message is fine
        client.greeting_and_ehlo()
        client.expect_cmd("MAIL FROM:<c@example.net>", 250)
        client.expect_cmd("RSET", 250)
        limited = client.cmd("MAIL FROM:<d@example.net>")   # the fourth in the hour is not
        assert (limited.code, limited.status) == (450, "4.7.1")


def test_greylisting_defers_then_passes_and_remembers(make_tayori: MakeTayori,
                                                      dns: DnsStub) -> None:
    tayori = untrusted(make_tayori, dns, '[greylist]\nenabled = true\ndelay = "1s"\n')

    def rcpt(sender: str) -> int:
        with tayori.client() as client:
            client.greeting_and_ehlo()
            client.expect_cmd(f"MAIL FROM:<{sender}>", 250)
            return client.cmd("RCPT TO:<u@tayori.test>").code

    assert rcpt("a@example.net") == 451
    assert "Greylisted" in tayori.log()
    wait_for(lambda: rcpt("a@example.net") == 250, timeout=10, interval=0.3,
             what="the retry to pass")
    tayori.stop()
    tayori.start()   # the pass was stored: the client network is now let through at once
    assert rcpt("other@example.net") == 250
