"""PROXY protocol v1 (text) and v2 (binary) headers, sans-IO.

Takes: the first bytes a client sent on a listener with ``proxy_protocol = true``.
Promises: :func:`parse` returns None while the header is incomplete, or a
:class:`ProxyHeader` (the original client and server addresses, or none for v1
``UNKNOWN`` / v2 ``LOCAL``) with the number of bytes it used; whatever follows is SMTP.
Failure policy: :class:`ProxyError` for anything malformed; the session is then closed
without a greeting (a proxy that speaks garbage is not a client to talk to).
Standards: HAProxy PROXY protocol specification, versions 1 and 2.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_SIGNATURE = b"PROXY "
V2_OTHER_FAMILIES = frozenset({0x00, 0x12, 0x22, 0x31, 0x32})  # UNSPEC, UDP4/6, UNIX
V1_MAX = 107


class ProxyError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    client: tuple[str, int] | None
    server: tuple[str, int] | None
    length: int


def parse(data: bytes) -> ProxyHeader | None:
    for signature in (V2_SIGNATURE, V1_SIGNATURE):
        if len(data) < len(signature) and signature.startswith(data):
            return None
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(V1_SIGNATURE):
        return _parse_v1(data)
    raise ProxyError("no PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyError("PROXY v1 header too long")
        return None
    words = data[:end].decode("ascii", "replace").split(" ")
    if len(words) >= 2 and words[1] == "UNKNOWN":
        return ProxyHeader(None, None, end + 2)
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        raise ProxyError("malformed PROXY v1 header")
    try:
        version = 4 if words[1] == "TCP4" else 6
        source, destination = ipaddress.ip_address(words[2]), ipaddress.ip_address(words[3])
        if not all(p.isascii() and p.isdigit() and len(p) <= 5 for p in words[4:6]):
            raise ValueError("ports are decimal numbers")
        ports = int(words[4]), int(words[5])
    except ValueError:
        raise ProxyError("malformed PROXY v1 addresses") from None
    if source.version != version or destination.version != version \
            or not all(0 <= p < 65536 for p in ports):
        raise ProxyError("malformed PROXY v1 addresses")
    return ProxyHeader((str(source), ports[0]), (str(destination), ports[1]), end + 2)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        return None
    version_command, family, length = struct.unpack("!BBH", data[12:16])
    if version_command >> 4 != 2 or version_command & 0x0F not in (0, 1):
        raise ProxyError("unsupported PROXY v2 version or command")
    total = 16 + length
    if len(data) < total:
        return None
    if version_command & 0x0F == 0:  # LOCAL: a health check from the proxy itself
        return ProxyHeader(None, None, total)
    body = data[16:total]
    source: ipaddress.IPv4Address | ipaddress.IPv6Address
    destination: ipaddress.IPv4Address | ipaddress.IPv6Address
    if family == 0x11 and length >= 12:
        source, destination = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
        ports = struct.unpack("!HH", body[8:12])
    elif family == 0x21 and length >= 36:
        source, destination = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        ports = struct.unpack("!HH", body[32:36])
    elif family in V2_OTHER_FAMILIES:  # valid but not TCP: treated as UNSPEC (spec §2.2)
        return ProxyHeader(None, None, total)
    else:
        raise ProxyError("unsupported PROXY v2 address family")
    return ProxyHeader((str(source), ports[0]), (str(destination), ports[1]), total)
