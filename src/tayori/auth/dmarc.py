"""DMARC evaluation (RFC 7489, with RFC 9091's np= and public suffix domains).

Takes: the message's raw header block, or its From field values (bytes or text, folded
or not; :func:`from_field_values` picks them out of a header block), the SPF result as a plain
``(result, domain)`` pair (the domain SPF checked: MAIL FROM's, or HELO's for a null
reverse-path, RFC 7489 §4.1), the DKIM results as ``(result, d=)`` pairs, a
:class:`tayori.dns.Resolver`, the local enforcement ceiling, and the random source for
``pct=`` sampling (injectable so tests are deterministic).
Promises: :func:`evaluate` returns a frozen :class:`DmarcVerdict`: the result (pass,
fail, none, temperror, permerror), the author domain, the policy domain and the record
used (from the author domain, its organizational domain, or with ``psd=True`` the public
suffix), the policy the record requests for this domain (p=, sp=, or np= for a
non-existent subdomain), the policy applied after pct= sampling, the disposition after
the local ceiling (config ``auth.dmarc``: ``reject`` honours the domain,
``quarantine`` turns reject into quarantine, ``none`` only observes), alignment details
and a reason. It never raises for anything a message or DNS can contain.
- Discovery (§6.6.3): ``_dmarc.<author>``; if no record there, ``_dmarc.<org-domain>``;
  with ``psd=True`` (RFC 9091), then ``_dmarc.<public-suffix>``, used only when it says
  ``psd=y`` (DMARCbis's tag) or the suffix is in ``psd_domains`` (RFC 9091 leaves the
  choice of PSDs to the receiver). TXT records that do not start with
  ``v=DMARC1`` are discarded; several DMARC records at one name end discovery: none.
- Records (§6.3, §6.6.3): unknown tags are ignored; an invalid value of an optional tag
  falls back to its default; an invalid or missing ``p=`` (or invalid ``sp=``) means
  ``p=none`` when ``rua=`` holds a valid URI, and otherwise no DMARC processing (none).
  A record that is not a tag-list at all (a term without ``=``, a tag given twice) is
  permerror: the owner's intent cannot be read, so no policy is applied.
- Alignment (§3.1): relaxed compares organizational domains, strict the exact names;
  names are compared in lower-case A-label form, surrounding dots ignored.
- The author (§6.6.1): no From field, or no usable domain in it, is permerror (policy
  none, ``malformed_from``). Several addresses with different domains are evaluated
  each, and the strictest failing verdict wins, as §6.6.1 says. Several From fields are
  forbidden by RFC 5322, and §6.6.1 leaves them out of scope; tayori evaluates every
  domain in every field the same way (so a second From cannot opt a message out of a
  reject policy) and sets ``malformed_from``, so the session may refuse the message
  outright. An unquoted address used as a display name (``a@bank.example <x@evil>``,
  invalid RFC 5322) is evaluated as an author too. More than
  :data:`MAX_AUTHOR_DOMAINS` distinct domains is permerror with
  ``malformed_from`` (bounding the DNS work one message can cause).
- np= (RFC 9091): applies when the record came from a parent of the author domain
  and the author domain does not exist (NXDOMAIN, or no A, AAAA and MX records). The
  existence check is made only for a failing message whose record has np=, so a pass
  reports sp= (or p=) as its policy.
- pct= (§6.6.4): a failing message not sampled gets the next weaker policy (reject →
  quarantine → none); ``sampled_out`` records it for the aggregate report.
Failure policy: DnsTemporaryError anywhere (discovery, existence) gives temperror, and
:func:`reply_for` answers it ``451 4.7.0`` (the check could not be completed; X.7.1
would claim a refusal that has not happened), unless the enforcement is ``none``.
A reject disposition is ``550 5.7.1``; quarantine is the caller's (a header or a held
state, config ``auth.dmarc_quarantine``).
Names that cannot be queried (too long) count as having no record.
Config keys (read by the caller): ``auth.dmarc`` (enforcement), ``auth.dmarc_psd``,
``auth.dmarc_psd_domains``.
Standards: RFC 7489 (§3.1 alignment, §6.3 tags, §6.6 evaluation), RFC 9091 (PSD, np=),
RFC 5322 §3.4/§3.6.2 (From), RFC 8601 (the A-R ``dmarc`` method, via
:meth:`DmarcVerdict.method_result`).
"""

from __future__ import annotations

import dataclasses
import random
import re
import socket
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import unquote

from tayori.address import AddressError, to_ascii_domain
from tayori.auth import orgdomain
from tayori.auth.results import MethodResult, field_name, field_value, header_fields
from tayori.dns import DnsTemporaryError, NxDomain, Resolver
from tayori.errors import Reply

MAX_AUTHOR_DOMAINS = 8
"""Distinct From domains evaluated at most; more is permerror (malformed From)."""


class DmarcResult(StrEnum):
    """The RFC 7489 §11.2 / RFC 8601 result values of the ``dmarc`` method."""

    PASS = "pass"
    FAIL = "fail"
    NONE = "none"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


class Policy(StrEnum):
    """A requested or applied policy, weakest first."""

    NONE = "none"
    QUARANTINE = "quarantine"
    REJECT = "reject"

    @property
    def strictness(self) -> int:
        return _ORDER.index(self)

    def weaker(self) -> Policy:
        """The next weaker policy (pct= sampling, §6.6.4); none stays none."""
        return _ORDER[max(self.strictness - 1, 0)]


_ORDER = (Policy.NONE, Policy.QUARANTINE, Policy.REJECT)


class AlignMode(StrEnum):
    """``adkim=`` / ``aspf=``: relaxed or strict identifier alignment."""

    RELAXED = "r"
    STRICT = "s"


class RecordSource(StrEnum):
    """Where the record was found: the author domain, its org domain, or the PSD."""

    FROM = "from"
    ORG = "org"
    PSD = "psd"


class RecordError(ValueError):
    """A DMARC record that cannot be used; ``result`` says what that means (§6.6.3)."""

    def __init__(self, result: DmarcResult, reason: str) -> None:
        super().__init__(reason)
        self.result = result


# --- report URIs ------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*:[^!\s,;]+)(?:!([0-9]+)([kmgtKMGT]?))?\Z")


@dataclass(frozen=True, slots=True)
class ReportUri:
    """One ``rua=``/``ruf=`` destination, with its optional ``!size`` limit in bytes."""

    uri: str
    max_size: int | None = None

    @property
    def mailbox(self) -> str | None:
        """The address of a ``mailto:`` URI (headers after ``?`` dropped), else None."""
        scheme, _, rest = self.uri.partition(":")
        if scheme.lower() != "mailto" or not rest:
            return None
        address = unquote(rest.split("?", 1)[0])
        return address if "@" in address.strip("@") else None

    @property
    def host(self) -> str | None:
        """The destination host (§7.1 step 1): a mailbox's domain, lower case."""
        mailbox = self.mailbox
        return mailbox.rsplit("@", 1)[1].lower().rstrip(".") if mailbox else None


def parse_uris(text: str) -> tuple[ReportUri, ...]:
    """The syntactically valid URIs of a comma-separated ``rua=``/``ruf=`` value."""
    uris = []
    for item in text.split(","):
        match = _URI.match(item.strip(" \t"))
        if match:
            size = int(match[2]) * _SIZE_UNITS[match[3].lower()] if match[2] else None
            uris.append(ReportUri(match[1], size))
    return tuple(uris)


# --- records --------------------------------------------------------------------------------

_VERSION = re.compile(r"[ \t]*[vV][ \t]*=[ \t]*DMARC1[ \t]*(?:;|\Z)")
_TAG = re.compile(r"([A-Za-z][A-Za-z0-9_]*)[ \t]*=[ \t]*(.*)\Z", re.DOTALL)
_FO = frozenset({"0", "1", "d", "s"})


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """A parsed DMARC policy record, defaults filled in (RFC 7489 §6.3, RFC 9091 np=).

    ``p_assumed`` is set when p= was missing or invalid and ``p=none`` was assumed
    because of a valid rua= (§6.6.3). ``psd`` is DMARCbis's y/n/u (u when absent).
    """

    p: Policy
    sp: Policy | None = None
    np: Policy | None = None
    pct: int = 100
    adkim: AlignMode = AlignMode.RELAXED
    aspf: AlignMode = AlignMode.RELAXED
    rua: tuple[ReportUri, ...] = ()
    ruf: tuple[ReportUri, ...] = ()
    fo: str = "0"
    rf: str = "afrf"
    ri: int = 86400
    psd: str = "u"
    p_assumed: bool = False
    text: str = ""

    def policy_for(self, *, subdomain: bool, exists: bool = True) -> Policy:
        """The policy requested for the author domain (§6.6.3, RFC 9091 np=)."""
        if not subdomain:
            return self.p
        if not exists and self.np is not None:
            return self.np
        return self.sp or self.p


def is_dmarc_record(text: str | bytes) -> bool:
    """Whether a TXT record is a DMARC record: it starts with ``v=DMARC1`` (§6.6.3)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return bool(_VERSION.match(text))


def _tags(text: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for raw in text.split(";"):
        term = raw.strip(" \t\r\n")
        if not term:
            continue
        match = _TAG.match(term)
        if match is None:
            raise RecordError(DmarcResult.PERMERROR, f"malformed tag {term!r} in DMARC record")
        name = match[1].lower()
        if name in tags:
            raise RecordError(DmarcResult.PERMERROR, f"tag {name}= given twice in DMARC record")
        tags[name] = match[2].strip(" \t\r\n")
    return tags


def _policy(value: str | None) -> Policy | None:
    try:
        return Policy(value.lower()) if value is not None else None
    except ValueError:
        return None


def _mode(value: str | None) -> AlignMode:
    return AlignMode.STRICT if value is not None and value.lower() == "s" else AlignMode.RELAXED


def _number(value: str | None, default: int, top: int) -> int:
    if value is None or not value.isdigit() or int(value) > top:
        return default
    return int(value)


def _choice(value: str | None, allowed: tuple[str, ...], default: str) -> str:
    return value.lower() if value is not None and value.lower() in allowed else default


def _fo(value: str | None) -> str:
    if value is None:
        return "0"
    options = [option.strip(" \t").lower() for option in value.split(":")]
    return ":".join(options) if options and all(o in _FO for o in options) else "0"


def parse_record(text: str | bytes) -> DmarcRecord:
    """Parse one DMARC record; RecordError (result permerror or none) when unusable."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not is_dmarc_record(text):
        raise RecordError(DmarcResult.NONE, "not a DMARC record (no leading v=DMARC1)")
    tags = _tags(text)
    rua = parse_uris(tags.get("rua", ""))
    p, sp = _policy(tags.get("p")), _policy(tags.get("sp"))
    broken = "p= missing" if "p" not in tags else "p= invalid" if p is None else ""
    if not broken and "sp" in tags and sp is None:
        broken = "sp= invalid"
    if broken and not rua:
        raise RecordError(DmarcResult.NONE, f"DMARC record unusable: {broken} and no rua=")
    return DmarcRecord(
        p=p if p is not None and not broken else Policy.NONE,
        sp=None if broken else sp,
        np=None if broken else _policy(tags.get("np")),
        pct=_number(tags.get("pct"), 100, 100),
        adkim=_mode(tags.get("adkim")),
        aspf=_mode(tags.get("aspf")),
        rua=rua,
        ruf=parse_uris(tags.get("ruf", "")),
        fo=_fo(tags.get("fo")),
        rf=_choice(tags.get("rf"), ("afrf",), "afrf"),
        ri=_number(tags.get("ri"), 86400, 2**32 - 1),
        psd=_choice(tags.get("psd"), ("y", "n", "u"), "u"),
        p_assumed=bool(broken),
        text=text,
    )


# --- alignment ------------------------------------------------------------------------------

def _loose_domain(domain: str) -> str | None:
    """A domain for comparison: lower case, surrounding dots dropped; None if malformed."""
    name = domain.strip().strip(".").lower()
    if not name or ".." in name:
        return None
    if name.isascii():
        return name
    try:
        return to_ascii_domain(name)
    except AddressError:
        return None


def aligned(identifier: str, author: str, mode: AlignMode) -> bool:
    """Whether an authenticated domain aligns with the author domain (§3.1)."""
    ident, from_domain = _loose_domain(identifier), _loose_domain(author)
    if ident is None or from_domain is None:
        return False
    if ident == from_domain:
        return True
    if mode is AlignMode.STRICT:
        return False
    try:
        return orgdomain.organizational_domain(ident) == orgdomain.organizational_domain(
            from_domain)
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class AlignmentDetails:
    """What aligned: ``spf_domain`` is the SPF identity checked (``""`` if none),
    ``dkim_domain`` the first passing d= that aligned (``""`` if none)."""

    spf: bool = False
    dkim: bool = False
    spf_domain: str = ""
    dkim_domain: str = ""
    aspf: AlignMode = AlignMode.RELAXED
    adkim: AlignMode = AlignMode.RELAXED


def _alignment(author: str, record: DmarcRecord, spf: tuple[str, str] | None,
               dkim: Sequence[tuple[str, str]]) -> AlignmentDetails:
    spf_domain = spf[1].rsplit("@", 1)[-1] if spf else ""
    spf_ok = spf is not None and spf[0].lower() == "pass" and aligned(
        spf_domain, author, record.aspf)
    dkim_domain = next((d for result, d in dkim
                        if result.lower() == "pass" and aligned(d, author, record.adkim)), "")
    return AlignmentDetails(spf_ok, bool(dkim_domain), spf_domain, dkim_domain,
                            record.aspf, record.adkim)


# --- the author domain (RFC 5322 From) ----------------------------------------------------

_SPECIALS = "<>,:;@"


def from_field_values(header: bytes) -> list[bytes]:
    """The raw values of every From field of a header block (or whole message)."""
    fields, _ = header_fields(header)
    return [field_value(f) for f in fields if field_name(f) == b"from"]


def _skip_comment(text: str, pos: int) -> int:
    depth = 0
    while pos < len(text):
        char = text[pos]
        if char == "\\":
            pos += 2
            continue
        depth += {"(": 1, ")": -1}.get(char, 0)
        pos += 1
        if depth == 0:
            return pos
    return pos


def _delimited(text: str, pos: int, close: str) -> int:
    """The position after the ``close`` that ends a quoted string or domain literal."""
    pos += 1
    while pos < len(text) and text[pos] != close:
        pos += 2 if text[pos] == "\\" else 1
    return min(pos + 1, len(text))


def _address_tokens(text: str) -> list[str]:
    """RFC 5322 address-list tokens: specials, quoted strings, literals, atoms (comments
    and whitespace dropped)."""
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char.isspace():
            pos += 1
        elif char == "(":
            pos = _skip_comment(text, pos)
        elif char in _SPECIALS:
            tokens.append(char)
            pos += 1
        elif char in '"[':
            end = _delimited(text, pos, '"' if char == '"' else "]")
            tokens.append(text[pos:end])
            pos = end
        else:
            end = pos
            while end < len(text) and not (text[end].isspace() or text[end] in _SPECIALS + '"(['):
                end += 1
            tokens.append(text[pos:end])
            pos = end
    return tokens


def _addr_specs(tokens: list[str]) -> list[list[str]]:
    """The addr-spec tokens of each mailbox (angle-addr route dropped; groups opened)."""
    specs: list[list[str]] = []
    current: list[str] = []
    angle: list[str] | None = None
    done = False
    for token in tokens:
        if angle is not None:
            if token == ">":
                specs.append(angle[len(angle) - angle[::-1].index(":"):] if ":" in angle
                             else angle)
                if "@" in current:  # an unquoted address as display name: check it too
                    specs.append(current)
                angle, done = None, True
            else:
                angle.append(token)
        elif token == "<" and not done:
            angle = []
        elif token in (",", ";"):
            if current and not done:
                specs.append(current)
            current, done = [], False
        elif token == ":" and not done:
            current = []  # a group's display name
        elif not done:
            current.append(token)
    if angle is not None:
        specs.append(angle)
    elif current and not done:
        specs.append(current)
    return specs


def _spec_domain(spec: list[str]) -> str | None:
    """The A-label domain of an addr-spec, or None when it has none usable."""
    if "@" not in spec:
        return None
    domain = "".join(spec[len(spec) - spec[::-1].index("@"):]).rstrip(".")
    if not domain or domain.startswith("["):
        return None
    try:
        return to_ascii_domain(domain)
    except AddressError:
        return None


@dataclass(frozen=True, slots=True)
class Authors:
    """The author domains of a message, in order, and what was wrong with its From."""

    domains: tuple[str, ...]
    problem: str = ""


def author_domains(from_fields: Sequence[bytes | str]) -> Authors:
    """The distinct domains of every mailbox in every From field (§6.6.1)."""
    if not from_fields:
        return Authors((), "no From field")
    domains: list[str] = []
    bad = 0
    for value in from_fields:
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        for spec in _addr_specs(_address_tokens(text.replace("\r", "").replace("\n", ""))):
            domain = _spec_domain(spec)
            if domain is None:
                bad += 1
            elif domain not in domains:
                domains.append(domain)
    problems = [f"{len(from_fields)} From fields"] if len(from_fields) > 1 else []
    if not domains:
        problems.append("no address with a usable domain in From")
    elif bad:
        problems.append(f"{bad} From address{'es' if bad > 1 else ''} without a usable domain")
    return Authors(tuple(domains), "; ".join(problems))


# --- discovery ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Discovery:
    """The outcome of policy discovery: the record text and where it was, or why none."""

    text: str | None
    domain: str = ""
    source: RecordSource | None = None
    reason: str = ""


_PSD_YES = re.compile(r"(?:\A|;)[ \t]*psd[ \t]*=[ \t]*y[ \t]*(?:;|\Z)", re.IGNORECASE)


async def _records_at(resolver: Resolver, domain: str) -> list[str]:
    """The DMARC records at ``_dmarc.<domain>``; DnsTemporaryError propagates."""
    try:
        answers = await resolver.txt(f"_dmarc.{domain}")
    except (NxDomain, ValueError):  # ValueError: a name too long to ask about
        return []
    texts = (answer.decode("utf-8", "replace") for answer in answers)
    return [text for text in texts if is_dmarc_record(text)]


async def discover(domain: str, resolver: Resolver, *, psd: bool = False,
                   psd_domains: Collection[str] = ()) -> Discovery:
    """Find the DMARC record for author ``domain`` (§6.6.3, RFC 9091 PSD discovery)."""
    org = orgdomain.organizational_domain(domain)
    steps = [(domain, RecordSource.FROM)]
    if org != domain:
        steps.append((org, RecordSource.ORG))
    suffix = orgdomain.public_suffix(org)
    if psd and suffix != org:
        steps.append((suffix, RecordSource.PSD))
    for name, source in steps:
        found = await _records_at(resolver, name)
        if len(found) > 1:
            return Discovery(None, name, source, f"{len(found)} DMARC records at _dmarc.{name}")
        if not found:
            continue
        if source is RecordSource.PSD and not (_PSD_YES.search(found[0])
                                               or name in psd_domains):
            return Discovery(None, name, source, f"_dmarc.{name} is not a PSD DMARC record")
        return Discovery(found[0], name, source)
    return Discovery(None, reason="no DMARC record")


async def domain_exists(resolver: Resolver, domain: str) -> bool:
    """A domain exists when it has an MX, A or AAAA record (RFC 9091's definition)."""
    try:
        if await resolver.mx(domain):
            return True
        for family in (socket.AF_INET, socket.AF_INET6):
            if await resolver.addresses(domain, family):
                return True
    except NxDomain:
        return False
    return False


# --- the verdict ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DmarcVerdict:
    """What DMARC says about one message.

    ``policy`` is what the record requests for the author domain (None when there is
    no usable record; none for permerror); ``applied`` is that policy after pct=
    sampling (none unless the result is fail); ``disposition`` is what tayori does,
    after the local enforcement ceiling (``enforcement``). ``from_domains`` lists every
    author domain; ``from_domain`` is the one this verdict is about.
    """

    result: DmarcResult
    from_domain: str = ""
    org_domain: str = ""
    policy_domain: str = ""
    record_source: RecordSource | None = None
    record: DmarcRecord | None = None
    policy: Policy | None = None
    applied: Policy = Policy.NONE
    disposition: Policy = Policy.NONE
    alignment: AlignmentDetails = field(default_factory=AlignmentDetails)
    sampled_out: bool = False
    local_override: bool = False
    from_domains: tuple[str, ...] = ()
    malformed_from: bool = False
    enforcement: Policy = Policy.REJECT
    reason: str = ""

    def method_result(self) -> MethodResult:
        """The ``dmarc=`` entry of our Authentication-Results field."""
        props: list[tuple[str, str]] = []
        if self.from_domain:
            props.append(("header.from", self.from_domain))
        if self.policy is not None:
            props.append(("policy.dmarc", self.policy.value))
        comment = ""
        if self.record is not None and self.result in (DmarcResult.PASS, DmarcResult.FAIL):
            record = self.record
            np = f" np={record.np}" if record.np else ""
            comment = f"p={record.p} sp={record.sp or record.p}{np} dis={self.disposition}"
        reason = "" if self.result in (DmarcResult.PASS, DmarcResult.FAIL) else self.reason
        return MethodResult("dmarc", self.result.value, reason, tuple(props), comment)


def reply_for(verdict: DmarcVerdict) -> Reply | None:
    """The SMTP reply a verdict calls for at end of DATA, or None to accept.

    A temperror defers, except under ``enforcement=none``: a monitoring-only
    configuration never delays mail.
    """
    if verdict.result is DmarcResult.TEMPERROR and verdict.enforcement is not Policy.NONE:
        return Reply(451, "4.7.0", "DMARC policy could not be checked, try again later")
    if verdict.disposition is Policy.REJECT:
        return Reply(550, "5.7.1",
                     f"Message rejected: unauthenticated mail from {verdict.from_domain} "
                     "is refused by its domain's DMARC policy")
    return None


@dataclass(frozen=True, slots=True)
class _Inputs:
    spf: tuple[str, str] | None
    dkim: tuple[tuple[str, str], ...]
    resolver: Resolver
    enforcement: Policy
    psd: bool
    psd_domains: Collection[str]
    sample: Callable[[], float]


def _sampled(policy: Policy, pct: int, sample: Callable[[], float]) -> tuple[Policy, bool]:
    """The policy after pct= sampling, and whether the message was sampled out."""
    if pct >= 100 or policy is Policy.NONE or sample() * 100 < pct:
        return policy, False
    return policy.weaker(), True


async def _requested(record: DmarcRecord, found: Discovery, domain: str, failed: bool,
                     resolver: Resolver) -> Policy:
    subdomain = found.domain != domain
    exists = True
    if subdomain and failed and record.np is not None:
        exists = await domain_exists(resolver, domain)
    return record.policy_for(subdomain=subdomain, exists=exists)


async def _judge(domain: str, record: DmarcRecord, found: Discovery,
                 inputs: _Inputs) -> DmarcVerdict:
    details = _alignment(domain, record, inputs.spf, inputs.dkim)
    passed = details.spf or details.dkim
    policy = await _requested(record, found, domain, not passed, inputs.resolver)
    applied, sampled_out = ((Policy.NONE, False) if passed
                            else _sampled(policy, record.pct, inputs.sample))
    disposition = min(applied, inputs.enforcement, key=lambda p: p.strictness)
    return DmarcVerdict(
        DmarcResult.PASS if passed else DmarcResult.FAIL,
        from_domain=domain, org_domain=orgdomain.organizational_domain(domain),
        policy_domain=found.domain, record_source=found.source, record=record,
        policy=policy, applied=applied, disposition=disposition, alignment=details,
        sampled_out=sampled_out, local_override=disposition is not applied,
        enforcement=inputs.enforcement,
        reason="aligned " + ("DKIM" if details.dkim else "SPF") if passed
        else "no aligned SPF or DKIM pass",
    )


async def _evaluate_domain(domain: str, inputs: _Inputs) -> DmarcVerdict:
    base = DmarcVerdict(DmarcResult.NONE, from_domain=domain,
                        org_domain=orgdomain.organizational_domain(domain),
                        enforcement=inputs.enforcement)
    try:
        found = await discover(domain, inputs.resolver, psd=inputs.psd,
                               psd_domains=inputs.psd_domains)
        if found.text is None:
            return dataclasses.replace(base, reason=found.reason)
        try:
            record = parse_record(found.text)
        except RecordError as exc:
            policy = Policy.NONE if exc.result is DmarcResult.PERMERROR else None
            return dataclasses.replace(base, result=exc.result, policy_domain=found.domain,
                                       record_source=found.source, policy=policy,
                                       reason=str(exc))
        return await _judge(domain, record, found, inputs)
    except DnsTemporaryError as exc:
        return dataclasses.replace(base, result=DmarcResult.TEMPERROR,
                                   reason=f"DNS temporary failure: {exc}")


def _severity(verdict: DmarcVerdict) -> int:
    """How strongly a verdict weighs when several author domains are checked."""
    if verdict.result is DmarcResult.FAIL and verdict.policy is not None:
        return {Policy.REJECT: 6, Policy.QUARANTINE: 5, Policy.NONE: 3}[verdict.policy]
    return {DmarcResult.TEMPERROR: 4, DmarcResult.PERMERROR: 2, DmarcResult.NONE: 1}.get(
        verdict.result, 0)


async def evaluate(
    from_fields: bytes | Sequence[bytes | str],
    *,
    spf: tuple[str, str] | None,
    dkim: Sequence[tuple[str, str]],
    resolver: Resolver,
    enforcement: Policy = Policy.REJECT,
    psd: bool = False,
    psd_domains: Collection[str] = (),
    sample: Callable[[], float] = random.random,
) -> DmarcVerdict:
    """Evaluate DMARC for a message; see the module docstring for every rule.

    ``from_fields`` is the list of From field values, or the raw header block (bytes)
    to take them from.
    """
    if isinstance(from_fields, bytes):
        from_fields = from_field_values(from_fields)
    authors = author_domains(from_fields)
    if not authors.domains or len(authors.domains) > MAX_AUTHOR_DOMAINS:
        too_many = f"more than {MAX_AUTHOR_DOMAINS} author domains"
        reason = "; ".join(filter(None, [authors.problem, too_many if authors.domains else ""]))
        return DmarcVerdict(DmarcResult.PERMERROR, policy=Policy.NONE,
                            from_domains=authors.domains, malformed_from=True,
                            enforcement=enforcement, reason=reason)
    inputs = _Inputs(spf, tuple(dkim), resolver, enforcement, psd,
                     frozenset(d.lower() for d in psd_domains), sample)
    verdicts = [await _evaluate_domain(domain, inputs) for domain in authors.domains]
    chosen = max(verdicts, key=_severity)
    reason = f"{chosen.reason}; {authors.problem}" if authors.problem else chosen.reason
    return dataclasses.replace(chosen, from_domains=authors.domains,
                               malformed_from=bool(authors.problem), reason=reason)


__all__ = [
    "MAX_AUTHOR_DOMAINS",
    "AlignMode",
    "AlignmentDetails",
    "Authors",
    "Discovery",
    "DmarcRecord",
    "DmarcResult",
    "DmarcVerdict",
    "Policy",
    "RecordError",
    "RecordSource",
    "ReportUri",
    "aligned",
    "author_domains",
    "discover",
    "domain_exists",
    "evaluate",
    "from_field_values",
    "is_dmarc_record",
    "parse_record",
    "parse_uris",
    "reply_for",
]
