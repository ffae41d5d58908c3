"""HELO/EHLO argument checks, and forward-confirmed reverse DNS (FCrDNS) of the client.

Takes: the HELO/EHLO argument as the client sent it (the text after the verb, spaces
stripped); for FCrDNS a :class:`tayori.dns.Resolver` and the client's IP address.
Promises:

- :func:`check_helo` returns None for an acceptable name, or the reason it is not, in
  words fit for the reply (:func:`helo_reply`, ``501 5.5.2 Helo command rejected: ...``).
  Acceptable: a domain in RFC 5321 §4.1.2 syntax (LDH labels of 1-63 octets, 255
  octets in all, no trailing dot, ASCII only since EHLO comes before SMTPUTF8, A-labels
  checked as IDNA2008, a top-level label that is not all digits, RFC 3696 §2), or an
  address literal ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]`` (RFC 5321 §4.1.3). Refused:
  a bare IP address (it must be bracketed), underscores and other non-LDH characters,
  a single label (``localhost``, ``PC-42``) unless ``allow_single_label``, address
  literals when ``allow_literal`` is off, general literals (``[tag:...]``), and any
  name in ``forbidden`` (e.g. tayori's own host name and addresses: no client is us).
- :func:`fcrdns` looks up the PTR names of the address, then the A (IPv4) or AAAA
  (IPv6) records of at most ``MAX_PTR_NAMES`` of them, concurrently; ``pass`` when one
  of them leads back to the address (``names`` lists those that do), ``fail`` when
  none does or there is no PTR (NXDOMAIN, NODATA), ``temperror`` when DNS could not
  answer (the PTR lookup failed, or none matched and some forward lookup failed).
  Each query is bounded by the resolver's timeout; a caller wanting one bound for the
  whole check wraps it in ``asyncio.timeout`` and counts TimeoutError as temperror.
  Comparison is on parsed addresses, so
  ``2001:db8::1`` equals ``2001:0db8:0:0::1``; an IPv4-mapped client is IPv4.

RFC 5321 §4.1.4: a server may check that the EHLO name matches the client, but must
not refuse mail on that basis alone, so nothing here compares the two; FCrDNS is a
local policy about the client's own DNS (like Postfix's reject_unknown_client_hostname),
answered with RFC 7372's ``X.7.25`` (:func:`fcrdns_reply`): ``450 4.7.25`` on
temperror (never a permanent refusal for a DNS outage), ``550 5.7.25`` on fail.
Failure policy: :func:`check_helo` is pure. :func:`fcrdns` never raises for DNS
trouble (that is ``temperror``); a PTR name that is not a valid host name is skipped;
a malformed ``ip`` raises ValueError (a caller's bug).
Config keys (proposed): ``helo.require_fqdn`` (true: single labels refused),
``helo.allow_literal`` (true), ``helo.check_syntax`` (true), ``helo.fcrdns``
(``"off"`` | ``"log"`` | ``"defer"`` | ``"reject"``).
Standards: RFC 5321 §2.3.5, §4.1.1.1, §4.1.2, §4.1.3, §4.1.4; RFC 1123 §2.1;
RFC 3696 §2; RFC 5890 (A-labels); RFC 7372 (X.7.25); RFC 8601 §3 (iprev, which this
FCrDNS is).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from tayori.address import AddressError, check_address_literal, to_ascii_domain
from tayori.dns import DnsTemporaryError, NxDomain, Resolver
from tayori.errors import Reply

MAX_PTR_NAMES = 10
"""PTR names whose addresses are looked up at most (RFC 7208 §5.5 uses the same bound)."""
MAX_DOMAIN = 255
MAX_LABEL = 63

_LDH = re.compile(r"[A-Za-z0-9-]+\Z")
_IP_TEXT = re.compile(r"[0-9.]+\Z|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\Z")

Status = Literal["pass", "fail", "temperror"]
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# --- HELO syntax -------------------------------------------------------------------------


def check_helo(argument: str, *, allow_single_label: bool = False,
               allow_literal: bool = True, forbidden: Collection[str] = ()) -> str | None:
    """None when ``argument`` is an acceptable HELO/EHLO name, else why not.

    ``forbidden`` holds names and literals compared case-insensitively after
    normalisation (``[IPv6:2001:DB8::1]`` equals ``[ipv6:2001:db8:0::1]``).
    """
    if not argument:
        return "a host name is required"
    if " " in argument or "\t" in argument:
        return "one host name is expected"
    if argument.startswith("["):
        reason, name = _literal(argument, allow_literal)
    else:
        reason, name = _domain(argument, allow_single_label)
    if reason is None and name in _normalised(forbidden):
        return "that name is ours, not yours"
    return reason


def _literal(argument: str, allowed: bool) -> tuple[str | None, str]:
    if not allowed:
        return "an address literal is not accepted here, a host name is", argument
    try:
        normal = check_address_literal(argument)
    except AddressError:
        return "malformed address literal", argument
    if not normal.startswith("[IPv6:") and ":" in normal:  # [tag:content]
        return "only IPv4 and IPv6 address literals are accepted", argument
    return None, normal.lower()


def _domain(argument: str, allow_single_label: bool) -> tuple[str | None, str]:
    if _IP_TEXT.match(argument) and _is_ip(argument):
        return f"an address must be written as a literal: [{_bracketed(argument)}]", argument
    reason = _domain_syntax(argument)
    if reason is None and "." not in argument and not allow_single_label:
        reason = "a fully-qualified host name is required"
    return reason, argument.lower()


def _domain_syntax(name: str) -> str | None:
    """Why ``name`` is not an RFC 5321 Domain (dot-separated LDH labels), or None."""
    if not name.isascii():
        return "the host name must be ASCII (A-labels)"
    if len(name) > MAX_DOMAIN:
        return "the host name is too long"
    if name.endswith("."):
        return "no trailing dot in a host name"
    labels = name.split(".")
    for label in labels:
        reason = _label_syntax(label)
        if reason:
            return reason
    if len(labels) > 1 and labels[-1].isdigit():
        return "the top-level label cannot be all digits"
    try:
        to_ascii_domain(name)  # IDNA2008 check of the xn-- labels
    except AddressError:
        return "invalid IDNA label in the host name"
    return None


def _label_syntax(label: str) -> str | None:
    if not label:
        return "empty label in the host name"
    if len(label) > MAX_LABEL:
        return "a label of the host name is longer than 63 characters"
    if "_" in label:
        return "underscores are not allowed in a host name"
    if not _LDH.match(label):
        return "only letters, digits, hyphens and dots are allowed in a host name"
    if label.startswith("-") or label.endswith("-"):
        return "a label cannot begin or end with a hyphen"
    return None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _bracketed(text: str) -> str:
    return text if ipaddress.ip_address(text).version == 4 else f"IPv6:{text}"


def _normalised(names: Collection[str]) -> set[str]:
    out: set[str] = set()
    for name in names:
        try:
            out.add(check_address_literal(name).lower() if name.startswith("[") else
                    name.rstrip(".").lower())
        except AddressError:
            out.add(name.lower())
    return out


def helo_reply(reason: str) -> Reply:
    """The reply refusing a HELO/EHLO argument (Postfix words it the same way)."""
    return Reply(501, "5.5.2", f"Helo command rejected: {reason}")


# --- FCrDNS ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FcrdnsResult:
    """The outcome; ``names`` are the PTR names confirmed by a forward lookup."""

    status: Status
    names: tuple[str, ...] = ()
    ptr_names: tuple[str, ...] = ()
    note: str = ""  # for the log: what failed


async def fcrdns(resolver: Resolver, ip: str) -> FcrdnsResult:
    """Forward-confirmed reverse DNS of ``ip`` (see the module docstring)."""
    address = _client_address(ip)
    try:
        ptr_names = tuple(await resolver.ptr(str(address)))
    except NxDomain:
        ptr_names = ()
    except DnsTemporaryError as exc:
        return FcrdnsResult("temperror", note=str(exc))
    if not ptr_names:
        return FcrdnsResult("fail", note=f"no PTR record for {address}")
    checked = ptr_names[:MAX_PTR_NAMES]
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(_forward(resolver, name, family)) for name in checked]
    return _judge(address, checked, [task.result() for task in tasks], ptr_names)


async def _forward(resolver: Resolver, name: str, family: int) -> list[str] | str:
    """The addresses of ``name``, or why they could not be had."""
    try:
        return await resolver.addresses(name, family)
    except NxDomain:
        return []
    except DnsTemporaryError as exc:
        return str(exc)
    except ValueError:  # a PTR name that is no host name
        return []


def _judge(address: IpAddress, names: Sequence[str], answers: Sequence[list[str] | str],
           ptr_names: tuple[str, ...]) -> FcrdnsResult:
    confirmed = tuple(name for name, found in zip(names, answers, strict=True)
                      if isinstance(found, list) and _contains(found, address))
    if confirmed:
        return FcrdnsResult("pass", confirmed, ptr_names)
    errors = [found for found in answers if isinstance(found, str)]
    if errors:
        return FcrdnsResult("temperror", (), ptr_names, errors[0])
    return FcrdnsResult("fail", (), ptr_names,
                        f"no PTR name of {address} resolves back to it")


def _contains(found: list[str], address: IpAddress) -> bool:
    for text in found:
        try:
            if ipaddress.ip_address(text) == address:
                return True
        except ValueError:
            continue
    return False


def _client_address(ip: str) -> IpAddress:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def fcrdns_reply(result: FcrdnsResult) -> Reply | None:
    """The reply refusing a client whose FCrDNS did not pass (RFC 7372 X.7.25)."""
    if result.status == "pass":
        return None
    if result.status == "temperror":
        return Reply(450, "4.7.25", "Reverse DNS validation failed, try again later")
    return Reply(550, "5.7.25", "Reverse DNS validation failed: the client's PTR "
                 "name does not resolve back to its address")


__all__ = [
    "MAX_PTR_NAMES",
    "FcrdnsResult",
    "check_helo",
    "fcrdns",
    "fcrdns_reply",
    "helo_reply",
]
