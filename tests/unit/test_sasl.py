"""Unit and property tests for tayori.smtp.sasl: PLAIN, LOGIN and the RFC 4954 encoding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tayori.smtp.sasl import (
    MAX_RESPONSE,
    MECHANISMS,
    Challenge,
    Credentials,
    Login,
    Plain,
    SaslError,
    decode_initial,
    decode_response,
)

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)


def status(step: object) -> tuple[int, str | None]:
    assert isinstance(step, SaslError), step
    return step.reply.code, step.reply.status


def test_mechanisms_table() -> None:
    assert list(MECHANISMS) == ["PLAIN", "LOGIN"]
    assert isinstance(MECHANISMS["PLAIN"](), Plain)
    assert isinstance(MECHANISMS["LOGIN"](), Login)


# --- PLAIN (RFC 4616) --------------------------------------------------------------------


def test_plain_with_initial_response() -> None:
    assert Plain().start(b"\x00user\x00secret") == Credentials("", "user", "secret")


def test_plain_without_initial_response_sends_an_empty_challenge() -> None:
    plain = Plain()
    assert plain.start(None) == Challenge(b"")
    assert plain.respond(b"admin\x00user\x00secret") == Credentials("admin", "user", "secret")


def test_plain_utf8_credentials() -> None:
    message = "\x00j\u00f6rg@b\u00fccher.example\x00p\u00e4ss".encode()
    assert Plain().start(message) == Credentials("", "j\u00f6rg@b\u00fccher.example",
                                                 "p\u00e4ss")


@pytest.mark.parametrize("message", [
    b"", b"user\x00secret", b"\x00user\x00secret\x00", b"\x00\x00secret", b"\x00user\x00",
    b"a\x00b\x00c\x00d", b"\x00us\xffer\x00secret", b"\xff\x00user\x00secret",
    b"\x00user\x00sec\xc3",
])
def test_plain_malformed_messages(message: bytes) -> None:
    assert status(Plain().start(message)) == (501, "5.5.2")


# --- LOGIN (draft-murchison-sasl-login) --------------------------------------------------


def test_login_asks_for_username_then_password() -> None:
    login = Login()
    assert login.start(None) == Challenge(b"Username:")
    assert login.respond(b"user") == Challenge(b"Password:")
    assert login.respond(b"secret") == Credentials("", "user", "secret")


def test_login_with_the_username_as_initial_response() -> None:
    login = Login()
    assert login.start(b"user") == Challenge(b"Password:")
    assert login.respond(b"secret") == Credentials("", "user", "secret")


@pytest.mark.parametrize(("username", "password"), [
    (b"", b"secret"), (b"user", b""), (b"us\xffer", b"secret"), (b"user", b"\xfe"),
])
def test_login_bad_credentials(username: bytes, password: bytes) -> None:
    login = Login()
    login.start(None)
    login.respond(username)
    assert status(login.respond(password)) == (501, "5.5.2")


def test_login_does_not_keep_the_username_after_the_exchange() -> None:
    login = Login()
    login.start(b"user")
    login.respond(b"secret")
    assert login._username is None


# --- the password stays out of logs -------------------------------------------------------


def test_password_is_not_in_repr() -> None:
    credentials = Credentials("", "user", "hunter2")
    assert "hunter2" not in repr(credentials) and "user" in repr(credentials)


# --- RFC 4954 §4 encoding ----------------------------------------------------------------


def test_decode_initial() -> None:
    assert decode_initial("=") == b""
    assert decode_initial("AHVzZXIAc2VjcmV0") == b"\x00user\x00secret"
    assert status(decode_initial("not base64!")) == (501, "5.5.2")
    assert status(decode_initial("*")) == (501, "5.5.2")
    assert status(decode_initial("dXNlcg\u00e9")) == (501, "5.5.2")


def test_decode_response() -> None:
    assert decode_response(b"") == b""
    assert decode_response(b"dXNlcg==") == b"user"
    assert status(decode_response(b"*")) == (501, "5.0.0")
    assert status(decode_response(b"=")) == (501, "5.5.2")


@pytest.mark.parametrize("line", [b"dXNlcg", b"dXNlcg=", b"dXNl cg==", b"dXNlcg==dXNlcg==",
                                  b"dXNlcg==\x00", b"\xffdXNlcg=="])
def test_decode_response_is_strict(line: bytes) -> None:
    assert status(decode_response(line)) == (501, "5.5.2")


def test_decode_response_length_limit() -> None:
    assert decode_response(b"A" * MAX_RESPONSE) == b"\x00" * (MAX_RESPONSE // 4 * 3)
    assert status(decode_response(b"A" * (MAX_RESPONSE + 4))) == (500, "5.5.6")


# --- properties --------------------------------------------------------------------------


@PROPERTY
@given(st.binary(max_size=64), st.lists(st.binary(max_size=32), max_size=3))
def test_any_input_gives_a_step_never_an_exception(initial: bytes, responses: list[bytes]) -> None:
    for factory in MECHANISMS.values():
        mechanism = factory()
        step = mechanism.start(initial)
        for data in responses:
            if not isinstance(step, Challenge):
                break
            step = mechanism.respond(data)
        assert isinstance(step, Challenge | Credentials | SaslError)
        if isinstance(step, Credentials):
            assert step.login and step.password


@PROPERTY
@given(st.binary(max_size=200))
def test_decode_response_never_raises(line: bytes) -> None:
    assert isinstance(decode_response(line), bytes | SaslError)


@PROPERTY
@given(st.text(max_size=20), st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_plain_round_trip(authzid: str, login: str, password: str) -> None:
    message = "\x00".join((authzid, login, password)).encode()
    step = Plain().start(message)
    if "\x00" in authzid + login + password:
        assert isinstance(step, SaslError)
    else:
        assert step == Credentials(authzid, login, password)
