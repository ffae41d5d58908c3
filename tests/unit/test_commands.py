"""Unit and property tests for tayori.smtp.commands: command lines and ESMTP parameters."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tayori.smtp.commands import (
    MailParams,
    ParamError,
    RcptParams,
    parse_command,
    parse_mail_params,
    parse_rcpt_params,
    split_params,
)

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)

ALL = frozenset({"SIZE", "8BITMIME", "SMTPUTF8", "DSN", "BINARYMIME", "CHUNKING"})
MAX = 10_000


def mail(text: str, offered: frozenset[str] = ALL, max_size: int = MAX) -> MailParams:
    return parse_mail_params(text, offered, max_size)


def rcpt(text: str, offered: frozenset[str] = ALL, smtputf8: bool = False) -> RcptParams:
    return parse_rcpt_params(text, offered, smtputf8)


def refused(call: object, *args: object, **kwargs: object) -> tuple[int, str | None]:
    assert callable(call)
    with pytest.raises(ParamError) as info:
        call(*args, **kwargs)
    return info.value.reply.code, info.value.reply.status


# --- parse_command -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "verb", "argument"),
    [
        (b"MAIL FROM:<a@b.example>", "MAIL", "FROM:<a@b.example>"),
        (b"mail FROM:<a@b.example> SIZE=1", "MAIL", "FROM:<a@b.example> SIZE=1"),
        (b"NOOP", "NOOP", ""),
        (b"rSeT", "RSET", ""),
        (b"EHLO  two spaces", "EHLO", " two spaces"),
        (b"", "", ""),
        ("RCPT TO:<用户@例子.广告>".encode(), "RCPT", "TO:<用户@例子.广告>"),
    ],
)
def test_parse_command(line: bytes, verb: str, argument: str) -> None:
    assert parse_command(line) == (verb, argument)


def test_parse_command_rejects_bad_utf8() -> None:
    with pytest.raises(UnicodeDecodeError):
        parse_command(b"MAIL FROM:<\xff@b.example>")


# --- split_params ------------------------------------------------------------------------


def test_split_params() -> None:
    assert split_params("") == {}
    assert split_params("  size=10   body=8BITMIME SMTPUTF8 ") == {
        "SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": None}
    assert split_params("X-FOO=a=b") == {"X-FOO": "a=b"}


@pytest.mark.parametrize(
    "text", ["=1", "-X=1", "SIZE=", "A_B=1", "é=1", "SIZE=1 size=2", "SMTPUTF8 SMTPUTF8=x"]
)
def test_split_params_malformed_or_conflicting(text: str) -> None:
    assert refused(split_params, text) == (501, "5.5.4")


def test_split_params_identical_repeat_taken_once() -> None:
    """smtplib repeats SMTPUTF8; the same keyword with the same value is taken once."""
    assert split_params("SMTPUTF8 smtputf8") == {"SMTPUTF8": None}
    assert split_params("SIZE=1 size=1") == {"SIZE": "1"}


@PROPERTY
@given(st.text(max_size=60))
def test_split_params_raises_only_param_error(text: str) -> None:
    try:
        params = split_params(text)
    except ParamError as exc:
        assert exc.reply.code == 501
    else:
        assert all(key == key.upper() for key in params)


# --- MAIL parameters ---------------------------------------------------------------------


def test_mail_defaults() -> None:
    assert mail("") == MailParams(size=None, body="7BIT", smtputf8=False, ret=None, envid=None)


def test_mail_all_parameters() -> None:
    params = mail("SIZE=1000 BODY=8bitmime SMTPUTF8 RET=hdrs ENVID=QQ314159+2Bx")
    assert params == MailParams(size=1000, body="8BITMIME", smtputf8=True, ret="HDRS",
                                envid="QQ314159+2Bx")


@pytest.mark.parametrize(("value", "size"), [("0", 0), ("10000", 10000), ("00012", 12)])
def test_mail_size(value: str, size: int) -> None:
    assert mail(f"SIZE={value}").size == size


def test_mail_size_without_limit() -> None:
    assert mail("SIZE=99999999999999999999", max_size=0).size == 99999999999999999999


def test_mail_size_over_limit_is_552() -> None:
    assert refused(mail, "SIZE=10001") == (552, "5.3.4")


@pytest.mark.parametrize(
    "value", ["abc", "-1", "1.5", "1e3", "999999999999999999999", "0x10", "1_000", "²", "¹²"]
)
def test_mail_size_malformed_is_501(value: str) -> None:
    """RFC 1870: size-value ::= 1*20DIGIT (ASCII digits only)."""
    assert refused(mail, f"SIZE={value}", max_size=0) == (501, "5.5.4")


@pytest.mark.parametrize("body", ["7BIT", "8BITMIME", "8bitmime"])
def test_mail_body_values(body: str) -> None:
    assert mail(f"BODY={body}").body == body.upper()


def test_mail_binarymime_only_when_offered() -> None:
    assert mail("BODY=BINARYMIME").body == "BINARYMIME"
    assert refused(mail, "BODY=BINARYMIME", ALL - {"BINARYMIME"}) == (501, "5.5.4")


@pytest.mark.parametrize("body", ["8BIT", "QUOTED", "BINARY"])
def test_mail_body_bad_value(body: str) -> None:
    assert refused(mail, f"BODY={body}") == (501, "5.5.4")


def test_mail_smtputf8_takes_no_value() -> None:
    assert mail("SMTPUTF8").smtputf8
    assert refused(mail, "SMTPUTF8=yes") == (501, "5.5.4")


@pytest.mark.parametrize(("value", "ret"), [("FULL", "FULL"), ("hdrs", "HDRS")])
def test_mail_ret(value: str, ret: str) -> None:
    assert mail(f"RET={value}").ret == ret


@pytest.mark.parametrize("text", ["RET=BOTH", "RET"])
def test_mail_ret_bad(text: str) -> None:
    assert refused(mail, text) == (501, "5.5.4")


def test_mail_envid_at_most_100() -> None:
    assert mail("ENVID=" + "x" * 100).envid == "x" * 100
    assert refused(mail, "ENVID=" + "x" * 101) == (501, "5.5.4")


@pytest.mark.parametrize("value", ["a+2b", "a+", "a+GG", "é", "a=b"])
def test_mail_envid_must_be_xtext(value: str) -> None:
    assert refused(mail, f"ENVID={value}") == (501, "5.5.4")


def test_mail_envid_without_value() -> None:
    assert refused(mail, "ENVID") == (501, "5.5.4")


@pytest.mark.parametrize(
    ("text", "offered"),
    [
        ("SIZE=1", ALL - {"SIZE"}),
        ("BODY=8BITMIME", ALL - {"8BITMIME"}),
        ("SMTPUTF8", ALL - {"SMTPUTF8"}),
        ("RET=FULL", ALL - {"DSN"}),
        ("ENVID=x", ALL - {"DSN"}),
        ("AUTH=<>", ALL),
        ("X-UNKNOWN", ALL),
        ("NOTIFY=NEVER", ALL),
        ("SIZE=1", frozenset()),
    ],
)
def test_mail_not_offered_is_555(text: str, offered: frozenset[str]) -> None:
    assert refused(mail, text, offered) == (555, "5.5.4")


@pytest.mark.parametrize(
    "text", ["SIZE=1 SIZE=2", "size=1 SIZE=01", "RET=FULL ret=HDRS", "BODY=7BIT body=8BITMIME",
             "ENVID=a ENVID=b"]
)
def test_mail_conflicting_duplicates_are_501(text: str) -> None:
    assert refused(mail, text) == (501, "5.5.4")


def test_mail_identical_duplicates_are_accepted() -> None:
    assert mail("SMTPUTF8 SMTPUTF8 SIZE=5 SIZE=5") == MailParams(size=5, smtputf8=True)


# --- RCPT parameters ---------------------------------------------------------------------


def test_rcpt_defaults() -> None:
    assert rcpt("") == RcptParams(notify=None, orcpt=None)


@pytest.mark.parametrize(
    ("value", "notify"),
    [
        ("NEVER", ("NEVER",)),
        ("never", ("NEVER",)),
        ("SUCCESS", ("SUCCESS",)),
        ("SUCCESS,FAILURE", ("SUCCESS", "FAILURE")),
        ("delay,failure,success", ("DELAY", "FAILURE", "SUCCESS")),
    ],
)
def test_rcpt_notify(value: str, notify: tuple[str, ...]) -> None:
    assert rcpt(f"NOTIFY={value}").notify == notify


@pytest.mark.parametrize(
    "value",
    ["NEVER,SUCCESS", "FAILURE,NEVER", "NEVER,NEVER", "SUCCESS,SUCCESS", "SUCCESS,", ",DELAY",
     "ALWAYS", "SUCCESS;FAILURE"],
)
def test_rcpt_notify_invalid(value: str) -> None:
    assert refused(rcpt, f"NOTIFY={value}") == (501, "5.5.4")


def test_rcpt_notify_needs_value() -> None:
    assert refused(rcpt, "NOTIFY") == (501, "5.5.4")


@pytest.mark.parametrize(
    "value", ["rfc822;user@example.com", "RFC822;a+2Bb@example.com", "rfc822;x+20y@example.com"]
)
def test_rcpt_orcpt_rfc822(value: str) -> None:
    assert rcpt(f"ORCPT={value}").orcpt == value  # stored as sent, still xtext


@pytest.mark.parametrize(
    "value",
    ["rfc822;", "rfc822", ";user@example.com", "rfc822;a+2bb@example.com", "rfc822;a=b",
     "x400;user@example.com", "rfc822;" + "a" * 500],
)
def test_rcpt_orcpt_invalid(value: str) -> None:
    assert refused(rcpt, f"ORCPT={value}") == (501, "5.5.4")


def test_rcpt_orcpt_utf8_only_with_smtputf8() -> None:
    value = "utf-8;用户@例子.广告"
    assert rcpt(f"ORCPT={value}", smtputf8=True).orcpt == value
    assert rcpt("ORCPT=utf-8;a\\x{2B}b@example.com", smtputf8=True).orcpt is not None
    assert refused(rcpt, f"ORCPT={value}", smtputf8=False) == (501, "5.5.4")


@pytest.mark.parametrize("value", ["utf-8;a+b@example.com", "utf-8;a\\b@example.com",
                                   "utf-8;a\\x{2b}@example.com"])
def test_rcpt_orcpt_utf8_invalid(value: str) -> None:
    assert refused(rcpt, f"ORCPT={value}", smtputf8=True) == (501, "5.5.4")


@pytest.mark.parametrize(("value", "utf8"), [
    ("rfc822;x+0D+0AAuthentication-Results:+20mx.tayori.test;+20dkim=pass", False),
    ("rfc822;x+0A+0AFrom+20evil@example.net", False),
    ("rfc822;a+00b@example.com", False),
    ("rfc822;a+7Fb@example.com", False),
    ("rfc822;a+09b@example.com", False),
    ("RFC822;a+0db@example.com", False),
    ("utf-8;a\\x{0D}\\x{0A}b@example.com", True),
    ("utf-8;a\\x{85}b@example.com", True),        # NEL, a C1 control
    ("utf-8;a\\x{2028}b@example.com", True),      # LINE SEPARATOR
    ("utf-8;a\\x{D800}b@example.com", True),      # a lone surrogate
    ("utf-8;a\\x{110000}b@example.com", True),    # no code point at all
    ("utf-8;a\x9bb@example.com", True),           # CSI, a C1 control, raw
])
def test_rcpt_orcpt_with_a_control_character_is_501(value: str, utf8: bool) -> None:
    """A decoded ORCPT is written as a header line (Delivered-To, Original-Recipient):
    CR, LF, NUL or any other control would forge header lines (RFC 3461 §4.2)."""
    code, status = refused(rcpt, f"ORCPT={value}", smtputf8=utf8)
    assert (code, status) == (501, "5.5.4")


@pytest.mark.parametrize("value", [
    "rfc822;u+40example.com+20x", "rfc822;+7E+21", "utf-8;a\\x{20}b@example.com",
    "utf-8;a\\x{2B}b@example.com", "utf-8;ü@example.com",
])
def test_rcpt_orcpt_printable_escapes_are_fine(value: str) -> None:
    assert rcpt(f"ORCPT={value}", smtputf8=True).orcpt == value


@pytest.mark.parametrize("text", [
    "ENVID=a+0Db", "ENVID=+0A", "ENVID=a+00", "ENVID=a+7F", "ENVID=a+C2+85",
    "AUTH=a+0D+0Ab@example.com", "AUTH=+09a@example.com",
])
def test_mail_envid_and_auth_with_a_control_character_are_501(text: str) -> None:
    assert refused(mail, text, ALL | {"AUTH"}) == (501, "5.5.4")


def test_mail_envid_and_auth_printable_escapes_are_fine() -> None:
    params = mail("ENVID=a+20b AUTH=a+2Bb@example.com", ALL | {"AUTH"})
    assert (params.envid, params.auth) == ("a+20b", "a+2Bb@example.com")


@pytest.mark.parametrize(
    ("text", "offered"),
    [("NOTIFY=NEVER", ALL - {"DSN"}), ("ORCPT=rfc822;a@b", ALL - {"DSN"}), ("SIZE=1", ALL),
     ("X-FOO=bar", ALL)],
)
def test_rcpt_not_offered_is_555(text: str, offered: frozenset[str]) -> None:
    assert refused(rcpt, text, offered) == (555, "5.5.4")


def test_rcpt_conflicting_duplicates_are_501() -> None:
    assert refused(rcpt, "NOTIFY=NEVER notify=SUCCESS") == (501, "5.5.4")
    assert refused(rcpt, "ORCPT=rfc822;a@b.example ORCPT=rfc822;c@d.example") == (501, "5.5.4")


def test_rcpt_both_parameters() -> None:
    params = rcpt("NOTIFY=FAILURE,DELAY ORCPT=rfc822;u@example.com")
    assert params == RcptParams(notify=("FAILURE", "DELAY"), orcpt="rfc822;u@example.com")


# --- properties --------------------------------------------------------------------------

KEYS = st.sampled_from(["SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "NOTIFY", "ORCPT", "X"])
VALUES = st.one_of(st.none(), st.text(max_size=12).filter(lambda v: " " not in v))
PARAM_TEXT = st.lists(st.tuples(KEYS, VALUES), max_size=4).map(
    lambda items: " ".join(k if v is None else f"{k}={v}" for k, v in items))


@PROPERTY
@given(PARAM_TEXT, st.booleans())
def test_mail_and_rcpt_params_raise_only_param_error(text: str, utf8: bool) -> None:
    for parse in (lambda: mail(text), lambda: rcpt(text, smtputf8=utf8)):
        try:
            parse()
        except ParamError as exc:
            assert exc.reply.code in (501, 552, 555)


def test_orcpt_of_a_utf8_address_in_xtext_is_accepted() -> None:
    """Postfix sends the UTF-8 bytes of a non-ASCII address as +XX (e.g. é is +C3+A9,
    and bytes 0x80-0x9F occur in others: ā is +C4+81): they are no control characters."""
    params = parse_rcpt_params("ORCPT=rfc822;j+C3+A4+C4+81rgen@example.org",
                               frozenset({"DSN"}), False)
    assert params.orcpt == "rfc822;j+C3+A4+C4+81rgen@example.org"
