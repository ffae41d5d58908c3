"""The openspf RFC 7208 suite end to end: through a running tayori, over real DNS.

One tayori (``[spf]``: fail and permerror refused, temperror deferred, softfail tagged,
HELO not checked, as the suite's driver does) and one DNS server on loopback
(:class:`spf_suite.SuiteDnsStub`) serve all 203 tests; each test switches the server to
its scenario's zone and opens a session whose client address the PROXY protocol sets.
The result is read where an operator would see it: ``550 5.7.23`` (fail, with the
explanation), ``550 5.7.24`` (permerror) or ``451 4.7.24`` (temperror) at MAIL FROM,
otherwise the ``Received-SPF`` field of the message tayori queued.

A local part that is no dot-string (``Macro Error``) is sent quoted, as SMTP requires;
tayori gives SPF the plain mailbox name. Four cases have an EHLO name or a MAIL FROM
that SMTP cannot carry (:data:`NOT_SMTP`): tayori refuses them as malformed (``501``)
before any SPF check, which is asserted instead; the other 199 are checked by SPF in
tayori.
An explanation ``DEFAULT`` is tayori's own default (``%{o} does not designate %{c} as a
permitted sender``); the suite's explanations must match exactly.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import Client, Tayori, queued_id
from spf_suite import RECEIVER, SUITE_SIZE, SuiteCase, SuiteDnsStub, suite_cases

CASES = list(suite_cases())
NOT_SMTP = {
    "toolonglabel": "a 64-octet label in the MAIL FROM domain (RFC 5321 §4.1.2 Domain)",
    "emptylabel": "an empty label in the MAIL FROM domain (A...example.com)",
    "nolocalpart": "<@example.net> is no RFC 5321 Path (no local part)",
    "invalid-hello-macro": "EHLO JUMPIN' JUPITER: a space in the EHLO argument (501 5.5.4)",
}
_DOT_STRING = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
REFUSALS = {(550, "5.7.23"): "fail", (550, "5.7.24"): "permerror", (451, "4.7.24"): "temperror"}
SPF_POLICY = """
[spf]
helo = false
on_fail = "reject"
on_softfail = "tag"
on_permerror = "reject"
on_temperror = "defer"

[dkim]
verify = false

[dmarc]
check = false

[arc]
verify = false
"""


@pytest.fixture(scope="module")
def stub() -> Iterator[SuiteDnsStub]:
    with SuiteDnsStub() as server:
        yield server


@pytest.fixture(scope="module")
def tayori(stub: SuiteDnsStub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tayori]:
    host, port = stub.address
    server = Tayori(Path(tmp_path_factory.mktemp("spf-e2e")), hostname=RECEIVER,
                    trusted=["198.51.100.254/32"], listen={"proxy_protocol": True},
                    dns={"nameservers": [f"{host}:{port}"], "timeout": 3}, extra=SPF_POLICY)
    server.start()
    yield server
    server.stop()


def proxy_line(client_ip: str) -> str:
    family = "TCP6" if ":" in client_ip else "TCP4"
    server = "::1" if family == "TCP6" else "127.0.0.1"
    return f"PROXY {family} {client_ip} {server} 4711 25"


def through_tayori(tayori: Tayori, case: SuiteCase) -> tuple[str, str | None]:
    """(SPF result, explanation) as tayori reports them; ``("not-smtp", None)`` when the
    EHLO name or the MAIL FROM address is refused as malformed."""
    with tayori.client() as client:
        client.line(proxy_line(case.host))
        client.expect(220)
        reply = client.cmd(f"EHLO {case.helo}")
        if reply.code == 250:
            reply = client.cmd(f"MAIL FROM:<{smtp_path(case.mailfrom)}>")
        if reply.code == 501:
            return "not-smtp", None
        refused = REFUSALS.get((reply.code, reply.status))
        if refused is not None:
            _, _, explanation = reply.text.partition(": ")
            return refused, explanation or None
        assert reply.code == 250, str(reply)
        return received_spf(tayori, client), None


def smtp_path(address: str) -> str:
    """The address as SMTP carries it: a local part that is no dot-string quoted."""
    local, at, domain = address.rpartition("@")
    if not local or _DOT_STRING.match(local):
        return address
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"' + at + domain


def received_spf(tayori: Tayori, client: Client) -> str:
    """The result in the Received-SPF field of a message sent in this transaction."""
    client.expect_cmd("RCPT TO:<u@tayori.test>", 250)
    client.expect_cmd("DATA", 354)
    client.send(b"Subject: SPF\r\n\r\nbody\r\n.\r\n")
    body = tayori.body(queued_id(client.expect(250)))
    found = re.search(rb"^Received-SPF: ([a-z]+) ", body, re.MULTILINE)
    assert found, body[:600]
    return found.group(1).decode()


def default_explanation(case: SuiteCase) -> str:
    domain = case.mailfrom.rpartition("@")[2] or case.helo
    address = ipaddress.ip_address(case.host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return f"{domain} does not designate {address} as a permitted sender"


def test_every_case_of_the_suite_runs_here() -> None:
    assert len(CASES) == SUITE_SIZE
    assert set(NOT_SMTP) <= {case.name for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_rfc7208_suite_through_tayori(case: SuiteCase, stub: SuiteDnsStub,
                                      tayori: Tayori) -> None:
    stub.use(case.zone)
    result, explanation = through_tayori(tayori, case)
    if case.name in NOT_SMTP:
        assert result == "not-smtp", (NOT_SMTP[case.name], result)
        return
    assert result in case.results, (case.scenario, result)
    if case.explanation is not None and result == "fail":
        expected = default_explanation(case) if case.explanation == "DEFAULT" \
            else case.explanation
        assert explanation == expected
