"""SPF: tayori's own asynchronous check_host() on the tayori resolver, and its reports.

Takes: a :class:`tayori.dns.Resolver`, the client's IP address, the identities (MAIL FROM
reverse-path without brackets, ``""`` for the null path; the HELO/EHLO argument) and the
receiving host's name, plus :class:`SpfOptions` (default explanation, clock for ``%{t}``,
time budget, lookup limits).
Promises: :func:`check_host` is RFC 7208 §4 for one identity; :func:`check` applies it
in the order of §2.3/§2.4 (below). Either returns an :class:`SpfVerdict` (result, the
identity and domain checked, the explanation for ``fail``, the mechanism that matched,
a problem text for logs) and never raises for anything DNS or a record can do: every
resolver exception becomes ``temperror``, every broken record ``permerror``.
:func:`received_spf` renders the ``Received-SPF`` field value (§9.1),
:func:`authentication_results_part` the ``spf=`` method for Authentication-Results
(RFC 8601 §2.7.2), and :data:`RECOMMENDED_REPLIES` / :func:`recommended_reply` say what
the session should answer: ``550 5.7.23`` on fail (with the explanation), ``451 4.7.24``
on temperror, ``550 5.7.24`` on permerror (RFC 7372). This module does no SMTP I/O and
applies no policy; softfail means "tag", and that is the session's to do.
Limits against hostile records (§4.6.4, §11): at most 10 terms that query DNS (include,
a, mx, ptr, exists, redirect; the 11th is permerror); at most 2 void lookups (the 3rd is
permerror), counting the query an a, mx or exists term makes itself when it is NXDOMAIN
or empty, but neither the address lookups of MX hosts nor PTR lookups, whose emptiness
follows from the client's address (its family, its PTR) more than from the record
(pyspf counts those too);
at most 10 MX hosts looked up per ``mx`` (the 11th is permerror); the first 10 PTR names
for ``ptr`` and ``%{p}``, the rest ignored; macro expansions capped
(:data:`tayori.auth.spf_macro.MAX_EXPANSION`); include/redirect loops end at the term
limit; and each check_host() bounded by ``SpfOptions.budget`` seconds (20 s, §4.6.4),
then temperror (:func:`check` may run two).
The ``exp=`` lookup counts against no limit and its failures only mean the default
explanation (§6.2). A target name that cannot be a DNS name after expansion (empty
label, label over 63 characters) is treated as not existing: no match for a, mx, ptr and
exists, permerror for include and redirect. ``ptr`` and ``%{p}`` ignore DNS errors, as
§5.5 and §7.3 say; elsewhere a DNS error is temperror (§4.6.4, §5).
IPv4-mapped IPv6 clients are IPv4 (§5: ``ip4`` matches them, ``ip6`` does not).
Order of :func:`check`: with the null reverse-path the HELO identity is checked
(``postmaster@<helo>``, §2.4) and its verdict returned. Otherwise, when ``check_helo``
(the default, the §2.3 recommendation), the HELO identity is checked first and its
verdict returned if it is ``fail`` (a conclusive rejection, §2.3); any other HELO result
lets the MAIL FROM identity decide, and its verdict is returned. A HELO that is not a
domain name (an address literal, a single label) gives ``none`` without any lookup.
Failure policy: never raises for DNS or record content; a malformed IP address argument
is a caller's bug (ValueError). Cancellation propagates.
Config keys: none read here; the session maps results to actions (see
:data:`RECOMMENDED_REPLIES`).
Standards: RFC 7208 (SPF), RFC 7372 (enhanced status codes 5.7.23/5.7.24/4.7.24),
RFC 8601 (Authentication-Results), RFC 5322 §3.2 (header field value syntax).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Literal, TypeVar

from tayori.address import AddressError, to_ascii_domain
from tayori.auth.spf_macro import (
    MacroString,
    MacroSyntaxError,
    MacroTooLong,
    MacroValues,
    domain_name,
    expand,
    parse_macro_string,
)
from tayori.auth.spf_record import (
    Directive,
    MultipleRecords,
    SpfRecord,
    SpfSyntaxError,
    parse_record,
    select_record,
)
from tayori.dns import DnsTemporaryError, NxDomain, Resolver
from tayori.errors import Reply

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Identity = Literal["mailfrom", "helo"]
T = TypeVar("T")

MAX_DNS_TERMS = 10
"""Terms that query DNS (include, a, mx, ptr, exists, redirect) per check (§4.6.4)."""
MAX_VOID_LOOKUPS = 2
"""Lookups answered NXDOMAIN or empty per check (§4.6.4)."""
MAX_MX_HOSTS = 10
"""MX hosts whose addresses one ``mx`` mechanism may look up (§4.6.4)."""
MAX_PTR_NAMES = 10
"""PTR names considered by ``ptr`` and ``%{p}``; the rest are ignored (§4.6.4)."""
DEFAULT_BUDGET = 20.0
"""Seconds one check_host() may take in all (§4.6.4: at least 20 s)."""
DEFAULT_EXPLANATION = "%{o} does not designate %{c} as a permitted sender"
"""Explanation for ``fail`` when the record gives none; a macro string (§6.2)."""
MAX_EXPLANATION = 400
"""Characters of explanation kept, so it fits in an SMTP reply line."""


class SpfResult(StrEnum):
    """The seven results of RFC 7208 §2.6."""

    NONE = "none"
    NEUTRAL = "neutral"
    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


_QUALIFIER_RESULTS = {"+": SpfResult.PASS, "-": SpfResult.FAIL,
                      "~": SpfResult.SOFTFAIL, "?": SpfResult.NEUTRAL}


@dataclass(frozen=True, slots=True)
class SpfVerdict:
    """The outcome of checking one identity.

    ``domain`` is the domain check_host() started from; ``sender`` the identity as checked
    (``postmaster@<domain>`` when it had no local part); ``explanation`` is set for
    ``fail`` only (public text, printable ASCII); ``mechanism`` is the directive that
    decided as written in the record, ``"default"`` when none matched, None when no
    record was evaluated; ``problem`` is for logs (never for the wire).
    """

    result: SpfResult
    identity: Identity
    domain: str
    sender: str
    client_ip: str
    helo: str
    explanation: str | None = None
    mechanism: str | None = None
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class SpfOptions:
    """Knobs of one evaluation. ``clock`` gives the epoch seconds for ``%{t}``."""

    default_explanation: str = DEFAULT_EXPLANATION
    clock: Callable[[], float] = time.time
    budget: float = DEFAULT_BUDGET
    max_dns_terms: int = MAX_DNS_TERMS
    max_void_lookups: int = MAX_VOID_LOOKUPS

    def __post_init__(self) -> None:
        parse_macro_string(self.default_explanation, explanation=True)  # fails early
        if self.budget <= 0:
            raise ValueError("the SPF time budget must be positive")


# --- the public entry points -----------------------------------------------------------------


async def check(resolver: Resolver, ip: str | IpAddress, mail_from: str, helo: str,
                receiver: str, *, check_helo: bool = True,
                options: SpfOptions | None = None) -> SpfVerdict:
    """The SPF verdict for a transaction: HELO and MAIL FROM in the order of §2.3/§2.4.

    ``mail_from`` is the reverse-path without brackets (``""`` for ``<>``).
    """
    helo_verdict: SpfVerdict | None = None
    if check_helo or not mail_from:
        helo_verdict = await check_host(resolver, ip, helo, f"postmaster@{helo}", helo=helo,
                                        receiver=receiver, identity="helo", options=options)
    if not mail_from:
        assert helo_verdict is not None
        return helo_verdict
    if helo_verdict is not None and helo_verdict.result is SpfResult.FAIL:
        return helo_verdict
    domain = _ascii_domain(mail_from.rpartition("@")[2])
    return await check_host(resolver, ip, domain, mail_from, helo=helo, receiver=receiver,
                            identity="mailfrom", options=options)


async def check_host(resolver: Resolver, ip: str | IpAddress, domain: str, sender: str, *,
                     helo: str, receiver: str = "", identity: Identity = "mailfrom",
                     options: SpfOptions | None = None) -> SpfVerdict:
    """RFC 7208 §4 check_host(<ip>, <domain>, <sender>) for one identity."""
    options = options or SpfOptions()
    client = client_address(ip)
    local, _, sender_domain = sender.rpartition("@")
    if not local:
        local, sender = "postmaster", f"postmaster@{sender_domain}"
    domain = domain.removesuffix(".")
    verdict = SpfVerdict(SpfResult.NONE, identity, domain, sender, str(client), helo)
    evaluation = _Evaluation(resolver, options, MacroValues(
        sender=sender, local_part=local, sender_domain=sender_domain, domain=domain,
        ip=client, helo=helo, receiver=receiver, timestamp=int(options.clock())))
    try:
        async with asyncio.timeout(options.budget):
            outcome = await evaluation.evaluate(domain, explain=True)
    except _Abort as abort:
        return dataclasses.replace(verdict, result=abort.result, problem=abort.problem)
    except TimeoutError:
        problem = f"SPF evaluation took longer than {options.budget:g}s"
        return dataclasses.replace(verdict, result=SpfResult.TEMPERROR, problem=problem)
    return dataclasses.replace(verdict, result=outcome.result, mechanism=outcome.mechanism,
                               explanation=outcome.explanation, problem=outcome.problem)


def client_address(ip: str | IpAddress) -> IpAddress:
    """The client address as SPF sees it: an IPv4-mapped IPv6 address is IPv4 (§5)."""
    address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _ascii_domain(domain: str) -> str:
    if domain.isascii():
        return domain
    try:
        return to_ascii_domain(domain)
    except AddressError:
        return domain  # left non-ASCII: check_host() answers none


# --- the evaluation ----------------------------------------------------------------------------


class _Abort(Exception):
    """temperror or permerror: ends the whole evaluation, from any depth (§4.6.4, §5.2)."""

    def __init__(self, result: SpfResult, problem: str) -> None:
        super().__init__(problem)
        self.result = result
        self.problem = problem


def _permerror(problem: str) -> _Abort:
    return _Abort(SpfResult.PERMERROR, problem)


@dataclass(frozen=True, slots=True)
class _Outcome:
    """A definite result of one record: none, neutral, pass, fail or softfail."""

    result: SpfResult
    mechanism: str | None = None
    explanation: str | None = None
    problem: str | None = None


@dataclass(slots=True)
class _Evaluation:
    """The state of one check_host(): counters, and the PTR answers, shared by all depths."""

    resolver: Resolver
    options: SpfOptions
    values: MacroValues
    dns_terms: int = 0
    void_lookups: int = 0
    _ptr_names: list[str] | None = None
    _validated: dict[str, bool] = field(default_factory=dict)

    async def evaluate(self, domain: str, *, explain: bool) -> _Outcome:
        """check_host() for ``domain``: none, or the record's result; raises _Abort."""
        if not valid_domain(domain):
            return _Outcome(SpfResult.NONE, problem=f"{domain!r} is not a valid domain name")
        record = await self._record(domain)
        if record is None:
            return _Outcome(SpfResult.NONE, problem=f"no SPF record at {domain}")
        for directive in record.directives:
            if await self._matches(directive, domain):
                result = _QUALIFIER_RESULTS[directive.qualifier]
                explanation = None
                if result is SpfResult.FAIL and explain:
                    explanation = await self._explain(record, domain)
                return _Outcome(result, directive.text, explanation)
        if record.redirect is not None:
            return await self._redirect(record.redirect, domain, explain=explain)
        return _Outcome(SpfResult.NEUTRAL, "default")

    async def _record(self, domain: str) -> SpfRecord | None:
        """The parsed SPF record of ``domain``; None when it publishes none (§4.4, §4.5)."""
        try:
            txt = select_record(await self._ask(self.resolver.txt(domain), void=False))
        except MultipleRecords as exc:
            raise _permerror(f"{domain}: {exc}") from exc
        if txt is None:
            return None
        try:
            return parse_record(txt)
        except SpfSyntaxError as exc:
            raise _permerror(f"{domain}: {exc}") from exc

    async def _redirect(self, target: MacroString, domain: str, *, explain: bool) -> _Outcome:
        self._count_dns_term("redirect")
        name = await self._target_name(target, domain)
        if name is None:
            raise _permerror(f"{domain}: redirect= target is not a domain name")
        outcome = await self.evaluate(name, explain=explain)
        if outcome.result is SpfResult.NONE:
            raise _permerror(f"{domain}: redirect={name} has no SPF record")
        return outcome

    # --- mechanisms (§5) ---

    async def _matches(self, directive: Directive, domain: str) -> bool:
        mechanism = directive.mechanism
        if mechanism == "all":
            return True
        if mechanism in ("ip4", "ip6"):
            return directive.network is not None and self.values.ip in directive.network
        self._count_dns_term(directive.text)
        name = await self._target_name(directive.target, domain)
        if mechanism == "include":
            return await self._include(name, directive, domain)
        if name is None:
            self._count_void()
            return False
        if mechanism == "a":
            return await self._a(name, directive)
        if mechanism == "mx":
            return await self._mx(name, directive)
        if mechanism == "ptr":
            return await self._ptr(name)
        return bool(await self._addresses(name, socket.AF_INET, void=True))  # exists

    async def _include(self, name: str | None, directive: Directive, domain: str) -> bool:
        if name is None:
            raise _permerror(f"{domain}: {directive.text}: not a domain name")
        outcome = await self.evaluate(name, explain=False)
        if outcome.result is SpfResult.NONE:
            raise _permerror(f"{domain}: {directive.text}: {name} has no SPF record")
        return outcome.result is SpfResult.PASS

    async def _a(self, name: str, directive: Directive) -> bool:
        addresses = await self._addresses(name, self._family(), void=True)
        return self._any_in_network(addresses, directive)

    async def _mx(self, name: str, directive: Directive) -> bool:
        records = await self._ask(self.resolver.mx(name), void=True)
        hosts = [mx.host for mx in sorted(records, key=lambda mx: mx.preference) if mx.host]
        for queried, host in enumerate(hosts):
            if queried == MAX_MX_HOSTS:
                raise _permerror(f"{directive.text}: more than {MAX_MX_HOSTS} MX hosts")
            addresses = await self._addresses(host, self._family(), void=False)
            if self._any_in_network(addresses, directive):
                return True
        return False

    async def _ptr(self, target: str) -> bool:
        for name in await self._ptr_candidates():
            if _within(name, target) and await self._validates(name):
                return True
        return False

    def _any_in_network(self, addresses: list[str], directive: Directive) -> bool:
        ip = self.values.ip
        prefix = directive.cidr4 if ip.version == 4 else directive.cidr6
        network = ipaddress.ip_network((ip, prefix), strict=False)
        for text in addresses:
            try:
                if client_address(text) in network:
                    return True
            except ValueError:
                continue  # a resolver handing back garbage does not match
        return False

    def _family(self) -> int:
        return socket.AF_INET if self.values.ip.version == 4 else socket.AF_INET6

    # --- PTR validation (§5.5), shared by ptr and %{p} ---

    async def _ptr_candidates(self) -> list[str]:
        """The first 10 PTR names of the client; [] on any DNS error (§5.5)."""
        if self._ptr_names is None:
            try:
                names = await self._ask(self.resolver.ptr(str(self.values.ip)), void=False)
            except _Abort:
                names = []
            self._ptr_names = [name.lower().removesuffix(".") for name in names
                               if name][:MAX_PTR_NAMES]
        return self._ptr_names

    async def _validates(self, name: str) -> bool:
        """Whether ``name`` has the client's address (forward-confirmed); errors: no."""
        if name not in self._validated:
            try:
                addresses = await self._addresses(name, self._family(), void=False)
            except _Abort:
                addresses = []
            self._validated[name] = any(_same_address(text, self.values.ip)
                                        for text in addresses)
        return self._validated[name]

    async def _validated_name(self, domain: str) -> str | None:
        """``%{p}``: a validated name, preferring ``domain`` itself, then a subdomain."""
        domain = domain.lower()
        validated = [name for name in await self._ptr_candidates() if await self._validates(name)]
        same = [name for name in validated if name == domain]
        below = [name for name in validated if name.endswith("." + domain)]
        return next(iter(same + below + validated), None)

    # --- explanations (§6.2) ---

    async def _explain(self, record: SpfRecord, domain: str) -> str:
        text = None
        if record.explanation is not None:
            text = await self._explanation_text(record.explanation, domain)
        if text is None:
            default = parse_macro_string(self.options.default_explanation, explanation=True)
            text = await self._expand(default, domain)
        return _public_text(text)

    async def _explanation_text(self, target: MacroString, domain: str) -> str | None:
        """The expanded exp= text, or None for any trouble (then the default applies)."""
        try:
            name = await self._target_name(target, domain)
            records = await self._ask(self.resolver.txt(name), void=False) if name else []
            if len(records) != 1:
                return None
            macro = parse_macro_string(records[0].decode("ascii"), explanation=True)
            return await self._expand(macro, domain)
        except (_Abort, MacroSyntaxError, MacroTooLong, UnicodeDecodeError):
            return None

    # --- macros, DNS and the limits ---

    async def _target_name(self, target: MacroString | None, domain: str) -> str | None:
        """The name a domain-spec designates (None: not a DNS name); default ``domain``."""
        if target is None:
            return domain
        try:
            return domain_name(await self._expand(target, domain))
        except MacroTooLong:
            return None

    async def _expand(self, macro: MacroString, domain: str) -> str:
        validated = await self._validated_name(domain) if macro.uses("p") else None
        return expand(macro, dataclasses.replace(self.values, domain=domain,
                                                 validated_name=validated))

    async def _addresses(self, name: str, family: int, *, void: bool) -> list[str]:
        return await self._ask(self.resolver.addresses(name, family), void=void)

    async def _ask(self, question: Awaitable[list[T]], *, void: bool) -> list[T]:
        """Await one DNS question: NXDOMAIN is [], a DNS failure temperror (§4.4, §5)."""
        try:
            answer = await question
        except (NxDomain, ValueError):  # ValueError: a name dns.py refuses to send
            answer = []
        except DnsTemporaryError as exc:
            raise _Abort(SpfResult.TEMPERROR, str(exc)) from exc
        except Exception as exc:  # a resolver must not break SPF: fail temporarily
            raise _Abort(SpfResult.TEMPERROR, f"resolver error: {exc!r}") from exc
        if not answer and void:
            self._count_void()
        return answer

    def _count_dns_term(self, what: str) -> None:
        self.dns_terms += 1
        if self.dns_terms > self.options.max_dns_terms:
            raise _permerror(f"more than {self.options.max_dns_terms} DNS-querying terms "
                             f"(at {what})")

    def _count_void(self) -> None:
        self.void_lookups += 1
        if self.void_lookups > self.options.max_void_lookups:
            raise _permerror(f"more than {self.options.max_void_lookups} void DNS lookups")


def valid_domain(domain: str) -> bool:
    """Whether check_host() may look ``domain`` up (§4.3): a multi-label DNS name."""
    name = domain_name(domain)
    return (name is not None and name == domain.lower().removesuffix(".") and "." in name
            and not name.startswith("["))


def _within(name: str, target: str) -> bool:
    target = target.lower()
    return name == target or name.endswith("." + target)


def _same_address(text: str, ip: IpAddress) -> bool:
    try:
        return client_address(text) == ip
    except ValueError:
        return False


_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def _public_text(text: str) -> str:
    """Printable ASCII only, bounded: it goes into an SMTP reply."""
    return _UNPRINTABLE.sub("?", text)[:MAX_EXPLANATION]


# --- reports ------------------------------------------------------------------------------------


RECOMMENDED_REPLIES: Mapping[SpfResult, Reply] = MappingProxyType({
    SpfResult.FAIL: Reply(550, "5.7.23", "SPF validation failed"),
    SpfResult.TEMPERROR: Reply(451, "4.7.24", "SPF validation error, try again later"),
    SpfResult.PERMERROR: Reply(550, "5.7.24", "SPF validation error"),
})
"""What to answer when policy rejects on a result (RFC 7208 §8, RFC 7372). Results not
listed are accepted; ``softfail`` is for tagging (§8.5)."""


def recommended_reply(verdict: SpfVerdict) -> Reply | None:
    """The reply for ``verdict`` if policy rejects it; a fail carries its explanation."""
    reply = RECOMMENDED_REPLIES.get(verdict.result)
    if reply is None or verdict.result is not SpfResult.FAIL or not verdict.explanation:
        return reply
    return Reply(reply.code, reply.status, f"{reply.text}: {verdict.explanation}")


_COMMENTS = {
    SpfResult.PASS: "domain of {sender} designates {ip} as permitted sender",
    SpfResult.FAIL: "domain of {sender} does not designate {ip} as permitted sender",
    SpfResult.SOFTFAIL: "transitioning domain of {sender} does not designate {ip} as "
                        "permitted sender",
    SpfResult.NEUTRAL: "{ip} is neither permitted nor denied by domain of {sender}",
    SpfResult.NONE: "domain of {sender} does not designate permitted sender hosts",
    SpfResult.TEMPERROR: "temporary error in processing during lookup of {sender}",
    SpfResult.PERMERROR: "permanent error in processing domain of {sender}",
}
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*\Z")


def received_spf(verdict: SpfVerdict, receiver: str) -> str:
    """The ``Received-SPF`` field value (RFC 7208 §9.1), unfolded, without the name."""
    comment = _COMMENTS[verdict.result].format(sender=verdict.sender, ip=verdict.client_ip)
    pairs = [("client-ip", verdict.client_ip), ("envelope-from", verdict.sender),
             ("helo", verdict.helo), ("receiver", receiver), ("identity", verdict.identity)]
    if verdict.mechanism is not None:
        pairs.append(("mechanism", verdict.mechanism))
    if verdict.problem is not None and verdict.result in (SpfResult.PERMERROR,
                                                           SpfResult.TEMPERROR):
        pairs.append(("problem", verdict.problem))
    values = "; ".join(f"{key}={_value(value)}" for key, value in pairs)
    return f"{verdict.result.value} ({_comment(f'{receiver}: {comment}')}) {values};"


def authentication_results_part(verdict: SpfVerdict) -> str:
    """The ``spf=`` method result for Authentication-Results (RFC 8601 §2.7.2)."""
    if verdict.identity == "helo":
        return f"spf={verdict.result.value} smtp.helo={_value(verdict.helo)}"
    return f"spf={verdict.result.value} smtp.mailfrom={_value(verdict.domain)}"


def _value(text: str) -> str:
    """A dot-atom as is, anything else as a quoted-string (RFC 5322 §3.2)."""
    text = _UNPRINTABLE.sub("?", text)
    if _DOT_ATOM.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    """Comment text (RFC 5322 ctext) with parentheses and backslashes escaped."""
    text = _UNPRINTABLE.sub("?", text)
    return re.sub(r"([()\\])", r"\\\1", text)


__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_EXPLANATION",
    "MAX_DNS_TERMS",
    "MAX_MX_HOSTS",
    "MAX_PTR_NAMES",
    "MAX_VOID_LOOKUPS",
    "RECOMMENDED_REPLIES",
    "Identity",
    "SpfOptions",
    "SpfResult",
    "SpfVerdict",
    "authentication_results_part",
    "check",
    "check_host",
    "client_address",
    "received_spf",
    "recommended_reply",
    "valid_domain",
]
