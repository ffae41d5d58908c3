"""DKIM interoperability: tayori's signatures checked by other verifiers, theirs by tayori.

dkimpy (in-process, its ``dnsfunc`` hook) verifies RSA-2048 and Ed25519 signatures that
tayori made, in every canonicalization, over made-up messages and over the MIME corpus in
../shared/testdata/mime; tayori verifies what dkimpy signs (including ``l=`` and rsa-sha1).
Perl's Mail::DKIM (Debian libmail-dkim-perl) verifies tayori's signatures with the keys
served by a DNS stub on loopback, handed to it through ``Mail::DKIM::DNS::resolver``.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import shutil
import subprocess
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from harness import SHARED, shared_data
from tayori.auth.canon import Mode
from tayori.auth.dkim import DkimResult, DkimSignatureResult, SignOptions, sign, verify
from tayori.auth.dkim_keys import SigningKey, keygen
from tayori.auth.headers import parse_message
from tayori.testing.dnsstub import DnsStub, StaticResolver

T = TypeVar("T")
NOW = 1_700_000_000
DOMAIN = "example.org"
MESSAGE = (
    b"Received: from client.example.org by mx.example.org; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: =?utf-8?q?J=C3=B6rg?= <jorg@example.org>\r\n"
    b"To: Bob <bob@example.net>, Carol\r\n"
    b"\t<carol@example.net>\r\n"
    b"Cc: dave@example.net\r\n"
    b"Subject: Interop  test\t \r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <interop@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Trailing space here   \r\n"
    b"\ttab-led line\r\n"
    b"\r\n"
    b"caf\xc3\xa9\r\n"
    b"\r\n\r\n"
)
CANONICALIZATIONS: list[tuple[Mode, Mode]] = [
    ("simple", "simple"), ("simple", "relaxed"), ("relaxed", "simple"), ("relaxed", "relaxed")]
HAS_NACL = importlib.util.find_spec("nacl") is not None
needs_nacl = pytest.mark.skipif(
    not HAS_NACL, reason="dkimpy needs PyNaCl for Ed25519, and it is not installed")
MIME = SHARED / "mime"
CORPUS = sorted([*MIME.glob("*.eml"), *MIME.glob("cpython-email/*.txt")]) if MIME.exists() else []


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, 20.0))


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class Keys:
    """An RSA-2048 and an Ed25519 key for example.org, their records, and dkimpy's forms."""

    def __init__(self) -> None:
        rsa_pem, rsa_txt = keygen("rsa", 2048)
        ed_pem, ed_txt = keygen("ed25519")
        self.rsa = SigningKey(DOMAIN, "rsa2048", _load(rsa_pem))
        self.ed = SigningKey(DOMAIN, "ed", _load(ed_pem))
        self.records = {"rsa2048._domainkey.example.org": rsa_txt,
                        "ed._domainkey.example.org": ed_txt}
        self.rsa_pem = rsa_pem
        seed = self.ed.private_key
        assert isinstance(seed, ed25519.Ed25519PrivateKey)
        self.ed_seed = base64.b64encode(seed.private_bytes_raw())  # dkimpy's Ed25519 form

    @property
    def zone(self) -> dict[str, Any]:
        return {name: {"TXT": [value]} for name, value in self.records.items()}

    def dnsfunc(self, name: bytes, timeout: float = 5) -> bytes | None:
        """dkimpy's DNS hook: the TXT record of ``name`` (``b"sel._domainkey.dom."``)."""
        value = self.records.get(name.decode("ascii").rstrip("."))
        return value.encode("ascii") if value is not None else None


def _load(pem: bytes) -> Any:
    return serialization.load_pem_private_key(pem, None)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def tayori_verify(message: bytes, keys: Keys) -> list[DkimSignatureResult]:
    return run(verify(message, StaticResolver(keys.zone), now=NOW))


def dkimpy_verify(message: bytes, keys: Keys, count: int | None = None) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature of ``message`` (the first ``count``)."""
    if count is None:
        count = sum(1 for line in message.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
                    if line.lower().startswith(b"dkim-signature:"))
    return [dkimpy.DKIM(message).verify(idx=i, dnsfunc=keys.dnsfunc) for i in range(count)]


# --- tayori signs, dkimpy verifies -------------------------------------------------------------


def ed25519_case(algorithm: str) -> Any:
    return pytest.param(algorithm, marks=needs_nacl) if "ed25519" in algorithm else algorithm


ALGORITHMS = [ed25519_case("rsa-sha256"), ed25519_case("ed25519-sha256")]


@pytest.mark.parametrize("canonicalization", CANONICALIZATIONS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_dkimpy_verifies_our_signatures(
    keys: Keys, algorithm: str, canonicalization: tuple[Mode, Mode]
) -> None:
    options = SignOptions(canonicalization=canonicalization, expire_after=86400 * 3650)
    key = keys.ed if algorithm.startswith("ed25519") else keys.rsa
    message = sign(MESSAGE, [key], now=NOW, options=options) + MESSAGE
    assert dkimpy_verify(message, keys) == [True]


@needs_nacl
def test_dkimpy_verifies_our_dual_signatures_and_sees_the_oversigning(keys: Keys) -> None:
    message = sign(MESSAGE, [keys.rsa, keys.ed], now=NOW) + MESSAGE
    assert dkimpy_verify(message, keys) == [True, True]
    tampered = message.replace(b"\r\n\r\n", b"\r\nSubject: Another subject\r\n\r\n", 1)
    assert dkimpy_verify(tampered, keys) == [False, False]


def test_corpus_present() -> None:
    shared_data("mime")
    assert len(CORPUS) >= 40


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_the_mime_corpus_signed_by_us_verifies_with_dkimpy_and_us(
    keys: Keys, path: Path
) -> None:
    message = crlf(path.read_bytes())
    try:
        fields = sign(message, [keys.rsa, keys.ed], now=NOW)
    except ValueError as exc:  # a few corpus messages have no From, which DKIM must sign
        assert "From" in str(exc)
        assert not any(field.key == "from" for field in parse_message(message).fields)
        return
    signed = fields + message
    assert [r.result for r in tayori_verify(signed, keys)[:2]] == [DkimResult.PASS] * 2
    checked = 2 if HAS_NACL else 1  # without PyNaCl, dkimpy checks the RSA signature only
    try:
        assert dkimpy_verify(signed, keys, checked) == [True] * checked
    except dkimpy.MessageFormatError:
        # msg_35: a header line without a colon and no empty line. dkimpy refuses the
        # message; tayori keeps the line as a malformed field that nothing signs.
        assert any(not field.name for field in parse_message(signed).fields)


# --- dkimpy signs, tayori verifies -------------------------------------------------------------


@pytest.mark.parametrize("canonicalization", CANONICALIZATIONS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_we_verify_dkimpys_signatures(
    keys: Keys, algorithm: str, canonicalization: tuple[Mode, Mode]
) -> None:
    header = dkimpy_sign(keys, algorithm, canonicalization)
    (result,) = tayori_verify(header + MESSAGE, keys)
    assert (result.result, result.algorithm) == (DkimResult.PASS, algorithm), result.reason


def dkimpy_sign(keys: Keys, algorithm: str, canonicalization: tuple[Mode, Mode],
                **options: Any) -> bytes:
    ed = algorithm.startswith("ed25519")
    return bytes(dkimpy.sign(
        MESSAGE, b"ed" if ed else b"rsa2048", DOMAIN.encode(),
        keys.ed_seed if ed else keys.rsa_pem,
        canonicalize=tuple(mode.encode() for mode in canonicalization),
        signature_algorithm=b"ed25519-sha256" if ed else algorithm.encode(), **options))


def test_we_honour_dkimpys_body_length(keys: Keys) -> None:
    header = dkimpy_sign(keys, "rsa-sha256", ("relaxed", "relaxed"), length=True)
    assert b"l=" in header
    (result,) = tayori_verify(header + MESSAGE + b"Appended by a mailing list.\r\n", keys)
    assert result.result is DkimResult.PASS, result.reason
    (changed,) = tayori_verify(header + MESSAGE.replace(b"caf", b"CAF"), keys)
    assert changed.result is DkimResult.FAIL


def test_dkimpys_rsa_sha1_verifies_but_is_only_policy(keys: Keys) -> None:
    header = dkimpy_sign(keys, "rsa-sha1", ("relaxed", "simple"))
    (result,) = tayori_verify(header + MESSAGE, keys)
    assert (result.result, result.algorithm) == (DkimResult.POLICY, "rsa-sha1")
    assert "RFC 8301" in result.reason
    (tampered,) = tayori_verify(header + MESSAGE.replace(b"Bob", b"Rob"), keys)
    assert tampered.result is DkimResult.FAIL


# --- Perl Mail::DKIM ---------------------------------------------------------------------------

PERL_VERIFIER = r"""
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Mail::DKIM::DNS;
use Net::DNS::Resolver;

my ($host, $port, $path) = @ARGV;
my $resolver = Net::DNS::Resolver->new(
    nameservers => [$host], port => $port, recurse => 1, retry => 1,
    udp_timeout => 5, tcp_timeout => 5);
Mail::DKIM::DNS::resolver($resolver);
open(my $fh, '<:raw', $path) or die "cannot read $path: $!";
my $message = do { local $/; <$fh> };
close($fh);
my $dkim = Mail::DKIM::Verifier->new();
$dkim->PRINT($message);
$dkim->CLOSE();
foreach my $signature ($dkim->signatures) {
    print join("\t", $signature->domain, $signature->selector, $signature->algorithm,
               $signature->result_detail), "\n";
}
"""


def mail_dkim_missing() -> str | None:
    """Why Mail::DKIM cannot run here, or None."""
    if shutil.which("perl") is None:
        return "perl is not installed"
    check = subprocess.run(["perl", "-MMail::DKIM::Verifier", "-MNet::DNS::Resolver", "-e1"],
                           capture_output=True, timeout=30, check=False)
    if check.returncode:
        return "Perl Mail::DKIM is not installed (Debian libmail-dkim-perl)"
    return None


def mail_dkim_has_ed25519() -> bool:
    check = subprocess.run(["perl", "-MMail::DKIM::Algorithm::ed25519_sha256", "-e1"],
                           capture_output=True, timeout=30, check=False)
    return check.returncode == 0


@pytest.fixture(scope="module")
def perl_dns(keys: Keys) -> Iterator[DnsStub]:
    missing = mail_dkim_missing()
    if missing:
        pytest.skip(missing)
    with DnsStub(keys.zone) as stub:
        yield stub


def mail_dkim_verify(message: bytes, stub: DnsStub, tmp_path: Path) -> list[list[str]]:
    """Mail::DKIM's result_detail per signature: [domain, selector, algorithm, detail]."""
    (tmp_path / "verify.pl").write_text(PERL_VERIFIER)
    (tmp_path / "message.eml").write_bytes(message)
    host, port = stub.address
    done = subprocess.run(["perl", str(tmp_path / "verify.pl"), host, str(port),
                           str(tmp_path / "message.eml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return [line.split("\t") for line in done.stdout.splitlines()]


pytest_peer = pytest.mark.peer


@pytest_peer
@pytest.mark.parametrize("canonicalization", CANONICALIZATIONS)
def test_mail_dkim_verifies_our_rsa_signature(
    keys: Keys, perl_dns: DnsStub, tmp_path: Path, canonicalization: tuple[Mode, Mode]
) -> None:
    options = SignOptions(canonicalization=canonicalization)
    message = sign(MESSAGE, [keys.rsa], now=NOW, options=options) + MESSAGE
    assert mail_dkim_verify(message, perl_dns, tmp_path) == [
        [DOMAIN, "rsa2048", "rsa-sha256", "pass"]]


@pytest_peer
def test_mail_dkim_fails_our_signature_on_a_changed_message(
    keys: Keys, perl_dns: DnsStub, tmp_path: Path
) -> None:
    message = sign(MESSAGE, [keys.rsa], now=NOW) + MESSAGE.replace(b"Interop", b"Changed")
    ((*_, detail),) = mail_dkim_verify(message, perl_dns, tmp_path)
    assert detail.startswith("fail")


@pytest_peer
def test_mail_dkim_verifies_our_ed25519_signature(
    keys: Keys, perl_dns: DnsStub, tmp_path: Path
) -> None:
    if not mail_dkim_has_ed25519():
        pytest.skip("this Mail::DKIM has no ed25519-sha256 (Debian bookworm's 1.20230212 "
                    "lacks Mail::DKIM::Algorithm::ed25519_sha256)")
    message = sign(MESSAGE, [keys.rsa, keys.ed], now=NOW) + MESSAGE
    assert mail_dkim_verify(message, perl_dns, tmp_path) == [
        [DOMAIN, "rsa2048", "rsa-sha256", "pass"], [DOMAIN, "ed", "ed25519-sha256", "pass"]]
