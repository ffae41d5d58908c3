"""Loading tayori's configuration: one TOML file, or the embedded default.

Takes: a path to ``tayori.toml``, or None for the embedded default (``default.toml``
beside this module: 127.0.0.1:2525, spool under ./var, relay for localhost only).
Promises: a fully validated, frozen :class:`Config`; relative paths (spool, TLS files,
table files) resolved against the config file's directory (the working directory for
the embedded default), so a running daemon never depends on its cwd.
Failure policy: :class:`ConfigError` with file, key, problem and what is allowed; a
TOML syntax error names the line and column.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from importlib import resources
from typing import Any

from tayori.config.model import (
    ActionConfig,
    CertificateConfig,
    Config,
    LimitsConfig,
    ListenConfig,
    LogConfig,
    MatchConfig,
    SmtpConfig,
    Table,
    from_document,
)
from tayori.config.schema import ConfigError

__all__ = ["ActionConfig", "CertificateConfig", "Config", "ConfigError", "LimitsConfig",
           "ListenConfig", "LogConfig", "MatchConfig", "SmtpConfig", "Table", "default_text",
           "load"]

EMBEDDED = "(embedded default)"


def default_text() -> str:
    return resources.files("tayori.config").joinpath("default.toml").read_text("utf-8")


def load(path: str | None) -> Config:
    """Read and validate ``path`` (None: the embedded default)."""
    if path is None:
        return _resolved(_parse(default_text(), EMBEDDED, os.getcwd()), os.getcwd())
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read the file: {exc.strerror}",
                          "a readable TOML file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(path, "", "the file is not UTF-8", "UTF-8 text") from None
    base = os.path.dirname(os.path.abspath(path))
    return _checked_keys(_resolved(_parse(text, path, base), base))


def _checked_keys(config: Config) -> Config:
    """Every ``[[dkim_key]]`` is a key tayori can sign with (read now, at start and on
    ``check-config``, rather than found unusable at the first delivery)."""
    from tayori.auth.dkim_keys import load_signing_key

    for index, entry in enumerate(config.dkim_keys):
        key = f"dkim_key[{index}].key_file"
        try:
            load_signing_key(entry.key_file, entry.domain, entry.selector)
        except OSError as exc:
            raise ConfigError(config.file, key, f"cannot read {entry.key_file}: "
                              f"{exc.strerror}", "a PEM private key readable by tayori's "
                              "user (tayori dkim keygen makes one)") from None
        except ValueError as exc:
            raise ConfigError(config.file, key, str(exc), "an unencrypted RSA (1024 to "
                              "8192 bits) or Ed25519 private key") from None
    return config


def _parse(text: str, file: str, base: str) -> Config:
    try:
        document: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"TOML syntax error: {exc}", "TOML (https://toml.io)") \
            from None
    return from_document(document, file, base)


def _resolved(config: Config, base: str) -> Config:
    def absolute(path: str) -> str:
        return os.path.normpath(os.path.join(base, path)) if path else path

    listeners = tuple(dataclasses.replace(item, tls_cert=absolute(item.tls_cert),
                                          tls_key=absolute(item.tls_key),
                                          tls_client_ca=absolute(item.tls_client_ca))
                      for item in config.listen)
    certificates = tuple(dataclasses.replace(item, cert=absolute(item.cert),
                                             key=absolute(item.key))
                         for item in config.certificates)
    actions = {name: dataclasses.replace(action, path=absolute(action.path))
               for name, action in config.actions.items()}
    log = dataclasses.replace(config.log, file=absolute(config.log.file))
    dkim_keys = tuple(dataclasses.replace(item, key_file=absolute(item.key_file))
                      for item in config.dkim_keys)
    greylist = dataclasses.replace(config.greylist, path=absolute(config.greylist.path) or
                                   os.path.join(absolute(config.spool), "greylist.sqlite3"))
    auth = dataclasses.replace(config.auth, users=absolute(config.auth.users),
                               sqlite=absolute(config.auth.sqlite),
                               senders=absolute(config.auth.senders),
                               ldap_ca_file=absolute(config.auth.ldap_ca_file))
    return dataclasses.replace(config, spool=absolute(config.spool), listen=listeners,
                               certificates=certificates, actions=actions, log=log,
                               auth=auth, greylist=greylist, dkim_keys=dkim_keys)
