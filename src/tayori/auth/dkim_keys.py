"""DKIM keys: the public key records verifiers fetch, and the private keys tayori signs with.

Takes: key records as DNS TXT bytes (fetched through :class:`tayori.dns.Resolver` at
``<selector>._domainkey.<domain>``); private key files (PEM: PKCS#8, or PKCS#1 for RSA;
or the base64 32-octet Ed25519 seed that dkimpy writes).
Promises: :func:`parse_key_record` returns a :class:`KeyRecord` (``public_key`` None for
a revoked key, ``p=`` empty). :func:`fetch_key` uses the first of a name's TXT records
that is a DKIM key record; :func:`fetch_keys` fetches several, concurrently, and keeps
each failure as its exception (DKIM and ARC report them each their own way).
:func:`verify_signature` and :func:`make_signature` are the two cryptographic operations,
for every algorithm in :data:`ALGORITHMS`: RSASSA-PKCS1-v1_5 over the hash, or Ed25519
over the SHA-256 digest (RFC 8463 §3, PureEdDSA of the hash).
:func:`keygen` makes a key and the TXT value to publish; :func:`write_private_key` writes
it with mode 0600 from the first byte on, atomically, never replacing an existing file.
Failure policy: a key record that cannot be used (malformed tag list, ``v=`` other than
DKIM1, unknown ``k=``, bad key data; no record at all, NXDOMAIN included) raises
:class:`KeyRecordError`, which the verifier reports as permerror; DnsTemporaryError passes
through (temperror). Unusable private keys and bad domains or selectors raise ValueError;
an existing key file raises FileExistsError.
Config keys: none here (the caller hands in paths, domains and selectors).
Standards: RFC 6376 §3.6 (key records), RFC 8463 (Ed25519), RFC 8301 (RSA at least 1024
bits; rsa-sha1 is not trusted), RFC 3447/8017 (RSA), RFC 8032 (Ed25519), RFC 1035 §3.3
(TXT character-strings of at most 255 octets).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from tayori.address import to_ascii_domain
from tayori.auth.dkim_tags import TagListError, compact, parse_tag_list, split_list
from tayori.dns import DnsTemporaryError, NxDomain, Resolver

KeyType = Literal["rsa", "ed25519"]
PublicKey = rsa.RSAPublicKey | ed25519.Ed25519PublicKey
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class Algorithm:
    """A signing algorithm (``a=``): its key type and hash."""

    name: str
    key_type: KeyType
    hash_name: Literal["sha256", "sha1"]


ALGORITHMS: dict[str, Algorithm] = {
    alg.name: alg
    for alg in (
        Algorithm("rsa-sha256", "rsa", "sha256"),
        Algorithm("ed25519-sha256", "ed25519", "sha256"),
        Algorithm("rsa-sha1", "rsa", "sha1"),  # verified only to be reported (RFC 8301)
    )
}
MIN_RSA_BITS = 1024
"""RFC 8301 §3.2: shorter RSA keys are not valid for verifying or signing."""
MAX_RSA_BITS = 8192
"""Longer keys are refused: they cost a verifier time and nobody needs them."""
_SELECTOR = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
_TXT_STRING = 255
_KEY_TYPES: dict[str, KeyType] = {"rsa": "rsa", "ed25519": "ed25519"}


class KeyRecordError(ValueError):
    """A key record that cannot be used; the text says why (for logs and reasons)."""


# --- public keys -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A parsed key record (RFC 6376 §3.6.1). ``hashes`` None means any (no ``h=``)."""

    key_type: KeyType
    public_key: PublicKey | None
    hashes: frozenset[str] | None = None
    services: frozenset[str] = frozenset({"*"})
    flags: frozenset[str] = frozenset()

    @property
    def bits(self) -> int:
        """The key size: RSA modulus bits, 256 for Ed25519, 0 for a revoked key."""
        if isinstance(self.public_key, rsa.RSAPublicKey):
            return self.public_key.key_size
        return 256 if self.public_key is not None else 0

    @property
    def testing(self) -> bool:
        """``t=y``: the domain is testing DKIM."""
        return "y" in self.flags


def parse_key_record(txt: bytes) -> KeyRecord:
    """The key record in one TXT record (character-strings joined)."""
    try:
        tags = parse_tag_list(txt)
    except TagListError as exc:
        raise KeyRecordError(f"malformed key record: {exc}") from exc
    if tags.get("v", "DKIM1") != "DKIM1":
        raise KeyRecordError(f"key record version v={tags['v']} is not DKIM1")
    key_type = _KEY_TYPES.get(tags.get("k", "rsa"))
    if key_type is None:
        raise KeyRecordError(f"unknown key type k={tags['k']}")
    if "p" not in tags:
        raise KeyRecordError("key record without p=")
    return KeyRecord(
        key_type=key_type,
        public_key=_public_key(key_type, compact(tags["p"])),
        hashes=_names(tags["h"]) if "h" in tags else None,
        services=_names(tags.get("s", "*")),
        flags=_names(tags.get("t", "")),
    )


def _names(value: str) -> frozenset[str]:
    """A colon-separated list of names (``h=``, ``s=``, ``t=``), lower case."""
    return frozenset(name.lower() for name in split_list(value) if name)


def _public_key(key_type: KeyType, data: str) -> PublicKey | None:
    if not data:
        return None  # revoked
    try:
        der = base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise KeyRecordError("key data p= is not base64") from exc
    if key_type == "ed25519":
        if len(der) != 32:
            raise KeyRecordError(f"an Ed25519 key is 32 octets, not {len(der)}")
        return ed25519.Ed25519PublicKey.from_public_bytes(der)
    return _rsa_public_key(der)


def _rsa_public_key(der: bytes) -> rsa.RSAPublicKey:
    """SubjectPublicKeyInfo as RFC 6376 says, or the bare RSAPublicKey many publish."""
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):
        pem = b"-----BEGIN RSA PUBLIC KEY-----\n%s-----END RSA PUBLIC KEY-----\n"
        try:
            key = serialization.load_pem_public_key(pem % base64.encodebytes(der))
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise KeyRecordError("key data p= is not an RSA public key") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise KeyRecordError("key data p= is not an RSA public key")
    return key


def key_name(selector: str, domain: str) -> str:
    """Where a key record lives: ``<selector>._domainkey.<domain>``, lower case."""
    return f"{selector}._domainkey.{domain}".lower()


async def fetch_key(resolver: Resolver, selector: str, domain: str) -> KeyRecord:
    """The key record of ``selector`` and ``domain``; see the module's failure policy."""
    name = key_name(selector, domain)
    try:
        records = await resolver.txt(name)
    except NxDomain as exc:
        raise KeyRecordError(f"no key record at {name}") from exc
    except ValueError as exc:  # a name the resolver cannot ask for
        raise KeyRecordError(f"cannot look up {name!r}: {exc}") from exc
    first_error: KeyRecordError | None = None
    for record in records:
        try:
            return parse_key_record(record)
        except KeyRecordError as exc:
            first_error = first_error or exc
    raise first_error or KeyRecordError(f"no key record at {name}")


KeyLookup = KeyRecord | KeyRecordError | DnsTemporaryError
"""What :func:`fetch_keys` found for one key: the record, or why there is none."""


async def fetch_keys(resolver: Resolver, wanted: Iterable[tuple[str, str]]
                     ) -> dict[tuple[str, str], KeyLookup]:
    """:func:`fetch_key` for each (selector, domain) of ``wanted``, concurrently: its key
    record, or the KeyRecordError or DnsTemporaryError that stopped it."""
    found: dict[tuple[str, str], KeyLookup] = {}

    async def one(selector: str, domain: str) -> None:
        try:
            found[(selector, domain)] = await fetch_key(resolver, selector, domain)
        except (KeyRecordError, DnsTemporaryError) as exc:
            found[(selector, domain)] = exc

    async with asyncio.TaskGroup() as group:
        for selector, domain in sorted(wanted):
            group.create_task(one(selector, domain))
    return found


def verify_signature(
    key: PublicKey, algorithm: Algorithm, signature: bytes, data: bytes
) -> bool:
    """Whether ``signature`` is ``algorithm``'s signature of ``data`` under ``key``."""
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), _hash(algorithm))
        else:
            key.verify(signature, hashlib.sha256(data).digest())
    except InvalidSignature:
        return False
    return True


def make_signature(key: PrivateKey, data: bytes) -> bytes:
    """Sign ``data``: rsa-sha256 with an RSA key, ed25519-sha256 with an Ed25519 key."""
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(hashlib.sha256(data).digest())


def _hash(algorithm: Algorithm) -> hashes.HashAlgorithm:
    return hashes.SHA1() if algorithm.hash_name == "sha1" else hashes.SHA256()


# --- private keys ------------------------------------------------------------------------------


def check_selector(selector: str) -> str:
    """``selector`` lower-cased if it is dot-separated labels of letters, digits, ``-``
    and ``_`` (RFC 6376 §3.1, with the underscore some operators use); else ValueError.
    """
    labels = selector.split(".")
    if len(selector) > 253 or not all(_SELECTOR.match(label) for label in labels):
        raise ValueError(f"malformed DKIM selector: {selector!r}")
    return selector.lower()


@dataclass(frozen=True)
class SigningKey:
    """A private key tayori signs with for ``domain`` under ``selector``.

    ``domain`` is normalised to its lower-case A-label form; ``algorithm`` follows from
    the key: ``rsa-sha256`` or ``ed25519-sha256``.
    """

    domain: str
    selector: str
    private_key: PrivateKey = field(repr=False)
    algorithm: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "domain", to_ascii_domain(self.domain))
        object.__setattr__(self, "selector", check_selector(self.selector))
        object.__setattr__(self, "algorithm", _check_private_key(self.private_key))


def _check_private_key(key: object) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519-sha256"
    if isinstance(key, rsa.RSAPrivateKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise ValueError(f"an RSA key of {key.key_size} bits cannot sign "
                             f"({MIN_RSA_BITS}-{MAX_RSA_BITS}, RFC 8301)")
        return "rsa-sha256"
    raise ValueError("a DKIM key is RSA or Ed25519")


def load_signing_key(path: str | os.PathLike[str], domain: str, selector: str) -> SigningKey:
    """Read a private key file: PEM (PKCS#8, or PKCS#1 RSA), unencrypted, or the base64
    32-octet Ed25519 seed (dkimpy's format). Raises OSError or ValueError.
    """
    data = Path(path).read_bytes()
    return SigningKey(domain, selector, _private_key(data, str(path)))


def _private_key(data: bytes, where: str) -> PrivateKey:
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"{where}: not an unencrypted PEM private key") from exc
        if not isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
            raise ValueError(f"{where}: a DKIM key is RSA or Ed25519")
        return key
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"{where}: neither PEM nor a base64 Ed25519 seed") from exc
    if len(seed) != 32:
        raise ValueError(f"{where}: an Ed25519 seed is 32 octets, not {len(seed)}")
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def public_txt(key: PrivateKey) -> str:
    """The key record to publish for ``key``: ``v=DKIM1; k=...; p=...``."""
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode('ascii')}"
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"


def keygen(algorithm: Literal["rsa", "ed25519"], bits: int = 2048) -> tuple[bytes, str]:
    """A new private key as unencrypted PKCS#8 PEM, and the TXT value to publish.

    ``bits`` is for RSA only: 1024 to 4096 (RFC 8301 asks for 2048 or more; 4096 is the
    most verifiers must handle, RFC 6376 §3.3.3).
    """
    key: PrivateKey
    if algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "rsa":
        if not MIN_RSA_BITS <= bits <= 4096:
            raise ValueError(f"RSA key size {bits} is outside 1024-4096")
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        raise ValueError(f"unknown key algorithm {algorithm!r}: rsa or ed25519")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, public_txt(key)


def txt_record(domain: str, selector: str, value: str) -> str:
    """A zone-file line publishing ``value``, in character-strings of at most 255 octets:
    ``<selector>._domainkey.<domain>. IN TXT ( "..." "..." )``.
    """
    data = value.encode("utf-8")
    strings = [data[i : i + _TXT_STRING] for i in range(0, len(data), _TXT_STRING)]
    quoted = " ".join('"' + _zone_escape(s) + '"' for s in strings or [b""])
    name = key_name(check_selector(selector), to_ascii_domain(domain))
    return f"{name}. IN TXT ( {quoted} )"


def _zone_escape(data: bytes) -> str:
    return "".join(f"\\{chr(b)}" if b in b'"\\' else chr(b) if 32 <= b < 127 else f"\\{b:03d}"
                   for b in data)


def write_private_key(path: str | os.PathLike[str], pem: bytes) -> None:
    """Write ``pem`` to ``path``: mode 0600 from creation, fsync'd, then linked into place
    (so the file appears whole or not at all); an existing ``path`` is never replaced.
    """
    target = Path(path)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(fd, 0o600)  # mkstemp made it 0600 already; umask cannot widen it
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temporary, target)
    finally:
        os.unlink(temporary)
    _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_key(
    path: str | os.PathLike[str],
    domain: str,
    selector: str,
    algorithm: Literal["rsa", "ed25519"] = "rsa",
    bits: int = 2048,
) -> str:
    """``tayori dkim keygen``: make a key, write it to ``path`` (0600, never replacing a
    file) and return the zone-file line to publish for ``selector`` and ``domain``.
    """
    pem, value = keygen(algorithm, bits)
    record = txt_record(domain, selector, value)  # a bad name fails before any write
    write_private_key(path, pem)
    return record


__all__ = [
    "ALGORITHMS",
    "MAX_RSA_BITS",
    "MIN_RSA_BITS",
    "Algorithm",
    "KeyLookup",
    "KeyRecord",
    "KeyRecordError",
    "KeyType",
    "PrivateKey",
    "PublicKey",
    "SigningKey",
    "check_selector",
    "create_key",
    "fetch_key",
    "fetch_keys",
    "key_name",
    "keygen",
    "load_signing_key",
    "make_signature",
    "parse_key_record",
    "public_txt",
    "txt_record",
    "verify_signature",
]
