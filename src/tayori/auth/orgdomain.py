"""Organizational domains and public suffixes, from the Public Suffix List bundled offline.

Takes: a domain name, in A-label or U-label form, any case, with or without a trailing
dot (callers normally hand in :func:`tayori.address.to_ascii_domain` output).
Promises: :func:`organizational_domain` answers RFC 7489 §3.2: the public suffix that
matches the most labels of the name (the implicit ``*`` rule when none does), plus one
more label; a name that is itself a public suffix is its own organizational domain.
:func:`public_suffix` answers the suffix alone (RFC 9091's "longest PSD" of a name).
Both answer in lower case, without the trailing dot. The list is the one the
``publicsuffixlist`` package ships (ICANN and private sections, as RFC 7489 uses it),
read from the package's own file, once, on first use; nothing is ever downloaded, and
the list changes only when the package is upgraded.
Failure policy: a name with an empty label (``a..b``, ``""``) raises ValueError; the
functions are pure and never touch the network.
Config keys: none.
Standards: RFC 7489 §3.2 (organizational domain), RFC 9091 (public suffix domains),
https://publicsuffix.org/list/ (the list and its matching rules).
"""

from __future__ import annotations

import functools

import publicsuffixlist


@functools.lru_cache(maxsize=1)
def _suffix_list() -> publicsuffixlist.PublicSuffixList:
    """The bundled list, parsed once; read from the package file, never fetched."""
    with open(publicsuffixlist.PSLFILE, "rb") as source:
        return publicsuffixlist.PublicSuffixList(source, accept_unknown=True)


def normalise(domain: str) -> str:
    """``domain`` lower-cased without a trailing dot; ValueError if a label is empty."""
    name = domain.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or "" in name.split("."):
        raise ValueError(f"not a domain name: {domain!r}")
    return name


def organizational_domain(domain: str) -> str:
    """The RFC 7489 §3.2 organizational domain of ``domain``."""
    name = normalise(domain)
    return _suffix_list().privatesuffix(name) or name


def public_suffix(domain: str) -> str:
    """The longest public suffix of ``domain`` (the name itself when it is one)."""
    name = normalise(domain)
    return _suffix_list().publicsuffix(name) or name


def is_public_suffix(domain: str) -> bool:
    """Whether ``domain`` is itself a public suffix (``com``, ``co.uk``, ``gov``)."""
    return public_suffix(domain) == normalise(domain)


__all__ = ["is_public_suffix", "normalise", "organizational_domain", "public_suffix"]
