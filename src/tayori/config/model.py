"""The validated configuration: frozen dataclasses, one per TOML section.

Takes: a parsed TOML document (see :mod:`tayori.config`).
Promises: every field documented (its ``setting`` metadata is the reference in
docs/configuration.md); cross-references checked (a match rule names an existing action
and table; a listener address parses; a table of networks holds CIDRs); a rule set that
would relay for anyone is refused, because an open relay is never wanted (DESIGN §2.6).
Failure policy: ConfigError naming file, key, problem and what is allowed.
Model: OpenSMTPD's listeners, tables, actions and match rules (DESIGN §4).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tayori.address import AddressError, check_address_literal, to_ascii_domain
from tayori.config.schema import (
    BOOL,
    DURATION,
    DURATION_LIST,
    INT,
    PATH,
    RATE,
    SIZE,
    STRING,
    STRING_LIST,
    BadValue,
    ConfigError,
    build,
    checked,
    convert,
    enum,
    required,
    setting,
)
from tayori.policy.dnsbl import Kind, zone_from_text
from tayori.route.aliases import AliasError, parse_aliases


def _parse_endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536 \
            or not host:
        raise BadValue(f"{text!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise BadValue(f"{host!r} is not an IP address") from None
    return host, int(port)


def parse_next_hop(text: str, default_port: int) -> tuple[str, int, bool]:
    """A relay or LMTP next hop: ``(host, port, brackets)``; a path (``/...``) is a unix
    socket (port 0); ``[host]`` means no MX lookup (brackets True)."""
    if text.startswith("/"):
        return text, 0, True
    host, port = text, default_port
    if text.count(":") == 1 or (text.startswith("[") and "]:" in text):
        host, _, port_text = text.rpartition(":")
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            raise BadValue(f"{text!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    brackets = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if brackets else host
    if not host:
        raise BadValue(f"{text!r} names no host")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            host = to_ascii_domain(host)
        except AddressError:
            raise BadValue(f"{text!r}: {host!r} is neither an IP address nor a host name") \
                from None
    return host, port, brackets


def _mechanisms(items: list[str]) -> tuple[str, ...]:
    names = tuple(item.upper() for item in items)
    unknown = [name for name in names if name not in ("PLAIN", "LOGIN")]
    if unknown or not names:
        raise BadValue(f"{unknown or items!r}: tayori offers PLAIN and LOGIN")
    return names


def _conninfo(text: str) -> str:
    if text:
        from psycopg.conninfo import conninfo_to_dict

        try:
            conninfo_to_dict(text)
        except Exception:   # psycopg's message may quote a password: say nothing of it
            raise BadValue("libpq cannot parse this connection string") from None
    return text


CONNINFO = checked(STRING, "connection string", '"host=/run/postgresql dbname=mail" or '
                   '"postgresql://user@host/db"', _conninfo)


def _forward_path(text: str) -> str:
    if not text.endswith(".forward"):
        raise BadValue(f"{text!r} does not end in .forward")
    return text


def _sign_for(items: list[str]) -> tuple[str, ...]:
    unknown = [item for item in items if item not in ("authenticated", "trusted")]
    if unknown:
        raise BadValue(f"{unknown!r}: only authenticated and trusted")
    return tuple(items)


def _positive(value: int) -> int:
    if value < 1:
        raise BadValue(f"{value} is less than 1")
    return value


POSITIVE = checked(INT, "integer", "a whole number >= 1", _positive)
ENDPOINT = checked(STRING, "address", '"IP:port" or "[IPv6]:port", e.g. "0.0.0.0:25", "[::]:25"',
                   _parse_endpoint)
LISTEN_MODES = ("smtp", "submission", "smtps")
AUTH_MODES = ("submission", "smtps")   # AUTH always offered, and required before MAIL
DIRECTORIES = ("dovecot", "ldap", "postgres", "sqlite")   # besides the users file
TLS_VERSIONS = ("1.2", "1.3")


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = setting("info", enum("debug", "info", "warning", "error"),
                         "Least severe event written to the operator log.")
    format: str = setting("text", enum("text", "json"),
                          "`text`: one readable line per event; `json`: one JSON object per line.")
    file: str = setting("", PATH, "Log file; empty writes to standard error.")


@dataclass(frozen=True, slots=True)
class ListenConfig:
    address: tuple[str, int] = required(ENDPOINT, "Where to listen.")
    mode: str = setting("smtp", enum(*LISTEN_MODES),
                        "Protocol spoken on this listener: `smtp` (port 25, mail from other "
                        "MTAs), `submission` (587: STARTTLS, then AUTH before MAIL; RFC 6409) "
                        "or `smtps` (465: TLS from the first byte, then AUTH before MAIL; "
                        "RFC 8314).")
    starttls: bool = setting(True, BOOL, "Offer STARTTLS (RFC 3207). Not used by `smtps`.")
    tls_cert: str = setting("", PATH, "PEM certificate chain. Empty: a self-signed certificate "
                            "is generated under `<spool>/tls/`. More certificates, chosen by "
                            "the name the client asks for (SNI): `[[certificate]]`.")
    tls_key: str = setting("", PATH, "PEM private key matching `tls_cert`.")
    tls_min_version: str = setting("1.2", enum(*TLS_VERSIONS), "Oldest TLS version accepted "
                                   "(RFC 8996: never 1.0 or 1.1).")
    tls_ciphers: str = setting("", STRING, "OpenSSL cipher list for TLS 1.2. Empty: forward-"
                               "secret AEAD suites only (ECDHE with AES-GCM or ChaCha20).")
    tls_client_certs: str = setting("none", enum("none", "optional", "required"),
                                    "Ask clients for a certificate, checked against "
                                    "`tls_client_ca`; its subject is logged. `required`: no "
                                    "TLS without one.")
    tls_client_ca: str = setting("", PATH, "CA certificates (PEM) for client certificates.")
    auth: bool = setting(False, BOOL, "`smtp`: offer AUTH here too (after STARTTLS). "
                         "`submission` and `smtps` always offer it.")
    auth_without_tls: bool = setting(False, BOOL, "Offer AUTH on a connection without TLS. "
                                     "Only for a loopback address (passwords would travel "
                                     "in clear text).")
    proxy_protocol: bool = setting(False, BOOL, "Expect a PROXY protocol v1 or v2 header "
                                   "before SMTP; the client address is taken from it.")

    @property
    def offers_auth(self) -> bool:
        return self.auth or self.mode in AUTH_MODES


@dataclass(frozen=True, slots=True)
class CertificateConfig:
    cert: str = required(PATH, "PEM certificate chain.")
    key: str = required(PATH, "PEM private key matching `cert`.")
    names: tuple[str, ...] = setting((), STRING_LIST, "Host names it serves when a client "
                                     "asks for one (SNI), `*.example.org` for a wildcard. "
                                     "Empty: the DNS names in the certificate.",
                                     shown_default="[] (from the certificate)")


@dataclass(frozen=True, slots=True)
class AuthConfig:
    mechanisms: tuple[str, ...] = setting(("PLAIN", "LOGIN"), checked(
        STRING_LIST, "list of SASL mechanisms", '["PLAIN", "LOGIN"] or a part of it',
        _mechanisms), "SASL mechanisms offered with AUTH, in this order (only over TLS, "
        "unless a listener says `auth_without_tls`).", shown_default='["PLAIN", "LOGIN"]')
    users: str = setting("./var/users", PATH, "The user file (`login:{ARGON2ID}...:sender, "
                         "@domain` per line), managed with `tayori user add | passwd | "
                         "delete | list`; used unless `sqlite`, `postgres`, `ldap` or "
                         "`dovecot` is set.")
    sqlite: str = setting("", PATH, "Users in an SQLite database instead (read-only).")
    postgres: str = setting("", CONNINFO, "Users in PostgreSQL instead: a libpq connection "
                            'string, "host=/run/postgresql dbname=mail user=tayori" or '
                            '"postgresql://..." (queries run read-only).')
    password_query: str = setting("SELECT password FROM users WHERE login = :login", STRING,
                                  "`sqlite`, `postgres`: the stored hash of `:login`.")
    senders_query: str = setting("", STRING, "`sqlite`, `postgres`: the sender addresses (and "
                                 "`@domain`s) of `:login`, one per row.")
    ldap: str = setting("", STRING, 'Users in LDAP instead: the server, "ldap://host" or '
                        '"ldaps://host"; a search for the user, then a bind as its entry.')
    ldap_base: str = setting("", STRING, "`ldap`: the search base DN.")
    ldap_filter: str = setting("(&(objectClass=inetOrgPerson)(uid={login}))", STRING,
                               "`ldap`: the search filter; `{login}` is replaced (escaped, "
                               "RFC 4515).")
    ldap_bind_dn: str = setting("", STRING, "`ldap`: the DN to search as; empty: anonymous.")
    ldap_bind_password: str = setting("", STRING, "`ldap`: the password of `ldap_bind_dn`.")
    ldap_start_tls: bool = setting(False, BOOL, "`ldap`: STARTTLS before anything is sent.")
    ldap_ca_file: str = setting("", PATH, "`ldap`: CA certificates for its TLS; empty: the "
                                "system's.")
    ldap_sender_attributes: tuple[str, ...] = setting(
        ("mail",), STRING_LIST, "`ldap`: attributes of the entry that list its sender "
        "addresses.", shown_default='["mail"]')
    dovecot: str = setting("", STRING, "Ask Dovecot's auth service instead: its auth-client "
                           'socket path, or "host:port".')
    senders: str = setting("", PATH, "A file of `login: address, @domain` lines: the sender "
                           "addresses of each login (besides the login itself when it is an "
                           "address), for directories without their own (Dovecot).")
    sender_policy: str = setting("owned", enum("owned", "any"), "`owned`: an authenticated "
                                 "client may use only its own addresses, in MAIL FROM and in "
                                 "the From header (else 553 5.7.1; so it cannot have mail "
                                 "signed for a domain not its own); `any`: every sender.")
    timeout: float = setting(10.0, DURATION, "Wait for the user directory; then 454 4.7.0.",
                             shown_default='"10s"')
    max_failures: int = setting(5, POSITIVE, "Failed logins from one client address (IPv6: "
                                "its /64) within `failure_window` before it is banned.")
    failure_window: float = setting(600.0, DURATION, "See `max_failures`.",
                                    shown_default='"10m"')
    ban_time: float = setting(3600.0, DURATION, "How long a banned client gets 421 4.7.0 at "
                              "connect and at AUTH (logged as auth-ban, for fail2ban).",
                              shown_default='"1h"')

    @property
    def backend(self) -> str:
        return next((name for name in DIRECTORIES if getattr(self, name)), "file")


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_message_size: int = setting(50 * 1024**2, SIZE, "Largest message accepted (SIZE; "
                                     "checked at MAIL and while data arrives): 552 5.3.4.",
                                     shown_default='"50M"')
    max_recipients: int = setting(1000, INT, "Recipients per message; more get 452 4.5.3.")
    max_connections: int = setting(1000, INT, "Sessions at once, all clients; more get 421.")
    max_connections_per_ip: int = setting(50, INT, "Sessions at once from one client address; "
                                          "more get 421 4.7.0.")
    max_errors: int = setting(20, INT, "Refused commands in one session before it is closed "
                              "with 421.")
    max_unknown_commands: int = setting(3, INT, "Unknown commands in one session before it is "
                                        "closed with 421.")
    max_received_headers: int = setting(100, INT, "More `Received:` headers than this is a mail "
                                        "loop: 554 5.4.6.")
    command_timeout: float = setting(300.0, DURATION, "Wait for the next command (RFC 5321 "
                                     "§4.5.3.2: at least 5 minutes).", shown_default='"5m"')
    data_timeout: float = setting(600.0, DURATION, "Wait for the next piece of message data.",
                                  shown_default='"10m"')
    drain_timeout: float = setting(30.0, DURATION, "On SIGTERM, how long running sessions may "
                                   "go on before they are closed with 421.",
                                   shown_default='"30s"')
    max_messages_per_connection: int = setting(1000, POSITIVE, "Messages in one session; "
                                               "the next MAIL gets 421 4.7.0 and the "
                                               "session is closed.")
    messages_per_sender: tuple[int, float] | None = setting(
        None, RATE, "Messages one sender may send in a time (the login when authenticated, "
        "else the MAIL FROM address): more get 450 4.7.1 until it has waited.",
        shown_default='"" (no limit)')
    recipients_per_sender: tuple[int, float] | None = setting(
        None, RATE, "Recipients one sender may give in a time: more get 450 4.7.1.",
        shown_default='"" (no limit)')
    messages_per_client: tuple[int, float] | None = setting(
        None, RATE, "Messages from one client address (IPv6: its /64) in a time.",
        shown_default='"" (no limit)')
    recipients_per_client: tuple[int, float] | None = setting(
        None, RATE, "Recipients from one client address (IPv6: its /64) in a time.",
        shown_default='"" (no limit)')


def _zones(kind: Kind) -> Callable[[list[str]], tuple[str, ...]]:
    def check(items: list[str]) -> tuple[str, ...]:
        for item in items:
            try:
                zone_from_text(item, kind)
            except ValueError as exc:
                raise BadValue(str(exc)) from None
        return tuple(items)
    return check


ZONES = checked(STRING_LIST, "list of zones", '["zone", "zone*2", "zone=127.0.0.2*3"]',
                _zones("block"))
ALLOW_ZONES = checked(STRING_LIST, "list of zones", '["zone", "zone=127.0.10.0/24"]',
                      _zones("allow"))


@dataclass(frozen=True, slots=True)
class DnsblConfig:
    zones: tuple[str, ...] = setting((), ZONES, 'Blocklists asked about each client of '
                                     'an `smtp` listener at connect: `"zone"`, `"zone*WEIGHT"`, '
                                     '`"zone=127.0.0.2,127.0.0.4/30*WEIGHT"` (the answers that '
                                     'count). Listed: 554 5.7.1 naming the list. Trusted networks '
                                     'and the other listeners are not checked.',
                                     shown_default="[]")
    allow: tuple[str, ...] = setting((), ALLOW_ZONES, "Allowlists (DNSWL): a client listed in one "
                                     "is neither blocked nor greylisted.", shown_default="[]")
    threshold: int = setting(1, POSITIVE, "The sum of the weights of the lists that name a "
                             "client at which it is refused.")
    time_limit: float = setting(5.0, DURATION, "Wait this long for the lists; one that has not "
                                "answered is skipped (logged), never a reason to refuse.",
                                shown_default='"5s"')


@dataclass(frozen=True, slots=True)
class GreylistConfig:
    enabled: bool = setting(False, BOOL, "Defer (451 4.7.1) the first attempt of every (client "
                            "network, sender, recipient) from untrusted clients of `smtp` "
                            "listeners; a retry after `delay` passes.")
    delay: float = setting(300.0, DURATION, "How long a new triplet waits.", shown_default='"5m"')
    retry_window: float = setting(2 * 86400.0, DURATION, "A retry later than this starts over.",
                                  shown_default='"2d"')
    allow_time: float = setting(35 * 86400.0, DURATION, "A client network that passed is let "
                                "through at once for this long.", shown_default='"35d"')
    path: str = setting("", PATH, "Where the triplets are kept (survives restarts). Empty: "
                        "`greylist.sqlite3` in the spool.")


def _positive_seconds(value: float) -> float:
    if value <= 0:
        raise BadValue("must be longer than 0")
    return value


POSITIVE_DURATION = checked(DURATION, "duration", 'a duration longer than 0, e.g. "20s"',
                            _positive_seconds)


@dataclass(frozen=True, slots=True)
class SpfConfig:
    check: bool = setting(True, BOOL, "Check SPF (RFC 7208) for untrusted, not logged-in "
                          "clients: the MAIL FROM identity (and the HELO name); the result "
                          "goes into Received-SPF and Authentication-Results.")
    helo: bool = setting(True, BOOL, "Check the HELO identity too (its `fail` decides).")
    on_fail: str = setting("reject", enum("reject", "tag"), "`fail`: refuse the mail (550 "
                           "5.7.23 with the domain's explanation), or only tag it.")
    on_softfail: str = setting("tag", enum("reject", "tag"), "`softfail`: refuse (550 5.7.23) "
                               "or tag.")
    on_permerror: str = setting("tag", enum("reject", "tag"), "A broken SPF record: refuse "
                                "(550 5.7.24) or tag.")
    on_temperror: str = setting("defer", enum("defer", "tag"), "DNS trouble: defer (451 "
                                "4.7.24) or tag.")
    timeout: float = setting(20.0, POSITIVE_DURATION, "The whole evaluation's time limit; "
                             "then `temperror`.", shown_default='"20s"')


@dataclass(frozen=True, slots=True)
class DkimConfig:
    verify: bool = setting(True, BOOL, "Verify the DKIM signatures (RFC 6376, 8463) of mail "
                           "from untrusted, not logged-in clients; the results go into "
                           "Authentication-Results.")
    max_signatures: int = setting(10, POSITIVE, "Signatures verified per message; more are "
                                  "reported `neutral`.")
    sign_for: tuple[str, ...] = setting(("authenticated", "trusted"), checked(
        STRING_LIST, "list", '["authenticated", "trusted"] or a part of it',
        _sign_for), "Whose mail is signed with the `[[dkim_key]]` of its From domain: "
        "logged-in clients, trusted networks.", shown_default='["authenticated", "trusted"]')
    headers: tuple[str, ...] = setting((), STRING_LIST, "Header fields to sign. Empty: "
                                       "RFC 6376's recommended set.",
                                       shown_default="[] (the recommended set)")
    oversign: tuple[str, ...] = setting(("from", "to", "subject", "date"), STRING_LIST,
                                        "Fields signed once more than they occur, so none "
                                        "can be added.",
                                        shown_default='["from", "to", "subject", "date"]')
    expire: float = setting(0.0, DURATION, "Signatures expire (x=) this long after signing; "
                            "0: never.", shown_default="0 (never)")


@dataclass(frozen=True, slots=True)
class DkimKeyConfig:
    domain: str = required(STRING, "The signing domain (d=): mail whose From is in it is "
                           "signed.")
    selector: str = required(STRING, "The selector (s=): the key is published at "
                             "`SELECTOR._domainkey.DOMAIN`.")
    key_file: str = required(PATH, "The private key (PEM; `tayori dkim keygen` writes one), "
                             "readable by tayori's `user`: it is read after privileges "
                             "are dropped. Two keys for one domain (RSA and Ed25519): both "
                             "sign.")


@dataclass(frozen=True, slots=True)
class DmarcConfig:
    check: bool = setting(True, BOOL, "Evaluate DMARC (RFC 7489, RFC 9091) for mail from "
                          "untrusted, not logged-in clients. DNS trouble (or a fail that an "
                          "aligned SPF or DKIM check with DNS trouble might have turned into "
                          "a pass) defers the message (451 4.7.0), unless `on_reject` and "
                          "`on_quarantine` are both `tag`.")
    on_reject: str = setting("reject", enum("reject", "quarantine", "tag"), "A failing "
                             "message whose domain asks for `p=reject`: refuse it (550 5.7.1), "
                             "treat it as `quarantine`, or only tag it.")
    on_quarantine: str = setting("header", enum("header", "hold", "tag"), "`p=quarantine`: "
                                 "add `X-Tayori-Quarantine: yes` (for the mailbox's spam "
                                 "folder rules), hold the message in the queue for the "
                                 "operator, or only tag it.")
    psd: bool = setting(False, BOOL, "Also look for a policy at the public suffix (RFC 9091).")
    reports: bool = setting(False, BOOL, "Record aggregate report data (in "
                            "`dmarc-reports.sqlite3` in the spool) and send the gzip'd reports "
                            "(RFC 7489 §7.2) to each domain's `rua`.")
    report_org: str = setting("", STRING, "The organisation named in reports. Empty: the "
                              "host name.")
    report_from: str = setting("", STRING, "The sender address of reports. Empty: "
                               "`postmaster@` the host name.")
    report_interval: float = setting(86400.0, DURATION, "How often reports are sent, in "
                                     "whole hours (rounded down; periods are aligned to "
                                     "UTC).", shown_default='"1d"')


@dataclass(frozen=True, slots=True)
class ArcConfig:
    verify: bool = setting(True, BOOL, "Validate ARC chains (RFC 8617) of received mail; "
                           "`arc=` goes into Authentication-Results.")
    seal: bool = setting(False, BOOL, "Seal (add an ARC set to) mail forwarded through an "
                         "alias or `.forward`, with the `[[dkim_key]]` named below (RSA).")
    seal_domain: str = setting("", STRING, "`seal`: the domain of the key to seal with.")
    seal_selector: str = setting("", STRING, "`seal`: the selector of that key.")


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    vrfy: bool = setting(False, BOOL, "Answer VRFY truthfully. Off: VRFY gets 252 (RFC 5321 "
                         "§3.5.3) and tells nothing.")
    smtputf8: bool = setting(True, BOOL, "Offer SMTPUTF8 (RFC 6531).")
    chunking: bool = setting(True, BOOL, "Offer CHUNKING and BINARYMIME (RFC 3030).")
    dsn: bool = setting(True, BOOL, "Offer DSN (RFC 3461).")
    helo_syntax: bool = setting(False, BOOL, "Refuse (501 5.5.2) an EHLO/HELO name that is "
                                "not a fully qualified domain or an address literal, from "
                                "untrusted clients of `smtp` listeners.")
    fcrdns: str = setting("off", enum("off", "log", "reject"), "Forward-confirmed reverse DNS "
                          "of untrusted clients of `smtp` listeners: `log` it, or `reject` "
                          "their mail (550 5.7.25; 450 4.7.25 when DNS fails) at MAIL.")


@dataclass(frozen=True, slots=True)
class QueueConfig:
    lifetime: float = setting(5 * 86400.0, DURATION, "How long a message may stay in the queue; "
                              "then its undelivered recipients bounce (expired).",
                              shown_default='"5d"')
    retry: tuple[float, ...] = setting((300.0, 600.0, 1200.0, 2400.0, 3600.0), DURATION_LIST,
                                       "Waits between attempts after a temporary failure, "
                                       "then the last one again; each with ±10% jitter.",
                                       shown_default='["5m", "10m", "20m", "40m", "1h"]')
    delay_warning: float = setting(0.0, DURATION, "After this long undelivered, the sender "
                                   "gets one delay notice (DSN action delayed). 0: only for "
                                   "recipients given with NOTIFY=DELAY, after 4h.",
                                   shown_default="0 (off)")
    postmaster: str = setting("", STRING, "Where a DSN that cannot be delivered goes (a "
                              "double bounce). Empty: it is logged and dropped.")
    max_active: int = setting(2000, INT, "Recipients being delivered at once, loaded from the "
                              "index (the active window), whatever the queue size.")
    bounce_size_limit: int = setting(100 * 1024, SIZE, "Messages larger than this come back "
                                     "in a DSN as headers only.", shown_default='"100K"')
    suspended: bool = setting(False, BOOL, "Accept and queue mail but attempt no delivery "
                              "(maintenance). Messages wait; their lifetime still runs.")


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    max_connections: int = setting(100, INT, "Outbound SMTP/LMTP connections at once, in total.")
    connect_timeout: float = setting(30.0, DURATION, "Wait for a TCP connection to a next hop.",
                                     shown_default='"30s"')
    command_timeout: float = setting(300.0, DURATION, "Wait for the greeting and for replies "
                                     "to EHLO, MAIL, RCPT (RFC 5321 §4.5.3.2: 5 minutes).",
                                     shown_default='"5m"')
    data_timeout: float = setting(600.0, DURATION, "Wait for the reply after the message "
                                  "content (RFC 5321 §4.5.3.2: 10 minutes).",
                                  shown_default='"10m"')
    max_recipients: int = setting(100, POSITIVE, "Recipients in one transaction; more go in "
                                  "further transactions (RFC 5321 §4.5.3.1.8: every server "
                                  "takes 100).")
    reuse_time: float = setting(2.0, DURATION, "Keep an idle connection this long for the next "
                                "message to the same destination.", shown_default='"2s"')
    prefer_ipv6: bool = setting(False, BOOL, "Try a host's IPv6 addresses before its IPv4 ones.")
    ipv4: bool = setting(True, BOOL, "Deliver over IPv4.")
    ipv6: bool = setting(True, BOOL, "Deliver over IPv6.")


@dataclass(frozen=True, slots=True)
class DnsConfig:
    nameservers: tuple[tuple[str, int], ...] = setting(
        (), checked(STRING_LIST, "list of addresses", '["IP:port", ...], e.g. ["127.0.0.1:53"]',
                    lambda items: tuple(_parse_endpoint(i) for i in items)),
        "Resolvers to ask; empty: those of /etc/resolv.conf.", shown_default="[] (the system's)")
    timeout: float = setting(5.0, DURATION, "Wait for a DNS answer; then the delivery is "
                             "deferred, never bounced.", shown_default='"5s"')


DELIVERY_KINDS = ("maildir", "mbox", "lmtp", "mx", "relay", "pipe")
_REMOTE_KEYS = {"tls", "tls_ca_file", "max_connections", "source_address"}
_MAILDIR_KEYS = {"users", "aliases", "subaddress", "quota_bytes", "quota_messages",
                 "quota_hard", "catch_all", "tag_folder", "owner", "run_as", "forward",
                 "forward_path", "timeout"}
_ACTION_KEYS = {"maildir": {"path"} | _MAILDIR_KEYS,
                "lmtp": {"host", "max_connections"},
                "relay": {"host", "auth_user", "auth_password"} | _REMOTE_KEYS,
                "pipe": {"command", "run_as", "timeout"}, "mx": {"port"} | _REMOTE_KEYS,
                "mbox": {"path", "subaddress"}}
_OPTIONAL_KEYS = {"tls", "tls_ca_file", "max_connections", "source_address", "port",
                  "auth_user", "auth_password", "timeout"} | _MAILDIR_KEYS


@dataclass(frozen=True, slots=True)
class ActionConfig:
    deliver: str = required(enum(*DELIVERY_KINDS), "How recipients routed here are delivered.")
    path: str = setting("", PATH, "`maildir`, `mbox`: mailbox path; `{user}` and `{domain}` are "
                        "replaced by the recipient's local part and domain.")
    host: str = setting("", STRING, '`relay`, `lmtp`: next hop, "[host]:port" (or a unix '
                        "socket path for lmtp).")
    command: str = setting("", STRING, "`pipe`: the command that receives the message on "
                           "its standard input (no shell; SENDER, RECIPIENT, LOCAL, DOMAIN, "
                           "EXTENSION in its environment; exit 75 defers, others bounce).")
    users: str = setting("", STRING, "`maildir`: a table of the local parts (or addresses) "
                         "that have a mailbox; others, unless aliases, are refused at RCPT "
                         "with 550 5.1.1. Empty (with no `aliases`): every local part.")
    aliases: str = setting("", STRING, "`maildir`: a table with `format = \"aliases\"` "
                           "(aliases(5)): names that expand to local names, addresses, "
                           "`|command`, `/file` or `:include:/file`.")
    subaddress: str = setting("+", STRING, "`maildir`: the delimiter of `user+tag`; the tag "
                              "is ignored when looking the user up. Empty: none.")
    catch_all: str = setting("", STRING, "`maildir`: the local name (a user or an alias) that "
                             "gets mail for unknown local parts instead of a 550 at RCPT.")
    tag_folder: bool = setting(False, BOOL, "`maildir`: `user+tag` goes to the Maildir++ "
                               "folder `tag` (when it is a valid folder name), not INBOX.")
    owner: str = setting("", STRING, "`maildir`: the system user that owns the mailboxes, or "
                         '"recipient": each mailbox belongs to the system account named by '
                         "its local part (unknown ones are refused at RCPT; never root). "
                         "Needs tayori started as root (with `user`, a privileged helper "
                         "writes the files). Empty: the user tayori runs as (one virtual mail "
                         "user for all mailboxes).")
    run_as: str = setting("", STRING, "`pipe`, and `|command` aliases of a `maildir` action: "
                          "run commands as this system user. Empty: as tayori runs.")
    forward: bool = setting(False, BOOL, "`maildir`: a recipient that is a system account "
                            "may redirect its mail with a `.forward` file (aliases(5) "
                            "targets; `\\user` keeps a copy in the user's own mailbox; "
                            "`|command` and `/file` run as that user). The file must belong "
                            "to the user (or root) and be writable by nobody else.")
    forward_path: str = setting("{home}/.forward", checked(
        STRING, "path template", 'a path ending in ".forward", with {home} and {user}',
        _forward_path), "`maildir`, with `forward`: where the file is; `{home}` and "
        "`{user}` are replaced. Its name ends in `.forward` (the privileged helper reads "
        "no other files for tayori).")
    timeout: float = setting(600.0, DURATION, "`pipe`, and `|command` targets of a `maildir` "
                             "action: how long the command may run; then it is killed and "
                             "the delivery deferred.", shown_default='"10m"')
    quota_bytes: int = setting(0, SIZE, "`maildir`: most bytes per mailbox; 0: no limit. "
                               "Full: 452 4.2.2 at RCPT, or a deferral when only the message "
                               "makes it full, and a 5.2.2 bounce at the end of the lifetime.")
    quota_messages: int = setting(0, INT, "`maildir`: most messages per mailbox; 0: no limit.")
    quota_hard: bool = setting(False, BOOL, "`maildir`: a full mailbox bounces at once "
                               "(552 5.2.2) instead of waiting for space.")
    port: int = setting(25, INT, "`mx`: the port of the MX hosts.")
    tls: str = setting("may", enum("none", "may", "encrypt", "verify"),
                       "`mx`, `relay`: STARTTLS policy. `may`: when offered, falling back to "
                       "plain text if the handshake fails; `encrypt`: required, not "
                       "authenticated; `verify`: required, certificate valid for the host name.")
    tls_ca_file: str = setting("", PATH, "`tls = verify`: CA certificates (PEM); empty: the "
                               "system's.")
    max_connections: int = setting(20, INT, "Connections at once to one destination (an MX "
                                   "domain, a relay host, an LMTP server).")
    source_address: str = setting("", STRING, "`mx`, `relay`: local IP address to connect from.")
    auth_user: str = setting("", STRING, "`relay`: log in (AUTH PLAIN or LOGIN) with this user; "
                             "only over TLS, unless `tls = \"none\"` says there is none.")
    auth_password: str = setting("", STRING, "`relay`: the password for `auth_user`.")


@dataclass(frozen=True, slots=True)
class MatchConfig:
    to: str = required(STRING, '"any", a table of domains, or one domain.')
    action: str = required(STRING, "The name of an `[actions.NAME]` section.")
    sender: str = setting("any", STRING, '"any", "authenticated" or a table of networks: '
                          "which clients the rule applies to. Written `from` in the file.",
                          shown_default='"any"')


@dataclass(frozen=True, slots=True)
class Table:
    """A named list (of domains, networks, users: inline, or one entry per line of a
    file), or an aliases(5) file (``format = "aliases"``: ``entries`` are its names)."""

    name: str
    entries: tuple[str, ...]
    path: str = ""
    format: str = "list"
    query: str = ""      # an SQLite table: the lookup, one ? for the key


@dataclass(frozen=True, slots=True)
class Config:
    file: str
    hostname: str = setting("", STRING, "Name in the greeting, EHLO reply and Received headers.",
                            shown_default="the system's fully qualified host name")
    authserv_id: str = setting("", STRING, "The name in tayori's Authentication-Results "
                               "headers (RFC 8601); such headers arriving with it are removed.",
                               shown_default="the host name")
    spool: str = setting("./var/spool", PATH, "Queue directory: message files, index, corrupt/. "
                         "Relative paths are relative to the config file.")
    user: str = setting("", STRING, "After binding the listeners, drop privileges to this "
                        "user (when started as root). Empty: keep running as is.")
    workers: int = setting(0, INT, "Worker processes sharing the listeners, each with its own "
                           "event loop; 0 means one per CPU core.",
                           shown_default="0 (one per core)")
    log: LogConfig = field(default_factory=LogConfig)
    listen: tuple[ListenConfig, ...] = ()
    certificates: tuple[CertificateConfig, ...] = ()
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    dnsbl: DnsblConfig = field(default_factory=DnsblConfig)
    greylist: GreylistConfig = field(default_factory=GreylistConfig)
    spf: SpfConfig = field(default_factory=SpfConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    dkim_keys: tuple[DkimKeyConfig, ...] = ()
    dmarc: DmarcConfig = field(default_factory=DmarcConfig)
    arc: ArcConfig = field(default_factory=ArcConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    tables: dict[str, Table] = field(default_factory=dict)
    actions: dict[str, ActionConfig] = field(default_factory=dict)
    match: tuple[MatchConfig, ...] = ()


TOP_LEVEL = ("hostname", "authserv_id", "spool", "user", "workers")
SECTIONS = {"log": LogConfig, "limits": LimitsConfig, "smtp": SmtpConfig, "auth": AuthConfig,
            "dnsbl": DnsblConfig, "greylist": GreylistConfig, "spf": SpfConfig,
            "dkim": DkimConfig, "dmarc": DmarcConfig, "arc": ArcConfig, "queue": QueueConfig,
            "delivery": DeliveryConfig, "dns": DnsConfig}


def from_document(doc: dict[str, Any], file: str, base: str) -> Config:
    """Validate a parsed TOML document into a Config; ``base`` anchors relative table files."""
    allowed = set(TOP_LEVEL) | set(SECTIONS) | {"listen", "certificate", "dkim_key", "tables",
                                                "actions", "match"}
    for key in doc:
        if key not in allowed:
            raise ConfigError(file, key, "unknown key", ", ".join(sorted(allowed)))
    top = convert(Config, {k: doc[k] for k in TOP_LEVEL if k in doc}, file, "")
    sections: dict[str, Any] = {name: build(cls, doc.get(name, {}), file, name)
                                for name, cls in SECTIONS.items()}
    listeners = tuple(build(ListenConfig, item, file, f"listen[{i}]")
                      for i, item in enumerate(_array(doc, "listen", file)))
    if not listeners:
        raise ConfigError(file, "listen", "no listener is configured",
                          'at least one [[listen]] with address = "IP:port"')
    tables = _tables(doc.get("tables", {}), file, base)
    actions = _actions(doc.get("actions", {}), file, tables)
    rules = tuple(_match(item, i, file, tables, actions)
                  for i, item in enumerate(_array(doc, "match", file)))
    for i, listener in enumerate(listeners):
        _check_listener(listener, file, f"listen[{i}]")
    certificates = tuple(build(CertificateConfig, item, file, f"certificate[{i}]")
                         for i, item in enumerate(_array(doc, "certificate", file)))
    dkim_keys = tuple(build(DkimKeyConfig, item, file, f"dkim_key[{i}]")
                      for i, item in enumerate(_array(doc, "dkim_key", file)))
    _check_arc_key(sections["arc"], dkim_keys, file)
    chosen = [name for name in DIRECTORIES if getattr(sections["auth"], name)]
    if len(chosen) > 1:
        raise ConfigError(file, f"auth.{chosen[1]}", f"auth.{chosen[0]} is set too",
                          "one user directory: users (a file), sqlite, postgres, ldap or "
                          "dovecot")
    top["hostname"] = top.get("hostname") or socket.getfqdn()
    top["authserv_id"] = top.get("authserv_id") or top["hostname"]
    return Config(file=file, listen=listeners, certificates=certificates, dkim_keys=dkim_keys,
                  tables=tables, actions=actions, match=rules, **top, **sections)


def _check_arc_key(arc: ArcConfig, keys: tuple[DkimKeyConfig, ...], file: str) -> None:
    if arc.seal and not any(k.domain == arc.seal_domain and k.selector == arc.seal_selector
                            for k in keys):
        raise ConfigError(file, "arc.seal_domain", "names no [[dkim_key]]",
                          "seal_domain and seal_selector of a [[dkim_key]] entry")


def _check_listener(listener: ListenConfig, file: str, key: str) -> None:
    if bool(listener.tls_cert) != bool(listener.tls_key):
        raise ConfigError(file, f"{key}.tls_key", "tls_cert and tls_key go together",
                          "both set, or both empty for a self-signed certificate")
    if listener.auth_without_tls and not ipaddress.ip_address(
            socket.gethostbyname(listener.address[0]) if listener.address[0] == "localhost"
            else listener.address[0]).is_loopback:
        raise ConfigError(file, f"{key}.auth_without_tls", "passwords would cross the network "
                          "in clear text", "true only on a loopback address (127.0.0.0/8, ::1)")
    if listener.tls_client_certs != "none" and not listener.tls_client_ca:
        raise ConfigError(file, f"{key}.tls_client_ca", "is needed to check client "
                          "certificates", "a PEM file of CA certificates")
    if listener.mode == "smtps" and not listener.starttls:
        raise ConfigError(file, f"{key}.starttls", "smtps is TLS from the first byte",
                          "leave starttls on (true) for an smtps listener")
    if listener.mode == "smtps" and listener.proxy_protocol:
        raise ConfigError(file, f"{key}.proxy_protocol", "is not supported with smtps yet",
                          "false; or terminate TLS in the proxy and use submission")


def _array(doc: dict[str, Any], key: str, file: str) -> list[Any]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(file, key, "must be an array of tables", f"[[{key}]] sections")
    return value


def _tables(raw: Any, file: str, base: str) -> dict[str, Table]:
    if not isinstance(raw, dict):
        raise ConfigError(file, "tables", "must be a table", "name = [entries] or {file = PATH}")
    tables = {}
    for name, value in raw.items():
        key = f"tables.{name}"
        if name in RESERVED_NAMES:
            raise ConfigError(file, key, "is a reserved word", "another table name")
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            tables[name] = Table(name, tuple(e.strip() for e in value if e.strip()))
        elif isinstance(value, dict) and "file" in value and set(value) <= {"file", "format"} \
                and isinstance(value["file"], str):
            tables[name] = _file_table(name, value, os.path.join(base, value["file"]), file)
        elif isinstance(value, dict) and "sqlite" in value:
            tables[name] = _sqlite_table(name, value, base, file)
        else:
            raise ConfigError(file, key, "must be a list of strings or {file = PATH}",
                              '["example.org", ...] or { file = "/etc/tayori/domains" } '
                              '(with format = "aliases" for an aliases(5) file)')
    return tables


def _sqlite_table(name: str, value: dict[str, Any], base: str, file: str) -> Table:
    """``{ sqlite = PATH, query = "SELECT ... WHERE key = ?", format = ... }``: the query
    is tried once now, so that a wrong one stops the start, not the mail."""
    key = f"tables.{name}"
    form, query, path = value.get("format", "list"), value.get("query"), value["sqlite"]
    allowed = '{ sqlite = PATH, query = "SELECT ... WHERE key = ?", format = "list" | "aliases" }'
    if set(value) - {"sqlite", "query", "format"} or not isinstance(path, str) or \
            not isinstance(query, str) or form not in ("list", "aliases"):
        raise ConfigError(file, key, "is not a valid SQLite table", allowed)
    path = os.path.join(base, path)
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            db.execute(query, ("",)).fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise ConfigError(file, f"{key}.query", f"{path}: {exc}",
                          "a SELECT with one ? (the key) on a readable database") from None
    return Table(name, (), path, form, query)


def _file_table(name: str, value: dict[str, Any], path: str, file: str) -> Table:
    key = f"tables.{name}"
    form = value.get("format", "list")
    if form == "list":
        entries = _read_table_file(path, file, key)
        return Table(name, tuple(e.strip() for e in entries if e.strip()), path)
    if form != "aliases":
        raise ConfigError(file, f"{key}.format", f"unknown format {form!r}", "list | aliases")
    try:
        with open(path, encoding="utf-8") as handle:
            aliases = parse_aliases(handle.read())
    except OSError as exc:
        raise ConfigError(file, key, f"cannot read {path}: {exc.strerror}",
                          "a readable aliases(5) file") from None
    except (UnicodeDecodeError, AliasError) as exc:
        raise ConfigError(file, key, f"{path}: {exc}", "aliases(5): name: target, ...") \
            from None
    return Table(name, tuple(aliases), path, "aliases")


def _read_table_file(path: str, file: str, key: str) -> tuple[str, ...]:
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise ConfigError(file, key, f"cannot read {path}: {exc.strerror}",
                          "a readable file, one entry per line") from None
    return tuple(line.split("#", 1)[0] for line in lines)


def _actions(raw: Any, file: str, tables: dict[str, Table]) -> dict[str, ActionConfig]:
    if not isinstance(raw, dict):
        raise ConfigError(file, "actions", "must be a table", "[actions.NAME] sections")
    actions = {}
    for name, table in raw.items():
        action = build(ActionConfig, table, file, f"actions.{name}")
        needs = _ACTION_KEYS[action.deliver]
        for key in ("path", "host", "command", *sorted(_OPTIONAL_KEYS)):
            if key in table and key not in needs:
                raise ConfigError(file, f"actions.{name}.{key}",
                                  f"does not apply to deliver = {action.deliver!r}",
                                  ", ".join(sorted(needs)) or "no further keys")
            if key in needs and key not in _OPTIONAL_KEYS and not getattr(action, key):
                raise ConfigError(file, f"actions.{name}.{key}",
                                  f"is required for deliver = {action.deliver!r}", key)
        if action.deliver in ("relay", "lmtp"):
            try:
                parse_next_hop(action.host, 25 if action.deliver == "relay" else 24)
            except BadValue as exc:
                raise ConfigError(file, f"actions.{name}.host", str(exc),
                                  '"[host]:port", "host:port", "IP:port" or, for lmtp, a '
                                  "unix socket path") from None
        for key, form in (("users", "list"), ("aliases", "aliases")):
            named = getattr(action, key)
            if named and (named not in tables or tables[named].format != form):
                raise ConfigError(file, f"actions.{name}.{key}",
                                  f"no {form} table named {named!r}",
                                  f"a table under [tables] with format {form!r}")
        actions[name] = action
    return actions


RESERVED_NAMES = frozenset({"any", "authenticated"})


def _match(raw: Any, index: int, file: str, tables: dict[str, Table],
           actions: dict[str, ActionConfig]) -> MatchConfig:
    prefix = f"match[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(file, prefix, "must be a table", "[[match]] with to and action")
    raw = dict(raw)
    if "from" in raw:
        raw["sender"] = raw.pop("from")
    rule = build(MatchConfig, raw, file, prefix)
    if rule.action not in actions:
        raise ConfigError(file, f"{prefix}.action", f"no action named {rule.action!r}",
                          ", ".join(sorted(actions)) or "define [actions.NAME] first")
    if rule.sender not in RESERVED_NAMES:
        table = tables.get(rule.sender)
        if table is None:
            raise ConfigError(file, f"{prefix}.from", f"no table named {rule.sender!r}",
                              '"any", "authenticated" or a table of networks')
        for entry in table.entries:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ConfigError(file, f"tables.{table.name}", f"{entry!r} is not a network",
                                  'CIDR networks such as "192.0.2.0/24" or "::1/128"') from None
    if rule.to != "any":
        entries = tables[rule.to].entries if rule.to in tables else (rule.to,)
        for entry in entries:
            try:
                if entry.startswith("["):
                    check_address_literal(entry)
                else:
                    to_ascii_domain(entry.removeprefix("*."))
            except AddressError:
                where = f"tables.{rule.to}" if rule.to in tables else f"{prefix}.to"
                raise ConfigError(file, where, f"{entry!r} is not a domain",
                                  'domains such as "example.org" or "*.example.org"') from None
    if rule.sender == "any" and rule.to == "any":
        raise ConfigError(file, prefix, 'from = "any" with to = "any" makes an open relay',
                          'limit "from" to a table of trusted networks or "authenticated", '
                          'or "to" to your domains')
    return rule
