"""DKIM conformance: the third-party vectors in ../shared/testdata/dkim.

Every signature of the Stalwart vectors, the RFC 8463 example and dkimpy's signed
messages verifies at the vectors' frozen time; variants of each (a body byte changed, a
signed header changed, the key record removed, a bad ``k=`` or ``v=``) give fail or
permerror; tayori's signature over the RFC 8463 example, with its keys and tags, is
byte-identical to the RFC's; and messages tayori signs with dkimpy's keys verify against
dkimpy's published key records (both RSA key encodings, Ed25519).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import pytest

from harness import SHARED, shared_data
from tayori.auth.dkim import (
    RFC8463_LAYOUT,
    DkimResult,
    DkimSignatureResult,
    SignOptions,
    sign,
    verify,
)
from tayori.auth.dkim_keys import load_signing_key
from tayori.testing.dnsstub import StaticResolver

T = TypeVar("T")
DKIM = SHARED / "dkim"
DKIMPY = DKIM / "dkimpy"
STALWART_TIME = 1667843664  # testdata README: every Stalwart signature passes then
RFC8463_TIME = 1528637909  # t= of the RFC 8463 example
RFC8463_ED25519 = "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
# dkimpy's test_dkim.py serves this for test2.message (Google's 2012 key); data, not code.
GMAIL_20120113 = (
    "k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA1Kd87/UeJjenpabgbFwh"
    "+eBCsSTrqmwIYYvywlbhbqoo2DymndFkbjOVIPIldNs/m40KF+yzMn1skyoxcTUGCQ"
    "s8g3FgD2Ap3ZB5DekAo5wMmk4wimDO+U8QzI3SD07y2+07wlNWwIt8svnxgdxGkVbb"
    "hzY8i+RQ9DpSVpPbF7ykQxtKXkv/ahW3KjViiAH+ghvvIhkx4xYSIc9oSwVmAl5Oct"
    "MEeWUwg8Istjqz8BZeTWbf41fbNhte7Y+YqZOwq1Sd0DbvYAD9NOZK9vlfuac0598H"
    "Y+vtSBczUiKERHv1yRbcaQtZFh5wtiRrN04BLUTD21MycBX5jYchHjPY/wIDAQAB"
)
Records = dict[str, str]


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, 10.0))


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def dkimpy(name: str) -> bytes:
    return (DKIMPY / name).read_bytes()


def dkimpy_txt(name: str) -> str:
    return dkimpy(name).decode("ascii").strip()


def check(message: bytes, records: Mapping[str, str], now: float) -> list[DkimSignatureResult]:
    zone = {name: {"TXT": [value]} for name, value in records.items()}
    return run(verify(message, StaticResolver(zone), now=now))


def results(found: list[DkimSignatureResult]) -> list[str]:
    return [r.result.value for r in found]


# --- the vectors ---------------------------------------------------------------------------------


def stalwart(name: str) -> tuple[bytes, Records]:
    """A Stalwart vector: DNS lines ``name value``, a blank line, the message (LF)."""
    dns, _, message = (DKIM / "stalwart" / name).read_bytes().partition(b"\n\n")
    records = dict(line.split(" ", 1) for line in dns.decode("ascii").splitlines())
    return crlf(message), records


def rfc_records() -> Records:
    """The RFC 8463 example's keys: its Ed25519 key, and RFC 6376's RSA key (dkimpy's)."""
    return {"brisbane._domainkey.football.example.com": RFC8463_ED25519,
            "test._domainkey.football.example.com": dkimpy_txt("test.txt")}


def dkimpy_vectors() -> dict[str, tuple[bytes, Records, int]]:
    """dkimpy's signed messages: message, key records, number of signatures."""
    return {
        "rfc6376.signed.msg": (crlf(dkimpy("rfc6376.signed.msg")), rfc_records(), 2),
        "rfc6376.signed.rsa.msg": (crlf(dkimpy("rfc6376.signed.rsa.msg")), rfc_records(), 1),
        "ed25519test2.msg": (dkimpy("ed25519test2.msg"),
                             {"sed._domainkey.test.ex": dkimpy_txt("eximtest.dns")}, 1),
        "test2.message": (crlf(dkimpy("test2.message")),
                          {"20120113._domainkey.gmail.com": GMAIL_20120113}, 1),
    }


STALWART = [f"00{i}.txt" for i in range(1, 7)]
DKIMPY_SIGNED = ["rfc6376.signed.msg", "rfc6376.signed.rsa.msg", "ed25519test2.msg",
                 "test2.message"]
VECTORS = [f"stalwart/{name}" for name in STALWART] + ["rfc8463-appendix-a3.eml"] + [
    f"dkimpy/{name}" for name in DKIMPY_SIGNED]


def vector(name: str) -> tuple[bytes, Records, float, int]:
    """(message, key records, frozen time, number of signatures) of a vector."""
    shared_data("dkim")
    kind, _, file = name.partition("/")
    if kind == "stalwart":
        message, records = stalwart(file)
        return message, records, STALWART_TIME, message.count(b"\r\nDKIM-Signature:") + 1
    if kind == "dkimpy":
        message, records, count = dkimpy_vectors()[file]
        return message, records, STALWART_TIME, count
    return (DKIM / name).read_bytes(), rfc_records(), RFC8463_TIME, 2


def test_the_vectors_are_there() -> None:
    shared_data("dkim")
    assert all((DKIM / "stalwart" / name).exists() for name in STALWART)
    assert all((DKIMPY / name).exists() for name in DKIMPY_SIGNED)


@pytest.mark.parametrize("name", VECTORS)
def test_every_signature_of_a_vector_passes(name: str) -> None:
    message, records, now, count = vector(name)
    found = check(message, records, now)
    assert results(found) == ["pass"] * count, [r.reason for r in found]
    assert all(r.domain and r.selector and len(r.header_b) == 8 for r in found)


def test_the_vectors_hold_fifteen_signatures() -> None:
    total = sum(vector(name)[3] for name in VECTORS)
    assert total == 15  # Stalwart 8, RFC 8463 2, dkimpy 5


def test_an_expired_vector_is_neutral_on_the_wall_clock() -> None:
    message, records, _, _ = vector("stalwart/005.txt")
    (result,) = check(message, records, now=STALWART_TIME + 2 * 86400)
    assert result.result is DkimResult.NEUTRAL
    assert "expired" in result.reason


def test_the_rfc8463_example_reports_what_authentication_results_needs() -> None:
    message, records, now, _ = vector("rfc8463-appendix-a3.eml")
    ed25519, rsa = check(message, records, now)
    assert (ed25519.domain, ed25519.selector, ed25519.algorithm, ed25519.header_b) == (
        "football.example.com", "brisbane", "ed25519-sha256", "/gCrinpc")
    assert (rsa.selector, rsa.algorithm, rsa.header_b, rsa.key_bits) == (
        "test", "rsa-sha256", "F45dVWDf", 1024)
    assert ed25519.auid == "@football.example.com"


def test_dkimpy_negative_vectors() -> None:
    shared_data("dkim")
    # the tags of rfc6376.signed.rsa.msg changed (t= gone, x= added), b= kept: no longer valid
    (changed,) = check(crlf(dkimpy("rfc6376.signed.no_t.msg")), rfc_records(), STALWART_TIME)
    assert changed.result is DkimResult.FAIL
    # d=legitimate.com(.attacker.com: not a domain, so no key is even looked up
    (bad_domain,) = check(crlf(dkimpy("test.message.baddomain")), {}, STALWART_TIME)
    assert bad_domain.result is DkimResult.PERMERROR
    assert "d=" in bad_domain.reason


@pytest.mark.parametrize(("record", "reason"), [
    ("badk.txt", "k=ed25519-sha256"),  # an unknown key type
    ("badversion.txt", "v=DKIM1:"),  # "v=DKIM1: g=*" is not DKIM1
    ("test_bad.txt", "not an RSA public key"),  # truncated key data
    ("test_tlsrpt.txt", "s="),  # a key for TLS reports only
])
def test_dkimpy_bad_key_records_are_permerrors(record: str, reason: str) -> None:
    shared_data("dkim")
    records = {"test._domainkey.football.example.com": dkimpy_txt(record)}
    (found,) = check(crlf(dkimpy("rfc6376.signed.rsa.msg")), records, RFC8463_TIME)
    assert found.result is DkimResult.PERMERROR
    assert reason in found.reason


def test_a_key_record_without_k_means_rsa() -> None:
    shared_data("dkim")
    records = {"test._domainkey.football.example.com": dkimpy_txt("test2.txt")}
    (found,) = check(crlf(dkimpy("rfc6376.signed.rsa.msg")), records, RFC8463_TIME)
    assert found.result is DkimResult.PASS


# --- negative variants of every vector -----------------------------------------------------------


def change_body_byte(message: bytes) -> bytes:
    """One letter or digit of the body replaced by another (whitespace would be relaxed)."""
    body_start = message.index(b"\r\n\r\n") + 4
    match = re.compile(rb"[A-Za-z0-9]").search(message, body_start)
    assert match is not None
    old = message[match.start()]
    new = b"x" if old != ord("x") else b"y"
    return message[: match.start()] + new + message[match.start() + 1 :]


def change_from(message: bytes) -> bytes:
    """The From field (every signature signs it) with one more letter in its value."""
    changed, count = re.subn(rb"(?im)^(From:[ \t]*)", rb"\1X", message, count=1)
    assert count == 1
    return changed


def without_records(records: Records) -> Records:
    return {}


def with_bad_k(records: Records) -> Records:
    return {name: _set_tag(value, "k", "dsa") for name, value in records.items()}


def with_bad_v(records: Records) -> Records:
    return {name: "v=DKIM2; " + re.sub(r"v=DKIM1;\s*", "", value)
            for name, value in records.items()}


def _set_tag(record: str, tag: str, value: str) -> str:
    if re.search(rf"(^|;)\s*{tag}=", record):
        return re.sub(rf"(^|;)(\s*){tag}=[^;]*", rf"\1\2{tag}={value}", record)
    return f"{tag}={value}; {record}"


MESSAGE_CHANGES: dict[str, Callable[[bytes], bytes]] = {
    "body byte changed": change_body_byte,
    "signed header changed": change_from,
}
RECORD_CHANGES: dict[str, tuple[Callable[[Records], Records], str]] = {
    "key record removed": (without_records, "no key record"),
    "bad k=": (with_bad_k, "unknown key type"),
    "bad v=": (with_bad_v, "not DKIM1"),
}


@pytest.mark.parametrize("change", MESSAGE_CHANGES)
@pytest.mark.parametrize("name", VECTORS)
def test_a_changed_message_fails(name: str, change: str) -> None:
    message, records, now, count = vector(name)
    found = check(MESSAGE_CHANGES[change](message), records, now)
    assert results(found) == ["fail"] * count, [r.reason for r in found]


@pytest.mark.parametrize("change", RECORD_CHANGES)
@pytest.mark.parametrize("name", VECTORS)
def test_a_bad_key_record_is_a_permerror(name: str, change: str) -> None:
    message, records, now, count = vector(name)
    alter, reason = RECORD_CHANGES[change]
    found = check(message, alter(records), now)
    assert results(found) == ["permerror"] * count
    assert all(reason in r.reason for r in found), [r.reason for r in found]


# --- signing: byte for byte --------------------------------------------------------------------

RFC8463_OPTIONS = SignOptions(headers=("from", "to", "subject", "date", "message-id"),
                              oversign=("from", "subject", "date"), layout=RFC8463_LAYOUT)


def rfc8463_parts() -> tuple[bytes, bytes, bytes]:
    """The example's Ed25519 field, RSA field, and the message they sign."""
    example = (shared_data("dkim") / "rfc8463-appendix-a3.eml").read_bytes()
    rsa_at = example.index(b"DKIM-Signature: v=1; a=rsa-sha256")
    message_at = example.index(b"From: ")
    return example[:rsa_at], example[rsa_at:message_at], example[message_at:]


@pytest.mark.parametrize(("key_file", "selector", "which"), [
    ("rfc8032_7_1.key", "brisbane", 0),  # RFC 8463 A.1's Ed25519 key (a base64 seed)
    ("test.private", "test", 1),  # RFC 6376's example RSA key
])
def test_our_signature_over_the_rfc8463_example_is_the_rfcs(
    key_file: str, selector: str, which: int
) -> None:
    parts = rfc8463_parts()
    key = load_signing_key(DKIMPY / key_file, "football.example.com", selector)
    made = sign(parts[2], [key], now=RFC8463_TIME, options=RFC8463_OPTIONS,
                identity="@football.example.com")
    assert made == parts[which]


def test_dual_signing_the_rfc8463_example_gives_both_fields_in_key_order() -> None:
    ed25519_field, rsa_field, message = rfc8463_parts()
    keys = [load_signing_key(DKIMPY / "rfc8032_7_1.key", "football.example.com", "brisbane"),
            load_signing_key(DKIMPY / "test.private", "football.example.com", "test")]
    made = sign(message, keys, now=RFC8463_TIME, options=RFC8463_OPTIONS,
                identity="@football.example.com")
    assert made == ed25519_field + rsa_field


# --- signing with dkimpy's keys, verifying against dkimpy's records ---------------------------

KEY_PAIRS = [
    ("1024_testkey.key", "1024_testkey_wo_markers.pub.txt"),
    ("1024_testkey.key", "1024_testkey_wo_markers.pub.rsa.txt"),  # bare RSAPublicKey p=
    ("2048_testkey.key", "2048_testkey_wo_markers.pub.txt"),
    ("2048_testkey.key", "2048_testkey_wo_markers.pub.rsa.txt"),
    ("2048_testkey_PKCS8.key", "2048_testkey_PKCS8.key.pub.txt"),
    ("test.private", "test.txt"),
    ("ed25519test.key", "ed25519test.dns"),
]
MESSAGES = ["test.message", "rfc6376.msg", "rfc6376.w1258.msg", "test_extra.message",
            "message.mbox", "ed25519test.msg"]


@pytest.mark.parametrize("message_file", MESSAGES)
@pytest.mark.parametrize(("key_file", "record_file"), KEY_PAIRS)
def test_messages_signed_with_dkimpys_keys_verify(
    key_file: str, record_file: str, message_file: str
) -> None:
    shared_data("dkim")
    key = load_signing_key(DKIMPY / key_file, "example.com", "test")
    message = crlf(dkimpy(message_file))
    signed = sign(message, [key], now=STALWART_TIME) + message
    records = {"test._domainkey.example.com": dkimpy_txt(record_file)}
    ours, *others = check(signed, records, STALWART_TIME)  # message.mbox has its own
    assert ours.result is DkimResult.PASS, ours.reason
    assert [r.reason for r in others] == ["no key record at 2007-00._domainkey.kitterman.com"
                                          ] * len(others)


def test_a_message_without_from_is_not_signed() -> None:
    shared_data("dkim")
    key = load_signing_key(DKIMPY / "test.private", "example.com", "test")
    with pytest.raises(ValueError, match="From"):
        sign(crlf(dkimpy("test_nofrom.message")), [key], now=STALWART_TIME)
