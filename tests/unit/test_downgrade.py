"""The 8BITMIME downgrade (tayori.deliver.downgrade), judged by the ``email`` package.

Every case checks the same contract: the output is 7bit data (ASCII, no NUL, CRLF only,
lines of at most 998 octets), it parses to the same tree of content types with the same
decoded leaves as the input, and it differs from the input exactly when
``needs_downgrade`` said so.
"""

from __future__ import annotations

import email
import email.message
import email.utils
from email.header import decode_header, make_header

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tayori.deliver.downgrade import downgrade, needs_downgrade

Tree = list[tuple[str, bytes | None]]


def parse(raw: bytes) -> email.message.Message:
    return email.message_from_bytes(raw)


def mime_tree(raw: bytes) -> Tree:
    """Content types in walk order, with each leaf's decoded payload (None for containers)."""
    return [(part.get_content_type(),
             None if part.is_multipart() else part.get_payload(decode=True))
            for part in parse(raw).walk()]


def assert_7bit(out: bytes) -> None:
    assert out.isascii(), "8-bit octets left"
    assert b"\x00" not in out, "NUL left"
    lines = out.split(b"\r\n")
    assert not any(b"\r" in line or b"\n" in line for line in lines), "bare CR or LF"
    assert max(map(len, lines)) <= 998, "line over 998 octets"


def assert_downgraded(raw: bytes) -> bytes:
    """Downgrade ``raw`` and check the whole contract; returns the output."""
    out = downgrade(raw)
    assert_7bit(out)
    assert mime_tree(out) == mime_tree(raw)
    assert (out != raw) == needs_downgrade(raw)
    return out


def header_text(raw: bytes, name: str) -> str:
    """A header field as a reader shows it (RFC 2047 decoded)."""
    value = parse(raw)[name]
    assert value is not None
    return str(make_header(decode_header(str(value))))


def message(header: str, body: bytes) -> bytes:
    return header.replace("\n", "\r\n").encode() + b"\r\n" + body


SIMPLE = message("Subject: hello\nContent-Type: text/plain; charset=utf-8\n"
                 "Content-Transfer-Encoding: 8bit\n",
                 "Grüße aus Köln,\r\nes ist schön hier.\r\n-- \r\nJürgen\r\n".encode())

ALTERNATIVE = message(
    'MIME-Version: 1.0\nContent-Type: multipart/alternative; boundary="=_alt"\n',
    b"This is a multi-part message.\r\n"
    b"--=_alt\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    b"\r\n" + "Prix : 10 €, café compris\r\n".encode() +
    b"--=_alt\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    b"\r\n" + "<p>Prix : 10 €, café compris</p>\r\n".encode() +
    b"--=_alt--\r\nepilogue\r\n")


def test_already_7bit_is_returned_unchanged() -> None:
    raw = message("Subject: plain\nContent-Type: text/plain\n", b"Just ASCII.\r\n")
    assert not needs_downgrade(raw)
    assert downgrade(raw) is raw


def test_simple_8bit_text_becomes_quoted_printable() -> None:
    out = assert_downgraded(SIMPLE)
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in out
    assert b"Content-Transfer-Encoding: 8bit" not in out
    assert b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln,\r\n" in out
    assert b"\r\n-- \r\n" not in out  # a line starting "--" is escaped: no forged delimiter
    assert out.startswith(b"Subject: hello\r\nContent-Type: text/plain; charset=utf-8\r\n")


def test_multipart_alternative_keeps_structure_bytes() -> None:
    out = assert_downgraded(ALTERNATIVE)
    assert out.startswith(ALTERNATIVE[:ALTERNATIVE.index(b"--=_alt\r\n") + 9])
    assert out.endswith(b"\r\n--=_alt--\r\nepilogue\r\n")
    assert out.count(b"Content-Transfer-Encoding: quoted-printable\r\n") == 2


def test_nested_multipart_rewrites_only_the_8bit_leaf() -> None:
    seven_bit_part = (b"--outer\r\nContent-Type: text/plain\r\n\r\nuntouched 7-bit text\r\n")
    raw = message(
        'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="outer"\n'
        "Content-Transfer-Encoding: 8bit\n",
        b"--outer\r\nContent-Type: multipart/alternative; boundary=inner\r\n\r\n"
        b"--inner\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" +
        "naïve\r\n".encode() + b"--inner--\r\n\r\n" + seven_bit_part + b"--outer--\r\n")
    out = assert_downgraded(raw)
    assert seven_bit_part in out
    assert b"Content-Transfer-Encoding: 7bit\r\n\r\n--outer\r\n" in out
    assert b"--inner--\r\n\r\n--outer\r\n" in out


def test_message_rfc822_is_downgraded_inside() -> None:
    inner = message("From: a@example.org\nSubject: Überweisung\n"
                    "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n",
                    "Betrag: 5 €\r\n".encode())
    raw = message('MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n',
                  b"--b\r\nContent-Type: text/plain\r\n\r\nforwarded:\r\n"
                  b"--b\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n"
                  b"\r\n" + inner + b"--b--\r\n")
    out = assert_downgraded(raw)
    forwarded = parse(out).get_payload()[1]
    assert forwarded["Content-Transfer-Encoding"] == "7bit"
    embedded = forwarded.get_payload()[0]
    assert str(make_header(decode_header(embedded["Subject"]))) == "Überweisung"
    assert embedded["Content-Transfer-Encoding"] == "quoted-printable"


def test_8bit_subject_becomes_rfc2047_utf8() -> None:
    subject = "Re: [tayori-dev] Grüße — ein sehr langer Betreff, der über mehrere Zeilen " \
              "gefaltet werden muss, weil er länger als 76 Zeichen ist"
    raw = message(f"Subject: {subject}\nFrom: plain@example.org\n", b"body\r\n")
    out = assert_downgraded(raw)
    assert header_text(out, "Subject") == subject
    assert b"Subject: Re: [tayori-dev] =?utf-8?" in out
    field = out.split(b"\r\nFrom:")[0]
    assert all(len(line) <= 76 for line in field.split(b"\r\n"))
    assert out.endswith(b"From: plain@example.org\r\n\r\nbody\r\n")


def test_8bit_header_that_is_not_utf8_is_unknown_8bit() -> None:
    raw = b"Subject: caf\xe9 cr\xe8me\r\n\r\nbody\r\n"
    out = assert_downgraded(raw)
    assert b"=?unknown-8bit?" in out
    parts = decode_header(parse(out)["Subject"])
    assert b"".join(text if isinstance(text, bytes) else text.encode() for text, _ in parts) \
        == b"caf\xe9 cr\xe8me"


def test_address_fields_encode_display_names_and_idna_domains() -> None:
    raw = message('From: Jürgen Müller <juergen@example.org>\n'
                  'To: "Ünal, Ayşe" <ayse@bücher.example>, plain@example.org (Grüße)\n'
                  'Cc: J. Dœ <j@example.org>\n',
                  b"body\r\n")
    out = assert_downgraded(raw)
    sender = parse(out)
    assert email.utils.getaddresses([header_text(out, "Cc")]) == [("J. Dœ", "j@example.org")]
    assert email.utils.getaddresses([header_text(out, "From")]) == \
        [("Jürgen Müller", "juergen@example.org")]
    assert email.utils.getaddresses([str(sender["To"])])[0][1] == "ayse@xn--bcher-kva.example"
    assert header_text(out, "To").startswith("Ünal, Ayşe")


def test_lines_with_encoded_words_stay_within_76_characters() -> None:
    long = "Ärger und Verdruß " * 12
    raw = message(f"From: {long}<a@example.org> ({long})\nSubject: {long}\n"
                  f"Content-Type: text/plain; {long.strip()}=x; charset=utf-8\n", b"body\r\n")
    out = assert_downgraded(raw)
    header = out.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert all(len(line) <= 76 for line in header if b"=?" in line)
    assert header_text(out, "Subject") == long.strip()
    assert parse(out).get_content_charset() == "utf-8"


def test_address_with_8bit_local_part_becomes_an_empty_group() -> None:
    raw = message("To: José <josé@example.org>\n", b"body\r\n")
    out = assert_downgraded(raw)
    assert out.startswith(b"To: =?utf-8?")
    assert b"?= :;\r\n" in out
    assert header_text(out, "To") == "José <josé@example.org> :;"


def test_8bit_filename_becomes_rfc2231() -> None:
    raw = message('MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n',
                  b"--b\r\nContent-Type: application/pdf\r\n" +
                  'Content-Disposition: attachment; filename="Prüfbericht März.pdf"\r\n'.encode() +
                  b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--b--\r\n")
    out = assert_downgraded(raw)
    assert b"filename*=utf-8''Pr%C3%BCfbericht%20M%C3%A4rz.pdf" in out
    assert parse(out).get_payload()[0].get_filename() == "Prüfbericht März.pdf"


def test_binary_part_becomes_base64() -> None:
    blob = bytes(range(256)) * 8 + b"\r\n--bx\r\n--b -\r\n"   # lines like delimiters
    raw = message('MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n',
                  b"--b\r\nContent-Type: application/octet-stream\r\n"
                  b"Content-Transfer-Encoding: binary\r\n\r\n" + blob + b"\r\n--b--\r\n")
    out = assert_downgraded(raw)
    assert b"Content-Transfer-Encoding: base64\r\n" in out
    assert parse(out).get_payload()[0].get_payload(decode=True) == blob


def test_long_lines_in_7bit_text_become_quoted_printable() -> None:
    raw = message("Content-Type: text/plain\n", b"x" * 2500 + b"\r\nshort\r\n")
    assert needs_downgrade(raw)
    out = assert_downgraded(raw)
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in out
    assert b"MIME-Version: 1.0\r\n" in out


def test_8bit_part_that_is_ascii_keeps_its_label() -> None:
    raw = ALTERNATIVE.replace("10 €, café".encode(), b"10 EUR, cafe")
    assert not needs_downgrade(raw)
    assert downgrade(raw) is raw


def test_malformed_missing_close_delimiter() -> None:
    raw = message('MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n',
                  b"--b\r\nContent-Type: text/plain\r\n\r\nfirst\r\n"
                  b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" +
                  "zweite Straße\r\n".encode())
    out = assert_downgraded(raw)
    assert len(mime_tree(out)) == 3


def test_malformed_missing_close_delimiter_nested() -> None:
    raw = message('Content-Type: multipart/mixed; boundary="outer"\n',
                  b"--outer\r\nContent-Type: multipart/mixed; boundary=inner\r\n\r\n"
                  b"--inner\r\nContent-Type: text/plain\r\n\r\n" + "größer\r\n\r\n".encode() +
                  b"--outer\r\nContent-Type: text/plain\r\n\r\n" + "ende\xc3\xa9".encode() +
                  b"\r\n--outer--\r\n")
    assert_downgraded(raw)


@pytest.mark.parametrize("body", [
    b"no delimiter at all: caf\xc3\xa9\r\n",
    b"--b--\r\nclose delimiter first caf\xc3\xa9\r\n",
    b"pr\xc3\xa9amble caf\xc3\xa9\r\n--b--\r\n",
])
def test_multipart_without_first_delimiter_is_a_leaf(body: bytes) -> None:
    raw = message('Content-Type: multipart/mixed; boundary="b"\n', body)
    out = assert_downgraded(raw)
    assert not parse(out).is_multipart()


def test_multipart_without_boundary_nested() -> None:
    raw = message('Content-Type: multipart/mixed; boundary="b"\n',
                  b"--b\r\nContent-Type: multipart/related\r\n\r\nna\xc3\xafve\r\n--b--\r\n")
    assert_downgraded(raw)


def test_8bit_boundary_makes_the_multipart_opaque() -> None:
    raw = message('Content-Type: multipart/mixed; boundary="gr\xc3\xbc\xc3\x9fe"\n',
                  b"--gr\xc3\xbc\xc3\x9fe\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
                  b"--gr\xc3\xbc\xc3\x9fe--\r\n")
    assert_downgraded(raw)


def test_preamble_and_epilogue_8bit_become_question_marks() -> None:
    raw = ALTERNATIVE.replace(b"This is a multi-part message.",
                              "Dies ist eine mehrteilige Nachricht (größer).".encode())
    out = assert_downgraded(raw)
    assert b"(gr????er)" in out


def test_part_without_content_type_gets_a_charset() -> None:
    out = assert_downgraded(message("Subject: legacy\n", "8-bit Text ohne MIME: é\r\n".encode()))
    assert b"Content-Type: text/plain; charset=utf-8\r\n" in out
    latin1 = assert_downgraded(message("Subject: legacy\n", b"Latin-1: \xe9\r\n"))
    assert b"Content-Type: text/plain; charset=unknown-8bit\r\n" in latin1


def test_body_without_header_separator() -> None:
    raw = b"Subject: x\r\nSecond line is body: caf\xc3\xa9\r\n"
    assert_downgraded(raw)


def test_base64_label_with_junk_octets_is_cleaned() -> None:
    raw = message("Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n",
                  b"AAEC\xff\xfeAwQF\r\n" + b"QUJD" * 400 + b"\r\n")
    out = assert_downgraded(raw)
    assert b"\r\n\r\nAAECAwQFQUJD" in out


def test_quoted_printable_label_with_raw_8bit() -> None:
    raw = message("Content-Type: text/plain\nContent-Transfer-Encoding: quoted-printable\n",
                  b"caf\xc3\xa9 =C3=A9 soft=\r\nbreak\r\n")
    assert_downgraded(raw)


def test_delivery_status_blocks() -> None:
    raw = message(
        'Content-Type: multipart/report; report-type=delivery-status; boundary="r"\n',
        b"--r\r\nContent-Type: text/plain\r\n\r\nfailed\r\n"
        b"--r\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mx.example\r\n\r\n"
        b"Final-Recipient: rfc822; a@example.org\r\nAction: failed\r\n"
        b"Diagnostic-Code: smtp; 550 Benutzer unbekannt: J\xc3\xbcrgen\r\n"
        b"--r--\r\n")
    out = assert_downgraded(raw)
    assert b"=?utf-8?" in out


def test_lf_only_message_is_made_crlf() -> None:
    raw = SIMPLE.replace(b"\r\n", b"\n")
    out = downgrade(raw)
    assert_7bit(out)
    expected = mime_tree(SIMPLE)
    assert mime_tree(out) == expected


def test_ascii_lf_only_message_only_changes_line_ends() -> None:
    raw = b"Subject: x\n\nline\n"
    assert needs_downgrade(raw)
    assert downgrade(raw) == b"Subject: x\r\n\r\nline\r\n"


def test_long_header_line_is_folded() -> None:
    raw = message("X-Long: " + " ".join(["word"] * 400) + "\n", b"body\r\n")
    out = assert_downgraded(raw)
    assert parse(out)["X-Long"].replace("\r\n", "") == " ".join(["word"] * 400)


def test_soft_line_break_never_starts_a_line_with_two_dashes() -> None:
    line = "é" + "x" * 69 + "--b--"   # a 76-character wrap would leave "--b--" on a line
    raw = message('Content-Type: multipart/mixed; boundary="b"\n',
                  b"--b\r\nContent-Type: text/plain\r\n\r\n" + line.encode() + b"\r\n--b--\r\n")
    out = assert_downgraded(raw)
    assert b"=\r\n=2D-b--\r\n--b--\r\n" in out


def test_header_line_without_blanks_is_folded_hard() -> None:
    raw = message("Subject: caf\u00e9\nX-Token: " + "t" * 3000 + "\n", b"body\r\n")
    out = assert_downgraded(raw)
    assert parse(out)["X-Token"].replace("\r\n ", "") == "t" * 3000


def test_8bit_parameter_name_keeps_the_type() -> None:
    raw = message("Content-Type: text/plain; n\u00e4me=x; charset=us-ascii\n", b"body\r\n")
    out = assert_downgraded(raw)
    assert parse(out).get_content_charset() == "us-ascii"


def test_lone_cr_before_delimiter_is_a_line_end_as_for_email() -> None:
    raw = message('Content-Type: multipart/mixed; boundary="b"\n',
                  b"--b\r\nContent-Type: text/plain\r\n\r\ncaf\xc3\xa9\r--b\r\n\r\nx\r\n--b--\r\n")
    assert len(mime_tree(raw)) == 3
    assert_downgraded(raw)


def test_digest_default_type_is_message() -> None:
    inner = message("Subject: one\n", "caf\xe9".encode() + b"\r\n")
    raw = message('Content-Type: multipart/digest; boundary="d"\n',
                  b"--d\r\n\r\n" + inner + b"--d--\r\n")
    assert_downgraded(raw)
    assert mime_tree(raw)[1][0] == "message/rfc822"


def test_deep_nesting_does_not_recurse_forever() -> None:
    depth = 300
    head = b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
                    for i in range(depth))
    raw = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n" + head + \
        b"--b%d\r\nContent-Type: text/plain\r\n\r\n\xc3\xa9\r\n" % depth
    out = downgrade(raw)
    assert_7bit(out)


# --- property tests ----------------------------------------------------------------------

LABELS = [None, "7bit", "8bit", "binary", "8BIT", "x-unknown", "quoted-printable", "base64"]


def single_part(body: bytes, label: str | None, ctype: str) -> bytes:
    cte = f"Content-Transfer-Encoding: {label}\n" if label else ""
    return message(f"Subject: t\nContent-Type: {ctype}\n{cte}", body)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=3000), label=st.sampled_from(LABELS),
       ctype=st.sampled_from(["text/plain; charset=utf-8", "application/octet-stream"]))
def test_random_single_part_keeps_decoded_payload(body: bytes, label: str | None,
                                                  ctype: str) -> None:
    assert_downgraded(single_part(body, label, ctype))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(bodies=st.lists(st.tuples(st.binary(max_size=800), st.sampled_from(LABELS)),
                       min_size=1, max_size=4))
def test_random_parts_in_multipart_keep_decoded_payloads(
        bodies: list[tuple[bytes, str | None]]) -> None:
    parts = []
    for body, label in bodies:
        cte = f"Content-Transfer-Encoding: {label}\r\n" if label else ""
        parts.append(b"--XyZ\r\nContent-Type: text/plain\r\n" + cte.encode() + b"\r\n" +
                     body.replace(b"--XyZ", b"--xyz") + b"\r\n")
    raw = message('Content-Type: multipart/mixed; boundary="XyZ"\n',
                  b"".join(parts) + b"--XyZ--\r\n")
    assert_downgraded(raw)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=8)), max_size=6),
       end=st.integers(0, 10_000))
def test_mangled_messages_never_raise_and_come_out_7bit(cuts: list[tuple[int, bytes]],
                                                        end: int) -> None:
    raw = bytearray(ALTERNATIVE.replace(b"epilogue", b"pr\xc3\xa9" * 3))
    for position, junk in cuts:
        raw[position % (len(raw) + 1):position % (len(raw) + 1)] = junk
    out = downgrade(bytes(raw[:end % (len(raw) + 1)]))
    assert_7bit(out)
