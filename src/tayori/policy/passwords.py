"""Password hashes: argon2id for new ones, and the schemes existing user bases hold.

Takes: a stored hash string, as a user table, an SQL row or a Dovecot passwd-file holds
it, and the password a client gave (``str``, used as UTF-8).
Promises:
- :func:`hash_password` makes ``{ARGON2ID}$argon2id$v=19$m=...,t=...,p=...$salt$hash``
  (argon2-cffi, its RFC 9106 low-memory profile unless a hasher is given). The
  ``{SCHEME}`` prefix is Dovecot's, so the same line works in a Dovecot passwd-file.
- :func:`check_password` / :func:`verify_password` accept:

  ========================  =========================================================
  ``{ARGON2ID}``, ``{ARGON2I}``, bare ``$argon2id$`` / ``$argon2i$``   argon2 (RFC 9106)
  ``{BLF-CRYPT}``, bare ``$2a$`` ``$2b$`` ``$2y$``   bcrypt (first 72 bytes, as crypt(3))
  ``{SHA512-CRYPT}``, bare ``$6$``    SHA-crypt, SHA-512 (Drepper, "Unix crypt using
                                      SHA-256 and SHA-512"), ``rounds=`` honoured
  ``{SHA256-CRYPT}``, bare ``$5$``    the same with SHA-256
  ``{CRYPT}`` + any of the crypt strings above
  ========================  =========================================================

  Scheme names compare case-insensitively. SHA-crypt is computed here (the standard
  library's ``crypt`` module is deprecated) and compared with
  :func:`hmac.compare_digest`; bcrypt and argon2-cffi compare in constant time
  themselves.
- :func:`needs_rehash` is True for anything but an argon2id hash with the current
  parameters: a caller that has just verified a password may store a new hash.
Failure policy: never raises to the caller for a stored value it cannot use: an unknown
or plaintext scheme, a malformed hash, a password that is not valid Unicode, or a
SHA-crypt ``rounds`` above :data:`MAX_SHA_CRYPT_ROUNDS` all give ``ok=False`` with a
``problem`` worth logging (never shown to the client). ``!`` or ``*`` in front of a
hash (a locked account, as in shadow(5)) is such a problem too.
Cost: every check is CPU-heavy by design (tens of milliseconds); call it off the event
loop (:mod:`tayori.policy.userdb` does).
Config keys: none (the user directories that store hashes read them).
Standards: RFC 9106 (Argon2), the PHC string format, Drepper's SHA-crypt specification
(its published test vectors are in the unit tests), OpenBSD bcrypt.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass

import argon2
import bcrypt
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

#: The hasher for new hashes (and the parameters :func:`needs_rehash` expects).
HASHER = argon2.PasswordHasher.from_parameters(argon2.profiles.RFC_9106_LOW_MEMORY)

#: SHA-crypt's own limits (the specification's), and ours: a stored hash asking for
#: more rounds than this is refused rather than tying up a worker for minutes.
SHA_CRYPT_MIN_ROUNDS = 1000
SHA_CRYPT_MAX_ROUNDS = 999_999_999
SHA_CRYPT_DEFAULT_ROUNDS = 5000
MAX_SHA_CRYPT_ROUNDS = 2_000_000

#: bcrypt reads at most this many bytes of the password.
BCRYPT_MAX_BYTES = 72

_PREFIX = re.compile(r"\{([A-Za-z0-9.-]+)\}")


@dataclass(frozen=True, slots=True)
class Verification:
    """The result of checking a password against a stored hash.

    ``ok``: the password matches. ``scheme``: what the stored value was recognised as
    (``ARGON2ID``, ``BLF-CRYPT``, ``SHA512-CRYPT``...; empty when unknown). ``problem``:
    why the stored value could not be used at all (for the operator's log; empty when
    the check itself ran, whatever its answer)."""

    ok: bool
    scheme: str = ""
    problem: str = ""


def hash_password(password: str, hasher: argon2.PasswordHasher | None = None) -> str:
    """A new ``{ARGON2ID}`` hash of ``password`` with a fresh random salt."""
    return "{ARGON2ID}" + (hasher or HASHER).hash(password)


def verify_password(stored: str, password: str) -> bool:
    """True when ``password`` matches ``stored``; False otherwise, also for a stored
    value that cannot be used (see :func:`check_password` for the reason)."""
    return check_password(stored, password).ok


def check_password(stored: str, password: str) -> Verification:
    """Check ``password`` against ``stored``; never raises (see the module's contract)."""
    try:
        secret = password.encode("utf-8")
    except UnicodeEncodeError:
        return Verification(False, problem="the password is not valid UTF-8")
    scheme, body = split_scheme(stored)
    if scheme in ("CRYPT", ""):
        scheme = _crypt_scheme(body)
    check = _CHECKS.get(scheme)
    if check is None:
        return Verification(False, problem=_unknown(stored, scheme))
    return check(scheme, body, secret)


def split_scheme(stored: str) -> tuple[str, str]:
    """``("SHA512-CRYPT", "$6$...")`` for ``{SHA512-CRYPT}$6$...``; ``("", stored)``
    when there is no ``{SCHEME}`` prefix."""
    match = _PREFIX.match(stored)
    if match is None:
        return "", stored
    return match.group(1).upper(), stored[match.end():]


def needs_rehash(stored: str, hasher: argon2.PasswordHasher | None = None) -> bool:
    """True unless ``stored`` is an argon2id hash with ``hasher``'s parameters."""
    scheme, body = split_scheme(stored)
    if scheme not in ("ARGON2ID", "") or not body.startswith("$argon2id$"):
        return True
    try:
        return (hasher or HASHER).check_needs_rehash(body)
    except (InvalidHashError, ValueError):
        return True


def _crypt_scheme(body: str) -> str:
    """The scheme of a bare modular-crypt string (``$6$...``), or ""."""
    for prefix, scheme in _CRYPT_IDS:
        if body.startswith(prefix):
            return scheme
    return ""


_CRYPT_IDS = (("$argon2id$", "ARGON2ID"), ("$argon2i$", "ARGON2I"),
              ("$2a$", "BLF-CRYPT"), ("$2b$", "BLF-CRYPT"), ("$2y$", "BLF-CRYPT"),
              ("$6$", "SHA512-CRYPT"), ("$5$", "SHA256-CRYPT"))


def _unknown(stored: str, scheme: str) -> str:
    if stored.startswith(("!", "*")):
        return "the account is locked (the hash starts with ! or *)"
    if scheme in ("PLAIN", "CLEAR", "CLEARTEXT"):
        return f"plaintext passwords ({{{scheme}}}) are not accepted; store a hash"
    if scheme:
        return f"unsupported password scheme {{{scheme}}}"
    return "unrecognised password hash (no {SCHEME} prefix, no known $id$)"


# --- argon2 -------------------------------------------------------------------------

def _check_argon2(scheme: str, body: str, secret: bytes) -> Verification:
    expected = "$argon2id$" if scheme == "ARGON2ID" else "$argon2i$"
    if not body.startswith(expected):
        return Verification(False, scheme, f"{{{scheme}}} does not hold an {expected} hash")
    try:
        return Verification(HASHER.verify(body, secret), scheme)
    except VerifyMismatchError:
        return Verification(False, scheme)
    except (InvalidHashError, VerificationError) as exc:   # undecodable, bad parameters
        return Verification(False, scheme, f"malformed argon2 hash: {exc}")


# --- bcrypt -------------------------------------------------------------------------

_BCRYPT = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}\Z")


def _check_bcrypt(scheme: str, body: str, secret: bytes) -> Verification:
    if not _BCRYPT.match(body):
        return Verification(False, scheme, "malformed bcrypt hash")
    try:
        ok = bcrypt.checkpw(secret[:BCRYPT_MAX_BYTES], body.encode("ascii"))
    except ValueError as exc:
        return Verification(False, scheme, f"bcrypt refused the hash: {exc}")
    return Verification(ok, scheme)


# --- SHA-crypt (Drepper) ------------------------------------------------------------

_CRYPT64 = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ROUNDS = re.compile(rb"rounds=(\d{1,9})\$")


@dataclass(frozen=True, slots=True)
class _ShaVariant:
    ident: bytes                  # b"5" or b"6"
    digest: Callable[[bytes], hashlib._Hash]
    size: int                     # digest bytes
    grouped: int                  # the bytes encoded in groups of three
    spread: int                   # group g starts at byte g * spread % grouped


_SHA256 = _ShaVariant(b"5", hashlib.sha256, 32, 30, 21)
_SHA512 = _ShaVariant(b"6", hashlib.sha512, 64, 63, 22)


def sha_crypt(password: bytes, setting: bytes, variant: str = "SHA512-CRYPT") -> bytes:
    """The SHA-crypt string for ``password`` and a ``setting``
    (``$6$[rounds=N$]salt[$...]``): what crypt(3) returns. Raises ValueError for a
    setting it cannot use."""
    sha = _SHA512 if variant == "SHA512-CRYPT" else _SHA256
    head = b"$" + sha.ident + b"$"
    if not setting.startswith(head):
        raise ValueError(f"not a ${sha.ident.decode()}$ setting")
    rest = setting[len(head):]
    rounds, custom = SHA_CRYPT_DEFAULT_ROUNDS, False
    match = _ROUNDS.match(rest)
    if match:
        rounds = min(max(int(match.group(1)), SHA_CRYPT_MIN_ROUNDS), SHA_CRYPT_MAX_ROUNDS)
        custom, rest = True, rest[match.end():]
    elif rest.startswith(b"rounds="):
        raise ValueError("malformed rounds= in the setting")
    if rounds > MAX_SHA_CRYPT_ROUNDS:
        raise ValueError(f"rounds={rounds} is above the limit {MAX_SHA_CRYPT_ROUNDS}")
    salt = rest.split(b"$", 1)[0][:16]
    encoded = _crypt64(_sha_digest(sha, password, salt, rounds), sha)
    prefix = head + (b"rounds=%d$" % rounds if custom else b"")
    return prefix + salt + b"$" + encoded


def _repeat(block: bytes, length: int) -> bytes:
    """``block`` repeated and cut to ``length`` bytes."""
    return (block * (length // len(block) + 1))[:length]


def _sha_digest(sha: _ShaVariant, password: bytes, salt: bytes, rounds: int) -> bytes:
    h = sha.digest
    alternate = h(password + salt + password).digest()
    first = h(password + salt + _repeat(alternate, len(password)))
    length = len(password)
    while length:
        first.update(alternate if length & 1 else password)
        length >>= 1
    digest = first.digest()
    p_bytes = _repeat(h(password * len(password)).digest(), len(password))
    s_bytes = _repeat(h(salt * (16 + digest[0])).digest(), len(salt))
    # Round i hashes [P|C] + (S if i % 3) + (P if i % 7) + [C|P]: the pattern repeats
    # every 42 rounds, so the 42 fixed parts are joined once.
    parts = [((s_bytes if i % 3 else b"") + (p_bytes if i % 7 else b""), i & 1)
             for i in range(42)]
    for i in range(rounds):
        middle, odd = parts[i % 42]
        digest = h(p_bytes + middle + digest if odd else digest + middle + p_bytes).digest()
    return digest


def _crypt64(digest: bytes, sha: _ShaVariant) -> bytes:
    """The digest in crypt's base-64, in SHA-crypt's byte order: group g of three bytes
    holds bytes g, g + n/3 and g + 2n/3 (n: the bytes grouped, 63 or 30), rotated so
    that it starts at g * spread mod n; the leftover byte(s) come last."""
    n = sha.grouped
    third = n // 3
    out = bytearray()
    for group in range(third):
        a = group * sha.spread % n
        b, c = (a + third) % n, (a + 2 * third) % n
        out += _b64_from_24bit(digest[a], digest[b], digest[c], 4)
    if sha.size == 64:
        out += _b64_from_24bit(0, 0, digest[63], 2)
    else:
        out += _b64_from_24bit(0, digest[31], digest[30], 3)
    return bytes(out)


def _b64_from_24bit(high: int, middle: int, low: int, count: int) -> bytes:
    word = (high << 16) | (middle << 8) | low
    return bytes(_CRYPT64[(word >> (6 * k)) & 0x3F] for k in range(count))


def _check_sha_crypt(scheme: str, body: str, secret: bytes) -> Verification:
    try:
        stored = body.encode("utf-8")
        computed = sha_crypt(secret, stored, scheme)
    except (ValueError, UnicodeEncodeError) as exc:
        return Verification(False, scheme, f"unusable {scheme} hash: {exc}")
    return Verification(hmac.compare_digest(computed, stored), scheme)


_CHECKS: dict[str, Callable[[str, str, bytes], Verification]] = {
    "ARGON2ID": _check_argon2,
    "ARGON2I": _check_argon2,
    "BLF-CRYPT": _check_bcrypt,
    "SHA512-CRYPT": _check_sha_crypt,
    "SHA256-CRYPT": _check_sha_crypt,
}
