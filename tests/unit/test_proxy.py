"""Unit tests for tayori.receive.proxy: PROXY protocol v1 (text) and v2 (binary) headers."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tayori.receive.proxy import V2_SIGNATURE, ProxyError, ProxyHeader, parse

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)


def v2(command: int, family: int, body: bytes, version: int = 2) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", (version << 4) | command, family, len(body)) + body


def v2_inet4(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    body = (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
            + struct.pack("!HH", sport, dport) + tlvs)
    return v2(0x1, 0x11, body)


def v2_inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    body = (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
            + struct.pack("!HH", sport, dport))
    return v2(0x1, 0x21, body)


# --- v1 ----------------------------------------------------------------------------------


def test_v1_tcp4() -> None:
    header = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n"
    assert parse(header + b"EHLO x\r\n") == ProxyHeader(("192.0.2.1", 56324),
                                                       ("198.51.100.2", 25), len(header))


def test_v1_tcp6() -> None:
    header = b"PROXY TCP6 2001:db8::1 2001:db8:0:0:0:0:0:2 65535 0\r\n"
    assert parse(header) == ProxyHeader(("2001:db8::1", 65535), ("2001:db8::2", 0),
                                        len(header))


def test_v1_longest_legal_header() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    header = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(header) == 104
    result = parse(header)
    assert result is not None and result.length == len(header)


@pytest.mark.parametrize("header", [b"PROXY UNKNOWN\r\n",
                                    b"PROXY UNKNOWN ::1 ::2 1 2\r\n"])
def test_v1_unknown(header: bytes) -> None:
    assert parse(header + b"220") == ProxyHeader(None, None, len(header))


@pytest.mark.parametrize(
    "data",
    [b"", b"P", b"PROX", b"PROXY", b"PROXY ", b"PROXY TCP4 192.0.2.1",
     b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25", b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r"],
)
def test_v1_incomplete(data: bytes) -> None:
    assert parse(data) is None


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO client.example\r\n",
        b"proxy TCP4 192.0.2.1 198.51.100.2 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n",
        b"PROXY TCP5 192.0.2.1 198.51.100.2 1 2\r\n",
        b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
        b"PROXY TCP6 192.0.2.1 198.51.100.2 1 2\r\n",
        b"PROXY TCP4 192.0.2.256 198.51.100.2 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 x 2\r\n",
        b"PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n",
        b"PROXY " + b"x" * 200,
    ],
)
def test_v1_malformed(data: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(data)


def test_v1_without_crlf_in_107_octets_is_invalid_even_when_it_arrives_at_once() -> None:
    """PROXY protocol spec §2.1: "If the CRLF sequence is not found in the first 107
    characters, the receiver should declare the line invalid." The parser already does so
    when the first read holds 107+ octets without CRLF; an over-long line that arrives
    together with its CRLF must not be accepted either."""
    with pytest.raises(ProxyError):
        parse(b"PROXY UNKNOWN " + b"x" * 200 + b"\r\n")


@pytest.mark.parametrize("port", [b"+25", b"2_5"])
def test_v1_ports_are_plain_decimal(port: bytes) -> None:
    """PROXY protocol spec §2.1: a port is "a decimal integer in the range [0..65535]"."""
    with pytest.raises(ProxyError):
        parse(b"PROXY TCP4 192.0.2.1 198.51.100.2 " + port + b" 25\r\n")


# --- v2 ----------------------------------------------------------------------------------


def test_v2_ipv4() -> None:
    header = v2_inet4("192.0.2.1", "198.51.100.2", 56324, 25)
    assert len(header) == 16 + 12
    assert parse(header + b"EHLO") == ProxyHeader(("192.0.2.1", 56324), ("198.51.100.2", 25), 28)


def test_v2_ipv4_with_tlvs() -> None:
    tlv = struct.pack("!BH", 0x04, 3) + b"abc"  # PP2_TYPE_NOOP
    header = v2_inet4("192.0.2.1", "198.51.100.2", 1, 2, tlvs=tlv)
    result = parse(header + b"more")
    assert result == ProxyHeader(("192.0.2.1", 1), ("198.51.100.2", 2), len(header))


def test_v2_ipv6() -> None:
    header = v2_inet6("2001:db8::1", "2001:db8::2", 40000, 587)
    assert parse(header) == ProxyHeader(("2001:db8::1", 40000), ("2001:db8::2", 587), 52)


def test_v2_local() -> None:
    header = v2(0x0, 0x00, b"")
    assert parse(header + b"EHLO") == ProxyHeader(None, None, 16)
    with_body = v2(0x0, 0x11, b"\x00" * 12)
    assert parse(with_body) == ProxyHeader(None, None, 28)


def test_v2_unspec_family() -> None:
    assert parse(v2(0x1, 0x00, b"")) == ProxyHeader(None, None, 16)


@pytest.mark.parametrize(("family", "length"), [(0x12, 12), (0x22, 36), (0x31, 216),
                                                (0x32, 216)])
def test_v2_other_valid_families_fall_back_to_unspec(family: int, length: int) -> None:
    """PROXY protocol spec §2.2: "Only the UNSPEC protocol byte (\\x00) is mandatory to
    implement on the receiver. A receiver is not required to implement other ones, provided
    that it automatically falls back to the UNSPEC mode for the valid combinations above
    that it does not support." UDP and UNIX sources are valid: no addresses, no error."""
    assert parse(v2(0x1, family, b"\x00" * length)) == ProxyHeader(None, None, 16 + length)


@pytest.mark.parametrize("cut", [1, 5, 12, 13, 15, 16, 20, 27])
def test_v2_incomplete(cut: int) -> None:
    assert parse(v2_inet4("192.0.2.1", "198.51.100.2", 1, 2)[:cut]) is None


@pytest.mark.parametrize(
    "data",
    [
        v2(0x1, 0x11, b"\x00" * 12, version=1),
        v2(0x1, 0x11, b"\x00" * 12, version=3),
        v2(0x2, 0x11, b"\x00" * 12),
        v2(0x1, 0x11, b"\x00" * 11),
        v2(0x1, 0x21, b"\x00" * 35),
        v2(0x1, 0x41, b"\x00" * 12),
        v2(0x1, 0x13, b"\x00" * 12),
        b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c" + b"\x00" * 12,
    ],
)
def test_v2_malformed(data: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(data)


@PROPERTY
@given(st.binary(max_size=120))
def test_parse_raises_only_proxy_error(data: bytes) -> None:
    for candidate in (data, b"PROXY " + data, V2_SIGNATURE + data):
        try:
            result = parse(candidate)
        except ProxyError:
            continue
        if result is not None:
            assert 0 < result.length <= len(candidate)


@PROPERTY
@given(st.ip_addresses(v=4), st.ip_addresses(v=4), st.integers(0, 65535), st.integers(0, 65535))
def test_v1_and_v2_agree(src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, sport: int,
                         dport: int) -> None:
    text = f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode()
    one, two = parse(text), parse(v2_inet4(str(src), str(dst), sport, dport))
    assert one is not None and two is not None
    assert (one.client, one.server) == (two.client, two.server) == ((str(src), sport),
                                                                    (str(dst), dport))
