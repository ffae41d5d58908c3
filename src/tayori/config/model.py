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
from dataclasses import dataclass, field
from typing import Any

from tayori.address import AddressError, check_address_literal, to_ascii_domain
from tayori.config.schema import (
    BOOL,
    DURATION,
    INT,
    PATH,
    SIZE,
    STRING,
    BadValue,
    ConfigError,
    build,
    checked,
    convert,
    enum,
    required,
    setting,
)


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


ENDPOINT = checked(STRING, "address", '"IP:port" or "[IPv6]:port", e.g. "0.0.0.0:25", "[::]:25"',
                   _parse_endpoint)
LISTEN_MODES = ("smtp",)


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
                        "Protocol spoken on this listener. (`submission`, `smtps` and `lmtp` "
                        "arrive with their issues.)")
    starttls: bool = setting(True, BOOL, "Offer STARTTLS (RFC 3207).")
    tls_cert: str = setting("", PATH, "PEM certificate chain for STARTTLS. Empty: a "
                            "self-signed certificate is generated under `<spool>/tls/`.")
    tls_key: str = setting("", PATH, "PEM private key matching `tls_cert`.")
    proxy_protocol: bool = setting(False, BOOL, "Expect a PROXY protocol v1 or v2 header "
                                   "before SMTP; the client address is taken from it.")


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


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    vrfy: bool = setting(False, BOOL, "Answer VRFY truthfully. Off: VRFY gets 252 (RFC 5321 "
                         "§3.5.3) and tells nothing.")
    smtputf8: bool = setting(True, BOOL, "Offer SMTPUTF8 (RFC 6531).")
    chunking: bool = setting(True, BOOL, "Offer CHUNKING and BINARYMIME (RFC 3030).")
    dsn: bool = setting(True, BOOL, "Offer DSN (RFC 3461).")


DELIVERY_KINDS = ("maildir", "lmtp", "mx", "relay", "pipe")
_ACTION_KEYS = {"maildir": {"path"}, "lmtp": {"host"}, "relay": {"host"}, "pipe": {"command"},
                "mx": set()}


@dataclass(frozen=True, slots=True)
class ActionConfig:
    deliver: str = required(enum(*DELIVERY_KINDS), "How recipients routed here are delivered.")
    path: str = setting("", PATH, "`maildir`: mailbox path; `{user}` and `{domain}` are "
                        "replaced by the recipient's local part and domain.")
    host: str = setting("", STRING, '`relay`, `lmtp`: next hop, "[host]:port" (or a unix '
                        "socket path for lmtp).")
    command: str = setting("", STRING, "`pipe`: the command that receives the message.")


@dataclass(frozen=True, slots=True)
class MatchConfig:
    to: str = required(STRING, '"any", a table of domains, or one domain.')
    action: str = required(STRING, "The name of an `[actions.NAME]` section.")
    sender: str = setting("any", STRING, '"any", "authenticated" or a table of networks: '
                          "which clients the rule applies to. Written `from` in the file.",
                          shown_default='"any"')


@dataclass(frozen=True, slots=True)
class Table:
    """A named list of domains or networks (inline, or one entry per line of a file)."""

    name: str
    entries: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Config:
    file: str
    hostname: str = setting("", STRING, "Name in the greeting, EHLO reply and Received headers.",
                            shown_default="the system's fully qualified host name")
    spool: str = setting("./var/spool", PATH, "Queue directory: message files, index, corrupt/. "
                         "Relative paths are relative to the config file.")
    user: str = setting("", STRING, "After binding the listeners, drop privileges to this "
                        "user (when started as root). Empty: keep running as is.")
    workers: int = setting(0, INT, "Worker processes sharing the listeners, each with its own "
                           "event loop; 0 means one per CPU core.",
                           shown_default="0 (one per core)")
    log: LogConfig = field(default_factory=LogConfig)
    listen: tuple[ListenConfig, ...] = ()
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    tables: dict[str, Table] = field(default_factory=dict)
    actions: dict[str, ActionConfig] = field(default_factory=dict)
    match: tuple[MatchConfig, ...] = ()


TOP_LEVEL = ("hostname", "spool", "user", "workers")
SECTIONS = {"log": LogConfig, "limits": LimitsConfig, "smtp": SmtpConfig}


def from_document(doc: dict[str, Any], file: str, base: str) -> Config:
    """Validate a parsed TOML document into a Config; ``base`` anchors relative table files."""
    allowed = set(TOP_LEVEL) | set(SECTIONS) | {"listen", "tables", "actions", "match"}
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
    actions = _actions(doc.get("actions", {}), file)
    rules = tuple(_match(item, i, file, tables, actions)
                  for i, item in enumerate(_array(doc, "match", file)))
    for i, listener in enumerate(listeners):
        if bool(listener.tls_cert) != bool(listener.tls_key):
            raise ConfigError(file, f"listen[{i}].tls_key", "tls_cert and tls_key go together",
                              "both set, or both empty for a self-signed certificate")
    top["hostname"] = top.get("hostname") or socket.getfqdn()
    return Config(file=file, listen=listeners, tables=tables, actions=actions, match=rules,
                  **top, **sections)


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
            entries = tuple(value)
        elif isinstance(value, dict) and set(value) == {"file"} and isinstance(value["file"], str):
            entries = _read_table_file(os.path.join(base, value["file"]), file, key)
        else:
            raise ConfigError(file, key, "must be a list of strings or {file = PATH}",
                              '["example.org", ...] or { file = "/etc/tayori/domains" }')
        tables[name] = Table(name, tuple(e.strip() for e in entries if e.strip()))
    return tables


def _read_table_file(path: str, file: str, key: str) -> tuple[str, ...]:
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise ConfigError(file, key, f"cannot read {path}: {exc.strerror}",
                          "a readable file, one entry per line") from None
    return tuple(line.split("#", 1)[0] for line in lines)


def _actions(raw: Any, file: str) -> dict[str, ActionConfig]:
    if not isinstance(raw, dict):
        raise ConfigError(file, "actions", "must be a table", "[actions.NAME] sections")
    actions = {}
    for name, table in raw.items():
        action = build(ActionConfig, table, file, f"actions.{name}")
        needs = _ACTION_KEYS[action.deliver]
        for key in ("path", "host", "command"):
            if key in table and key not in needs:
                raise ConfigError(file, f"actions.{name}.{key}",
                                  f"does not apply to deliver = {action.deliver!r}",
                                  ", ".join(sorted(needs)) or "no further keys")
            if key in needs and not getattr(action, key):
                raise ConfigError(file, f"actions.{name}.{key}",
                                  f"is required for deliver = {action.deliver!r}", key)
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
