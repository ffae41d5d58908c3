"""ARC (RFC 8617): validating the chain a message arrives with, sealing it when tayori forwards.

Takes: a message as raw bytes with CRLF line endings (header fields, empty line, body), as
the spool stores it. To validate: a :class:`tayori.dns.Resolver` for the key records
(``<s>._domainkey.<d>`` TXT, the same records as DKIM's) and the time (injectable; the
wall clock by default; only an ARC-Message-Signature's ``x=`` reads it). To seal: a
:class:`~tayori.auth.dkim_keys.SigningKey` (RSA), tayori's authserv-id, the results the
ARC-Authentication-Results records (:func:`collect_results` gathers them from the
Authentication-Results fields we wrote), the :class:`ArcVerdict` the message came with,
the time, and the header names the ARC-Message-Signature signs.
Promises: :func:`validate` follows RFC 8617 §5.2 and returns an :class:`ArcVerdict`:

- ``cv`` ``none``: the message has no ARC header field at all;
- ``fail``: an ARC field cannot be read (tag list, ``i=``, a tag's value, algorithm),
  the newest ARC-Seal or any other says ``cv=fail`` (``fail_reported_at`` names the
  newest such instance: a sealer already declared the chain broken), more than
  :data:`MAX_SETS` sets, a set without exactly one AAR, AMS and AS, instances not
  1..N, ``cv`` not ``none`` at i=1 or not ``pass`` above, the newest
  ARC-Message-Signature or any ARC-Seal does not verify, or a key is missing or
  unusable; a temporary DNS failure too (§5.2.1: all failures are permanent);
- ``pass``: everything verified. ``oldest_pass`` (§5.2 step 5) is then the lowest
  instance from which every ARC-Message-Signature still verifies, 0 when all do.

``instance`` is the highest ``i=`` read; ``sets`` describes each set of a chain whose
structure is sound, passing or not (seal and signature domains, the AAR's results), for
Authentication-Results and DMARC reports; :meth:`ArcVerdict.method_result` is the
``arc=`` result to write. Only ``rsa-sha256`` is accepted (the one algorithm RFC 8617
defines; ``ed25519-sha256`` came only in an expired draft): ``algorithms`` widens that.
:func:`seal` returns the ARC Set to prepend, ``ARC-Seal``, ``ARC-Message-Signature``,
``ARC-Authentication-Results`` in that order, with instance N+1, ``cv=`` the verdict's,
relaxed/relaxed, ``t=`` now. The ARC-Seal covers every set of a passing chain, or only
the new set when the chain failed (§5.1.2). Fields are laid out as the ARC test suite's
standardized form: tags in alphabetical order, ``"; "`` between them, no trailing
``;``, folded only between tags (and between the names of ``h=``) with ``b=`` on a
line of its own. It returns ``b""`` (no set added) when :attr:`ArcVerdict.seal_refusal`
says why not: the newest ARC-Seal reports ``cv=fail`` (§5.1 step 2), or the chain
holds :data:`MAX_SETS` sets already. :func:`seal_async` is the same, in a worker thread
for a message longer than :data:`~tayori.auth.dkim.BIG_BODY`.
Failure policy: :func:`validate` never raises for anything a message or DNS may hold;
``reason`` is for logs, never for the SMTP wire. :func:`seal` raises ValueError for a
caller's mistake: a key that is not RSA, an ARC or Authentication-Results name among the
headers to sign (§4.1.2 forbids them), a verdict that does not fit the message.
Config keys: none read here; the caller hands in key and names (proposed: ``[arc]
seal = true``, ``[arc] key`` naming a ``[[dkim.keys]]`` domain/selector, ``[arc] headers``
defaulting to :data:`DEFAULT_HEADERS`).
Standards: RFC 8617 (§4.1 the three fields, §4.2.1 instances 1-50, §5.1 sealing, §5.1.1
the seal's scope, §5.1.2 cv=fail chains, §5.2 validation, §5.2.1 permanent failures,
§6/§10.2 ``arc=`` with ``smtp.remote-ip`` and ``header.oldest-pass``); RFC 6376 (the
AMS is a DKIM-Signature without ``v=``/AUID: tags, canonicalization, key records);
RFC 8301 (RSA keys of 1024 bits at least).
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from tayori.address import AddressError, to_ascii_domain
from tayori.auth.canon import MODES, BodyHash, Mode, body_hash, header_hash_input, relaxed_header
from tayori.auth.dkim import (
    CLOCK_SKEW,
    BodyKey,
    MessageSignature,
    hash_bodies_async,
    in_worker_if_big,
    key_problem,
    signature_problem,
)
from tayori.auth.dkim import DEFAULT_HEADERS as DKIM_HEADERS
from tayori.auth.dkim_keys import (
    ALGORITHMS,
    Algorithm,
    KeyLookup,
    KeyRecord,
    KeyRecordError,
    SigningKey,
    check_selector,
    fetch_keys,
    make_signature,
    verify_signature,
)
from tayori.auth.dkim_tags import (
    TagListError,
    base64_value,
    number_value,
    parse_tag_list,
    split_list,
    strip_tag_value,
)
from tayori.auth.headers import HeaderField, ParsedMessage, parse_message, signed_header_names
from tayori.auth.results import (
    ARC_FIELD_NAME,
    AuthResults,
    MethodResult,
    ResultsSyntaxError,
    arc_result,
    authentication_results,
    parse,
    parse_arc,
)
from tayori.dns import DnsTemporaryError, Resolver

SEAL_FIELD = "ARC-Seal"
SIGNATURE_FIELD = "ARC-Message-Signature"
RESULTS_FIELD = ARC_FIELD_NAME
MAX_SETS = 50
"""RFC 8617 §4.2.1: instances run from 1 to 50; a longer chain fails."""
RSA_SHA256 = "rsa-sha256"
DEFAULT_HEADERS: tuple[str, ...] = (*DKIM_HEADERS, "dkim-signature")
"""DKIM's list, and the DKIM-Signature fields (RFC 8617 §4.1.2 SHOULD sign them)."""
FORBIDDEN_HEADERS = frozenset({"arc-seal", "arc-message-signature",
                               "arc-authentication-results", "authentication-results"})
"""Names an ARC-Message-Signature must not sign (RFC 8617 §4.1.2)."""
LINE_WIDTH = 78
DEFAULT_AMS_CANONICALIZATION = "relaxed/relaxed"
"""An ARC-Message-Signature without ``c=`` is read as relaxed/relaxed, as the ARC test
suite (made with dkimpy, which reads it so) has it, not as DKIM's simple/simple: a
deliberate quirk, since RFC 8617 §4.1.2 gives the AMS DKIM's semantics."""

_AAR, _AMS, _AS = "arc-authentication-results", "arc-message-signature", "arc-seal"
_AAR_INSTANCE = re.compile(rb"[ \t\r\n]*i[ \t\r\n]*=[ \t\r\n]*([0-9]{1,9})[ \t\r\n]*;")
_DIGITS = re.compile(r"[0-9]{1,12}\Z")
_INSTANCE = re.compile(r"[0-9]{1,9}\Z")
_MODES: dict[str, Mode] = {mode: mode for mode in MODES}
_SEAL_TAGS = ("a", "b", "cv", "d", "i", "s")
_SIGNATURE_TAGS = ("a", "b", "bh", "d", "h", "i", "s")


class ChainStatus(StrEnum):
    """Chain Validation Status (RFC 8617 §4.4), as written in ``cv=`` and ``arc=``."""

    NONE = "none"
    PASS = "pass"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class ArcSet:
    """One ARC Set of a chain whose structure is sound, as far as its fields read.

    Domains and selectors are lower case (``""`` if unreadable); ``authserv_id`` and
    ``results`` come from the ARC-Authentication-Results (empty if it does not parse:
    its payload does not affect the chain's validity).
    """

    instance: int
    seal_domain: str
    seal_selector: str
    signature_domain: str
    signature_selector: str
    authserv_id: str
    results: tuple[MethodResult, ...]


@dataclass(frozen=True, slots=True)
class ArcVerdict:
    """What :func:`validate` found; see the module docstring."""

    cv: ChainStatus
    instance: int = 0
    reason: str = ""
    oldest_pass: int | None = None
    sets: tuple[ArcSet, ...] = ()
    fail_reported_at: int | None = None

    @property
    def seal_refusal(self) -> str | None:
        """Why a sealer must not add a set to this chain, or None when it may."""
        if self.fail_reported_at is not None and self.fail_reported_at == self.instance:
            return "the newest ARC-Seal reports cv=fail (RFC 8617 §5.1)"
        if self.instance >= MAX_SETS:
            return f"the chain holds {self.instance} ARC Sets; {MAX_SETS} at most"
        return None

    def method_result(self, remote_ip: str | None = None) -> MethodResult:
        """``arc=<cv>`` for Authentication-Results (RFC 8617 §6): ``remote_ip`` is the
        address the message came from; ``header.oldest-pass`` when the chain passed."""
        return arc_result(self.cv.value, remote_ip=remote_ip, oldest_pass=self.oldest_pass)


class _Broken(Exception):
    """The chain fails: ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- collecting the sets ---------------------------------------------------------------------


@dataclass(slots=True)
class _RawSet:
    """The fields found with one instance value, by kind."""

    aar: list[HeaderField]
    ams: list[HeaderField]
    seal: list[HeaderField]

    def kind(self, key: str) -> list[HeaderField]:
        return self.aar if key == _AAR else self.ams if key == _AMS else self.seal

    def complete(self) -> tuple[HeaderField, HeaderField, HeaderField] | None:
        if len(self.aar) == len(self.ams) == len(self.seal) == 1:
            return self.aar[0], self.ams[0], self.seal[0]
        return None


def _tags(field: HeaderField) -> dict[str, str]:
    try:
        return parse_tag_list(field.value, strict=True)
    except TagListError as exc:
        raise _Broken(f"malformed {field.name.decode('ascii')}: {exc}") from exc


def _instance(field: HeaderField) -> int:
    """The ``i=`` of an ARC field; _Broken when it has none that reads as a number > 0."""
    if field.key == _AAR:
        match = _AAR_INSTANCE.match(field.value)
        value = match.group(1).decode("ascii") if match else ""
    else:
        value = _tags(field).get("i", "")
    if not _INSTANCE.match(value) or int(value) == 0:
        raise _Broken(f"{field.name.decode('ascii')} without a valid leading i=")
    return int(value)


def _collect(fields: Iterable[HeaderField]) -> tuple[dict[int, _RawSet], list[str]]:
    """The ARC fields by instance, and what could not be read."""
    sets: dict[int, _RawSet] = {}
    problems: list[str] = []
    for field in fields:
        if field.key not in (_AAR, _AMS, _AS):
            continue
        try:
            instance = _instance(field)
        except _Broken as broken:
            problems.append(broken.reason)
            continue
        sets.setdefault(instance, _RawSet([], [], [])).kind(field.key).append(field)
    return sets, problems


def _structure(sets: dict[int, _RawSet], problems: Sequence[str], reported: int | None
               ) -> list[tuple[HeaderField, HeaderField, HeaderField]]:
    """RFC 8617 §5.2 steps 1 to 3.2: the chain's sets, or _Broken."""
    top = max(sets, default=0)
    if reported is not None and reported == top:
        raise _Broken(f"ARC-Seal i={top} reports cv=fail")
    if problems:
        raise _Broken(problems[0])
    return _chain_fields(sets)


def _chain_fields(sets: dict[int, _RawSet]) -> list[tuple[HeaderField, HeaderField, HeaderField]]:
    """Sets 1..N, each with exactly one AAR, AMS and AS (RFC 8617 §5.2 step 3)."""
    if max(sets) > MAX_SETS:
        raise _Broken(f"i={max(sets)}: more than {MAX_SETS} ARC Sets")
    chain = []
    for instance in range(1, max(sets) + 1):
        found = sets.get(instance)
        complete = found.complete() if found else None
        if complete is None:
            raise _Broken(f"ARC Set i={instance} lacks or repeats a field")
        chain.append(complete)
    return chain


# --- reading the tags ----------------------------------------------------------------------------


def _require(tags: dict[str, str], names: Sequence[str], what: str) -> None:
    missing = [f"{name}=" for name in names if name not in tags]
    if missing:
        raise _Broken(f"{what} without {', '.join(missing)}")


def _algorithm(value: str, allowed: Collection[str]) -> Algorithm:
    algorithm = ALGORITHMS.get(value)
    if algorithm is None or value not in allowed:
        raise _Broken(f"unsupported algorithm a={value}")
    return algorithm


def _domain(value: str) -> str:
    try:
        return to_ascii_domain(value)
    except AddressError as exc:
        raise _Broken(f"malformed domain d={value}") from exc


def _selector(value: str) -> str:
    try:
        return check_selector(value)
    except ValueError as exc:
        raise _Broken(f"malformed selector s={value}") from exc


def _number(tags: dict[str, str], name: str) -> int | None:
    return number_value(tags, name, _DIGITS, _Broken)


def _base64(tags: dict[str, str], name: str) -> bytes:
    return base64_value(tags, name, _Broken)


def _canonicalization(value: str) -> tuple[Mode, Mode]:
    header, _, body = value.partition("/")
    header_mode, body_mode = _MODES.get(header), _MODES.get(body or "simple")
    if header_mode is None or body_mode is None:
        raise _Broken(f"unknown canonicalization c={value}")
    return header_mode, body_mode


@dataclass(frozen=True, slots=True)
class _Seal:
    """An ARC-Seal whose tags read well (RFC 8617 §4.1.3)."""

    field: HeaderField
    algorithm: Algorithm
    cv: ChainStatus
    domain: str
    selector: str
    signature: bytes

    @property
    def key_id(self) -> tuple[str, str]:
        return self.selector, self.domain


def _read_seal(field: HeaderField, allowed: Collection[str]) -> _Seal:
    tags = _tags(field)
    _require(tags, _SEAL_TAGS, "ARC-Seal")
    if "h" in tags:
        raise _Broken("ARC-Seal with h= (RFC 8617 §4.1.3)")
    try:
        cv = ChainStatus(tags["cv"])
    except ValueError as exc:
        raise _Broken(f"ARC-Seal with cv={tags['cv']}") from exc
    _number(tags, "t")
    return _Seal(field, _algorithm(tags["a"], allowed), cv, _domain(tags["d"]),
                 _selector(tags["s"]), _base64(tags, "b"))


def _read_signature(field: HeaderField, allowed: Collection[str]) -> MessageSignature:
    """An ARC-Message-Signature whose tags read well (RFC 8617 §4.1.2), or _Broken."""
    tags = _tags(field)
    _require(tags, _SIGNATURE_TAGS, "ARC-Message-Signature")
    signed = tuple(name.lower() for name in split_list(tags["h"]))
    if _AS in signed:
        raise _Broken("ARC-Message-Signature signs ARC-Seal (RFC 8617 §4.1.2)")
    header_canon, body_canon = _canonicalization(tags.get("c", DEFAULT_AMS_CANONICALIZATION))
    signed_at, expires = _number(tags, "t"), _number(tags, "x")
    if signed_at is not None and expires is not None and expires < signed_at:
        raise _Broken("x= is earlier than t=")
    return MessageSignature(
        field=field, algorithm=_algorithm(tags["a"], allowed), header_canon=header_canon,
        body_canon=body_canon, domain=_domain(tags["d"]), selector=_selector(tags["s"]),
        signed=signed, body_hash=_base64(tags, "bh"), signature=_base64(tags, "b"),
        length=_number(tags, "l"), expires=expires)


# --- keys and hashes -------------------------------------------------------------------------


_Keys = dict[tuple[str, str], KeyLookup]


def _public_key(keys: _Keys, key_id: tuple[str, str], algorithm: Algorithm) -> KeyRecord:
    key = keys[key_id]
    selector, domain = key_id
    if isinstance(key, KeyRecordError):
        raise _Broken(str(key))
    if isinstance(key, DnsTemporaryError):
        raise _Broken(f"key lookup failed (permanent for ARC): {key}")
    problem = key_problem(algorithm, domain, f"@{domain}", key)
    if problem is not None:
        raise _Broken(f"{selector}._domainkey.{domain}: {problem}")
    return key


# --- verifying ---------------------------------------------------------------------------------


def _unsigned(field: HeaderField) -> bytes:
    """The field as its own signature signed it: ``b=`` blanked."""
    return field.with_value(strip_tag_value(field.value, "b"))


def _seal_input(scope: Iterable[bytes], seal: bytes) -> bytes:
    """What an ARC-Seal signs (RFC 8617 §5.1.1): the fields of ``scope`` (raw, in order:
    AAR, AMS, AS of each set from i=1 up), then ``seal`` with ``b=`` blanked, all relaxed,
    the last without its CRLF."""
    own = relaxed_header(seal)
    return b"".join(relaxed_header(raw) for raw in scope) + own[:-2]


def _signature_problem(signature: MessageSignature, key: KeyRecord, body: BodyHash,
                       fields: Sequence[HeaderField], now: float) -> str | None:
    """Why an ARC-Message-Signature does not verify, or None when it does: expired, or
    as a DKIM-Signature would not."""
    if signature.expires is not None and now > signature.expires + CLOCK_SKEW:
        return f"expired (x={signature.expires})"
    return signature_problem(signature, key, body, fields)


def _check_seals(seals: Sequence[_Seal], chain: Sequence[tuple[HeaderField, ...]],
                 keys: _Keys) -> None:
    """RFC 8617 §5.2 step 6: each ARC-Seal, newest first, over sets 1..its own."""
    for instance in range(len(seals), 0, -1):
        seal = seals[instance - 1]
        key = _public_key(keys, seal.key_id, seal.algorithm)
        scope = [field.raw for fields in chain[: instance - 1] for field in fields]
        scope += [field.raw for field in chain[instance - 1][:2]]
        data = _seal_input(scope, _unsigned(seal.field))
        assert key.public_key is not None
        if not verify_signature(key.public_key, seal.algorithm, seal.signature, data):
            raise _Broken(f"ARC-Seal i={instance} did not verify")


def _check_cv(seals: Sequence[_Seal]) -> None:
    """RFC 8617 §5.2 step 3.3: ``cv=none`` at i=1, ``pass`` above."""
    for instance, seal in enumerate(seals, 1):
        wanted = ChainStatus.NONE if instance == 1 else ChainStatus.PASS
        if seal.cv is not wanted:
            raise _Broken(f"ARC-Seal i={instance} has cv={seal.cv.value}, not {wanted.value}")


def _reported_fail(sets: dict[int, _RawSet]) -> int | None:
    """The highest instance whose ARC-Seal says ``cv=fail``."""
    failed = [instance for instance, found in sets.items() for field in found.seal
              if _tags_or_empty(field).get("cv") == ChainStatus.FAIL]
    return max(failed, default=None)


def _tags_or_empty(field: HeaderField) -> dict[str, str]:
    try:
        return parse_tag_list(field.value)
    except TagListError:
        return {}


def _describe(instance: int, fields: tuple[HeaderField, ...]) -> ArcSet:
    aar, ams, seal = fields
    ams_tags, seal_tags = _tags_or_empty(ams), _tags_or_empty(seal)
    try:
        results: AuthResults | None = parse_arc(aar.value)[1]
    except ResultsSyntaxError:
        results = None
    return ArcSet(
        instance=instance,
        seal_domain=seal_tags.get("d", "").lower(),
        seal_selector=seal_tags.get("s", "").lower(),
        signature_domain=ams_tags.get("d", "").lower(),
        signature_selector=ams_tags.get("s", "").lower(),
        authserv_id=results.authserv_id if results else "",
        results=results.results if results else (),
    )


@dataclass(slots=True)
class _Validation:
    """One run of RFC 8617 §5.2 over a message, with the keys and body hashes it fetched."""

    message: bytes
    parsed: ParsedMessage
    resolver: Resolver
    now: float
    allowed: Collection[str]
    keys: _Keys
    bodies: dict[BodyKey, BodyHash]

    async def verdict(self) -> ArcVerdict:
        sets, problems = _collect(self.parsed.fields)
        if not sets and not problems:
            return ArcVerdict(ChainStatus.NONE, reason="no ARC header fields")
        top, reported = max(sets, default=0), _reported_fail(sets)
        described: tuple[ArcSet, ...] = ()
        try:
            chain = _structure(sets, problems, reported)
            described = tuple(_describe(i, fields) for i, fields in enumerate(chain, 1))
            oldest = await self._verify(chain)
        except _Broken as broken:
            return ArcVerdict(ChainStatus.FAIL, top, broken.reason, sets=described,
                              fail_reported_at=reported)
        return ArcVerdict(ChainStatus.PASS, top, "verified", oldest, described)

    async def _verify(self, chain: Sequence[tuple[HeaderField, HeaderField, HeaderField]]
                      ) -> int:
        """Steps 3.3 to 6 of RFC 8617 §5.2; returns oldest-pass, _Broken on failure."""
        seals = [_read_seal(seal, self.allowed) for _, _, seal in chain]
        _check_cv(seals)
        newest = _read_signature(chain[-1][1], self.allowed)
        await self._load([newest], seals)
        problem = self._problem(newest)
        if problem is not None:
            raise _Broken(f"ARC-Message-Signature i={len(chain)}: {problem}")
        _check_seals(seals, chain, self.keys)
        return await self._oldest_pass(chain)

    async def _oldest_pass(self, chain: Sequence[tuple[HeaderField, ...]]) -> int:
        """RFC 8617 §5.2 step 5: walking down from AMS N-1, the instance above the first
        one that does not read or verify; 0 when all verify."""
        older = [(instance, _readable_signature(chain[instance - 1][1], self.allowed))
                 for instance in range(len(chain) - 1, 0, -1)]
        await self._load([signature for _, signature in older if signature is not None], [])
        for instance, signature in older:
            if signature is None or self._problem(signature) is not None:
                return instance + 1
        return 0

    async def _load(self, signatures: Sequence[MessageSignature], seals: Sequence[_Seal]
                    ) -> None:
        """Fetch the keys and hash the bodies these need, once each."""
        wanted = {s.key_id for s in signatures} | {s.key_id for s in seals}
        wanted -= self.keys.keys()
        self.keys |= await fetch_keys(self.resolver, wanted)
        needed = {s.body_key for s in signatures} - self.bodies.keys()
        self.bodies |= await hash_bodies_async(self.message, self.parsed.body_offset, needed)

    def _problem(self, signature: MessageSignature) -> str | None:
        """Why an ARC-Message-Signature does not verify, or None when it does."""
        try:
            key = _public_key(self.keys, signature.key_id, signature.algorithm)
        except _Broken as broken:
            return broken.reason
        return _signature_problem(signature, key, self.bodies[signature.body_key],
                                  self.parsed.fields, self.now)


def _readable_signature(field: HeaderField, allowed: Collection[str]
                        ) -> MessageSignature | None:
    try:
        return _read_signature(field, allowed)
    except _Broken:
        return None


async def validate(
    message: bytes,
    resolver: Resolver,
    *,
    now: float | None = None,
    algorithms: Collection[str] = (RSA_SHA256,),
) -> ArcVerdict:
    """Validate the ARC chain of ``message`` (RFC 8617 §5.2); see the module docstring."""
    when = time.time() if now is None else now
    run = _Validation(message, parse_message(message), resolver, when, frozenset(algorithms),
                      {}, {})
    return await run.verdict()


# --- sealing -----------------------------------------------------------------------------------


def collect_results(message: bytes, authserv_id: str) -> list[MethodResult]:
    """The method results of every Authentication-Results field of ``message`` that
    ``authserv_id`` wrote (compared case-insensitively, without a trailing dot), in field
    order: one AAR carries all of an ADMD's results (RFC 8617 §4.1.1). A field that does
    not parse is left out.
    """
    ours = authserv_id.rstrip(".").lower()
    found: list[MethodResult] = []
    for field in parse_message(message).fields:
        if field.key != "authentication-results":
            continue
        try:
            results = parse(field.value)
        except ResultsSyntaxError:
            continue
        if results.authserv_id.rstrip(".").lower() == ours:
            found.extend(results.results)
    return found


def _tag_words(tag: str, value: str) -> list[str]:
    """A tag as the words a line may break between: ``h=`` between its names."""
    if tag != "h":
        return [f"{tag}={value}"]
    first, *rest = value.split(":")
    words = [f"h={first}", *rest]
    return [word + ":" for word in words[:-1]] + words[-1:]


def write_field(name: str, tags: Sequence[tuple[str, str]]) -> bytes:
    """The field ``name: t1=v1; t2=v2 ...`` with CRLF, laid out as the module docstring
    says: ``b=`` alone on its line, so the folding never depends on its value and the
    form signed (``b=`` empty) differs from the form written in ``b=`` only.
    """
    lines = [f"{name}:"]
    for index, (tag, value) in enumerate(tags):
        words = _tag_words(tag, value)
        if index < len(tags) - 1:
            words[-1] += ";"
        for position, word in enumerate(words):
            glue = " " if position == 0 else ""
            alone = tag == "b" or (position == 0 and lines[-1].startswith(" b="))
            if alone or len(lines[-1]) + len(glue) + len(word) > LINE_WIDTH:
                lines.append(" " + word)
            else:
                lines[-1] += glue + word
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _signed_field(name: str, tags: Sequence[tuple[str, str]], key: SigningKey,
                  data_of: Callable[[bytes], bytes]) -> bytes:
    """The field with its ``b=`` made over ``data_of(the field with b= empty)``."""
    data = data_of(write_field(name, tags))
    signature = base64.b64encode(make_signature(key.private_key, data)).decode("ascii")
    return write_field(name, [(tag, signature if tag == "b" else value)
                              for tag, value in tags])


def _sealed_sets(fields: Sequence[HeaderField], chain: ArcVerdict) -> list[bytes]:
    """The fields of the existing sets the new ARC-Seal covers: all of a passing chain,
    none of a failed one (RFC 8617 §5.1.2)."""
    if chain.cv is not ChainStatus.PASS:
        if chain.cv is ChainStatus.NONE and chain.instance:
            raise ValueError("a verdict of cv=none cannot have ARC Sets")
        return []
    sets, problems = _collect(fields)
    try:
        found = _chain_fields(sets) if sets and not problems else []
    except _Broken:
        found = []
    if len(found) != chain.instance:
        raise ValueError("the verdict does not fit the message's ARC Sets")
    return [field.raw for fields_of_set in found for field in fields_of_set]


def _names(fields: Sequence[HeaderField], headers: Iterable[str]) -> list[str]:
    wanted = [name.lower() for name in headers]
    forbidden = sorted(FORBIDDEN_HEADERS.intersection(wanted))
    if forbidden:
        raise ValueError(f"an ARC-Message-Signature must not sign {', '.join(forbidden)}")
    return signed_header_names(fields, wanted, ())


def seal(
    message: bytes,
    key: SigningKey,
    *,
    authserv_id: str,
    results: Sequence[MethodResult],
    chain: ArcVerdict,
    now: float,
    headers: Sequence[str] = DEFAULT_HEADERS,
) -> bytes:
    """The ARC Set to prepend to ``message`` (AS, AMS, AAR), or ``b""`` when
    ``chain.seal_refusal`` forbids one; see the module docstring.

    ``results`` are what the AAR records (``none`` when empty); ``chain`` is the verdict
    :func:`validate` gave for this message; ``headers`` the names the AMS signs, each once
    per instance present.
    """
    if key.algorithm != RSA_SHA256:
        raise ValueError(f"ARC seals with {RSA_SHA256} only, not {key.algorithm}")
    if chain.seal_refusal is not None:
        return b""
    parsed = parse_message(message)
    scope = _sealed_sets(parsed.fields, chain)
    instance, signed_at = str(chain.instance + 1), str(int(now))
    names = _names(parsed.fields, headers)
    aar = authentication_results(authserv_id, results, instance=chain.instance + 1)
    digest = body_hash(message, parsed.body_offset, "relaxed", "sha256").digest
    ams = _signed_field(SIGNATURE_FIELD, [
        ("a", RSA_SHA256), ("b", ""), ("bh", base64.b64encode(digest).decode("ascii")),
        ("c", "relaxed/relaxed"), ("d", key.domain), ("h", ":".join(names)),
        ("i", instance), ("s", key.selector), ("t", signed_at),
    ], key, lambda unsigned: header_hash_input(parsed.fields, names, unsigned, "relaxed"))
    scope += [aar, ams]
    arc_seal = _signed_field(SEAL_FIELD, [
        ("a", RSA_SHA256), ("b", ""), ("cv", chain.cv.value), ("d", key.domain),
        ("i", instance), ("s", key.selector), ("t", signed_at),
    ], key, lambda unsigned: _seal_input(scope, unsigned))
    return arc_seal + ams + aar


async def seal_async(
    message: bytes,
    key: SigningKey,
    *,
    authserv_id: str,
    results: Sequence[MethodResult],
    chain: ArcVerdict,
    now: float,
    headers: Sequence[str] = DEFAULT_HEADERS,
) -> bytes:
    """:func:`seal`, in a worker thread when the message is longer than ``BIG_BODY``."""
    return await in_worker_if_big(len(message), lambda: seal(
        message, key, authserv_id=authserv_id, results=results, chain=chain, now=now,
        headers=headers))


__all__ = [
    "DEFAULT_HEADERS",
    "FORBIDDEN_HEADERS",
    "MAX_SETS",
    "RESULTS_FIELD",
    "RSA_SHA256",
    "SEAL_FIELD",
    "SIGNATURE_FIELD",
    "ArcSet",
    "ArcVerdict",
    "ChainStatus",
    "collect_results",
    "seal",
    "seal_async",
    "validate",
    "write_field",
]
