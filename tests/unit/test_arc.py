"""tayori.auth.arc: sealing hop after hop and validating what comes out, the chain rules
(RFC 8617 §5.2), sealing rules (§5.1, §5.1.2), the layout, and dkimpy as a second opinion.
Keys are made per module; DNS is a StaticResolver; time is fixed.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tayori.auth.arc import (
    DEFAULT_HEADERS,
    MAX_SETS,
    ArcVerdict,
    ChainStatus,
    collect_results,
    seal,
    seal_async,
    validate,
    write_field,
)
from tayori.auth.canon import body_hash, header_hash_input, relaxed_header
from tayori.auth.dkim_keys import ALGORITHMS as KEY_ALGORITHMS
from tayori.auth.dkim_keys import SigningKey, make_signature, public_txt, verify_signature
from tayori.auth.dkim_tags import parse_tag_list, strip_tag_value
from tayori.auth.headers import parse_message
from tayori.auth.results import MethodResult, dkim_result, parse, spf_result
from tayori.testing.dnsstub import StaticResolver

T = TypeVar("T")
NOW = 1_700_000_000
AUTHSERV_ID = "mx.forwarder.example"
MESSAGE = (
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel; h=from; bh=x; b=y\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: list@lists.example\r\n"
    b"Subject: Lunch  on\tFriday?\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <lunch@example.org>\r\n"
    b"\r\n"
    b"Shall we meet at  noon? \r\n"
    b"-- \r\n"
    b"Alice\r\n"
)
RESULTS = [spf_result("pass", mailfrom="alice@example.org"),
           dkim_result("pass", domain="example.org", selector="sel", signature="yyyyyyyy")]


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, 10.0))


@pytest.fixture(scope="module")
def keys() -> list[SigningKey]:
    """Three sealers: two RSA-2048 domains and one RSA-1024 (the least RFC 8301 allows)."""
    return [SigningKey("lists.example", "arc", rsa.generate_private_key(65537, 2048)),
            SigningKey("forwarder.example", "s1", rsa.generate_private_key(65537, 2048)),
            SigningKey("mx.example", "old", rsa.generate_private_key(65537, 1024))]


@pytest.fixture(scope="module")
def zone(keys: list[SigningKey]) -> dict[str, Any]:
    return {f"{key.selector}._domainkey.{key.domain}": {"TXT": [public_txt(key.private_key)]}
            for key in keys}


def check(message: bytes, zone: dict[str, Any], **options: Any) -> ArcVerdict:
    return run(validate(message, StaticResolver(zone), now=NOW, **options))


def hop(message: bytes, key: SigningKey, zone: dict[str, Any],
        results: Sequence[MethodResult] = RESULTS) -> bytes:
    """What a forwarder does: validate, seal, prepend."""
    chain = check(message, zone)
    return seal(message, key, authserv_id=AUTHSERV_ID, results=results, chain=chain,
                now=NOW) + message


def chained(keys: Sequence[SigningKey], zone: dict[str, Any], message: bytes = MESSAGE) -> bytes:
    for key in keys:
        message = hop(message, key, zone)
    return message


def replace_once(message: bytes, old: bytes, new: bytes) -> bytes:
    assert message.count(old) >= 1
    return message.replace(old, new, 1)


def arc_fields(message: bytes, name: str) -> list[bytes]:
    return [f.raw for f in parse_message(message).fields if f.key == name]


# --- round trips ---------------------------------------------------------------------------------


def test_a_message_without_arc_fields_is_none(zone: dict[str, Any]) -> None:
    verdict = check(MESSAGE, zone)
    assert (verdict.cv, verdict.instance, verdict.sets) == (ChainStatus.NONE, 0, ())
    assert verdict.seal_refusal is None
    assert check(b"", zone).cv is ChainStatus.NONE


def test_the_first_seal_is_instance_one_with_cv_none(keys: list[SigningKey],
                                                    zone: dict[str, Any]) -> None:
    arc_set = seal(MESSAGE, keys[0], authserv_id=AUTHSERV_ID, results=RESULTS,
                   chain=check(MESSAGE, zone), now=NOW)
    fields = parse_message(arc_set + b"\r\n").fields
    assert [f.key for f in fields] == ["arc-seal", "arc-message-signature",
                                       "arc-authentication-results"]
    seal_tags, ams_tags = parse_tag_list(fields[0].value), parse_tag_list(fields[1].value)
    assert list(seal_tags) == ["a", "b", "cv", "d", "i", "s", "t"]
    assert list(ams_tags) == ["a", "b", "bh", "c", "d", "h", "i", "s", "t"]
    assert (seal_tags["cv"], seal_tags["i"], seal_tags["t"]) == ("none", "1", str(NOW))
    assert ams_tags["h"] == "from:to:subject:date:message-id:dkim-signature"
    assert fields[2].value.startswith(b" i=1; mx.forwarder.example;")


def test_three_hops_pass_with_every_set_described(keys: list[SigningKey],
                                                  zone: dict[str, Any]) -> None:
    verdict = check(chained(keys, zone), zone)
    assert (verdict.cv, verdict.instance, verdict.oldest_pass) == (ChainStatus.PASS, 3, 0)
    assert [(s.instance, s.seal_domain, s.signature_selector) for s in verdict.sets] == [
        (1, "lists.example", "arc"), (2, "forwarder.example", "s1"), (3, "mx.example", "old")]
    assert all(s.authserv_id == AUTHSERV_ID for s in verdict.sets)
    assert [r.method for r in verdict.sets[0].results] == ["spf", "dkim"]


def test_the_arc_result_for_authentication_results(keys: list[SigningKey],
                                                   zone: dict[str, Any]) -> None:
    verdict = check(chained(keys[:2], zone), zone)
    result = verdict.method_result(remote_ip="192.0.2.7")
    assert (result.method, result.result) == ("arc", "pass")
    assert result.properties == (("smtp.remote-ip", "192.0.2.7"), ("header.oldest-pass", "0"))
    assert ArcVerdict(ChainStatus.FAIL, 1, "x").method_result().properties == ()


def test_sets_in_any_header_order_still_pass(keys: list[SigningKey],
                                             zone: dict[str, Any]) -> None:
    message = chained(keys[:2], zone)
    parsed = parse_message(message)
    arc = [f.raw for f in parsed.fields if f.key.startswith("arc-")]
    rest = [f.raw for f in parsed.fields if not f.key.startswith("arc-")]
    shuffled = b"".join(rest[:2] + arc[::-1] + rest[2:]) + b"\r\n" + message[parsed.body_offset:]
    assert check(shuffled, zone).cv is ChainStatus.PASS


def test_oldest_pass_names_the_first_hop_whose_signature_still_verifies(
    keys: list[SigningKey], zone: dict[str, Any]
) -> None:
    message = hop(MESSAGE, keys[0], zone)
    chain = check(message, zone)
    footer = message + b"-- \r\nlists.example: unsubscribe\r\n"  # the list adds a footer
    message = seal(footer, keys[1], authserv_id=AUTHSERV_ID, results=RESULTS, chain=chain,
                   now=NOW) + footer
    message = hop(message, keys[2], zone)
    verdict = check(message, zone)
    assert (verdict.cv, verdict.oldest_pass) == (ChainStatus.PASS, 2)


# --- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "reason"), [
    (lambda m: m + b"P.S. one more line\r\n", "ARC-Message-Signature i=2: body hash"),
    (lambda m: replace_once(m, b"Subject: Lunch", b"Subject: Dinner"),
     "ARC-Message-Signature i=2: signature did not verify"),
    (lambda m: replace_once(m, b"spf=pass", b"spf=fail"), "ARC-Seal i=2 did not verify"),
    (lambda m: re.sub(rb"(i=1; mx.forwarder.example;)", rb"\1 dmarc=pass;", m, count=1),
     "ARC-Seal i=2 did not verify"),  # AS(2) covers AAR(1), and is checked first
    (lambda m: replace_once(m, b"cv=pass", b"cv=none"), "ARC-Seal i=2 has cv=none"),
])
def test_a_changed_chain_fails(keys: list[SigningKey], zone: dict[str, Any],
                               change: Any, reason: str) -> None:
    verdict = check(change(chained(keys[:2], zone)), zone)
    assert verdict.cv is ChainStatus.FAIL
    assert verdict.reason.startswith(reason), verdict.reason
    assert (verdict.instance, verdict.fail_reported_at, verdict.oldest_pass) == (2, None, None)
    assert [s.seal_domain for s in verdict.sets] == ["lists.example", "forwarder.example"]


def test_an_unsigned_header_may_change(keys: list[SigningKey], zone: dict[str, Any]) -> None:
    message = chained(keys[:2], zone)
    changed = b"X-Spam-Score: 0.1\r\nReceived: by a.example\r\n" + message
    assert check(changed, zone).cv is ChainStatus.PASS


@pytest.mark.parametrize(("drop", "reason"), [
    ("arc-seal", "ARC Set i=1 lacks or repeats a field"),
    ("arc-message-signature", "ARC Set i=1 lacks or repeats a field"),
    ("arc-authentication-results", "ARC Set i=1 lacks or repeats a field"),
])
def test_a_set_missing_a_field_fails(keys: list[SigningKey], zone: dict[str, Any],
                                     drop: str, reason: str) -> None:
    message = chained(keys[:2], zone)
    victim = arc_fields(message, drop)[-1]  # the i=1 one, lowest in the header
    verdict = check(message.replace(victim, b""), zone)
    assert (verdict.cv, verdict.reason, verdict.sets) == (ChainStatus.FAIL, reason, ())


def test_a_repeated_seal_fails(keys: list[SigningKey], zone: dict[str, Any]) -> None:
    message = chained(keys[:1], zone)
    verdict = check(arc_fields(message, "arc-seal")[0] + message, zone)
    assert verdict.cv is ChainStatus.FAIL
    assert verdict.reason == "ARC Set i=1 lacks or repeats a field"


@pytest.mark.parametrize("field", [
    b"ARC-Seal: i=0; a=rsa-sha256; cv=none; d=x.example; s=s; b=AAAA\r\n",
    b"ARC-Authentication-Results: lists.example; i=1; spf=pass\r\n",
    b"ARC-Message-Signature: i=x; a=rsa-sha256\r\n",
    b"ARC-Seal: i=1;; a=rsa-sha256\r\n",
])
def test_an_unreadable_instance_fails(zone: dict[str, Any], field: bytes) -> None:
    verdict = check(field + MESSAGE, zone)
    assert (verdict.cv, verdict.instance) == (ChainStatus.FAIL, 0)


def test_more_than_fifty_sets_fail_and_cannot_be_sealed(keys: list[SigningKey],
                                                        zone: dict[str, Any]) -> None:
    message = replace_once(chained(keys[:1], zone), b"i=1;", b"i=51;")
    verdict = check(message, zone)
    assert (verdict.cv, verdict.instance) == (ChainStatus.FAIL, 51)
    assert "more than 50" in verdict.reason
    full = ArcVerdict(ChainStatus.PASS, MAX_SETS)
    assert full.seal_refusal is not None
    assert seal(MESSAGE, keys[0], authserv_id=AUTHSERV_ID, results=[], chain=full,
                now=NOW) == b""


def test_a_missing_key_or_a_dns_failure_fails(keys: list[SigningKey],
                                              zone: dict[str, Any]) -> None:
    message = chained(keys[:1], zone)
    assert "no key record" in check(message, {}).reason
    name = f"arc._domainkey.{keys[0].domain}"
    verdict = check(message, {name: "SERVFAIL"})
    assert verdict.cv is ChainStatus.FAIL
    assert "permanent for ARC" in verdict.reason  # RFC 8617 §5.2.1


def test_only_rsa_sha256_unless_widened(keys: list[SigningKey], zone: dict[str, Any]) -> None:
    message = chained(keys[:1], zone)
    verdict = check(message, zone, algorithms=("ed25519-sha256",))
    assert (verdict.cv, verdict.reason) == (ChainStatus.FAIL, "unsupported algorithm a=rsa-sha256")


# --- cv=fail -----------------------------------------------------------------------------------


def test_a_failed_chain_is_sealed_with_cv_fail_over_the_new_set_only(
    keys: list[SigningKey], zone: dict[str, Any]
) -> None:
    broken = chained(keys[:1], zone) + b"tampered\r\n"
    chain = check(broken, zone)
    assert (chain.cv, chain.seal_refusal) == (ChainStatus.FAIL, None)
    arc_set = seal(broken, keys[1], authserv_id=AUTHSERV_ID, results=RESULTS, chain=chain,
                   now=NOW)
    as_field, ams, aar = (f.raw for f in parse_message(arc_set + b"\r\n").fields)
    assert b"cv=fail" in as_field and b"i=2" in as_field
    # RFC 8617 §5.1.2, checked independently: the seal signs AAR, AMS and itself only
    colon = as_field.index(b":")
    value = as_field[colon + 1 : -2]
    blanked = as_field[: colon + 1] + strip_tag_value(value, "b") + b"\r\n"
    data = relaxed_header(aar) + relaxed_header(ams) + relaxed_header(blanked)[:-2]
    signature = base64.b64decode("".join(parse_tag_list(value)["b"].split()))
    public = keys[1].private_key.public_key()
    assert verify_signature(public, KEY_ALGORITHMS["rsa-sha256"], signature, data)
    sealed = check(arc_set + broken, zone)
    assert (sealed.cv, sealed.fail_reported_at, sealed.instance) == (ChainStatus.FAIL, 2, 2)


def test_no_set_is_added_after_a_seal_reporting_cv_fail(keys: list[SigningKey],
                                                        zone: dict[str, Any]) -> None:
    broken = chained(keys[:1], zone) + b"tampered\r\n"
    message = hop(broken, keys[1], zone)
    verdict = check(message, zone)
    assert (verdict.cv, verdict.fail_reported_at) == (ChainStatus.FAIL, 2)
    assert verdict.seal_refusal is not None and "cv=fail" in verdict.seal_refusal
    assert hop(message, keys[2], zone) == message


def test_a_seal_reporting_cv_fail_ends_the_chain(keys: list[SigningKey],
                                                 zone: dict[str, Any]) -> None:
    newest = replace_once(chained(keys[:1], zone), b"cv=none", b"cv=fail")
    verdict = check(newest, zone)
    assert (verdict.cv, verdict.fail_reported_at, verdict.instance) == (ChainStatus.FAIL, 1, 1)
    assert hop(newest, keys[1], zone) == newest
    older = replace_once(chained(keys[:2], zone), b"cv=none", b"cv=fail")
    verdict = check(older, zone)
    assert (verdict.cv, verdict.fail_reported_at, verdict.instance) == (ChainStatus.FAIL, 1, 2)
    assert verdict.seal_refusal is None  # the newest seal says pass: a set with cv=fail
    assert b"cv=fail; d=mx.example; i=3" in hop(older, keys[2], zone)


# --- AMS tags a sealer of ours never writes, signed honestly -----------------------------------


def hand_sealed(message: bytes, key: SigningKey, **ams: str) -> bytes:
    """``message`` with a first ARC Set whose AMS has the tags ``ams`` added, every
    signature made by hand (an independent check of the scopes :func:`seal` uses)."""
    parsed = parse_message(message)
    aar = b"ARC-Authentication-Results: i=1; mx.example; none\r\n"
    limit = int(ams["l"]) if "l" in ams else None
    digest = body_hash(message, parsed.body_offset, "relaxed", "sha256", limit).digest
    tags = {"a": "rsa-sha256", "b": "", "bh": base64.b64encode(digest).decode(),
            "c": "relaxed/relaxed", "d": key.domain, "h": "from:to", "i": "1",
            "s": key.selector, "t": str(NOW), **ams}
    data = header_hash_input(parsed.fields, ["from", "to"],
                             write_field("ARC-Message-Signature", list(tags.items())),
                             "relaxed")
    ams_field = _signed("ARC-Message-Signature", tags, key, data)
    seal_tags = {"a": "rsa-sha256", "b": "", "cv": "none", "d": key.domain, "i": "1",
                 "s": key.selector}
    unsigned = write_field("ARC-Seal", list(seal_tags.items()))
    data = relaxed_header(aar) + relaxed_header(ams_field) + relaxed_header(unsigned)[:-2]
    return _signed("ARC-Seal", seal_tags, key, data) + ams_field + aar + message


def _signed(name: str, tags: dict[str, str], key: SigningKey, data: bytes) -> bytes:
    b_value = base64.b64encode(make_signature(key.private_key, data)).decode()
    return write_field(name, list({**tags, "b": b_value}.items()))


def test_hand_sealed_sets_pass(keys: list[SigningKey], zone: dict[str, Any]) -> None:
    assert check(hand_sealed(MESSAGE, keys[0]), zone).cv is ChainStatus.PASS


def test_an_expired_message_signature_fails(keys: list[SigningKey],
                                            zone: dict[str, Any]) -> None:
    message = hand_sealed(MESSAGE, keys[0], x=str(NOW + 60))
    assert check(message, zone).cv is ChainStatus.PASS
    late = run(validate(message, StaticResolver(zone), now=NOW + 3600))
    assert late.reason == f"ARC-Message-Signature i=1: expired (x={NOW + 60})"
    early = hand_sealed(MESSAGE, keys[0], x=str(NOW - 1))
    assert check(early, zone).reason == "x= is earlier than t="


def test_a_body_length_limit_is_honoured(keys: list[SigningKey], zone: dict[str, Any]) -> None:
    message = hand_sealed(MESSAGE, keys[0], l="10")
    assert check(message + b"appended\r\n", zone).cv is ChainStatus.PASS
    too_long = hand_sealed(MESSAGE, keys[0], l="100000")
    assert "longer than the body" in check(too_long, zone).reason


@pytest.mark.parametrize(("tags", "reason"), [
    ({"h": "from:arc-seal"}, "signs ARC-Seal"),
    ({"c": "loose/simple"}, "unknown canonicalization"),
    ({"a": "rsa-sha1"}, "unsupported algorithm"),
    ({"d": "exa mple.org"}, "malformed domain"),
    ({"t": "soon"}, "malformed t="),
])
def test_a_malformed_message_signature_fails(keys: list[SigningKey], zone: dict[str, Any],
                                             tags: dict[str, str], reason: str) -> None:
    verdict = check(hand_sealed(MESSAGE, keys[0], **tags), zone)
    assert verdict.cv is ChainStatus.FAIL
    assert reason in verdict.reason


# --- sealing: inputs, layout, async --------------------------------------------------------


def test_collect_results_takes_ours_in_order() -> None:
    message = (b"Authentication-Results: MX.Forwarder.Example.;\r\n"
               b"  spf=pass smtp.mailfrom=a@b.example\r\n"
               b"Authentication-Results: other.example; dkim=fail\r\n"
               b"Authentication-Results: mx.forwarder.example; none\r\n"
               b"Authentication-Results: mx.forwarder.example; (((\r\n"
               b"Authentication-Results: mx.forwarder.example; dkim=pass header.d=b.example;\r\n"
               b"  dmarc=pass\r\n" + MESSAGE)
    found = collect_results(message, AUTHSERV_ID)
    assert [(r.method, r.result) for r in found] == [("spf", "pass"), ("dkim", "pass"),
                                                      ("dmarc", "pass")]


def test_the_aar_carries_the_results_and_says_none_without_any(
    keys: list[SigningKey], zone: dict[str, Any]
) -> None:
    arc_set = seal(MESSAGE, keys[0], authserv_id=AUTHSERV_ID, results=[],
                   chain=check(MESSAGE, zone), now=NOW)
    aar = parse_message(arc_set + b"\r\n").fields[2]
    assert aar.key == "arc-authentication-results"
    assert aar.value == b" i=1; mx.forwarder.example; none"
    message = hop(MESSAGE, keys[0], zone)
    aar_value = arc_fields(message, "arc-authentication-results")[0].split(b";", 1)[1]
    assert [r.method for r in parse(aar_value).results] == ["spf", "dkim"]


def test_fields_are_folded_between_tags_with_b_alone(keys: list[SigningKey],
                                                     zone: dict[str, Any]) -> None:
    names = [f"x-header-{n}" for n in range(12)]
    message = b"".join(f"{n}: v\r\n".encode() for n in names) + MESSAGE
    arc_set = seal(message, keys[0], authserv_id=AUTHSERV_ID, results=RESULTS,
                   chain=check(message, zone), now=NOW, headers=[*DEFAULT_HEADERS, *names])
    for line in arc_set.split(b"\r\n"):
        assert len(line) <= 78 or line.startswith(b" b="), line
    assert b"x-header-11" in arc_set
    assert check(arc_set + message, zone).cv is ChainStatus.PASS


def test_write_field_keeps_tags_readable() -> None:
    field = write_field("ARC-Seal", [("a", "rsa-sha256"), ("b", "QUJD" * 30), ("cv", "none"),
                                     ("d", "example.org"), ("i", "1"), ("s", "s"), ("t", "1")])
    lines = field.split(b"\r\n")
    assert lines[0] == b"ARC-Seal: a=rsa-sha256;"
    assert lines[1] == b" b=" + b"QUJD" * 30 + b";"
    assert lines[2] == b" cv=none; d=example.org; i=1; s=s; t=1"
    (parsed,) = parse_message(field).fields
    assert parse_tag_list(parsed.value)["b"] == "QUJD" * 30


@pytest.mark.parametrize("headers", [["from", "authentication-results"], ["From", "ARC-Seal"]])
def test_seal_refuses_to_sign_arc_or_results_fields(keys: list[SigningKey],
                                                    headers: list[str]) -> None:
    with pytest.raises(ValueError, match="must not sign"):
        seal(MESSAGE, keys[0], authserv_id=AUTHSERV_ID, results=[],
             chain=ArcVerdict(ChainStatus.NONE), now=NOW, headers=headers)


def test_seal_refuses_keys_and_verdicts_that_do_not_fit(keys: list[SigningKey],
                                                        zone: dict[str, Any]) -> None:
    ed = SigningKey("example.org", "ed", ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(ValueError, match="rsa-sha256"):
        seal(MESSAGE, ed, authserv_id=AUTHSERV_ID, results=[],
             chain=ArcVerdict(ChainStatus.NONE), now=NOW)
    for chain in (ArcVerdict(ChainStatus.NONE, 1), ArcVerdict(ChainStatus.PASS, 2)):
        with pytest.raises(ValueError, match="verdict"):
            seal(chained(keys[:1], zone), keys[1], authserv_id=AUTHSERV_ID, results=[],
                 chain=chain, now=NOW)


def test_seal_async_matches_seal_for_a_big_message(keys: list[SigningKey],
                                                   zone: dict[str, Any]) -> None:
    big = MESSAGE + b"x" * 70 + b"\r\n" * 2000
    chain = check(big, zone)
    options: dict[str, Any] = {"authserv_id": AUTHSERV_ID, "results": RESULTS,
                               "chain": chain, "now": NOW}
    made = run(seal_async(big, keys[0], **options))
    assert made == seal(big, keys[0], **options)
    assert check(made + big, zone).cv is ChainStatus.PASS


# --- a second opinion -------------------------------------------------------------------------


def test_dkimpy_validates_our_chain(keys: list[SigningKey], zone: dict[str, Any]) -> None:
    dkimpy = pytest.importorskip("dkim")
    message = chained(keys, zone)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        entry = zone.get(name.decode().rstrip("."))
        return entry["TXT"][0].encode() if entry else None

    cv, results, reason = dkimpy.arc_verify(message, dnsfunc=dnsfunc)
    assert cv == b"pass", reason
    assert len(results) == 3
