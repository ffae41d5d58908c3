"""Unit tests for tayori.auth.inbound (the SPF/DKIM/DMARC/ARC stage) and the draft's header
rewrite in tayori.queue.spool, on an in-memory resolver and a fixed clock."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tayori.auth.dkim import sign
from tayori.auth.dkim_keys import SigningKey, public_txt
from tayori.auth.inbound import (
    NOT_CHECKED,
    QUARANTINE_FIELD,
    Action,
    Inbound,
    InboundVerdict,
    SpfOutcome,
    unquoted,
)
from tayori.auth.results import header_fields, parse
from tayori.config import Config, ConfigError
from tayori.config.model import from_document
from tayori.errors import INTERNAL_ERROR
from tayori.policy.screening import Client
from tayori.queue.spool import SPILL_SIZE, Draft, Spool
from tayori.testing.dnsstub import StaticResolver, Zone

T = TypeVar("T")
NOW = 1_700_000_000.0
KEY = SigningKey("example.org", "ed", ed25519.Ed25519PrivateKey.generate())
ZONE: Zone = {
    "example.org": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
    "_dmarc.example.org": {"TXT": ["v=DMARC1; p=reject"]},
    "ed._domainkey.example.org": {"TXT": [public_txt(KEY.private_key)]},
    "soft.example": {"TXT": ["v=spf1 ~all"]},
    "_dmarc.soft.example": {"TXT": ["v=DMARC1; p=quarantine"]},
    "broken.example": {"TXT": ["v=spf1 bogus:x"]},
    "dnsfail.example": "SERVFAIL",
    "keyfail.example": {"TXT": ["v=spf1 ~all"]},
    "_dmarc.keyfail.example": {"TXT": ["v=DMARC1; p=reject"]},
    "ed._domainkey.keyfail.example": "SERVFAIL",
}
SCREENED = Client("S1", "192.0.2.1", screened=True)
STRANGER = Client("S2", "203.0.113.9", screened=True)
TRACE = b"Received: from client.example by mx.example.net; now\r\n"


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, 10.0))


def config(tmp_path: Path | None = None, **sections: dict[str, Any]) -> Config:
    return from_document({"hostname": "mx.example.net", "spool": str(tmp_path or "/nonexistent"),
                          "listen": [{"address": "127.0.0.1:2525"}], **sections},
                         "test.toml", "/")


def stage(zone: Zone = ZONE, **sections: dict[str, Any]) -> Inbound:
    return Inbound(config(**sections), StaticResolver(zone), clock=lambda: NOW)


def message(author: str, *, head: bytes = b"", signed_by: SigningKey | None = None) -> bytes:
    data = head + (f"From: <a@{author}>\r\nTo: <u@example.net>\r\nSubject: test\r\n\r\n"
                   "Hello.\r\n").encode()
    return sign(data, [signed_by], now=NOW) + data if signed_by else data


def judge(inbound: Inbound, client: Client, mail_from: str, data: bytes) -> InboundVerdict:
    async def both() -> InboundVerdict:
        outcome = await inbound.at_mail(client, "client.example", mail_from)
        return await inbound.at_end(client, outcome, data, trace=TRACE,
                                    recipients=["u@example.net"], queue_id="Q1")
    return run(both())


def results(verdict: InboundVerdict) -> dict[str, str]:
    fields, _ = header_fields(verdict.header)
    [ours] = [parse(f.split(b":", 1)[1]) for f in fields
              if f.lower().startswith(b"authentication-results:")]
    assert ours.authserv_id == "mx.example.net"
    return {r.method: r.result for r in ours.results}


# --- SPF at MAIL ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("client", "domain", "result", "reply"), [
    (SCREENED, "example.org", "pass", None),
    (STRANGER, "example.org", "fail", (550, "5.7.23")),
    (STRANGER, "soft.example", "softfail", None),
    (STRANGER, "broken.example", "permerror", None),
    (STRANGER, "dnsfail.example", "temperror", (451, "4.7.24")),
])
def test_spf_policy_at_mail(client: Client, domain: str, result: str,
                            reply: tuple[int, str] | None) -> None:
    outcome = run(stage().at_mail(client, "client.example", f"a@{domain}"))
    assert outcome.verdict is not None and outcome.verdict.result.value == result
    refusal = outcome.refusal
    assert (refusal.code, refusal.status) == reply if refusal else reply is None


def test_spf_fail_explains_and_tagging_lets_everything_in() -> None:
    outcome = run(stage().at_mail(STRANGER, "client.example", "a@example.org"))
    assert outcome.refusal is not None
    assert outcome.refusal.text.endswith(
        "example.org does not designate 203.0.113.9 as a permitted sender")
    tagging = stage(spf={"on_fail": "tag", "on_softfail": "reject", "on_permerror": "reject",
                         "on_temperror": "tag"})
    for domain, code in (("example.org", None), ("soft.example", 550),
                         ("broken.example", 550), ("dnsfail.example", None)):
        refusal = run(tagging.at_mail(STRANGER, "client.example", f"a@{domain}")).refusal
        assert (refusal.code if refusal else None) == code, domain


def test_unscreened_clients_and_disabled_checks_ask_nothing() -> None:
    resolver = StaticResolver(ZONE)
    inbound = Inbound(config(), resolver)
    inside = Client("S3", "192.0.2.1", screened=False)
    assert run(inbound.at_mail(inside, "client.example", "a@example.org")) is NOT_CHECKED
    verdict = run(inbound.at_end(inside, NOT_CHECKED, message("example.org")))
    assert verdict == InboundVerdict() and not inbound.checks(inside)
    off = Inbound(config(spf={"check": False}), resolver)
    assert run(off.at_mail(SCREENED, "client.example", "a@example.org")) is NOT_CHECKED
    assert not resolver.queries


def test_a_quoted_local_part_reaches_spf_plain() -> None:
    assert unquoted('"Macro Error"@e8.example.com') == "Macro Error@e8.example.com"
    assert unquoted('"a\\"b"@x.example') == 'a"b@x.example'
    assert unquoted("plain@x.example") == "plain@x.example"
    assert unquoted("") == ""


# --- DKIM, DMARC, ARC at the end of the data -------------------------------------------------

def test_a_signed_message_passes_and_gets_its_fields_above_the_received() -> None:
    data = message("example.org", signed_by=KEY)
    verdict = judge(stage(), STRANGER, "a@soft.example", data)
    assert verdict.action is Action.ACCEPT and verdict.reply is None
    assert results(verdict) == {"spf": "softfail", "dkim": "pass", "dmarc": "pass",
                                "arc": "none"}
    assert verdict.rewrite == (verdict.header, 0)
    names = [f.split(b":")[0] for f in header_fields(verdict.header)[0]]
    assert names == [b"Authentication-Results", b"Received-SPF"]
    assert all(len(line) <= 78 for line in verdict.header.split(b"\r\n"))


def test_dmarc_reject_quarantine_and_hold() -> None:
    rejected = judge(stage(), STRANGER, "a@soft.example", message("example.org"))
    assert rejected.action is Action.REFUSE and rejected.rewrite is None
    assert rejected.reply is not None
    assert (rejected.reply.code, rejected.reply.status) == (550, "5.7.1")
    quarantined = judge(stage(), STRANGER, "a@soft.example", message("soft.example"))
    assert quarantined.action is Action.QUARANTINE
    assert quarantined.header.startswith(QUARANTINE_FIELD)
    held = judge(stage(dmarc={"on_quarantine": "hold"}), STRANGER, "a@soft.example",
                 message("soft.example"))
    assert held.action is Action.HOLD and QUARANTINE_FIELD not in held.header


@pytest.mark.parametrize(("dmarc", "action", "disposition"), [
    ({"on_reject": "quarantine"}, Action.QUARANTINE, "quarantine"),
    ({"on_reject": "quarantine", "on_quarantine": "hold"}, Action.HOLD, "quarantine"),
    ({"on_reject": "tag"}, Action.ACCEPT, "none"),
    ({"check": False}, Action.ACCEPT, None),
])
def test_the_local_ceiling_on_reject(dmarc: dict[str, Any], action: Action,
                                     disposition: str | None) -> None:
    verdict = judge(stage(dmarc=dmarc), STRANGER, "a@soft.example", message("example.org"))
    assert verdict.action is action
    found = verdict.dmarc
    assert (found.disposition.value if found else None) == disposition
    if found is not None:
        assert found.local_override


def test_an_aligned_key_lookup_failure_defers_rather_than_rejects() -> None:
    signing = SigningKey("keyfail.example", "ed", KEY.private_key)
    data = message("keyfail.example", signed_by=signing)
    verdict = judge(stage(), STRANGER, "a@keyfail.example", data)
    assert verdict.dkim[0].result.value == "temperror"
    assert verdict.dmarc is not None and verdict.dmarc.result.value == "temperror"
    assert verdict.reply is not None and (verdict.reply.code, verdict.reply.status) == (
        451, "4.7.0")
    tagging = judge(stage(dmarc={"on_reject": "tag", "on_quarantine": "tag"}), STRANGER,
                    "a@keyfail.example", data)
    assert tagging.action is Action.ACCEPT
    assert results(tagging)["dmarc"] == "temperror"


def test_forged_fields_go_and_the_header_block_is_rewritten_whole() -> None:
    head = (b"Authentication-Results: MX.example.net.; dkim=pass\r\n"
            b"Authentication-Results: other.example; dkim=pass\r\n")
    data = message("soft.example", head=head)
    verdict = judge(stage(dmarc={"check": False}), SCREENED, "a@example.org", data)
    assert verdict.forged == 1 and verdict.rewrite is not None
    block, replaced = verdict.rewrite
    header_length = data.index(b"\r\n\r\n") + 2
    assert replaced == len(TRACE) + header_length
    assert block == verdict.header + TRACE + data[:header_length].replace(head[:52], b"")


class Exploding(StaticResolver):
    async def txt(self, name: str) -> list[bytes]:
        raise RuntimeError("a bug")


def test_a_bug_defers_and_never_accepts() -> None:
    inbound = Inbound(config(), Exploding(ZONE), clock=lambda: NOW)
    broken = Client("S4", "not an address", screened=True)
    outcome = run(inbound.at_mail(broken, "client.example", "a@example.org"))
    assert outcome.refusal == INTERNAL_ERROR and outcome.verdict is None
    verdict = run(inbound.at_end(STRANGER, SpfOutcome(), message("example.org", signed_by=KEY)))
    assert (verdict.action, verdict.reply) == (Action.REFUSE, INTERNAL_ERROR)


def test_report_data_is_recorded_and_its_failure_is_harmless(tmp_path: Path) -> None:
    zone = {**ZONE, "_dmarc.example.org": {"TXT": ["v=DMARC1; p=reject; rua=mailto:r@x.example"]}}
    inbound = Inbound(config(tmp_path, dmarc={"reports": True}), StaticResolver(zone),
                      clock=lambda: NOW)
    verdict = judge(inbound, SCREENED, "a@example.org", message("example.org"))
    assert verdict.action is Action.ACCEPT
    assert (tmp_path / "dmarc-reports.sqlite3").exists()
    inbound.close()
    unwritable = Inbound(config(tmp_path / "missing" / "dir", dmarc={"reports": True}),
                         StaticResolver(zone), clock=lambda: NOW)
    assert judge(unwritable, SCREENED, "a@example.org", message("example.org")).action \
        is Action.ACCEPT


# --- the draft's header rewrite ----------------------------------------------------------------

def draft(tmp_path: Path, content: bytes) -> tuple[Spool, Draft]:
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    result = spool.new_draft("Q1")
    result.write(content)
    return spool, result


@pytest.mark.parametrize("size", [100, SPILL_SIZE + 10])
def test_rewrite_header_in_memory_and_on_disk(tmp_path: Path, size: int) -> None:
    content = b"Received: old\r\nX-Forged: 1\r\n\r\n" + b"b" * size
    spool, item = draft(tmp_path, content)
    assert item.spilled == (size > SPILL_SIZE)
    run(spool.rewrite_header(item, b"New: 1\r\nReceived: old\r\n", 28))
    item.write(b"tail\r\n")
    expected = b"New: 1\r\nReceived: old\r\n\r\n" + b"b" * size + b"tail\r\n"
    assert run(spool.read_draft(item)) == expected
    assert run(spool.read_draft(item, 8)) == expected[8:]
    assert item.size == len(expected)
    item.persist()
    assert Path(item.final_path).read_bytes() == expected
    assert os.listdir(tmp_path / "spool" / "incoming") == []
    spool.close()


def test_a_failed_rewrite_leaves_the_draft_as_it_was(tmp_path: Path) -> None:
    content = b"Subject: x\r\n\r\n" + b"b" * (SPILL_SIZE + 10)
    spool, item = draft(tmp_path, content)
    Path(item.path + ".rewrite").write_bytes(b"in the way")   # the new file cannot be made
    with pytest.raises(FileExistsError):
        run(spool.rewrite_header(item, b"New: 1\r\n", 0))
    assert run(spool.read_draft(item)) == content and item.size == len(content)
    item.discard()
    spool.close()


def test_the_spf_time_limit_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"spf\.timeout"):
        config(spf={"timeout": 0})
