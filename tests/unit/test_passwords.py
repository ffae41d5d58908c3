"""tayori.policy.passwords: argon2id hashes, bcrypt, and SHA-crypt computed here and checked
against the test vectors of Drepper's specification ("Unix crypt using SHA-256 and
SHA-512"), rounds= included; unusable stored values give False with a reason, never an
exception. (Hashes made by Dovecot's doveadm and by OpenSSL are checked in
tests/integration/test_userdb_peers.py.)"""

from __future__ import annotations

import argon2
import bcrypt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tayori.policy import passwords
from tayori.policy.passwords import (
    check_password,
    hash_password,
    needs_rehash,
    sha_crypt,
    split_scheme,
    verify_password,
)

# (setting, password, crypt(3) result) from the specification's test vectors.
SHA512_VECTORS = [
    ("$6$saltstring", "Hello world!",
     "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdF"
     "CoEOfaS35inz1"),
    ("$6$rounds=10000$saltstringsaltstring", "Hello world!",
     "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0"
     "Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v."),
    ("$6$rounds=5000$toolongsaltstring", "This is just a test",
     "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZxUh"
     "x1yxdYcz/e1JSbq3y6JMxxl8audkUEm0"),
    ("$6$rounds=1400$anotherlongsaltstring",
     "a very much longer text to encrypt.  This one even stretches over morethan one line.",
     "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wPvMxQ6Fm7I6IoYN3CmLs"
     "66x9t0oSwbtEW7o7UmJEiDwGqd8p4ur1"),
    ("$6$rounds=77777$short", "we have a short salt string but not a short password",
     "$6$rounds=77777$short$WuQyW2YR.hBNpjjRhpYD/ifIw05xdfeEyQoMxIXbkvr0gge1a1x3yRULJ5CCaUeO"
     "xFmtlcGZelFl5CxtgfiAc0"),
    ("$6$rounds=123456$asaltof16chars..", "a short string",
     "$6$rounds=123456$asaltof16chars..$BtCwjqMJGx5hrJhZywWvt0RLE8uZ4oPwcelCjmw2kSYu.Ec6ycUL"
     "evoBK25fs2xXgMNrCzIMVcgEJAstJeonj1"),
    ("$6$rounds=10$roundstoolow", "the minimum number is still observed",
     "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1xhLsPuWGsUSklZt58jaT"
     "fF4ZEQpyUNGc0dqbpBYYBaHHrsX."),
]

SHA256_VECTORS = [
    ("$5$saltstring", "Hello world!",
     "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),
    ("$5$rounds=10000$saltstringsaltstring", "Hello world!",
     "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA"),
    ("$5$rounds=5000$toolongsaltstring", "This is just a test",
     "$5$rounds=5000$toolongsaltstrin$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5"),
    ("$5$rounds=1400$anotherlongsaltstring",
     "a very much longer text to encrypt.  This one even stretches over morethan one line.",
     "$5$rounds=1400$anotherlongsalts$Rx.j8H.h8HjEDGomFU8bDkXm3XIUnzyxf12oP84Bnq1"),
    ("$5$rounds=77777$short", "we have a short salt string but not a short password",
     "$5$rounds=77777$short$JiO1O3ZpDAxGJeaDIuqCoEFysAe1mZNJRs3pw0KQRd/"),
    ("$5$rounds=123456$asaltof16chars..", "a short string",
     "$5$rounds=123456$asaltof16chars..$gP3VQ/6X7UUEW3HkBn2w1/Ptq2jxPyzV/cZKmF/wJvD"),
    ("$5$rounds=10$roundstoolow", "the minimum number is still observed",
     "$5$rounds=1000$roundstoolow$yfvwcWrQ8l/K0DAWyuPMDNHpIVlTQebY9l/gL972bIC"),
]

# Cheap argon2 parameters for tests that make many hashes.
FAST = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


# --- SHA-crypt ----------------------------------------------------------------------

@pytest.mark.parametrize(("setting", "password", "expected"), SHA512_VECTORS)
def test_sha512_crypt_gives_the_specification_vectors(setting: str, password: str,
                                                      expected: str) -> None:
    assert sha_crypt(password.encode(), setting.encode(), "SHA512-CRYPT") == expected.encode()


@pytest.mark.parametrize(("setting", "password", "expected"), SHA256_VECTORS)
def test_sha256_crypt_gives_the_specification_vectors(setting: str, password: str,
                                                      expected: str) -> None:
    assert sha_crypt(password.encode(), setting.encode(), "SHA256-CRYPT") == expected.encode()


@pytest.mark.parametrize(("setting", "password", "expected"), SHA512_VECTORS + SHA256_VECTORS)
def test_the_vectors_verify_bare_and_with_dovecot_prefixes(setting: str, password: str,
                                                           expected: str) -> None:
    scheme = "{SHA512-CRYPT}" if expected.startswith("$6$") else "{SHA256-CRYPT}"
    for stored in (expected, scheme + expected, "{CRYPT}" + expected, scheme.lower() + expected):
        result = check_password(stored, password)
        assert result.ok, (stored, result)
        assert result.scheme == scheme.strip("{}")
        assert not verify_password(stored, password + "x")
        assert not verify_password(stored, password[:-1])


def test_explicit_default_rounds_are_kept_in_the_output() -> None:
    """``rounds=5000`` written out is preserved (it is part of the stored string)."""
    result = sha_crypt(b"Hello world!", b"$5$rounds=5000$saltstring", "SHA256-CRYPT")
    assert result == b"$5$rounds=5000$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"


def test_a_stored_hash_with_a_changed_rounds_value_does_not_verify() -> None:
    _, password, expected = SHA512_VECTORS[1]
    assert not verify_password(expected.replace("rounds=10000", "rounds=10001"), password)


def test_rounds_above_the_limit_are_refused_not_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(passwords, "MAX_SHA_CRYPT_ROUNDS", 50_000)
    _, password, expected = SHA512_VECTORS[4]   # rounds=77777
    result = check_password(expected, password)
    assert not result.ok
    assert "rounds=77777" in result.problem


@pytest.mark.parametrize("stored", [
    "$6$rounds=abc$salt$hash", "$6$rounds=$salt$x", "{SHA512-CRYPT}$5$saltstring$x",
    "{SHA256-CRYPT}nonsense", "{SHA512-CRYPT}",
])
def test_malformed_sha_crypt_values_are_a_problem_not_an_exception(stored: str) -> None:
    result = check_password(stored, "Hello world!")
    assert not result.ok
    assert result.problem


def test_a_non_ascii_password_is_hashed_as_utf8() -> None:
    stored = sha_crypt("pässwörd".encode(), b"$6$abcdefgh", "SHA512-CRYPT").decode()
    assert verify_password(stored, "pässwörd")
    assert not verify_password(stored, "passwort")


# --- bcrypt -------------------------------------------------------------------------

@pytest.mark.parametrize("ident", ["2a", "2b", "2y"])
def test_bcrypt_hashes_verify_with_every_variant_and_prefix(ident: str) -> None:
    made = bcrypt.hashpw(b"correct horse", bcrypt.gensalt(4)).decode()
    body = f"${ident}$" + made[4:]
    for stored in (body, "{BLF-CRYPT}" + body, "{CRYPT}" + body):
        result = check_password(stored, "correct horse")
        assert result.ok and result.scheme == "BLF-CRYPT", stored
        assert not verify_password(stored, "correct horsE")


def test_bcrypt_reads_the_first_72_bytes_like_crypt() -> None:
    """A hash made from a long password (crypt(3) and Dovecot truncate it) verifies, and
    bcrypt's own ValueError for longer passwords does not escape."""
    long_password = "x" * 72 + "tail"
    stored = bcrypt.hashpw(b"x" * 72, bcrypt.gensalt(4)).decode()
    assert verify_password(stored, long_password)
    assert verify_password(stored, "x" * 72)
    assert not verify_password(stored, "x" * 71)


def test_a_malformed_bcrypt_hash_is_a_problem() -> None:
    result = check_password("{BLF-CRYPT}$2b$04$tooshort", "pw")
    assert not result.ok and "bcrypt" in result.problem


# --- argon2 -------------------------------------------------------------------------

def test_new_hashes_are_argon2id_with_the_dovecot_prefix() -> None:
    stored = hash_password("s3cret")
    assert stored.startswith("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$")
    assert verify_password(stored, "s3cret")
    assert not verify_password(stored, "s3cret ")
    assert stored != hash_password("s3cret")   # a fresh salt each time


def test_argon2_verifies_bare_and_prefixed_i_and_id() -> None:
    argon2id = FAST.hash("pw")
    argon2i = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1,
                                    type=argon2.Type.I).hash("pw")
    for stored in (argon2id, "{ARGON2ID}" + argon2id, argon2i, "{ARGON2I}" + argon2i,
                   "{argon2id}" + argon2id):
        assert check_password(stored, "pw").ok, stored
        assert not verify_password(stored, "pW")


def test_an_argon2_prefix_that_does_not_match_the_hash_is_a_problem() -> None:
    result = check_password("{ARGON2I}" + FAST.hash("pw"), "pw")
    assert not result.ok and "does not hold" in result.problem


def test_a_malformed_argon2_hash_is_a_problem() -> None:
    result = check_password("{ARGON2ID}$argon2id$v=19$m=8,t=1,p=1$garbage", "pw")
    assert not result.ok and "malformed" in result.problem


def test_needs_rehash_is_false_only_for_current_argon2id() -> None:
    assert not needs_rehash(hash_password("pw"))
    assert needs_rehash("{ARGON2ID}" + FAST.hash("pw"))          # weaker parameters
    assert not needs_rehash("{ARGON2ID}" + FAST.hash("pw"), FAST)
    assert needs_rehash(SHA512_VECTORS[0][2])
    assert needs_rehash(bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode())
    assert needs_rehash("{ARGON2ID}$argon2id$garbage")
    assert needs_rehash("")


# --- what cannot be used ------------------------------------------------------------

@pytest.mark.parametrize(("stored", "words"), [
    ("{PLAIN}secret", "plaintext"),
    ("{CLEARTEXT}secret", "plaintext"),
    ("{MD5-CRYPT}$1$abc$def", "unsupported"),
    ("{SSHA}abcdef", "unsupported"),
    ("secret", "unrecognised"),
    ("", "unrecognised"),
    ("$1$saltsalt$hash", "unrecognised"),
    ("!" + SHA512_VECTORS[0][2], "locked"),
    ("*", "locked"),
])
def test_unusable_stored_values_fail_with_a_reason(stored: str, words: str) -> None:
    result = check_password(stored, "secret")
    assert not result.ok
    assert words in result.problem


def test_a_password_that_is_not_unicode_text_fails_with_a_reason() -> None:
    result = check_password(hash_password("pw", FAST), "\udcff")
    assert not result.ok and "UTF-8" in result.problem


def test_split_scheme() -> None:
    assert split_scheme("{sha512-crypt}$6$x") == ("SHA512-CRYPT", "$6$x")
    assert split_scheme("$6$x") == ("", "$6$x")
    assert split_scheme("{BROKEN$6$x") == ("", "{BROKEN$6$x")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80),
                 st.from_regex(r"\{[A-Z0-9-]{0,14}\}\$[0-9a-z]{1,8}\$.{0,40}", fullmatch=True),
                 st.from_regex(r"\$[256aby]{1,2}\$(rounds=[0-9]{1,4}\$)?.{0,60}", fullmatch=True)),
       st.text(max_size=40))
def test_checking_never_raises(stored: str, password: str) -> None:
    result = check_password(stored, password)
    assert isinstance(result.ok, bool)
    assert result.ok is verify_password(stored, password)
