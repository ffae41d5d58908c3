"""DNS blocklists and allowlists (DNSBL/RBL, DNSWL), checked when a client connects.

Takes: a :class:`tayori.dns.Resolver`, the client's IP address, the configured
:class:`DnsblZone` entries and a score threshold.
Promises: :func:`check` asks every zone at once, under one deadline (``time_limit``), for
the A records of the client's name in it (RFC 5782 §2: the IPv4 octets reversed,
``1.2.0.192.zone``; for IPv6 the 32 nibbles reversed, ``...8.b.d.0.1.0.0.2.zone``;
an IPv4-mapped IPv6 client is asked as IPv4). Entries with the same zone name share one
query, so one list can weigh its return codes differently::

    DnsblZone("zen.example", weight=3, match=("127.0.0.2", "127.0.0.4/30"))
    DnsblZone("zen.example", weight=1, match=("127.0.0.10/31",))

An answer counts as a listing when it lies in 127.0.0.0/8 (anything else is a broken
list or a resolver rewriting NXDOMAIN: ignored), is not a known error code
(:data:`ERROR_CODES`, e.g. Spamhaus' 127.255.255.252-255 "query refused / limit
exceeded", DNSWL.org's 127.0.0.255, and 127.0.0.1, URIBL's "query refused" and the
value lists avoid for listings since RFC 5782 §5 reserves 127.0.0.1 as the address never
listed; ignored, unless the entry's ``match`` names it), and, if the
entry has a ``match``, lies in one of its networks. Each ignored answer is noted in
:attr:`DnsblVerdict.problems` for the operator's log. The verdict sums the weights of
the ``block`` entries that list the client; any ``allow`` entry (a DNSWL) listing it
exempts the client from the blocklists (``exempt``, which the lead may also use to
skip greylisting). ``blocked`` is score >= threshold and not exempt; then the TXT
record of the heaviest listing zone is fetched (same deadline) as the public reason,
and :meth:`DnsblVerdict.reply` gives ``554 5.7.1 Service unavailable; client
[192.0.2.1] blocked using zen.example; <TXT reason>``, to be sent as the greeting
(RFC 5321 §3.1: then only QUIT is served) or, as Postfix does by default, at RCPT.
Caching is the resolver's job (:class:`tayori.dns.DnsPythonResolver` caches by TTL).
Failure policy: fail open per zone. A zone whose lookup fails temporarily
(SERVFAIL, REFUSED, network) or does not answer before the deadline is skipped and
noted in ``problems``: a blocklist outage must not stop all mail, which is why this
differs from the fail-closed rule for policy hooks (DESIGN §2.4). A skipped allowlist
exempts nobody. A TXT lookup that fails leaves the reason out. A malformed ``client_ip``
or zone raises ValueError; any other exception is a bug and propagates, so the hook
around it fails closed.
Config keys (proposed): ``[[dnsbl.zones]]`` with ``name``, ``weight`` (1), ``kind``
(``"block"`` | ``"allow"``), ``match`` (list of IPv4 addresses or networks, default all
of 127.0.0.0/8 but the error codes); ``dnsbl.threshold`` (1); ``dnsbl.time_limit`` ("5s").
Standards: RFC 5782 (DNSBL/DNSWL query and answer conventions), RFC 5321 §3.1 and
§4.2.3 (554 greeting), RFC 3463 (5.7.1).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from tayori.address import AddressError, to_ascii_domain
from tayori.dns import DnsTemporaryError, NxDomain, Resolver
from tayori.errors import Reply

Kind = Literal["block", "allow"]
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

LISTING_RANGE = ipaddress.IPv4Network("127.0.0.0/8")
"""Where every listing answer lies (RFC 5782 §2.3)."""
ERROR_CODES: tuple[ipaddress.IPv4Network, ...] = (
    ipaddress.IPv4Network("127.0.0.1/32"),        # URIBL: query refused
    ipaddress.IPv4Network("127.0.0.255/32"),      # DNSWL.org: query limit exceeded
    ipaddress.IPv4Network("127.255.255.252/30"),  # Spamhaus: typo, open resolver, limit
)
"""Answers that report a problem with the query, not a listing."""
MAX_REASON = 200
"""Characters of a TXT reason put in the reply at most."""


@dataclass(frozen=True, slots=True)
class DnsblZone:
    """One list: ``name`` (the zone), ``weight`` added to the score, ``kind``, ``match``.

    ``match`` holds IPv4 addresses or networks (text); empty means any answer in
    127.0.0.0/8 except :data:`ERROR_CODES`. ``name`` is normalised to lower case
    without the trailing dot.
    """

    name: str
    weight: int = 1
    kind: Kind = "block"
    match: tuple[str, ...] = ()
    networks: tuple[ipaddress.IPv4Network, ...] = field(init=False, repr=False,
                                                        compare=False)

    def __post_init__(self) -> None:
        try:
            name = to_ascii_domain(self.name.rstrip("."))
        except AddressError as exc:
            raise ValueError(f"not a DNS zone name: {self.name!r}") from exc
        if self.kind not in ("block", "allow"):
            raise ValueError(f"{name}: kind must be 'block' or 'allow', not {self.kind!r}")
        if self.weight < 0:
            raise ValueError(f"{name}: the weight cannot be negative")
        networks = tuple(ipaddress.IPv4Network(m, strict=False) for m in self.match)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "match", tuple(self.match))
        object.__setattr__(self, "networks", networks)

    def lists(self, answer: ipaddress.IPv4Address) -> bool:
        """Whether ``answer`` (already known to be in 127.0.0.0/8) is a listing here."""
        if any(answer in network for network in self.networks):
            return True
        return not self.networks and not is_error_code(answer)


@dataclass(frozen=True, slots=True)
class DnsblHit:
    """A zone entry that lists the client, with the answers that did."""

    zone: str
    weight: int
    kind: Kind
    answers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DnsblVerdict:
    """What the lists say about ``client_ip``.

    ``hits``: blocklist entries listing the client, heaviest first; ``allowed_by``:
    allowlist entries listing it; ``reason``: the TXT of the heaviest hit (only when
    blocked); ``problems``: zones skipped and answers ignored, for the log.
    """

    client_ip: str
    score: int
    threshold: int
    hits: tuple[DnsblHit, ...] = ()
    allowed_by: tuple[DnsblHit, ...] = ()
    reason: str | None = None
    problems: tuple[str, ...] = ()

    @property
    def exempt(self) -> bool:
        return bool(self.allowed_by)

    @property
    def blocked(self) -> bool:
        return not self.exempt and bool(self.hits) and self.score >= self.threshold

    @property
    def listed_in(self) -> tuple[str, ...]:
        """The names of the zones listing the client, heaviest first, each once."""
        return tuple(dict.fromkeys(hit.zone for hit in self.hits))

    def reply(self) -> Reply | None:
        """``554 5.7.1`` naming the lists, when blocked; None otherwise."""
        if not self.blocked:
            return None
        text = (f"Service unavailable; client [{self.client_ip}] blocked using "
                f"{', '.join(self.listed_in)}")
        if self.reason:
            text += f"; {self.reason}"
        return Reply(554, "5.7.1", text)


def zone_from_text(text: str, kind: Kind = "block") -> DnsblZone:
    """A config entry: ``zone``, ``zone*WEIGHT``, ``zone=127.0.0.2,127.0.0.4/30*WEIGHT``.
    Raises ValueError saying what is wrong."""
    rest, star, weight = text.strip().rpartition("*") if "*" in text else (text.strip(), "", "")
    if star and not weight.strip().isdigit():
        raise ValueError(f"{text!r}: the weight after * must be a whole number")
    name, _, answers = rest.partition("=")
    match = tuple(a.strip() for a in answers.split(",") if a.strip())
    try:
        return DnsblZone(name.strip(), int(weight) if star else 1, kind, match)
    except ipaddress.AddressValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None


def query_name(client: IpAddress, zone: str) -> str:
    """The name to ask for ``client`` in ``zone`` (RFC 5782 §2.1, §2.4)."""
    if client.version == 4:
        labels = str(client).split(".")
    else:
        labels = list(client.exploded.replace(":", ""))
    return ".".join(reversed(labels)) + "." + zone


def is_error_code(answer: ipaddress.IPv4Address) -> bool:
    return any(answer in network for network in ERROR_CODES)


async def check(resolver: Resolver, client_ip: str, zones: Sequence[DnsblZone],
                threshold: int = 1, *, time_limit: float = 5.0,
                fetch_reason: bool = True) -> DnsblVerdict:
    """Ask all ``zones`` about ``client_ip`` at once; see the module docstring.

    ``time_limit`` is not a caller's ``asyncio.timeout``: when it runs out, the zones
    that answered still count and only the silent ones are skipped.
    """
    if threshold < 1:
        raise ValueError("the DNSBL threshold must be at least 1")
    client = _client_address(client_ip)
    deadline = asyncio.get_running_loop().time() + time_limit
    names = list(dict.fromkeys(zone.name for zone in zones))
    async with asyncio.TaskGroup() as group:
        tasks = {name: group.create_task(_lookup(resolver, query_name(client, name),
                                                 deadline)) for name in names}
    answers = {name: task.result() for name, task in tasks.items()}
    verdict = _judge(str(client), zones, answers, threshold)
    if verdict.blocked and fetch_reason:
        reason = await _reason(resolver, query_name(client, verdict.hits[0].zone), deadline)
        verdict = replace(verdict, reason=reason)
    return verdict


def _client_address(ip: str) -> IpAddress:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


async def _lookup(resolver: Resolver, name: str, deadline: float) -> list[str] | str:
    """The A records of ``name`` (``[]``: not listed), or why the zone is skipped."""
    try:
        async with asyncio.timeout_at(deadline):
            return await resolver.addresses(name, socket.AF_INET)
    except NxDomain:
        return []
    except DnsTemporaryError as exc:
        return f"skipped: {exc}"
    except TimeoutError:
        return f"skipped: no answer for {name} within the time limit"


def _judge(client: str, zones: Sequence[DnsblZone], answers: dict[str, list[str] | str],
           threshold: int) -> DnsblVerdict:
    problems = [f"{name} {found}" for name, found in answers.items() if isinstance(found, str)]
    listings: dict[str, list[ipaddress.IPv4Address]] = {}
    for name, found in answers.items():
        if isinstance(found, list):
            listings[name] = _listing_answers(name, found, problems)
    hits = [hit for hit in (_hit(zone, listings.get(zone.name, [])) for zone in zones) if hit]
    blocks = sorted((h for h in hits if h.kind == "block"), key=lambda h: -h.weight)
    allows = tuple(h for h in hits if h.kind == "allow")
    return DnsblVerdict(client, sum(h.weight for h in blocks), threshold, tuple(blocks),
                        allows, None, tuple(problems))


def _listing_answers(zone: str, found: list[str],
                     problems: list[str]) -> list[ipaddress.IPv4Address]:
    """The answers in 127.0.0.0/8; the others are noted as ignored."""
    kept: list[ipaddress.IPv4Address] = []
    for text in found:
        try:
            answer = ipaddress.IPv4Address(text)
        except ValueError:
            problems.append(f"{zone} answered {text!r}, not an IPv4 address: ignored")
            continue
        if answer not in LISTING_RANGE:
            problems.append(f"{zone} answered {answer}, outside 127.0.0.0/8: ignored")
            continue
        if is_error_code(answer):
            problems.append(f"{zone} answered {answer}, an error code of the list (query "
                            "refused or limit exceeded?): counted only where a match names it")
        kept.append(answer)
    return kept


def _hit(zone: DnsblZone, answers: list[ipaddress.IPv4Address]) -> DnsblHit | None:
    listed = tuple(str(answer) for answer in answers if zone.lists(answer))
    return DnsblHit(zone.name, zone.weight, zone.kind, listed) if listed else None


async def _reason(resolver: Resolver, name: str, deadline: float) -> str | None:
    """The list's TXT explanation for ``name``, made safe for a reply line; or None."""
    try:
        async with asyncio.timeout_at(deadline):
            records = await resolver.txt(name)
    except (NxDomain, DnsTemporaryError, TimeoutError):
        return None
    return _clean(records[0]) if records else None


def _clean(record: bytes) -> str | None:
    """Printable ASCII only, whitespace collapsed, at most :data:`MAX_REASON` characters."""
    text = "".join(c if 0x21 <= ord(c) <= 0x7E else " " for c in record.decode("latin-1"))
    text = " ".join(text.split())
    if len(text) > MAX_REASON:
        text = text[: MAX_REASON - 3] + "..."
    return text or None


__all__ = [
    "ERROR_CODES",
    "LISTING_RANGE",
    "DnsblHit",
    "DnsblVerdict",
    "DnsblZone",
    "check",
    "is_error_code",
    "query_name",
]
