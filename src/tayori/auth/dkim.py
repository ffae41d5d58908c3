"""DKIM: verifying every signature on a message, and signing with tayori's own keys.

Takes: a message as raw bytes with CRLF line endings, as the spool stores it (header
fields, empty line, body). To verify: a :class:`tayori.dns.Resolver` for the key records
(``<s>._domainkey.<d>`` TXT) and the time (injectable; default the wall clock). To sign:
:class:`SigningKey` values (several per domain for dual signing, RSA-2048 and Ed25519),
:class:`SignOptions` (header names to sign and over-sign, canonicalization, expiry,
layout) and the time.
Promises: :func:`verify` returns one :class:`DkimSignatureResult` per DKIM-Signature
field, in header order, with the RFC 8601 result names:

- ``pass``: body hash and signature verified;
- ``fail``: the body hash or the signature did not verify, or ``l=`` is longer than the
  body;
- ``neutral``: well-formed, but not evaluated: expired (``x=`` more than
  :data:`CLOCK_SKEW` ago), or beyond ``max_signatures``. A ``t=`` in the future is not
  held against a signature (RFC 6376 §3.5 allows it to be ignored; a signer's clock skew
  must not break its mail): ``t=`` is only checked against ``x=``;
- ``policy``: an ``rsa-sha1`` signature that verified. RFC 8301 §3.1 says verifiers must
  not consider it valid; it is not ``fail`` either, which would claim it did not verify.
  ``policy`` says what happened: valid, and refused by rule. One that does not verify is
  ``fail`` like any other;
- ``temperror``: the key lookup failed temporarily (DnsTemporaryError);
- ``permerror``: the signature or its key cannot be used: malformed tag list, a missing
  required tag, ``v=`` not 1, an unknown ``a=``, ``c=`` or ``q=``, a bad ``d=`` or
  ``s=``, From not signed, ``i=`` outside ``d=``, ``x=`` before ``t=``; no key record
  (NXDOMAIN or none there), an unusable record (``v=``, ``k=``, ``p=``), a revoked key,
  a key of another type, a key whose ``h=``, ``s=`` or ``t=s`` refuses the signature,
  an RSA key shorter than 1024 bits (RFC 8301 §3.2) or longer than 8192.

Keys are fetched concurrently, one lookup per (selector, domain). The body is hashed once
per (canonicalization, hash, ``l=``), streaming, in a worker thread when it is longer than
:data:`BIG_BODY`, so a big message never stalls the event loop.
:func:`sign` returns the DKIM-Signature fields to prepend (folded, CRLF line endings), one
per key in order: ``t=`` now, ``h=`` every instance of :data:`DEFAULT_HEADERS` present
plus one more of each :data:`OVERSIGNED` name (so none can be added), relaxed/relaxed,
tags in the order ``v a c d i q s t x h bh b`` (RFC 8463's: with :data:`RFC8463_LAYOUT`
its Appendix A.3 example comes out byte for byte). :func:`sign_async` is the same, in a
worker thread for a message longer than :data:`BIG_BODY`. Keys come from
:func:`load_signing_key`; :func:`create_key` is ``tayori dkim keygen``.
The parts ARC (RFC 8617) reuses live beside this module: :mod:`tayori.auth.headers`
(raw fields, instance selection), :mod:`tayori.auth.canon` (canonicalization, the signed
header data, streaming body hashes), :mod:`tayori.auth.dkim_tags` (tag lists, folding),
:mod:`tayori.auth.dkim_keys` (key records, private keys, the two crypto operations); and
here, since an ARC-Message-Signature is verified as a DKIM-Signature is: the signature as
read (:class:`MessageSignature`), whether a key fits it (:func:`key_problem`), whether it
verifies (:func:`signature_problem`), the body hashes (:func:`hash_bodies_async`) and
the rule for big messages (:func:`in_worker_if_big`).
Failure policy: :func:`verify` does not raise for anything a message or DNS may hold: it
is all in the results (``reason`` is for logs, never for the SMTP wire). :func:`sign`
raises ValueError for a message without a From field (RFC 6376 §5.4 requires signing it)
or an identity outside the signing domain.
Config keys: none read here; the caller hands in keys and options (proposed:
``[[dkim.keys]]`` domain/selector/key_file, ``dkim.sign_for``).
Standards: RFC 6376 (DKIM), RFC 8463 (ed25519-sha256), RFC 8301 (rsa-sha1 not trusted,
RSA of 1024 bits at least), RFC 8601 §2.7.1 (result names), RFC 6008 (``header.b``).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from tayori.auth.canon import MODES, BodyHash, HashName, Mode, body_hash, header_hash_input
from tayori.auth.dkim_keys import (
    ALGORITHMS,
    MAX_RSA_BITS,
    MIN_RSA_BITS,
    Algorithm,
    KeyLookup,
    KeyRecord,
    KeyRecordError,
    SigningKey,
    create_key,
    fetch_keys,
    keygen,
    load_signing_key,
    make_signature,
    txt_record,
    verify_signature,
    write_private_key,
)
from tayori.auth.dkim_tags import (
    Layout,
    TagListError,
    TagValue,
    base64_value,
    compact,
    fold_field,
    number_value,
    parse_tag_list,
    split_list,
    strip_tag_value,
)
from tayori.auth.headers import HeaderField, parse_message, signed_header_names
from tayori.dns import DnsTemporaryError, Resolver

FIELD_NAME = "DKIM-Signature"
BIG_BODY = 64 * 1024
"""Bodies longer than this are hashed in a worker thread."""
MAX_SIGNATURES = 10
"""Signatures evaluated per message by default; later ones are reported ``neutral``."""
CLOCK_SKEW = 300
"""Seconds of slack for ``x=`` (expiry) against our clock."""
DEFAULT_HEADERS: tuple[str, ...] = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "sender",
    "in-reply-to", "references", "mime-version", "content-type",
    "content-transfer-encoding", "content-disposition", "resent-date", "resent-from",
    "resent-sender", "resent-to", "resent-cc", "resent-message-id", "list-id",
    "list-help", "list-unsubscribe", "list-unsubscribe-post", "list-subscribe",
    "list-post", "list-owner", "list-archive",
)
"""RFC 6376 §5.4.1's recommendation, with the MIME fields and RFC 8058's List-Unsubscribe-Post."""
OVERSIGNED: tuple[str, ...] = ("from", "to", "subject", "date")
"""Names signed once more than they occur, so a second instance cannot be added."""
RFC8463_LAYOUT = Layout(width=59, list_separator=" : ", query_tag=True)
"""The layout of the RFC 6376 / RFC 8463 examples."""

_REQUIRED_TAGS = ("v", "a", "b", "bh", "d", "h", "s")
_LDH = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LDH}(?:\.{_LDH})*\Z")
_SELECTOR = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\Z")
_DIGITS = {"l": re.compile(r"[0-9]{1,76}\Z"), "t": re.compile(r"[0-9]{1,12}\Z"),
           "x": re.compile(r"[0-9]{1,12}\Z")}
_IDENTITY = re.compile(r"[\x21-\x3a\x3c-\x7e]*@[A-Za-z0-9.-]+\Z")
_T = TypeVar("_T")


class DkimResult(StrEnum):
    """The result of one signature, named as in RFC 8601 §2.7.1."""

    PASS = "pass"
    FAIL = "fail"
    NEUTRAL = "neutral"
    POLICY = "policy"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


@dataclass(frozen=True, slots=True)
class DkimSignatureResult:
    """What became of one DKIM-Signature field.

    ``domain`` (``d=``, lower case), ``selector``, ``algorithm`` (``a=``) and ``auid``
    (``i=``, default ``@d``) are as far as the field could be read (``""`` otherwise).
    ``header_b`` is the first 8 characters of ``b=`` (RFC 6008, to tell signatures of one
    domain apart in Authentication-Results). ``reason`` is for logs. ``key_bits`` and
    ``testing`` (``t=y``) describe the key when one was fetched.
    """

    result: DkimResult
    domain: str
    selector: str
    algorithm: str
    header_b: str
    auid: str
    reason: str
    key_bits: int = 0
    testing: bool = False


class _Verdict(Exception):
    """What became of a signature: ``result`` for ``reason``. Raised where the evaluation
    ends early (a malformed field, an unusable key), returned where it runs to the end.
    """

    def __init__(self, result: DkimResult, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


BodyKey = tuple[Mode, HashName, int | None]
"""What a body hash depends on: canonicalization, hash, length limit (``l=``)."""


@dataclass(frozen=True, slots=True)
class MessageSignature:
    """A DKIM-Signature or ARC-Message-Signature whose tags read well: what verifying it
    needs (RFC 6376 §3.5; RFC 8617 §4.1.2)."""

    field: HeaderField
    algorithm: Algorithm
    header_canon: Mode
    body_canon: Mode
    domain: str
    selector: str
    signed: tuple[str, ...]
    body_hash: bytes
    signature: bytes
    length: int | None
    expires: int | None

    @property
    def key_id(self) -> tuple[str, str]:
        return self.selector, self.domain

    @property
    def body_key(self) -> BodyKey:
        return self.body_canon, self.algorithm.hash_name, self.length


@dataclass(frozen=True, slots=True)
class _Signature(MessageSignature):
    """A DKIM-Signature field that is well-formed, with its tags read (``i=`` and ``t=``
    too)."""

    auid: str
    timestamp: int | None


# --- reading a signature -----------------------------------------------------------------------


def _tags(field: HeaderField) -> dict[str, str]:
    try:
        return parse_tag_list(field.value)
    except TagListError as exc:
        raise _Verdict(DkimResult.PERMERROR, f"malformed signature: {exc}") from exc


def _parse_signature(field: HeaderField) -> _Signature:
    """Read and check a DKIM-Signature field (RFC 6376 §3.5, §6.1.1); _Verdict if bad."""
    tags = _tags(field)
    missing = [f"{name}=" for name in _REQUIRED_TAGS if name not in tags]
    if missing:
        raise _permerror(f"missing {', '.join(missing)}")
    if tags["v"] != "1":
        raise _permerror(f"unsupported version v={tags['v']}")
    algorithm = ALGORITHMS.get(tags["a"].lower())
    if algorithm is None:
        raise _permerror(f"unsupported algorithm a={tags['a']}")
    header_canon, body_canon = _canonicalization(tags.get("c", "simple"))
    domain = _domain(tags["d"])
    timestamp, expires = _number(tags, "t"), _number(tags, "x")
    if timestamp is not None and expires is not None and expires < timestamp:
        raise _permerror("x= is earlier than t=")
    _check_query(tags.get("q"))
    return _Signature(
        field=field, algorithm=algorithm, header_canon=header_canon,
        body_canon=body_canon, domain=domain, selector=_selector(tags["s"]),
        auid=_auid(tags.get("i"), domain), signed=_signed_names(tags["h"]),
        body_hash=_base64(tags, "bh"), signature=_base64(tags, "b"),
        length=_number(tags, "l"), timestamp=timestamp, expires=expires,
    )


def _permerror(reason: str) -> _Verdict:
    return _Verdict(DkimResult.PERMERROR, reason)


def _canonicalization(value: str) -> tuple[Mode, Mode]:
    header, _, body = value.lower().partition("/")
    header_mode, body_mode = _mode(header), _mode(body or "simple")
    if header_mode is None or body_mode is None:
        raise _permerror(f"unknown canonicalization c={value}")
    return header_mode, body_mode


def _mode(name: str) -> Mode | None:
    return next((mode for mode in MODES if mode == name), None)


def _domain(value: str) -> str:
    if len(value) > 253 or not _DOMAIN.match(value):
        raise _permerror(f"malformed domain d={value}")
    return value.lower()


def _selector(value: str) -> str:
    if len(value) > 253 or not _SELECTOR.match(value):
        raise _permerror(f"malformed selector s={value}")
    return value.lower()


def _signed_names(value: str) -> tuple[str, ...]:
    names = tuple(name.lower() for name in split_list(value))
    if not all(names):
        raise _permerror("malformed h=")
    if "from" not in names:
        raise _permerror("From is not signed")
    return names


def _auid(value: str | None, domain: str) -> str:
    if value is None:
        return f"@{domain}"
    if not in_domain(value, domain):
        raise _permerror(f"i={value} is not in d={domain}")
    return value


def in_domain(identity: str, domain: str) -> bool:
    """Whether the domain of ``identity`` (``local@host``) is ``domain`` or under it."""
    _, at, host = identity.rpartition("@")
    host = host.lower()
    return bool(at) and (host == domain or host.endswith("." + domain))


def _check_query(value: str | None) -> None:
    if value is not None and "dns/txt" not in (m.lower() for m in split_list(value)):
        raise _permerror(f"unsupported query method q={value}")


def _number(tags: dict[str, str], name: str) -> int | None:
    return number_value(tags, name, _DIGITS[name], _permerror)


def _base64(tags: dict[str, str], name: str) -> bytes:
    return base64_value(tags, name, _permerror)


# --- verifying ---------------------------------------------------------------------------------


async def verify(
    message: bytes,
    resolver: Resolver,
    *,
    now: float | None = None,
    max_signatures: int = MAX_SIGNATURES,
) -> list[DkimSignatureResult]:
    """Evaluate every DKIM-Signature of ``message``; see the module docstring."""
    if max_signatures < 1:
        raise ValueError("max_signatures must be at least 1")
    parsed = parse_message(message)
    fields = [f for f in parsed.fields if f.key == "dkim-signature"]
    when = time.time() if now is None else now
    prepared = [_prepare(f, when) for f in fields[:max_signatures]]
    signatures = [s for s in prepared if isinstance(s, _Signature)]
    keys = await fetch_keys(resolver, {s.key_id for s in signatures})
    needed = {s.body_key for s in signatures if isinstance(_usable_key(s, keys), KeyRecord)}
    bodies = await hash_bodies_async(message, parsed.body_offset, needed)
    results = [_conclude(item, keys, bodies, parsed.fields) for item in prepared]
    skipped = _Verdict(DkimResult.NEUTRAL, f"not evaluated: over {max_signatures} signatures")
    results += [_describe(f, skipped) for f in fields[max_signatures:]]
    return results


def _prepare(field: HeaderField, now: float) -> _Signature | tuple[HeaderField, _Verdict]:
    try:
        signature = _parse_signature(field)
        _check_expiry(signature, now)
    except _Verdict as refused:
        return field, refused
    return signature


def _check_expiry(signature: _Signature, now: float) -> None:
    if signature.expires is not None and now > signature.expires + CLOCK_SKEW:
        raise _Verdict(DkimResult.NEUTRAL, f"signature expired (x={signature.expires})")


_Keys = dict[tuple[str, str], KeyLookup]


def _usable_key(signature: _Signature, keys: _Keys) -> KeyRecord | _Verdict:
    key = keys[signature.key_id]
    if isinstance(key, KeyRecordError):
        return _permerror(str(key))
    if isinstance(key, DnsTemporaryError):
        return _Verdict(DkimResult.TEMPERROR, f"key lookup failed: {key}")
    problem = key_problem(signature.algorithm, signature.domain, signature.auid, key)
    return key if problem is None else _permerror(problem)


def key_problem(algorithm: Algorithm, domain: str, auid: str, key: KeyRecord) -> str | None:
    """Why ``key`` cannot verify a signature (RFC 6376 §6.1.2, RFC 8301), or None."""
    if key.public_key is None:
        return "key revoked (empty p=)"
    if key.key_type != algorithm.key_type:
        return f"key type k={key.key_type} does not fit a={algorithm.name}"
    if key.hashes is not None and algorithm.hash_name not in key.hashes:
        return f"key h= does not allow {algorithm.hash_name}"
    if not key.services & {"*", "email"}:
        return "key s= is not for email"
    if "s" in key.flags and auid.rpartition("@")[2].lower() != domain:
        return "key t=s requires the i= domain to be d="
    if key.key_type == "rsa" and not MIN_RSA_BITS <= key.bits <= MAX_RSA_BITS:
        return f"RSA key of {key.bits} bits (allowed: {MIN_RSA_BITS}-{MAX_RSA_BITS})"
    return None


async def in_worker_if_big(size: int, work: Callable[[], _T]) -> _T:
    """``work()``, in a worker thread when ``size`` (of the message or body it works on)
    is over :data:`BIG_BODY`, so that a big message never stalls the event loop."""
    if size > BIG_BODY:
        return await asyncio.to_thread(work)
    return work()


async def hash_bodies_async(
    message: bytes, offset: int, needed: Iterable[BodyKey]
) -> dict[BodyKey, BodyHash]:
    """:func:`hash_bodies`, in a worker thread for a body over :data:`BIG_BODY`."""
    return await in_worker_if_big(len(message) - offset,
                                  lambda: hash_bodies(message, offset, needed))


def hash_bodies(
    message: bytes, offset: int, needed: Iterable[BodyKey]
) -> dict[BodyKey, BodyHash]:
    """The body hash for each (canonicalization, hash, length limit) in ``needed``."""
    return {key: body_hash(message, offset, *key) for key in needed}


def _conclude(
    item: _Signature | tuple[HeaderField, _Verdict],
    keys: _Keys,
    bodies: dict[BodyKey, BodyHash],
    fields: Sequence[HeaderField],
) -> DkimSignatureResult:
    if not isinstance(item, _Signature):
        return _describe(*item)
    key = _usable_key(item, keys)
    if isinstance(key, _Verdict):
        return _describe(item.field, key, keys.get(item.key_id))
    return _describe(item.field, _check(item, key, bodies[item.body_key], fields), key)


def _check(
    signature: _Signature, key: KeyRecord, body: BodyHash, fields: Sequence[HeaderField]
) -> _Verdict:
    """The verdict on a signature whose key is usable (RFC 6376 §6.1.3)."""
    problem = signature_problem(signature, key, body, fields)
    if problem is not None:
        return _Verdict(DkimResult.FAIL, problem)
    if signature.algorithm.hash_name == "sha1":
        return _Verdict(DkimResult.POLICY, "rsa-sha1 verified, but is not trusted (RFC 8301)")
    testing = " (key in testing mode, t=y)" if key.testing else ""
    return _Verdict(DkimResult.PASS, f"verified{testing}")


def signature_problem(
    signature: MessageSignature, key: KeyRecord, body: BodyHash, fields: Sequence[HeaderField]
) -> str | None:
    """Why a signature does not verify with a key that fits it (:func:`key_problem` said
    None) and the body hash it asks for (RFC 6376 §6.1.3), or None when it verifies:
    ``l=`` longer than the body, the body hash, or the signature of the header fields."""
    if signature.length is not None and body.length < signature.length:
        return f"l={signature.length} is longer than the body"
    if not hmac.compare_digest(body.digest, signature.body_hash):
        return "body hash did not verify"
    unsigned = signature.field.with_value(strip_tag_value(signature.field.value, "b"))
    data = header_hash_input(fields, signature.signed, unsigned, signature.header_canon)
    assert key.public_key is not None  # key_problem() refused revoked keys
    if not verify_signature(key.public_key, signature.algorithm, signature.signature, data):
        return "signature did not verify"
    return None


def _describe(
    field: HeaderField, verdict: _Verdict, key: KeyLookup | None = None
) -> DkimSignatureResult:
    """The result for ``field``: its tags as far as they can be read, and the verdict."""
    try:
        tags = parse_tag_list(field.value)
    except TagListError:
        tags = {}
    domain = tags.get("d", "").lower()
    record = key if isinstance(key, KeyRecord) else None
    return DkimSignatureResult(
        result=verdict.result,
        domain=domain,
        selector=tags.get("s", "").lower(),
        algorithm=tags.get("a", ""),
        header_b=compact(tags.get("b", ""))[:8],
        auid=tags.get("i", f"@{domain}" if domain else ""),
        reason=verdict.reason,
        key_bits=record.bits if record else 0,
        testing=record.testing if record else False,
    )


# --- signing -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignOptions:
    """How tayori signs: which header fields, which canonicalization, which layout.

    ``headers``: names signed once per instance present. ``oversign``: names signed once
    more than they occur. ``expire_after``: seconds until ``x=`` (None: no ``x=``).
    """

    headers: tuple[str, ...] = DEFAULT_HEADERS
    oversign: tuple[str, ...] = OVERSIGNED
    canonicalization: tuple[Mode, Mode] = ("relaxed", "relaxed")
    expire_after: int | None = None
    layout: Layout = field(default_factory=Layout)

    def __post_init__(self) -> None:
        if "from" not in {name.lower() for name in (*self.headers, *self.oversign)}:
            raise ValueError("From must be signed (RFC 6376 §5.4)")
        if any(mode not in MODES for mode in self.canonicalization):
            raise ValueError(f"unknown canonicalization {self.canonicalization}")
        if self.expire_after is not None and self.expire_after <= 0:
            raise ValueError("expire_after must be positive")


def sign(
    message: bytes,
    keys: Sequence[SigningKey],
    *,
    now: float,
    options: SignOptions | None = None,
    identity: str | None = None,
) -> bytes:
    """The DKIM-Signature fields for ``message``, one per key; see the module docstring.

    ``options`` defaults to ``SignOptions()``.
    ``identity`` is the ``i=`` to write (an address or ``@domain`` in every key's domain).
    """
    options = options or SignOptions()
    parsed = parse_message(message)
    if not any(f.key == "from" for f in parsed.fields):
        raise ValueError("a message without From cannot be DKIM-signed (RFC 6376 §5.4)")
    header_canon, body_canon = options.canonicalization
    names = signed_header_names(parsed.fields, options.headers, options.oversign)
    digest = body_hash(message, parsed.body_offset, body_canon, "sha256").digest
    signed_at = int(now)
    fields: list[bytes] = []
    for key in keys:
        tags = _signature_tags(key, options, identity=identity, signed_at=signed_at,
                               names=names, digest=digest)
        unsigned = fold_field(FIELD_NAME, tags, "", options.layout)
        data = header_hash_input(parsed.fields, names, unsigned, header_canon)
        b_value = base64.b64encode(make_signature(key.private_key, data)).decode("ascii")
        fields.append(fold_field(FIELD_NAME, tags, b_value, options.layout))
    return b"".join(fields)


async def sign_async(
    message: bytes,
    keys: Sequence[SigningKey],
    *,
    now: float,
    options: SignOptions | None = None,
    identity: str | None = None,
) -> bytes:
    """:func:`sign`, in a worker thread when the message is longer than :data:`BIG_BODY`."""
    return await in_worker_if_big(
        len(message), lambda: sign(message, keys, now=now, options=options, identity=identity))


def _signature_tags(
    key: SigningKey,
    options: SignOptions,
    *,
    identity: str | None,
    signed_at: int,
    names: Sequence[str],
    digest: bytes,
) -> list[tuple[str, TagValue]]:
    header_canon, body_canon = options.canonicalization
    tags: list[tuple[str, TagValue]] = [
        ("v", "1"), ("a", key.algorithm), ("c", f"{header_canon}/{body_canon}"),
        ("d", key.domain)]
    if identity is not None:
        if not _IDENTITY.match(identity) or not in_domain(identity, key.domain):
            raise ValueError(f"identity {identity!r} is not an address in {key.domain}")
        tags.append(("i", identity))
    if options.layout.query_tag:
        tags.append(("q", "dns/txt"))
    tags += [("s", key.selector), ("t", str(signed_at))]
    if options.expire_after is not None:
        tags.append(("x", str(signed_at + options.expire_after)))
    tags += [("h", list(names)), ("bh", base64.b64encode(digest).decode("ascii"))]
    return tags


__all__ = [
    "BIG_BODY",
    "CLOCK_SKEW",
    "DEFAULT_HEADERS",
    "MAX_SIGNATURES",
    "OVERSIGNED",
    "RFC8463_LAYOUT",
    "DkimResult",
    "DkimSignatureResult",
    "KeyRecord",
    "KeyRecordError",
    "Layout",
    "SignOptions",
    "SigningKey",
    "create_key",
    "in_domain",
    "key_problem",
    "keygen",
    "load_signing_key",
    "sign",
    "sign_async",
    "txt_record",
    "verify",
    "write_private_key",
]
