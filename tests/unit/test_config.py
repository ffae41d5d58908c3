"""Unit tests for tayori.config: the embedded default, validation messages, paths, tables."""

from __future__ import annotations

import sqlite3
import textwrap
from pathlib import Path

import pytest

from tayori.auth.dkim_keys import keygen
from tayori.config import ConfigError, default_text, load
from tayori.config.schema import DURATION, SIZE, BadValue

LISTEN = '[[listen]]\naddress = "127.0.0.1:2525"\n'
LOCAL = '[actions.local]\ndeliver = "maildir"\npath = "/var/mail/{user}"\n'
RULE = '[[match]]\nto = "example.org"\naction = "local"\n'


def write(directory: Path, text: str, name: str = "tayori.toml") -> str:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def refused(directory: Path, text: str) -> ConfigError:
    path = write(directory, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    error = info.value
    assert error.file == path
    assert str(error).startswith(f"{path}: ")
    return error


# --- the embedded default ----------------------------------------------------------------


def test_embedded_default_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load(None)
    assert config.file == "(embedded default)"
    assert [(listener.address, listener.mode) for listener in config.listen] == [
        (("127.0.0.1", 2525), "smtp"), (("127.0.0.1", 2587), "submission")]
    assert config.spool == str(tmp_path / "var" / "spool")
    assert config.auth.users == str(tmp_path / "var" / "users")
    assert config.hostname
    assert set(config.actions) == {"local", "remote"}
    assert config.actions["local"].path == str(tmp_path / "var/mail/{domain}/{user}")
    assert [(rule.sender, rule.to, rule.action) for rule in config.match] == [
        ("any", "local_domains", "local"), ("trusted_networks", "any", "remote"),
        ("authenticated", "any", "remote")]
    assert config.tables["trusted_networks"].entries == ("127.0.0.0/8", "::1/128")
    assert config.limits.max_message_size == 50 * 1024 * 1024
    assert config.limits.command_timeout == 300.0


def test_default_text_is_the_file_that_loads(tmp_path: Path) -> None:
    path = write(tmp_path, default_text())
    config = load(path)
    assert config.spool == str(tmp_path / "var" / "spool")


def test_minimal_config(tmp_path: Path) -> None:
    config = load(write(tmp_path, 'hostname = "mx.example"\n' + LISTEN))
    assert config.hostname == "mx.example"
    assert config.match == () and config.actions == {}
    assert config.listen[0].starttls is True
    assert config.smtp.dsn is True


# --- values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size"),
    [("100", 100), ("10K", 10 * 1024), ("10 KB", 10 * 1024), ("50M", 50 * 1024**2),
     ("2g", 2 * 1024**3), ("7B", 7), (12345, 12345)],
)
def test_sizes(value: object, size: int) -> None:
    assert SIZE.convert(value) == size


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0),
     ("1.5s", 1.5), (10, 10.0), (2.5, 2.5)],
)
def test_durations(value: object, seconds: float) -> None:
    assert DURATION.convert(value) == seconds


@pytest.mark.parametrize("value", ["5", "5 minutes", "-1s", "1y", True, -3, [1]])
def test_bad_durations(value: object) -> None:
    """A duration is a number of seconds >= 0 or a string with a unit."""
    with pytest.raises(BadValue):
        DURATION.convert(value)


def test_listener_addresses(tmp_path: Path) -> None:
    config = load(write(tmp_path, '[[listen]]\naddress = "[::1]:25"\n'
                                  '[[listen]]\naddress = "localhost:2525"\n'))
    assert [listener.address for listener in config.listen] == [("::1", 25), ("localhost", 2525)]


def test_relative_paths_resolved_against_the_config_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(conf, 'spool = "queue"\n[log]\nfile = "../log/tayori.log"\n'
                       '[[listen]]\naddress = "127.0.0.1:25"\ntls_cert = "cert.pem"\n'
                       'tls_key = "/abs/key.pem"\n' + LOCAL)
    config = load(path)
    assert config.spool == str(conf / "queue")
    assert config.log.file == str(tmp_path / "log" / "tayori.log")
    assert config.listen[0].tls_cert == str(conf / "cert.pem")
    assert config.listen[0].tls_key == "/abs/key.pem"
    assert config.actions["local"].path == "/var/mail/{user}"


def test_relative_path_with_relative_config_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "etc").mkdir()
    write(tmp_path / "etc", 'spool = "spool"\n' + LISTEN)
    monkeypatch.chdir(tmp_path)
    assert load("etc/tayori.toml").spool == str(tmp_path / "etc" / "spool")


def test_table_from_file(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "domains").write_text(
        "# our domains\nexample.org\n\n  example.net  # the other one\n*.example.com\n",
        encoding="utf-8")
    (tmp_path / "lists" / "nets").write_text("192.0.2.0/24\n2001:db8::/32\n", encoding="utf-8")
    config = load(write(tmp_path, LISTEN + LOCAL + """
        [tables]
        domains = { file = "lists/domains" }
        nets = { file = "lists/nets" }
        [actions.out]
        deliver = "mx"
        [[match]]
        to = "domains"
        action = "local"
        [[match]]
        from = "nets"
        to = "any"
        action = "out"
        """))
    assert config.tables["domains"].entries == ("example.org", "example.net", "*.example.com")
    assert config.tables["nets"].entries == ("192.0.2.0/24", "2001:db8::/32")


# --- errors ------------------------------------------------------------------------------


def test_unknown_key(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + "[limits]\nmax_mesage_size = 10\n")
    assert error.key == "limits.max_mesage_size"
    assert error.wrong == "unknown key"
    assert "max_message_size" in error.allowed
    assert "limits.max_mesage_size: unknown key; allowed: " in str(error)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    error = refused(tmp_path, 'spoool = "x"\n' + LISTEN)
    assert error.key == "spoool" and error.wrong == "unknown key"
    assert "spool" in error.allowed.split(", ")


def test_unknown_listener_key(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + "starttsl = true\n")
    assert error.key == "listen[0].starttsl"
    assert "starttls" in error.allowed


def test_bad_size(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + '[limits]\nmax_message_size = "50X"\n')
    assert error.key == "limits.max_message_size"
    assert "'50X' is not a size" in error.wrong
    assert "K, M or G" in error.allowed
    assert str(error).endswith("; allowed: " + error.allowed)


def test_bad_duration(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + '[limits]\ncommand_timeout = "5 minutes"\n')
    assert error.key == "limits.command_timeout"
    assert "is not a duration" in error.wrong
    assert "ms, s, m, h or d" in error.allowed


def test_nan_duration_is_refused(tmp_path: Path) -> None:
    """TOML allows ``nan``; a timeout of NaN seconds is not a duration."""
    error = refused(tmp_path, LISTEN + "[limits]\ndata_timeout = nan\n")
    assert error.key == "limits.data_timeout"


def test_negative_integer(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + "[limits]\nmax_recipients = -1\n")
    assert error.key == "limits.max_recipients" and "negative" in error.wrong


def test_boolean_is_not_an_integer(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + "[limits]\nmax_recipients = true\n")
    assert error.key == "limits.max_recipients" and "is not an integer" in error.wrong


def test_bad_enum(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + '[log]\nlevel = "loud"\n')
    assert error.key == "log.level"
    assert "'loud' is not one of the choices" in error.wrong
    assert error.allowed == "debug | info | warning | error"


def test_bad_type(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + "[smtp]\ndsn = \"yes\"\n")
    assert error.key == "smtp.dsn" and error.allowed == "true or false"


def test_section_must_be_a_table(tmp_path: Path) -> None:
    error = refused(tmp_path, "limits = 5\n" + LISTEN)
    assert error.key == "limits" and "must be a table" in error.wrong


def test_missing_listener(tmp_path: Path) -> None:
    error = refused(tmp_path, 'hostname = "mx.example"\n')
    assert error.key == "listen"
    assert error.wrong == "no listener is configured"
    assert "[[listen]]" in error.allowed


def test_listener_without_address(tmp_path: Path) -> None:
    error = refused(tmp_path, "[[listen]]\nstarttls = false\n")
    assert error.key == "listen[0].address" and error.wrong == "is required"


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536",
                                     "mx.example:25", ":25", "127.0.0.1:x"])
def test_bad_listener_address(tmp_path: Path, address: str) -> None:
    error = refused(tmp_path, f'[[listen]]\naddress = "{address}"\n')
    assert error.key == "listen[0].address"
    assert "IP:port" in error.allowed


def test_match_naming_a_missing_action(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + LOCAL + '[[match]]\nto = "example.org"\naction = "locl"\n')
    assert error.key == "match[0].action"
    assert error.wrong == "no action named 'locl'"
    assert error.allowed == "local"


def test_match_naming_a_missing_table(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + LOCAL
                    + '[[match]]\nfrom = "trusted"\nto = "example.org"\naction = "local"\n')
    assert error.key == "match[0].from"
    assert error.wrong == "no table named 'trusted'"
    assert "table of networks" in error.allowed


def test_network_table_with_a_non_cidr_entry(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + LOCAL + """
        [tables]
        trusted = ["127.0.0.0/8", "localhost"]
        [[match]]
        from = "trusted"
        to = "example.org"
        action = "local"
        """)
    assert error.key == "tables.trusted"
    assert error.wrong == "'localhost' is not a network"
    assert "CIDR" in error.allowed


def test_domain_table_with_a_bad_domain(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + LOCAL + """
        [tables]
        domains = ["example.org", "bad_domain!"]
        [[match]]
        to = "domains"
        action = "local"
        """)
    assert error.key == "tables.domains"
    assert "'bad_domain!' is not a domain" in error.wrong


def test_open_relay_is_refused(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + '[actions.out]\ndeliver = "mx"\n'
                              '[[match]]\nfrom = "any"\nto = "any"\naction = "out"\n')
    assert error.key == "match[0]"
    assert "open relay" in error.wrong
    assert "authenticated" in error.allowed


def test_open_relay_by_default_from(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + '[actions.out]\ndeliver = "mx"\n'
                              '[[match]]\nto = "any"\naction = "out"\n')
    assert "open relay" in error.wrong


def test_tls_cert_without_key(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + 'tls_cert = "/etc/ssl/cert.pem"\n')
    assert error.key == "listen[0].tls_key"
    assert "go together" in error.wrong
    assert "both set" in error.allowed


def test_action_needs_its_keys(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + '[actions.local]\ndeliver = "maildir"\n')
    assert error.key == "actions.local.path"
    error = refused(tmp_path, LISTEN + '[actions.out]\ndeliver = "mx"\npath = "/x"\n')
    assert error.key == "actions.out.path" and "does not apply" in error.wrong


def test_reserved_table_name(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + '[tables]\nany = ["example.org"]\n')
    assert error.key == "tables.any" and "reserved" in error.wrong


def test_unreadable_table_file(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + '[tables]\nd = { file = "missing.txt" }\n')
    assert error.key == "tables.d"
    assert "cannot read" in error.wrong and "missing.txt" in error.wrong


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + "hostname = \n")
    assert error.key == ""
    assert "TOML syntax error" in error.wrong and "line 3" in error.wrong


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "tayori.toml"
    path.write_bytes(b'hostname = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(str(path))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load(str(tmp_path / "nope.toml"))


def test_local_tables_are_checked_at_start(tmp_path: Path) -> None:
    """A broken aliases file, a wrong SQLite query, a users table of the wrong format:
    refused at start, naming the table."""
    (tmp_path / "aliases").write_text("no colon here\n")
    error = refused(tmp_path, LISTEN + LOCAL + RULE + '[tables]\n'
                    'aliases = { file = "aliases", format = "aliases" }\n')
    assert error.key == "tables.aliases" and "line 1" in str(error)
    sqlite3.connect(tmp_path / "db.sqlite3").close()
    error = refused(tmp_path, LISTEN + LOCAL + RULE + '[tables]\n'
                    'users = { sqlite = "db.sqlite3", query = "SELECT 1 FROM missing '
                    'WHERE a = ?" }\n')
    assert error.key == "tables.users.query" and "no such table" in str(error)
    (tmp_path / "list").write_text("u\n")
    error = refused(tmp_path, LISTEN + RULE + '[tables]\nlist = { file = "list" }\n'
                    '[actions.local]\ndeliver = "maildir"\npath = "/m/{user}"\n'
                    'aliases = "list"\n')
    assert error.key == "actions.local.aliases"


def test_dkim_keys_are_read_when_the_config_is(tmp_path: Path) -> None:
    entry = '[[dkim_key]]\ndomain = "example.org"\nselector = "s1"\nkey_file = "s1.pem"\n'
    error = refused(tmp_path, LISTEN + entry)
    assert error.key == "dkim_key[0].key_file" and "cannot read" in str(error)
    (tmp_path / "s1.pem").write_text("not a key")
    assert refused(tmp_path, LISTEN + entry).key == "dkim_key[0].key_file"
    pem, _ = keygen("ed25519")
    (tmp_path / "s1.pem").write_bytes(pem)
    config = load(write(tmp_path, LISTEN + entry))
    assert config.dkim_keys[0].key_file == str(tmp_path / "s1.pem")


def test_arc_sealing_names_a_dkim_key(tmp_path: Path) -> None:
    error = refused(tmp_path, LISTEN + '[arc]\nseal = true\nseal_domain = "example.org"\n'
                                       'seal_selector = "arc"\n')
    assert error.key == "arc.seal_domain"
