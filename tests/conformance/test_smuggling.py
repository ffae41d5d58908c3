"""SMTP smuggling (CVE-2023-51764 family): every end-of-data sequence of the public scanners.

Each payload from ../shared/testdata/smtp/payloads.json is sent inside DATA, followed by
the commands of a second message, then a real ``<CRLF>.<CRLF>``. The fake terminator must
never end the first message, and the second message must never be queued: tayori either
refuses the transaction (and closes, for bare CR/LF) or keeps everything as the first
message's content.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from harness import Client, Tayori, envelopes_by_id, shared_data

SMUGGLED = (b"MAIL FROM:<attacker@evil.example>\r\nRCPT TO:<smuggled@tayori.test>\r\n"
            b"DATA\r\nSubject: smuggled\r\n\r\nI should not exist\r\n")


def _payloads() -> Iterator[tuple[str, str]]:
    try:
        path = shared_data("smtp", "payloads.json")
    except BaseException:  # skipped: no test data here
        return
    data = json.loads(path.read_text())["end_of_data_smuggling"]
    seen = set()
    for source, items in data.items():
        if not source.startswith("source_"):
            continue
        for name, payload in (items.items() if isinstance(items, dict) else enumerate(items)):
            if payload not in seen:
                seen.add(payload)
                yield f"{source.removeprefix('source_')}-{name}", payload


PAYLOADS = list(_payloads())


def test_payloads_present() -> None:
    shared_data("smtp", "payloads.json")
    assert len(PAYLOADS) >= 15


@pytest.mark.parametrize(("name", "payload"), PAYLOADS, ids=[n for n, _ in PAYLOADS])
def test_smuggled_message_is_never_queued(server: Tayori, name: str, payload: str) -> None:
    before = set(envelopes_by_id(server))
    with server.client() as client:
        client.greeting_and_ehlo()
        client.expect_cmd("MAIL FROM:<sender@example.net>", 250)
        client.expect_cmd("RCPT TO:<victim@tayori.test>", 250)
        client.expect_cmd("DATA", 354)
        client.send(b"Subject: first\r\n\r\nfirst message" + payload.encode("latin-1")
                    + SMUGGLED + b"\r\n.\r\n")
        replies = _replies_until_close(client)
    new = [env for qid, env in envelopes_by_id(server).items() if qid not in before]
    assert all(r.address != "smuggled@tayori.test" for env in new for r in env.recipients)
    assert all(env.sender != "attacker@evil.example" for env in new)
    content = b"first message" + payload.encode("latin-1") + SMUGGLED
    crlf = content.count(b"\r\n")
    if content.count(b"\r") == crlf and content.count(b"\n") == crlf:
        # only proper line ends (e.g. NUL before the dot, or a dot-stuffed line): it is all
        # content of the first message, ended by the real <CRLF>.<CRLF>
        assert len(new) == 1 and replies[0] == 250, replies
        assert b"I should not exist" in server.body(new[0].queue_id)
    else:
        assert new == [], "a message was queued despite a bare CR/LF in its content"
        assert replies[0] == 521, replies


def _replies_until_close(client: Client) -> list[int]:
    codes = []
    try:
        while True:
            codes.append(client.reply().code)
            if codes[-1] in (221, 421, 521):
                break
            client.line("QUIT")
    except (ConnectionError, OSError):
        pass
    return codes
