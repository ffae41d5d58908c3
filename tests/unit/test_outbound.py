"""auth.outbound: which transactions get DKIM signatures and ARC sets, and what a failure
does (the message goes on without them; logged). Signatures verify with tayori's own
verifier here; tests/integration/test_dkim_signing.py checks them with dkimpy and Perl."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tayori.auth import outbound
from tayori.auth.dkim import DEFAULT_HEADERS, DkimResult, verify
from tayori.auth.dkim_keys import keygen, write_private_key
from tayori.auth.outbound import OutboundAuth, sign_options
from tayori.config import Config
from tayori.config.model import DkimConfig, from_document
from tayori.queue.store import Claim, QueuedMessage
from tayori.testing.dnsstub import StaticResolver

T = TypeVar("T")
NOW = 1_700_000_000.0
MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hi\r\n"
           b"\r\nHello.\r\n")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, 10))


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    directory = tmp_path_factory.mktemp("keys")
    records = {}
    for name, algorithm in (("rsa", "rsa"), ("ed", "ed25519")):
        pem, value = keygen(algorithm)  # type: ignore[arg-type]
        write_private_key(directory / f"{name}.pem", pem)
        records[f"{name}._domainkey.example.org"] = value
    return directory, records


def config(key_dir: tuple[Path, dict[str, str]], **sections: Any) -> Config:
    directory, _ = key_dir
    keys = [{"domain": "example.org", "selector": name, "key_file": str(directory / f"{name}.pem")}
            for name in ("rsa", "ed")]
    return from_document({
        "hostname": "mx.example", "listen": [{"address": "127.0.0.1:2525"}],
        "tables": {"trusted": ["192.0.2.0/24"]},
        "actions": {"out": {"deliver": "mx"}},
        "match": [{"from": "trusted", "to": "any", "action": "out"}],
        "dkim_key": sections.pop("dkim_key", keys), **sections}, "t.toml", "/")


def message(protocol: str = "ESMTP", client: str = "198.51.100.1") -> QueuedMessage:
    return QueuedMessage("Q1", "alice@example.org", 10, "7BIT", False, None, None, NOW,
                         client, "helo", protocol)


def claim(depth: int = 0) -> Claim:
    return Claim(message(), 0, "bob@example.net", None, None, "out", 0, False, False, None,
                 None, None, depth)


def auth(cfg: Config) -> OutboundAuth:
    return OutboundAuth(cfg, StaticResolver({}), clock=lambda: NOW)


@pytest.mark.parametrize(("protocol", "client", "sign_for", "signed"), [
    ("ESMTPSA", "198.51.100.1", ["authenticated", "trusted"], True),
    ("ESMTPA", "198.51.100.1", ["authenticated"], True),
    ("ESMTPS", "192.0.2.7", ["authenticated", "trusted"], True),
    ("ESMTPS", "192.0.2.7", ["authenticated"], False),
    ("ESMTPSA", "198.51.100.1", ["trusted"], False),
    ("ESMTPS", "198.51.100.1", ["authenticated", "trusted"], False),
])
def test_who_is_signed(key_dir: tuple[Path, dict[str, str]], protocol: str, client: str,
                       sign_for: list[str], signed: bool) -> None:
    cfg = config(key_dir, dkim={"sign_for": sign_for})
    assert auth(cfg).signs(message(protocol, client)) is signed
    assert (auth(cfg).prefix(message(protocol, client), [claim()]) is not None) is signed


def test_dual_signature_over_what_is_sent_verifies(key_dir: tuple[Path, dict[str, str]]
                                                   ) -> None:
    prefix = auth(config(key_dir)).prefix(message("ESMTPA"), [claim()])
    assert prefix is not None
    fields = run(prefix(MESSAGE))
    results = run(verify(fields + MESSAGE, StaticResolver(
        {name: {"TXT": [value]} for name, value in key_dir[1].items()}), now=NOW))
    assert [(r.result, r.algorithm) for r in results] == [
        (DkimResult.PASS, "rsa-sha256"), (DkimResult.PASS, "ed25519-sha256")]


def test_no_key_for_the_from_domain_no_signature(key_dir: tuple[Path, dict[str, str]]) -> None:
    prefix = auth(config(key_dir)).prefix(message("ESMTPA"), [claim()])
    assert prefix is not None
    assert run(prefix(MESSAGE.replace(b"example.org", b"example.com"))) == b""
    assert run(prefix(b"Subject: no From\r\n\r\nbody\r\n")) == b""


def test_a_failing_signer_sends_unsigned_and_logs(key_dir: tuple[Path, dict[str, str]],
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    async def broken(*args: object, **kwargs: object) -> bytes:
        raise RuntimeError("the signer broke")

    monkeypatch.setattr(outbound, "sign_async", broken)
    prefix = auth(config(key_dir)).prefix(message("ESMTPA"), [claim()])
    assert prefix is not None
    assert run(prefix(MESSAGE)) == b""
    [record] = [r for r in caplog.records if r.getMessage() == "dkim-sign-failed"]
    assert record.fields["queue_id"] == "Q1"  # type: ignore[attr-defined]


def test_an_unusable_key_file_is_logged_and_skipped(key_dir: tuple[Path, dict[str, str]],
                                                    tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "junk.pem").write_bytes(b"not a key")
    directory, _ = key_dir
    cfg = config(key_dir, dkim_key=[
        {"domain": "example.org", "selector": "bad", "key_file": str(tmp_path / "junk.pem")},
        {"domain": "example.org", "selector": "gone", "key_file": str(tmp_path / "missing")},
        {"domain": "example.org", "selector": "ed", "key_file": str(directory / "ed.pem")}])
    keys = auth(cfg).keys
    assert [key.selector for key in keys.signing["example.org"]] == ["ed"]
    files = [r.fields["file"] for r in caplog.records  # type: ignore[attr-defined]
             if r.getMessage() == "dkim-key-unusable"]
    assert files == [str(tmp_path / "junk.pem"), str(tmp_path / "missing")]


def test_only_forwarded_recipients_are_sealed(key_dir: tuple[Path, dict[str, str]]) -> None:
    cfg = config(key_dir, arc={"seal": True, "seal_domain": "example.org",
                               "seal_selector": "rsa"})
    sealing = auth(cfg)
    assert sealing.prefix(message(), [claim(0)]) is None         # not signed, not forwarded
    prefix = sealing.prefix(message(), [claim(0), claim(1)])
    assert prefix is not None
    fields = run(prefix(MESSAGE))
    assert fields.startswith(b"ARC-Seal: ") and b"cv=none" in fields
    assert b"DKIM-Signature" not in fields


def test_sealing_with_an_ed25519_key_is_disabled(key_dir: tuple[Path, dict[str, str]],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(key_dir, arc={"seal": True, "seal_domain": "example.org",
                               "seal_selector": "ed"})
    assert auth(cfg).keys.seal is None
    assert any(r.getMessage() == "arc-seal-disabled" for r in caplog.records)


def test_sign_options_from_the_config() -> None:
    default = sign_options(DkimConfig())
    assert default.headers == DEFAULT_HEADERS and default.expire_after is None
    assert default.oversign == ("from", "to", "subject", "date")
    custom = sign_options(DkimConfig(headers=("Subject",), oversign=(), expire=7200.0))
    assert custom.headers == ("subject", "from") and custom.expire_after == 7200

