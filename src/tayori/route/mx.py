"""MX routing: the ordered list of (host, address) hops that mail for a domain goes to.

Takes: a :class:`tayori.dns.Resolver`, the recipient domain in A-label form (as in
``Mailbox.ascii_domain``) or an address literal, our own names and addresses (for loop
detection), and which address families may be used.
Promises: :func:`mx_hops` returns hops in the order delivery should try them: MX records
by preference, shuffled among equal preferences (RFC 5321 §5.1), each host's addresses
with the preferred family first, an address listed once (at its first place). At most
:data:`MAX_MX_HOSTS` MX hosts are looked up and :data:`MAX_ADDRESSES` hops returned, so
a hostile zone cannot make one delivery try hundreds of servers. Without MX records the
domain itself is the implicit MX at preference 0. An address literal is one hop, with no
DNS at all; its ``host`` is the literal as normalised (``[192.0.2.1]``, ``[IPv6:...]``),
which tells delivery not to send it as a TLS server name.
Failure policy: when no hop can be given, :class:`RouteError` carries the reply to answer
or bounce with; its code says whether it is permanent. DNS trouble is always temporary
(``451 4.4.3``), and a hop lost to a temporary failure makes an empty result temporary
too. Permanent: the domain does not exist or has neither MX nor address (``550 5.1.2``),
a null MX (``556 5.1.10``), every MX host without an address (``550 5.4.4``), mail that
would loop back to us (``554 5.4.6``). Reply texts name the domain, never an exception.
An MX host that does not resolve is skipped. If one of the MX hosts is us (its name is in
``own_names``, or one of its addresses in ``own_addresses``), we are a backup MX and only
the more preferred hosts are kept.
Config keys: none read here; the caller passes ``hostname`` and listener addresses as
``own_names`` / ``own_addresses``, and the address-family switches.
Standards: RFC 5321 §5.1 (MX, implicit MX, loops), RFC 7505 (null MX), RFC 7504 and
RFC 3463 (556, X.1.10; X.4.3, X.4.4, X.4.6), RFC 6724 (family preference: v4 or v6
first by configuration).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import random
import socket
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import TypeVar

from tayori.address import AddressError, check_address_literal
from tayori.dns import DnsTemporaryError, MxRecord, NxDomain, Resolver
from tayori.errors import Reply

MAX_MX_HOSTS = 10
"""MX hosts looked up at most (the most preferred ones)."""
MAX_ADDRESSES = 20
"""Hops returned at most."""

_RNG = random.Random()
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Hop:
    """One place to try: ``host`` is the MX name (for logs, TLS SNI, Remote-MTA)."""

    host: str
    address: str
    preference: int


class RouteError(Exception):
    """No hop for the domain; ``reply`` says why, and whether for good (5xx) or for now."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class _Resolved:
    """An MX host with its addresses; ``temporary`` if a lookup of them failed for now."""

    record: MxRecord
    addresses: tuple[str, ...]
    temporary: bool


async def mx_hops(
    resolver: Resolver,
    domain: str,
    *,
    own_names: frozenset[str] = frozenset(),
    own_addresses: frozenset[str] = frozenset(),
    prefer_ipv6: bool = False,
    ipv4: bool = True,
    ipv6: bool = True,
    rng: random.Random | None = None,
) -> list[Hop]:
    """The hops for ``domain``, best first; RouteError when there is none."""
    families = _families(ipv4=ipv4, ipv6=ipv6, prefer_ipv6=prefer_ipv6)
    domain = _host_key(domain)
    ours = frozenset(_normal_address(address) for address in own_addresses)
    if domain.startswith("["):
        return [_literal_hop(domain, families, ours)]
    records, implicit = await _mx_records(resolver, domain, rng or _RNG)
    resolved = await _gather(_resolve(resolver, record, families) for record in records)
    names = frozenset(_host_key(name) for name in own_names)
    usable = _more_preferred_than_us(resolved, names, ours, domain)
    hops = _hops(usable)
    if not hops:
        raise RouteError(_no_hop_reply(domain, usable, implicit=implicit))
    return hops


def _families(*, ipv4: bool, ipv6: bool, prefer_ipv6: bool) -> tuple[int, ...]:
    order = (socket.AF_INET6, socket.AF_INET) if prefer_ipv6 else (socket.AF_INET,
                                                                    socket.AF_INET6)
    enabled = {socket.AF_INET: ipv4, socket.AF_INET6: ipv6}
    families = tuple(family for family in order if enabled[family])
    if not families:
        raise ValueError("IPv4 and IPv6 are both disabled")
    return families


def _host_key(name: str) -> str:
    return name.rstrip(".").lower()


def _normal_address(address: str) -> str:
    """The canonical text of an IP address, so that ``::1`` and ``0::1`` compare equal."""
    try:
        return ipaddress.ip_address(address).compressed
    except ValueError:
        return address


# --- replies ----------------------------------------------------------------------------------


def _dns_failure(domain: str) -> Reply:
    return Reply(451, "4.4.3", f"Temporary DNS failure looking up the mail servers of {domain}")


def _loop(domain: str) -> Reply:
    return Reply(554, "5.4.6", f"Mail for {domain} loops back to myself")


def _no_hop_reply(domain: str, resolved: list[_Resolved], *, implicit: bool) -> Reply:
    if any(host.temporary for host in resolved):
        return _dns_failure(domain)
    if implicit:
        return Reply(550, "5.1.2", f"Domain {domain} has no mail server (no MX or address)")
    return Reply(550, "5.4.4", f"No mail server of {domain} has a usable address")


# --- steps ------------------------------------------------------------------------------------


def _literal_hop(literal: str, families: tuple[int, ...], ours: frozenset[str]) -> Hop:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` as one hop; other literals do not route."""
    try:
        normal = check_address_literal(literal)
        text = normal[1:-1]
        address = ipaddress.ip_address(text[5:] if text[:5].lower() == "ipv6:" else text)
    except (AddressError, ValueError):
        reply = Reply(550, "5.1.2", f"Cannot route to address literal {literal}")
        raise RouteError(reply) from None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    if family not in families:
        reply = Reply(550, "5.4.4", f"Cannot deliver to {normal}: IPv{address.version} is off")
        raise RouteError(reply)
    if address.compressed in ours:
        raise RouteError(_loop(normal))
    return Hop(normal, address.compressed, 0)


async def _mx_records(
    resolver: Resolver, domain: str, rng: random.Random
) -> tuple[list[MxRecord], bool]:
    """The MX hosts to look up, in order, and whether they are the implicit MX."""
    try:
        records = await resolver.mx(domain)
    except NxDomain:
        raise RouteError(Reply(550, "5.1.2", f"Domain {domain} does not exist")) from None
    except DnsTemporaryError:
        raise RouteError(_dns_failure(domain)) from None
    if not records:
        return [MxRecord(0, domain)], True
    if all(record.host == "" for record in records):
        reply = Reply(556, "5.1.10", f"Domain {domain} does not accept mail (null MX)")
        raise RouteError(reply)
    named = [record for record in records if record.host]
    return _shuffled_by_preference(named, rng)[:MAX_MX_HOSTS], False


def _shuffled_by_preference(records: list[MxRecord], rng: random.Random) -> list[MxRecord]:
    out: list[MxRecord] = []
    by_preference = sorted(records, key=lambda record: record.preference)
    for _, group in itertools.groupby(by_preference, key=lambda record: record.preference):
        equals = list(group)
        rng.shuffle(equals)
        out.extend(equals)
    return out


async def _gather(coroutines: Iterable[Coroutine[object, object, _T]]) -> list[_T]:
    """Run concurrently under a TaskGroup; results in the given order."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(coroutine) for coroutine in coroutines]
    return [task.result() for task in tasks]


async def _resolve(resolver: Resolver, record: MxRecord, families: tuple[int, ...]) -> _Resolved:
    found = await _gather(_addresses(resolver, record.host, family) for family in families)
    addresses = tuple(address for family_addresses, _ in found for address in family_addresses)
    return _Resolved(record, addresses, temporary=any(failed for _, failed in found))


async def _addresses(resolver: Resolver, host: str, family: int) -> tuple[list[str], bool]:
    """A host's addresses of one family, and whether the lookup failed temporarily."""
    try:
        return await resolver.addresses(host, family), False
    except NxDomain:
        return [], False
    except DnsTemporaryError:
        return [], True


def _more_preferred_than_us(
    resolved: list[_Resolved], names: frozenset[str], ours: frozenset[str], domain: str
) -> list[_Resolved]:
    """Drop us and every MX no more preferred than us (RFC 5321 §5.1); none left is a loop."""
    own = [host.record.preference for host in resolved if _is_us(host, names, ours)]
    if not own:
        return resolved
    kept = [host for host in resolved if host.record.preference < min(own)]
    if not kept:
        raise RouteError(_loop(domain))
    return kept


def _is_us(host: _Resolved, names: frozenset[str], ours: frozenset[str]) -> bool:
    return host.record.host in names or any(
        _normal_address(address) in ours for address in host.addresses
    )


def _hops(resolved: list[_Resolved]) -> list[Hop]:
    hops: list[Hop] = []
    seen: set[str] = set()
    for host in resolved:
        for address in host.addresses:
            if address not in seen:
                seen.add(address)
                hops.append(Hop(host.record.host, address, host.record.preference))
    return hops[:MAX_ADDRESSES]
