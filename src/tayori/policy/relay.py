"""Relay control: which recipients a client may send to, and through which action.

Takes: the configured match rules and tables (DESIGN §4), and per recipient the client's
address, whether it authenticated, and the recipient's domain (A-label form).
Promises: :meth:`Rules.route` returns the action name of the first rule that matches,
or None: a recipient no rule accepts is refused at RCPT with ``554 5.7.1`` (no open
relay, DESIGN §2.6). :meth:`Rules.route_internal` routes mail tayori writes itself
(DSNs to senders it accepted mail from) by the rules' domains alone. Domains match
exactly, case-insensitively (``*.example.org`` for its subdomains); address literals
match only when a table lists them. A client's IPv4-mapped IPv6 address
(``::ffff:192.0.2.1``) is its IPv4 address for the network tables.
:func:`sender_routed` tells whether a local part carries sender-specified routing
(``user%host``, ``host!user``, ``"user@host"``), which tayori never follows (routing
sees the domain only) but a next hop might: a recipient for RCPT to refuse.
Failure policy: pure; the config loader has already refused malformed tables.
Config keys: ``tables``, ``match``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from tayori.address import check_address_literal, to_ascii_domain
from tayori.config import Config

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ROUTING_CHARACTERS = frozenset("@%!")


def sender_routed(local: str) -> bool:
    """Whether a local part names another destination: ``user%host`` (the percent hack),
    ``host!user`` (a UUCP bang path) or an ``@`` (only possible quoted: ``"user@host"``).

    Postfix's ``allow_percent_hack = no`` and ``swap_bangpath = no`` keep such a
    recipient from being rewritten, and its ``reject_unauth_destination`` refuses one
    bound for a relay domain; Exim's default ACL refuses these characters outright.
    Quoting and backslash escapes do not hide them, so the text is checked as written.
    """
    return not ROUTING_CHARACTERS.isdisjoint(local)


@dataclass(frozen=True, slots=True)
class _Rule:
    networks: tuple[Network, ...] | None     # None: any client
    authenticated: bool
    domains: frozenset[str] | None            # None: any domain
    wildcards: tuple[str, ...]
    action: str

    def matches(self, client: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
                authenticated: bool, domain: str) -> bool:
        if self.authenticated and not authenticated:
            return False
        if self.networks is not None and (client is None or not any(
                client in network for network in self.networks)):
            return False
        return self.matches_domain(domain)

    def matches_domain(self, domain: str) -> bool:
        if self.domains is None:
            return True
        return domain in self.domains or any(domain.endswith(w) for w in self.wildcards)


class Rules:
    def __init__(self, config: Config) -> None:
        self._rules = tuple(_compile(config, rule.sender, rule.to, rule.action)
                            for rule in config.match)

    def route(self, client_ip: str | None, authenticated: bool, domain: str) -> str | None:
        """The action for a recipient in ``domain`` (``Mailbox.ascii_domain`` form)."""
        client = _address(client_ip)
        for rule in self._rules:
            if rule.matches(client, authenticated, domain):
                return rule.action
        return None


    def trusts(self, client_ip: str | None) -> bool:
        """Whether a match rule's network table lists the client (a trusted network: not
        screened by blocklists, greylisting, HELO and reverse-DNS checks)."""
        client = _address(client_ip)
        return client is not None and any(
            rule.networks is not None and any(client in n for n in rule.networks)
            for rule in self._rules)

    def route_internal(self, domain: str) -> str | None:
        """The action for mail tayori writes itself (DSNs): the first rule for the
        domain, whichever clients it names; nobody outside can make tayori write it."""
        for rule in self._rules:
            if rule.matches_domain(domain):
                return rule.action
        return None


def _address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _compile(config: Config, sender: str, to: str, action: str) -> _Rule:
    networks: tuple[Network, ...] | None = None
    if sender not in ("any", "authenticated"):
        networks = tuple(ipaddress.ip_network(e, strict=False)
                         for e in config.tables[sender].entries)
    domains: frozenset[str] | None = None
    wildcards: tuple[str, ...] = ()
    if to != "any":
        entries = config.tables[to].entries if to in config.tables else (to,)
        exact = [e for e in entries if not e.startswith("*.")]
        domains = frozenset(check_address_literal(e) if e.startswith("[") else to_ascii_domain(e)
                            for e in exact)
        wildcards = tuple("." + to_ascii_domain(e[2:]) for e in entries if e.startswith("*."))
    return _Rule(networks, sender == "authenticated", domains, wildcards, action)
