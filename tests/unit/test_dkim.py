"""tayori.auth.dkim and its parts: header fields, canonicalization, tag lists, keys, signing,
and verification against an in-memory resolver (StaticResolver)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import stat
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from tayori.auth import dkim
from tayori.auth.canon import (
    BodyHash,
    Mode,
    body_hash,
    canonical_header,
    crlf_run_start,
    header_hash_input,
)
from tayori.auth.dkim import (
    DkimResult,
    DkimSignatureResult,
    SignOptions,
    sign,
    sign_async,
    verify,
)
from tayori.auth.dkim_keys import (
    KeyRecordError,
    SigningKey,
    create_key,
    fetch_key,
    keygen,
    load_signing_key,
    make_signature,
    parse_key_record,
    public_txt,
    txt_record,
    write_private_key,
)
from tayori.auth.dkim_tags import (
    Layout,
    TagListError,
    TagValue,
    fold_field,
    parse_tag_list,
    strip_tag_value,
)
from tayori.auth.headers import parse_message, select_headers, signed_header_names
from tayori.dns import DnsTemporaryError
from tayori.testing.dnsstub import StaticResolver, Zone

T = TypeVar("T")
NOW = 1_700_000_000
DOMAIN = "example.org"
MESSAGE = (
    b"Received: from a.example by b.example; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>,\r\n"
    b"  Carol <carol@example.net>\r\n"
    b"Subject: Lunch  on\tFriday?\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <lunch@example.org>\r\n"
    b"\r\n"
    b"Shall we meet at  noon? \r\n"
    b"\r\n"
    b"-- \r\n"
    b"Alice\r\n"
    b"\r\n"
)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, 10.0))


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return SigningKey(DOMAIN, "rsa", rsa.generate_private_key(65537, 2048))


@pytest.fixture(scope="module")
def ed_key() -> SigningKey:
    return SigningKey(DOMAIN, "ed", ed25519.Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def zone(rsa_key: SigningKey, ed_key: SigningKey) -> dict[str, Any]:
    return {f"{key.selector}._domainkey.{DOMAIN}": {"TXT": [public_txt(key.private_key)]}
            for key in (rsa_key, ed_key)}


def check(message: bytes, zone: Zone, **options: Any) -> list[DkimSignatureResult]:
    return run(verify(message, StaticResolver(zone), now=options.pop("now", NOW), **options))


def only(message: bytes, zone: Zone, **options: Any) -> DkimSignatureResult:
    (result,) = check(message, zone, **options)
    return result


def signed(message: bytes, keys: Sequence[SigningKey], **options: Any) -> bytes:
    return sign(message, keys, now=NOW, **options) + message


def forge(message: bytes, key: SigningKey, **tags: str) -> bytes:
    """``message`` with a signature whose tags are ours, overridden or added by ``tags``
    (``None``-like ``""`` drops a tag), signed honestly over what it says.
    """
    values: dict[str, TagValue] = {
        "v": "1", "a": key.algorithm, "c": "relaxed/relaxed", "d": key.domain,
        "s": key.selector, "t": str(NOW), "h": ["from", "to", "subject"]}
    values.update({name: value for name, value in tags.items() if name != "bh"})
    values = {name: value for name, value in values.items() if value != ""}
    parsed = parse_message(message)
    _, body_mode = str(values.get("c", "simple/simple")).partition("/")[::2]
    limit = int(str(values["l"])) if "l" in values else None
    digest = body_hash(message, parsed.body_offset, _mode(body_mode), "sha256", limit).digest
    values["bh"] = tags.get("bh", base64.b64encode(digest).decode())
    items = list(values.items())
    unsigned = fold_field("DKIM-Signature", items, "", Layout())
    header_mode = _mode(str(values.get("c", "simple")).partition("/")[0])
    h = values.get("h", [])
    names = h if isinstance(h, list) else [name.strip() for name in str(h).split(":")]
    data = header_hash_input(parsed.fields, names, unsigned, header_mode)
    b_value = base64.b64encode(make_signature(key.private_key, data)).decode()
    return fold_field("DKIM-Signature", items, b_value, Layout()) + message


def _mode(name: str) -> Mode:
    return "relaxed" if name == "relaxed" else "simple"


# --- header fields -----------------------------------------------------------------------------


def test_header_fields_keep_their_bytes_and_the_body_offset() -> None:
    parsed = parse_message(MESSAGE)
    names = [f.name for f in parsed.fields]
    assert names == [b"Received", b"From", b"To", b"Subject", b"Date", b"Message-ID"]
    assert parsed.fields[2].raw == b"To: Bob <bob@example.net>,\r\n  Carol <carol@example.net>\r\n"
    assert parsed.fields[2].value == b" Bob <bob@example.net>,\r\n  Carol <carol@example.net>"
    assert MESSAGE[parsed.body_offset:].startswith(b"Shall we")
    assert b"".join(f.raw for f in parsed.fields) + b"\r\n" == MESSAGE[: parsed.body_offset]


def test_a_message_without_an_empty_line_is_all_header() -> None:
    parsed = parse_message(b"From: a@example.org\r\nSubject: x")
    assert [f.raw for f in parsed.fields] == [b"From: a@example.org\r\n", b"Subject: x"]
    assert parsed.body_offset == len(b"From: a@example.org\r\nSubject: x")


def test_malformed_header_lines_are_kept_but_never_selected() -> None:
    parsed = parse_message(b" folded first\r\nno colon here\r\nBad Name: x\r\nFrom: a\r\n\r\n")
    assert [f.name for f in parsed.fields] == [b"", b"", b"", b"From"]
    assert select_headers(parsed.fields, ["", "bad name", "from"])[:2] == [None, None]


def test_a_name_with_space_before_the_colon_is_the_name() -> None:
    (field,) = parse_message(b"Subject \t: hi\r\n\r\n").fields
    assert (field.name, field.key, field.value) == (b"Subject", "subject", b" hi")


def test_selection_takes_the_last_unused_instance_then_null() -> None:
    fields = parse_message(b"X: 1\r\nY: a\r\nx: 2\r\n\r\n").fields
    chosen = select_headers(fields, ["x", "X", "x", "y"])
    assert [f.raw if f else None for f in chosen] == [b"x: 2\r\n", b"X: 1\r\n", None,
                                                       b"Y: a\r\n"]


def test_signed_names_count_instances_and_oversign_one_more() -> None:
    fields = parse_message(b"From: a\r\nTo: b\r\nTo: c\r\nCc: d\r\nX: e\r\n\r\n").fields
    names = signed_header_names(fields, ["from", "to", "cc", "reply-to"], ["from", "x", "date"])
    assert names == ["from", "to", "to", "cc", "from", "x", "x", "date"]


# --- canonicalization --------------------------------------------------------------------------

RFC6376_EXAMPLE = b"A: X\r\nB : Y\t\r\n\tZ  \r\n\r\n C \r\nD \t E\r\n\r\n\r\n"


def test_rfc6376_section_3_4_5_example() -> None:
    parsed = parse_message(RFC6376_EXAMPLE)
    relaxed = b"".join(canonical_header(f.raw, "relaxed") for f in parsed.fields)
    simple = b"".join(canonical_header(f.raw, "simple") for f in parsed.fields)
    assert relaxed == b"a:X\r\nb:Y Z\r\n"
    assert simple == b"A: X\r\nB : Y\t\r\n\tZ  \r\n"
    offset = parsed.body_offset
    cases: list[tuple[Mode, bytes]] = [("relaxed", b" C\r\nD E\r\n"),
                                       ("simple", b" C \r\nD \t E\r\n")]
    for mode, canonical in cases:
        assert body_hash(RFC6376_EXAMPLE, offset, mode, "sha256") == BodyHash(
            hashlib.sha256(canonical).digest(), len(canonical))


@pytest.mark.parametrize(("body", "mode", "canonical"), [
    (b"", "simple", b"\r\n"),
    (b"", "relaxed", b""),
    (b"\r\n\r\n", "simple", b"\r\n"),
    (b" \t\r\n\r\n", "relaxed", b""),
    (b"abc", "simple", b"abc\r\n"),
    (b"abc  ", "relaxed", b"abc\r\n"),
    (b"a\r\n\r\nb\r\n \r\n\r\n", "relaxed", b"a\r\n\r\nb\r\n"),
    (b"a\r\n\r\nb\r\n \r\n\r\n", "simple", b"a\r\n\r\nb\r\n \r\n"),
    (b"a\r\r\n\n\r\n", "simple", b"a\r\r\n\n\r\n"),
])
def test_body_edge_cases(body: bytes, mode: Mode, canonical: bytes) -> None:
    assert body_hash(body, 0, mode, "sha256") == BodyHash(
        hashlib.sha256(canonical).digest(), len(canonical))


def reference_body(body: bytes, mode: Mode) -> bytes:
    """RFC 6376 §3.4.3-3.4.4 the obvious way: whole body, line by line."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    lines = body.split(b"\r\n")[:-1]
    if mode == "relaxed":
        lines = [re.sub(rb"[ \t]+", b" ", line).rstrip(b" ") for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    canonical = b"".join(line + b"\r\n" for line in lines)
    return canonical or (b"\r\n" if mode == "simple" else b"")


@settings(max_examples=300, deadline=None)
@given(body=st.lists(st.sampled_from([b"a", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n\r\n"]),
                     max_size=60).map(b"".join),
       mode=st.sampled_from(["simple", "relaxed"]), chunk=st.integers(2, 9),
       limit=st.none() | st.integers(0, 40), prefix=st.binary(max_size=3))
def test_streaming_body_hash_equals_the_reference(
    body: bytes, mode: Mode, chunk: int, limit: int | None, prefix: bytes
) -> None:
    canonical = reference_body(body, mode)
    expected = canonical if limit is None else canonical[:limit]
    found = body_hash(prefix + body, len(prefix), mode, "sha256", limit, chunk=chunk)
    assert found.digest == hashlib.sha256(expected).digest()
    assert found.length == len(expected)


def test_a_long_run_of_empty_lines_is_found_from_the_tail() -> None:
    data = b"x" + b"\r\n" * 10_000
    assert crlf_run_start(data) == 1
    assert crlf_run_start(memoryview(b"\r\n" * 5000)) == 0
    assert crlf_run_start(b"x\r") == 2
    assert crlf_run_start(b"\n\r\n") == 1


def test_a_big_body_is_hashed_in_bounded_chunks() -> None:
    body = b"line with  spaces \r\n" * 20_000 + b"\r\n" * 5000
    expected = reference_body(body, "relaxed")
    assert body_hash(body, 0, "relaxed", "sha256").digest == hashlib.sha256(expected).digest()


# --- tag lists ---------------------------------------------------------------------------------


def test_tag_lists_take_folding_whitespace_around_tags_and_values() -> None:
    tags = parse_tag_list(b" v=1;\r\n\ta = rsa-sha256 ; h=From :\r\n To; b=ab\r\n cd;")
    assert tags == {"v": "1", "a": "rsa-sha256", "h": "From : To", "b": "ab cd"}


@pytest.mark.parametrize("data", [
    b"v=1; v=1", b"1v=2", b"v", b"v=1; =x", b"a=b\x01c", b"a=b\r\nc", b"a=\xff\xfe",
    b"a=b\nc",
])
def test_malformed_tag_lists_are_refused(data: bytes) -> None:
    with pytest.raises(TagListError):
        parse_tag_list(data)


def test_empty_tag_specs_and_empty_values_are_tolerated() -> None:
    assert parse_tag_list(b"a=; ;b=x;;") == {"a": "", "b": "x"}
    assert parse_tag_list(b"") == {}


def test_the_b_value_is_blanked_with_its_whitespace_and_nothing_else() -> None:
    data = b" bh=AAAA; b =\r\n abc\r\n def ; c=x"
    assert strip_tag_value(data, "b") == b" bh=AAAA; b =; c=x"
    assert strip_tag_value(b"b=xyz", "b") == b"b="
    assert strip_tag_value(b"a=1", "b") == b"a=1"


def test_folding_keeps_tag_lines_short_and_fills_b_lines() -> None:
    tags: list[tuple[str, TagValue]] = [("v", "1"), ("a", "rsa-sha256"), ("d", "example.org"),
                                        ("h", ["from", "to", "subject", "date"] * 5)]
    for layout in (Layout(width=40), Layout(width=40, list_separator=" : ")):
        field = fold_field("DKIM-Signature", tags, "B" * 100, layout)
        lines = field.decode().split("\r\n")[:-1]
        b_at = next(i for i, line in enumerate(lines) if line.startswith(" b="))
        assert all(len(line) < 40 for line in lines[:b_at])
        assert [len(line) for line in lines[b_at:]] == [40, 40, 25]
        parsed = parse_tag_list(parse_message(field).fields[0].value)
        assert parsed["h"].replace(" ", "").split(":") == ["from", "to", "subject", "date"] * 5
        assert parsed["b"].replace(" ", "") == "B" * 100


def test_layouts_are_checked() -> None:
    with pytest.raises(ValueError):
        Layout(width=10)
    with pytest.raises(ValueError):
        Layout(list_separator=";")


# --- key records -------------------------------------------------------------------------------


def test_a_key_record_with_defaults(rsa_key: SigningKey) -> None:
    p = public_txt(rsa_key.private_key).split("p=")[1]
    record = parse_key_record(f"p={p}".encode())
    assert (record.key_type, record.bits, record.hashes, record.services, record.flags) == (
        "rsa", 2048, None, frozenset({"*"}), frozenset())
    assert not record.testing


def test_key_record_tags_are_read(ed_key: SigningKey) -> None:
    p = public_txt(ed_key.private_key).split("p=")[1]
    record = parse_key_record(f"v=DKIM1; k=ed25519; h=sha256; s=email:*; t=y:s; n=x; p={p}"
                              .encode())
    assert (record.key_type, record.bits, record.testing) == ("ed25519", 256, True)
    assert record.hashes == frozenset({"sha256"}) and record.flags == frozenset({"y", "s"})


def test_a_bare_rsa_public_key_is_accepted(rsa_key: SigningKey) -> None:
    der = rsa_key.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    record = parse_key_record(b"k=rsa; p=" + base64.b64encode(der))
    assert record.bits == 2048


def test_an_empty_p_is_a_revoked_key() -> None:
    record = parse_key_record(b"v=DKIM1; p=")
    assert record.public_key is None and record.bits == 0


@pytest.mark.parametrize(("txt", "reason"), [
    (b"v=DKIM2; p=", "not DKIM1"),
    (b"v=DKIM1; k=dsa; p=", "unknown key type"),
    (b"v=DKIM1; k=rsa", "without p="),
    (b"k=rsa; p=!!!!", "not base64"),
    (b"k=rsa; p=AAAA", "not an RSA public key"),
    (b"k=ed25519; p=AAAA", "32 octets"),
    (b"k=rsa; p=x; p=y", "malformed key record"),
])
def test_unusable_key_records(txt: bytes, reason: str) -> None:
    with pytest.raises(KeyRecordError, match=reason):
        parse_key_record(txt)


def test_fetch_key_uses_the_first_usable_record(ed_key: SigningKey) -> None:
    good = public_txt(ed_key.private_key)
    resolver = StaticResolver({"s._domainkey.example.org": {"TXT": ["v=spf1 -all", good]},
                               "empty._domainkey.example.org": {"A": ["192.0.2.1"]},
                               "bad._domainkey.example.org": {"TXT": ["k=x; p="]},
                               "down._domainkey.example.org": "SERVFAIL"})
    assert run(fetch_key(resolver, "s", "example.org")).key_type == "ed25519"
    for selector, reason in (("none", "no key record"), ("empty", "no key record"),
                             ("bad", "unknown key type")):
        with pytest.raises(KeyRecordError, match=reason):
            run(fetch_key(resolver, selector, "example.org"))
    with pytest.raises(DnsTemporaryError):
        run(fetch_key(resolver, "down", "example.org"))


# --- private keys ------------------------------------------------------------------------------


def small_rsa_key() -> rsa.RSAPrivateKey:
    """A 511-bit RSA key (cryptography refuses to generate one below 1024 bits)."""
    p, q, e = _prime(2**255 + 12345), _prime(2**255 + 99999), 65537
    d = pow(e, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                    rsa.RSAPublicNumbers(e, p * q))
    return numbers.private_key()


def _prime(start: int) -> int:
    candidate = start | 1
    while not _probably_prime(candidate):
        candidate += 2
    return candidate


def _probably_prime(n: int) -> bool:
    witnesses = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    if any(n % w == 0 for w in witnesses):
        return n in witnesses
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in witnesses:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_signing_keys_are_checked_and_normalised(ed_key: SigningKey) -> None:
    key = SigningKey("Bücher.Example", "Sel_2024", ed_key.private_key)
    assert (key.domain, key.selector, key.algorithm) == (
        "xn--bcher-kva.example", "sel_2024", "ed25519-sha256")
    assert "private_key" not in repr(key)
    with pytest.raises(ValueError, match="selector"):
        SigningKey(DOMAIN, "bad selector", ed_key.private_key)
    with pytest.raises(ValueError):
        SigningKey("bad_domain..org", "s", ed_key.private_key)
    with pytest.raises(ValueError, match="511 bits"):
        SigningKey(DOMAIN, "s", small_rsa_key())


def test_private_keys_load_from_pem_and_from_a_raw_seed(tmp_path: Path) -> None:
    pem, _ = keygen("ed25519")
    (tmp_path / "ed.pem").write_bytes(pem)
    seed = bytes(range(32))
    (tmp_path / "ed.seed").write_bytes(base64.b64encode(seed) + b"\n")
    rsa_pem = rsa.generate_private_key(65537, 1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption())
    (tmp_path / "rsa.pem").write_bytes(rsa_pem)
    assert load_signing_key(tmp_path / "ed.pem", DOMAIN, "s").algorithm == "ed25519-sha256"
    from_seed = load_signing_key(tmp_path / "ed.seed", DOMAIN, "s").private_key
    assert isinstance(from_seed, ed25519.Ed25519PrivateKey)
    assert from_seed.private_bytes_raw() == seed
    assert load_signing_key(tmp_path / "rsa.pem", DOMAIN, "s").algorithm == "rsa-sha256"


@pytest.mark.parametrize(("content", "reason"), [
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "PEM"),
    (b"not a key at all", "neither PEM nor"),
    (base64.b64encode(b"short"), "32 octets"),
])
def test_unusable_private_key_files(tmp_path: Path, content: bytes, reason: str) -> None:
    (tmp_path / "key").write_bytes(content)
    with pytest.raises(ValueError, match=reason):
        load_signing_key(tmp_path / "key", DOMAIN, "s")


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_keygen_makes_a_key_and_its_record(algorithm: Any) -> None:
    pem, txt = keygen(algorithm)
    key = serialization.load_pem_private_key(pem, None)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    record = parse_key_record(txt.encode())
    assert record.key_type == algorithm
    assert txt.startswith(f"v=DKIM1; k={algorithm}; p=")
    assert isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey))
    assert public_txt(key) == txt


def test_keygen_refuses_bad_sizes_and_algorithms() -> None:
    with pytest.raises(ValueError):
        keygen("rsa", 512)
    with pytest.raises(ValueError):
        keygen("rsa", 8192)
    with pytest.raises(ValueError):
        keygen("dsa")  # type: ignore[arg-type]


def test_the_txt_record_is_split_into_255_octet_strings() -> None:
    _, value = keygen("rsa", 2048)
    line = txt_record("Example.ORG", "Sel", value)
    assert line.startswith('sel._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; p=')
    assert line.endswith('" )')
    strings = re.findall(r'"([^"]*)"', line)
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    assert "".join(strings) == value


def test_the_key_file_is_0600_and_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "example.org.rsa.pem"
    old_umask = os.umask(0)
    try:
        write_private_key(path, b"secret\n")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == b"secret\n"
    with pytest.raises(FileExistsError):
        write_private_key(path, b"other\n")
    assert path.read_bytes() == b"secret\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example.org.rsa.pem"]


def test_create_key_writes_the_key_and_returns_the_record(tmp_path: Path) -> None:
    path = tmp_path / "ed.pem"
    line = create_key(path, "example.org", "mail2024", "ed25519")
    key = load_signing_key(path, "example.org", "mail2024")
    assert line == txt_record("example.org", "mail2024", public_txt(key.private_key))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ValueError):
        create_key(tmp_path / "other.pem", "example.org", "bad selector!", "ed25519")
    assert not (tmp_path / "other.pem").exists()


# --- signing -----------------------------------------------------------------------------------


def test_the_signature_field_names_what_it_signs(rsa_key: SigningKey) -> None:
    field = sign(MESSAGE, [rsa_key], now=NOW)
    assert field.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    tags = parse_tag_list(parse_message(field).fields[0].value)
    assert [name for name in tags] == ["v", "a", "c", "d", "s", "t", "h", "bh", "b"]
    assert (tags["d"], tags["s"], tags["t"]) == (DOMAIN, "rsa", str(NOW))
    assert tags["h"].replace(" ", "").split(":") == [
        "from", "to", "subject", "date", "message-id", "from", "to", "subject", "date"]
    assert all(len(line) <= 76 for line in field.split(b"\r\n"))


def test_sign_options_are_checked() -> None:
    with pytest.raises(ValueError, match="From"):
        SignOptions(headers=("to",), oversign=())
    with pytest.raises(ValueError):
        SignOptions(canonicalization=("relaxed", "loose"))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SignOptions(expire_after=0)


def test_expiry_and_identity_are_written(ed_key: SigningKey) -> None:
    field = sign(MESSAGE, [ed_key], now=NOW, options=SignOptions(expire_after=3600),
                 identity="alice@mail.example.org")
    tags = parse_tag_list(parse_message(field).fields[0].value)
    assert (tags["i"], tags["x"]) == ("alice@mail.example.org", str(NOW + 3600))
    for identity in ("alice@example.com", "alice", "a b@example.org", "a;b@example.org"):
        with pytest.raises(ValueError, match="identity"):
            sign(MESSAGE, [ed_key], now=NOW, identity=identity)


def test_a_message_without_from_cannot_be_signed(ed_key: SigningKey) -> None:
    with pytest.raises(ValueError, match="From"):
        sign(b"To: bob@example.net\r\n\r\nhi\r\n", [ed_key], now=NOW)


def test_sign_async_signs_big_messages_in_a_worker_thread(
    ed_key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    real_sign = dkim.sign

    def spy(*args: Any, **kwargs: Any) -> bytes:
        threads.append(threading.get_ident())
        return real_sign(*args, **kwargs)

    monkeypatch.setattr(dkim, "sign", spy)
    big = MESSAGE + b"x" * 100 + b"\r\n" * dkim.BIG_BODY
    assert run(sign_async(big, [ed_key], now=NOW)) == real_sign(big, [ed_key], now=NOW)
    assert run(sign_async(MESSAGE, [ed_key], now=NOW)) == real_sign(MESSAGE, [ed_key], now=NOW)
    assert threads[0] != threading.get_ident() and threads[1] == threading.get_ident()


# --- verifying: what passes --------------------------------------------------------------------


@pytest.mark.parametrize("canonicalization", [
    ("simple", "simple"), ("simple", "relaxed"), ("relaxed", "simple"), ("relaxed", "relaxed")])
def test_signed_messages_verify_in_every_canonicalization(
    rsa_key: SigningKey, ed_key: SigningKey, zone: Zone, canonicalization: tuple[Mode, Mode]
) -> None:
    options = SignOptions(canonicalization=canonicalization)
    found = check(signed(MESSAGE, [rsa_key, ed_key], options=options), zone)
    assert [(r.result, r.selector, r.algorithm) for r in found] == [
        (DkimResult.PASS, "rsa", "rsa-sha256"), (DkimResult.PASS, "ed", "ed25519-sha256")]
    assert [r.key_bits for r in found] == [2048, 256]


def test_relaxed_signatures_survive_whitespace_and_case_changes(
    ed_key: SigningKey, zone: Zone
) -> None:
    message = signed(MESSAGE, [ed_key])
    rewritten = (message.replace(b"Subject: Lunch  on\tFriday?", b"SUBJECT:Lunch on Friday?  ")
                 .replace(b"at  noon? \r\n", b"at noon?\r\n") + b"\r\n\r\n")
    assert only(rewritten, zone).result is DkimResult.PASS


def test_unsigned_fields_may_be_added(ed_key: SigningKey, zone: Zone) -> None:
    message = b"X-Spam: no\r\nReceived: from c by d\r\n" + signed(MESSAGE, [ed_key])
    assert only(message, zone).result is DkimResult.PASS


def test_the_result_carries_what_authentication_results_needs(
    ed_key: SigningKey, zone: Zone
) -> None:
    message = signed(MESSAGE, [ed_key])
    b_value = parse_tag_list(parse_message(message).fields[0].value)["b"]
    result = only(message, zone)
    assert (result.domain, result.selector, result.auid, result.reason) == (
        DOMAIN, "ed", "@example.org", "verified")
    assert result.header_b == b_value.replace(" ", "")[:8]


def test_a_message_without_signatures_has_no_results(zone: Zone) -> None:
    assert check(MESSAGE, zone) == []


def test_a_testing_key_still_passes_and_says_so(ed_key: SigningKey) -> None:
    zone = {"ed._domainkey.example.org": {"TXT": [public_txt(ed_key.private_key) + "; t=y"]}}
    result = only(signed(MESSAGE, [ed_key]), zone)
    assert (result.result, result.testing) == (DkimResult.PASS, True)
    assert "testing" in result.reason


def test_a_big_body_is_hashed_off_the_event_loop(
    ed_key: SigningKey, zone: Zone, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    real = dkim.hash_bodies

    def spy(*args: Any) -> Any:
        threads.append(threading.get_ident())
        return real(*args)

    monkeypatch.setattr(dkim, "hash_bodies", spy)
    big = signed(MESSAGE + b"0123456789abcdef\r\n" * 8192, [ed_key])
    loop_thread: list[int] = []

    async def verify_big() -> list[DkimSignatureResult]:
        loop_thread.append(threading.get_ident())
        return await verify(big, StaticResolver(zone), now=NOW)

    assert [r.result for r in run(verify_big())] == [DkimResult.PASS]
    assert threads and threads[0] != loop_thread[0]
    assert only(signed(MESSAGE, [ed_key]), zone).result is DkimResult.PASS
    assert threads[1] == threading.get_ident()  # a small body is hashed in place


def test_one_key_lookup_and_one_body_hash_serve_identical_signatures(
    ed_key: SigningKey, zone: Zone
) -> None:
    field = sign(MESSAGE, [ed_key], now=NOW)
    resolver = StaticResolver(zone)
    found = run(verify(field + field + MESSAGE, resolver, now=NOW))
    assert [r.result for r in found] == [DkimResult.PASS] * 2
    assert resolver.queries[("ed._domainkey.example.org", "TXT")] == 1


def test_signatures_beyond_the_limit_are_not_evaluated(ed_key: SigningKey, zone: Zone) -> None:
    field = sign(MESSAGE, [ed_key], now=NOW)
    found = check(field * 3 + MESSAGE, zone, max_signatures=2)
    assert [r.result for r in found] == [DkimResult.PASS, DkimResult.PASS, DkimResult.NEUTRAL]
    assert found[2].domain == DOMAIN and "not evaluated" in found[2].reason
    with pytest.raises(ValueError):
        check(MESSAGE, zone, max_signatures=0)


# --- verifying: what does not ------------------------------------------------------------------


def test_a_changed_body_fails(ed_key: SigningKey, zone: Zone) -> None:
    message = signed(MESSAGE, [ed_key]).replace(b"noon", b"nine")
    result = only(message, zone)
    assert (result.result, result.reason) == (DkimResult.FAIL, "body hash did not verify")


def test_a_changed_signed_header_fails(rsa_key: SigningKey, zone: Zone) -> None:
    message = signed(MESSAGE, [rsa_key]).replace(b"Subject: Lunch", b"Subject: Dinner")
    result = only(message, zone)
    assert (result.result, result.reason) == (DkimResult.FAIL, "signature did not verify")


@pytest.mark.parametrize("added", [b"From: mallory@example.com\r\n",
                                   b"Subject: Win!\r\n", b"To: eve@example.com\r\n"])
def test_an_added_oversigned_header_fails(
    ed_key: SigningKey, zone: Zone, added: bytes
) -> None:
    message = signed(MESSAGE, [ed_key])
    for tampered in (added + message, message.replace(b"\r\n\r\n", b"\r\n" + added + b"\r\n", 1)):
        assert only(tampered, zone).result is DkimResult.FAIL


def test_a_replaced_signature_value_fails(ed_key: SigningKey, zone: Zone) -> None:
    message = signed(MESSAGE, [ed_key])
    start, end = message.index(b" b=") + 3, message.index(b"\r\nReceived:")
    replaced = message[:start] + b"AAAA" + message[end:]
    result = only(replaced, zone)
    assert (result.result, result.reason) == (DkimResult.FAIL, "signature did not verify")


def test_a_missing_key_record_is_a_permerror(ed_key: SigningKey) -> None:
    result = only(signed(MESSAGE, [ed_key]), {})
    assert (result.result, result.reason) == (
        DkimResult.PERMERROR, "no key record at ed._domainkey.example.org")


def test_a_dns_failure_is_a_temperror(ed_key: SigningKey) -> None:
    result = only(signed(MESSAGE, [ed_key]), {"ed._domainkey.example.org": "SERVFAIL"})
    assert result.result is DkimResult.TEMPERROR


@pytest.mark.parametrize(("record", "reason"), [
    ("v=DKIM1; k=ed25519; p=", "revoked"),
    ("v=DKIM1; k=rsa; p={rsa}", "does not fit"),
    ("v=DKIM1; k=ed25519; h=sha1; p={ed}", "h= does not allow sha256"),
    ("v=DKIM1; k=ed25519; s=tlsrpt; p={ed}", "not for email"),
    ("v=DKIM2; k=ed25519; p={ed}", "not DKIM1"),
    ("v=DKIM1; k=ed448; p={ed}", "unknown key type"),
])
def test_keys_that_refuse_the_signature_are_permerrors(
    rsa_key: SigningKey, ed_key: SigningKey, record: str, reason: str
) -> None:
    keys = {"rsa": public_txt(rsa_key.private_key).split("p=")[1],
            "ed": public_txt(ed_key.private_key).split("p=")[1]}
    zone = {"ed._domainkey.example.org": {"TXT": [record.format(**keys)]}}
    result = only(signed(MESSAGE, [ed_key]), zone)
    assert result.result is DkimResult.PERMERROR
    assert reason in result.reason


def test_strict_keys_refuse_a_subdomain_identity(ed_key: SigningKey) -> None:
    zone = {"ed._domainkey.example.org": {"TXT": [public_txt(ed_key.private_key) + "; t=s"]}}
    sub = signed(MESSAGE, [ed_key], identity="alice@mail.example.org")
    same = signed(MESSAGE, [ed_key], identity="alice@example.org")
    assert only(sub, zone).result is DkimResult.PERMERROR
    assert only(same, zone).result is DkimResult.PASS


def test_rsa_keys_below_1024_bits_are_refused(rsa_key: SigningKey) -> None:
    small = small_rsa_key().public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    zone = {"rsa._domainkey.example.org": {"TXT": [b"k=rsa; p=" + base64.b64encode(small)]}}
    result = only(signed(MESSAGE, [rsa_key]), zone)
    assert result.result is DkimResult.PERMERROR
    assert "511 bits" in result.reason and result.key_bits == 511


@pytest.mark.parametrize(("tags", "reason"), [
    ({"v": ""}, "missing v="),
    ({"h": ""}, "missing h="),
    ({"v": "2"}, "unsupported version"),
    ({"a": "rsa-sha512"}, "unsupported algorithm"),
    ({"c": "relaxed/loose"}, "unknown canonicalization"),
    ({"q": "https"}, "unsupported query method"),
    ({"d": "example..org"}, "malformed domain"),
    ({"d": "exa mple.org"}, "malformed domain"),
    ({"s": "-bad"}, "malformed selector"),
    ({"h": "to:subject"}, "From is not signed"),
    ({"h": "from::to"}, "malformed h="),
    ({"i": "alice@example.com"}, "not in d="),
    ({"i": "no-at-sign"}, "not in d="),
    ({"i": "alice@badexample.org"}, "not in d="),
    ({"t": "2000", "x": "1000"}, "earlier than t="),
    ({"t": "soon"}, "malformed t="),
    ({"l": "-1"}, "malformed l="),
    ({"bh": "not base64!"}, "bh= is not base64"),
])
def test_malformed_signatures_are_permerrors(
    ed_key: SigningKey, zone: Zone, tags: dict[str, str], reason: str
) -> None:
    result = only(forge(MESSAGE, ed_key, **tags), zone)
    assert result.result is DkimResult.PERMERROR
    assert reason in result.reason


def test_a_malformed_tag_list_is_a_permerror_without_details(zone: Zone) -> None:
    result = only(b"DKIM-Signature: v=1; v=1; d=example.org\r\n" + MESSAGE, zone)
    assert (result.result, result.domain, result.selector) == (DkimResult.PERMERROR, "", "")
    assert "duplicate" in result.reason


def test_odd_but_valid_signatures_pass(ed_key: SigningKey, zone: Zone) -> None:
    for tags in ({"q": "dns/txt"}, {"q": "foo:DNS/TXT"}, {"c": "relaxed"}, {"c": "simple"},
                 {"i": "alice@Sub.Example.ORG"}, {"z": "From:x", "n": "any"},
                 {"h": "From : TO : subject : X-Absent"}, {"a": "ED25519-SHA256"}):
        result = only(forge(MESSAGE, ed_key, **tags), zone)
        assert result.result is DkimResult.PASS, (tags, result.reason)


def test_an_expired_signature_is_neutral(ed_key: SigningKey, zone: Zone) -> None:
    message = forge(MESSAGE, ed_key, x=str(NOW + 60))
    assert only(message, zone, now=NOW + 60 + dkim.CLOCK_SKEW).result is DkimResult.PASS
    result = only(message, zone, now=NOW + 61 + dkim.CLOCK_SKEW)
    assert (result.result, result.reason) == (
        DkimResult.NEUTRAL, f"signature expired (x={NOW + 60})")


def test_a_timestamp_in_the_future_is_not_held_against_a_signature(
    ed_key: SigningKey, zone: Zone
) -> None:
    message = forge(MESSAGE, ed_key, t=str(NOW + 86400))
    assert only(message, zone).result is DkimResult.PASS


def test_a_body_length_limit_lets_text_be_appended(ed_key: SigningKey, zone: Zone) -> None:
    body_length = len(reference_body(MESSAGE.split(b"\r\n\r\n", 1)[1], "relaxed"))
    message = forge(MESSAGE, ed_key, l=str(body_length))
    assert only(message + b"Appended.\r\n", zone).result is DkimResult.PASS
    too_long = forge(MESSAGE, ed_key, l=str(body_length + 1))
    result = only(too_long, zone)
    assert (result.result, result.reason) == (
        DkimResult.FAIL, f"l={body_length + 1} is longer than the body")


def test_a_signature_over_nothing_but_null_headers_still_checks(
    ed_key: SigningKey, zone: Zone
) -> None:
    message = forge(MESSAGE, ed_key, h="from:x-none:x-none")
    assert only(message, zone).result is DkimResult.PASS
    assert only(message.replace(b"From: Alice", b"From: Alicia"), zone).result is (
        DkimResult.FAIL)
