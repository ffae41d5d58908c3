"""Unit tests for tayori.queue.maildrop (drop, normalisation, pickup, corrupt files) and the
pure parts of tayori.sendmail (options, header section, Bcc, -t recipients, -bs)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tayori import sendmail
from tayori.config import Config
from tayori.config.model import from_document
from tayori.policy.relay import Rules
from tayori.queue import maildrop
from tayori.queue.spool import Envelope, Spool, new_queue_id, read_envelopes

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)
HOST = "mx.example"


def make_config(tmp_path: Path, *, max_size: str = "1M", max_recipients: int = 50,
                remote: bool = True) -> Config:
    match: list[dict[str, Any]] = [{"to": "local_domains", "action": "local"}]
    if remote:
        match.append({"from": "trusted", "to": "any", "action": "remote"})
    return from_document({
        "hostname": HOST, "spool": str(tmp_path / "spool"),
        "listen": [{"address": "127.0.0.1:2525"}],
        "limits": {"max_message_size": max_size, "max_recipients": max_recipients},
        "tables": {"local_domains": ["example.org", HOST], "trusted": ["127.0.0.0/8"]},
        "actions": {"local": {"deliver": "maildir", "path": str(tmp_path / "mail")},
                    "remote": {"deliver": "mx"}},
        "match": match}, "t.toml", str(tmp_path))


@pytest.fixture
def config(tmp_path: Path) -> Config:
    cfg = make_config(tmp_path)
    maildrop.ensure(cfg.spool)
    return cfg


def drop(config: Config, message: bytes, recipients: tuple[str, ...] = ("bob@example.org",),
         *, sender: str | None = "alice@example.org", full_name: str | None = None,
         uid: int | None = None) -> str:
    return maildrop.drop(config.spool, sender, recipients, io.BytesIO(message),
                         uid=os.getuid() if uid is None else uid, full_name=full_name,
                         max_size=config.limits.max_message_size)


def drop_dir(config: Config) -> Path:
    return Path(maildrop.path_of(config.spool))


def run_pickup(config: Config, limit: int = 100, rounds: int = 1) -> list[str]:
    async def main() -> list[str]:
        spool = Spool(config.spool)
        spool.open()
        try:
            out: list[str] = []
            for _ in range(rounds):
                out += await maildrop.pickup(spool, config, Rules(config), limit=limit)
            return out
        finally:
            spool.close()

    return asyncio.run(main())


def queued(config: Config) -> dict[str, Envelope]:
    return {env.queue_id: env for env in read_envelopes(config.spool)}


def body(config: Config, queue_id: str) -> bytes:
    return (Path(config.spool) / "messages" / queue_id).read_bytes()


def header_section(data: bytes) -> list[bytes]:
    return data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


# --- the directory ---------------------------------------------------------------------


def test_ensure_makes_a_sticky_unlistable_drop_directory(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o750)
    (spool / "index.sqlite3").write_bytes(b"")
    os.chmod(spool / "index.sqlite3", 0o644)
    (spool / "messages").mkdir(mode=0o755)
    os.chmod(spool / "messages", 0o755)
    path = maildrop.ensure(str(spool))
    assert path == str(spool / "maildrop")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o1733
    assert stat.S_IMODE(os.stat(spool).st_mode) & 0o011 == 0o011     # reachable
    assert stat.S_IMODE(os.stat(spool).st_mode) & 0o004 == 0          # not listable
    assert stat.S_IMODE(os.stat(spool / "index.sqlite3").st_mode) & 0o007 == 0
    assert stat.S_IMODE(os.stat(spool / "messages").st_mode) & 0o007 == 0
    os.chmod(path, 0o755)
    maildrop.ensure(str(spool))          # again: repaired, not an error
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o1733


# --- drop ------------------------------------------------------------------------------


def test_drop_writes_one_complete_file(config: Config) -> None:
    before = time.time()
    drop_id = drop(config, b"Subject: hi\nTo: bob@example.org\n\nline\n.\n..\r\nend",
                   recipients=("bob@example.org", "carol@example.net"), full_name="Alice A.")
    assert re.fullmatch(r"[0-9B-Z]{1,15}", drop_id)
    files = os.listdir(drop_dir(config))
    assert files == [f"D{drop_id}"]
    path = drop_dir(config) / files[0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    first, content = path.read_bytes().split(b"\n", 1)
    meta = json.loads(first)
    assert meta["version"] == 1
    assert meta["sender"] == "alice@example.org"
    assert meta["recipients"] == ["bob@example.org", "carol@example.net"]
    assert meta["uid"] == os.getuid()
    assert meta["full_name"] == "Alice A."
    assert before <= meta["time"] <= time.time()
    # CRLF everywhere; a lone dot is plain data here
    assert content == b"Subject: hi\r\nTo: bob@example.org\r\n\r\nline\r\n.\r\n..\r\nend\r\n"


def test_drop_sender_none_means_the_submitting_user(config: Config) -> None:
    drop(config, b"x\n", sender=None)
    (path,) = drop_dir(config).iterdir()
    assert json.loads(path.read_bytes().split(b"\n", 1)[0])["sender"] is None


def test_the_final_name_appears_only_complete(config: Config,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    directory = drop_dir(config)
    seen_while_writing: list[list[str]] = []
    at_rename: list[bytes] = []
    real_rename = os.rename

    class Slow(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            seen_while_writing.append(sorted(os.listdir(directory)))
            return super().read(min(size or 1000, 1000) if size and size > 0 else 1000)

    def rename(source: Any, target: Any) -> None:
        at_rename.append(Path(source).read_bytes())
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    message = b"Subject: big\r\n\r\n" + (b"0123456789" * 50 + b"\r\n") * 100
    drop_id = maildrop.drop(config.spool, None, ["bob@example.org"], Slow(message),
                            uid=os.getuid(), full_name=None)
    assert len(seen_while_writing) > 10
    assert all(len(names) == 1 and names[0].startswith("T") for names in seen_while_writing)
    final = (directory / f"D{drop_id}").read_bytes()
    assert at_rename == [final]            # renamed only once complete
    assert final.split(b"\n", 1)[1] == message
    assert os.listdir(directory) == [f"D{drop_id}"]


def test_a_failed_drop_leaves_nothing(config: Config) -> None:
    class Broken(io.BytesIO):
        calls = 0

        def read(self, size: int | None = -1) -> bytes:
            self.calls += 1
            if self.calls > 2:
                raise OSError(5, "Input/output error")
            return b"x" * 100 + b"\n"

    with pytest.raises(OSError):
        maildrop.drop(config.spool, None, ["bob@example.org"], Broken(), uid=0, full_name=None)
    assert os.listdir(drop_dir(config)) == []


def test_too_big_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, max_size="1K")
    maildrop.ensure(cfg.spool)
    with pytest.raises(maildrop.MessageTooBig, match="limit is 1024 bytes"):
        drop(cfg, b"x" * 600 + b"\n" + b"y" * 600 + b"\n")
    assert os.listdir(drop_dir(cfg)) == []
    # LF becoming CRLF counts: 1023 octets of LF text is 1024+ as CRLF
    with pytest.raises(maildrop.MessageTooBig):
        drop(cfg, b"a\n" * 512)


def test_drop_without_maildrop_is_an_oserror(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    with pytest.raises(FileNotFoundError):
        drop(cfg, b"x\n")


# --- normalisation ---------------------------------------------------------------------


def normal(data: bytes, chunk: int = 65536) -> bytes:
    class Chunky(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            return super().read(chunk)

    return b"".join(maildrop.normalised(Chunky(data)))


def test_line_ends_become_crlf() -> None:
    assert normal(b"a\nb\r\nc\rd") == b"a\r\nb\r\nc\r\nd\r\n"
    assert normal(b"a\r\n", chunk=2) == b"a\r\n"            # CR and LF in different reads
    assert normal(b"a\r\r\nb", chunk=2) == b"a\r\n\r\nb\r\n"
    assert normal(b"") == b""


def test_long_lines_are_broken_header_lines_folded() -> None:
    long_header = b"Subject: " + b"w" * 2000
    out = normal(long_header + b"\n\n" + b"b" * 2500 + b"\n")
    head, text = out.split(b"\r\n\r\n", 1)
    head_lines = head.split(b"\r\n")
    assert all(len(line) <= 998 for line in out.split(b"\r\n"))
    assert head_lines[0].startswith(b"Subject: ")
    assert all(line.startswith(b" ") for line in head_lines[1:])       # continuation
    assert b"".join(line.lstrip(b" ") for line in head_lines) == long_header
    assert text.replace(b"\r\n", b"") == b"b" * 2500


def test_long_lines_are_not_cut_inside_a_utf8_character() -> None:
    text = "ü".encode() * 1500
    out = normal(b"Subject: x\n\n" + text)
    pieces = out.split(b"\r\n\r\n", 1)[1].split(b"\r\n")[:-1]
    assert all(len(p) <= 998 for p in pieces)
    assert [p.decode("utf-8") for p in pieces]     # each piece is whole characters
    assert b"".join(pieces) == text


def test_complete_adds_missing_fields_before_the_body() -> None:
    def complete(names: set[str]) -> list[bytes]:
        return [f"X-Names: {','.join(sorted(names))}\r\n".encode()]

    def run(data: bytes) -> bytes:
        return b"".join(maildrop.normalised(io.BytesIO(data), complete))

    assert run(b"From: a\nSubject: s\n folded\n\nbody\n") == \
        b"From: a\r\nSubject: s\r\n folded\r\nX-Names: from,subject\r\n\r\nbody\r\n"
    # no header section at all: the fields, then the empty line, then the text
    assert run(b"just text\n") == b"X-Names: \r\n\r\njust text\r\n"
    assert run(b"") == b"X-Names: \r\n"
    assert run(b"To: x\n") == b"To: x\r\nX-Names: to\r\n"


@PROPERTY
@given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b"Subject: x", b": ", b" ",
                                 b"\xc3\xbc", b"x" * 700, b"."]), max_size=60),
       st.integers(min_value=1, max_value=700))
def test_normalised_is_crlf_bounded_and_idempotent(parts: list[bytes], chunk: int) -> None:
    data = b"".join(parts)
    once = normal(data, chunk)
    assert once == normal(once)
    if once:
        assert once.endswith(b"\r\n")
    lines = once.split(b"\r\n")[:-1]
    assert all(b"\r" not in line and b"\n" not in line and len(line) <= 998 for line in lines)


# --- pickup ----------------------------------------------------------------------------


def test_pickup_queues_with_received_and_added_fields(config: Config) -> None:
    drop_id = drop(config, b"Subject: hello\nTo: bob@example.org\n\nHi Bob.\n",
                   full_name="Alice Example")
    assert run_pickup(config) == [drop_id]
    assert os.listdir(drop_dir(config)) == []
    env = queued(config)[drop_id]
    assert env.sender == "alice@example.org"
    assert [(r.address, r.action, r.state) for r in env.recipients] == [
        ("bob@example.org", "local", "queued")]
    assert env.protocol == "local"
    assert env.client_address == "127.0.0.1"
    assert env.message_id == f"<{drop_id}@{HOST}>"
    data = body(config, drop_id)
    assert env.size == len(data)
    assert data.startswith(f"Received: by {HOST} (tayori, from userid {os.getuid()})\r\n"
                           f"\tid {drop_id}\r\n\tfor <bob@example.org>; ".encode())
    head = header_section(data)
    assert head[3:5] == [b"Subject: hello", b"To: bob@example.org"]
    assert head[5].startswith(b"Date: ")
    assert head[6] == f"Message-ID: <{drop_id}@{HOST}>".encode()
    assert head[7] == b"From: Alice Example <alice@example.org>"
    assert data.endswith(b"\r\n\r\nHi Bob.\r\n")


def test_pickup_keeps_fields_that_are_there(config: Config) -> None:
    message = (b"From: Someone <someone@example.org>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
               b"Message-ID: <own@example.org>\r\n\r\nbody\r\n")
    drop_id = drop(config, message, recipients=("a@example.org", "b@example.net"))
    run_pickup(config)
    data = body(config, drop_id)
    assert data.endswith(message)
    assert data.count(b"Date:") == data.count(b"From:") == data.count(b"Message-ID:") == 1
    assert b"\tid " + drop_id.encode() + b"\r\n\t; " in data   # two recipients: no "for"
    env = queued(config)[drop_id]
    assert env.message_id == "<own@example.org>"
    assert {r.address: r.action for r in env.recipients} == {
        "a@example.org": "local", "b@example.net": "remote"}


def test_pickup_default_sender_null_sender_and_bare_names(config: Config) -> None:
    mine = drop(config, b"text\n", recipients=("root", "Postmaster"), sender=None)
    bounce = drop(config, b"Subject: x\n\ntext\n", sender="")
    run_pickup(config)
    envs = queued(config)
    import pwd
    login = pwd.getpwuid(os.getuid()).pw_name
    assert envs[mine].sender == f"{login}@{HOST}"
    assert [r.address for r in envs[mine].recipients] == [f"root@{HOST}", f"Postmaster@{HOST}"]
    assert envs[bounce].sender == ""
    from_line = next(line for line in header_section(body(config, bounce))
                     if line.startswith(b"From:"))
    assert from_line.endswith(f"<{login}@{HOST}>".encode()) or \
        from_line == f"From: {login}@{HOST}".encode()
    # text without a header section: fields added, then the empty line
    assert body(config, mine).endswith(b"\r\n\r\ntext\r\n")


def test_pickup_full_name_cannot_inject_header_lines(config: Config) -> None:
    drop_id = drop(config, b"x\n", full_name="Eve\r\nBcc: victim@example.net")
    run_pickup(config)
    data = body(config, drop_id)
    assert b"\r\nBcc:" not in data
    assert b"From: Eve Bcc: victim@example.net <alice@example.org>" in data or \
        b'From: "Eve Bcc: victim@example.net" <alice@example.org>' in data


def test_pickup_utf8_is_8bitmime_and_smtputf8(config: Config) -> None:
    drop_id = drop(config, "Subject: Grüße\n\nÄ\n".encode(), recipients=("jö@example.org",),
                   full_name="Jöran")
    run_pickup(config)
    env = queued(config)[drop_id]
    assert env.body_type == "8BITMIME"
    assert env.smtputf8
    assert b"From: =?utf-8?b?" in body(config, drop_id)     # ASCII address: encoded name


def test_unroutable_recipients_are_left_out(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, remote=False)
    maildrop.ensure(cfg.spool)
    drop_id = drop(cfg, b"x\n", recipients=("bob@example.org", "far@example.net"))
    only_far = drop(cfg, b"x\n", recipients=("far@example.net",))
    assert run_pickup(cfg) == [drop_id]
    assert [r.address for r in queued(cfg)[drop_id].recipients] == ["bob@example.org"]
    corrupt = tmp_path / "spool" / "corrupt"
    assert os.listdir(corrupt) == [f"maildrop-D{only_far}"]     # set aside, never deleted


def test_duplicate_recipients_are_queued_once(config: Config) -> None:
    drop_id = drop(config, b"x\n", recipients=("bob@example.org", "bob@example.org", "root",
                                               f"root@{HOST}"))
    run_pickup(config)
    assert [r.address for r in queued(config)[drop_id].recipients] == [
        "bob@example.org", f"root@{HOST}"]


@pytest.mark.parametrize("content", [
    b"not json at all\nSubject: x\n\nbody\n",
    b'{"version": 2, "sender": null, "recipients": ["a@example.org"], "uid": 0, '
    b'"time": 1, "full_name": null}\nx\n',
    b'{"version": 1, "sender": null, "recipients": [], "uid": 0, "time": 1, '
    b'"full_name": null}\nx\n',
    b'{"version": 1, "sender": "bad address", "recipients": ["a@example.org"], "uid": 0, '
    b'"time": 1, "full_name": null}\nx\n',
    b'{"version": 1, "sender": null, "recipients": ["a@@example.org"], "uid": 0, '
    b'"time": 1, "full_name": null}\nx\n',
    b'{"version": 1, "sender": null, "recipients": ["a@example.org"], "uid": "0", '
    b'"time": 1, "full_name": null}\nx\n',
    b"",
], ids=["garbage", "version", "no-recipients", "bad-sender", "bad-recipient", "uid-type",
        "empty"])
def test_an_unusable_file_is_moved_to_corrupt(config: Config, content: bytes) -> None:
    good = drop(config, b"x\n")
    name = "D" + good[:-1] + ("B" if good[-1] != "B" else "C")
    (drop_dir(config) / name).write_bytes(content)
    assert run_pickup(config) == [good]
    corrupt = Path(config.spool) / "corrupt"
    assert os.listdir(corrupt) == [f"maildrop-{name}"]
    assert (corrupt / f"maildrop-{name}").read_bytes() == content
    assert os.listdir(drop_dir(config)) == []
    assert list(queued(config)) == [good]


def test_odd_names_symlinks_and_directories_are_set_aside(config: Config,
                                                          tmp_path: Path) -> None:
    directory = drop_dir(config)
    secret = tmp_path / "secret"
    secret.write_text("root's secret\n")
    (directory / "D1234567890BC").symlink_to(secret)
    (directory / "Dnot-an-id").write_bytes(b"x")
    (directory / "D1234567890BD").mkdir()
    assert run_pickup(config) == []
    corrupt = Path(config.spool) / "corrupt"
    assert sorted(os.listdir(corrupt)) == ["maildrop-D1234567890BC", "maildrop-D1234567890BD",
                                           "maildrop-Dnot-an-id"]
    assert (corrupt / "maildrop-D1234567890BC").is_symlink()     # moved, never followed
    assert secret.read_text() == "root's secret\n"
    assert queued(config) == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_a_forged_uid_is_set_aside(config: Config) -> None:
    drop_id = drop(config, b"x\n", uid=0)
    path = drop_dir(config) / f"D{drop_id}"
    os.chown(path, 4242, 4242)           # written by uid 4242, claiming to be root
    assert run_pickup(config) == []
    assert os.listdir(Path(config.spool) / "corrupt") == [f"maildrop-D{drop_id}"]
    honest = drop(config, b"x\n", uid=4242)
    os.chown(drop_dir(config) / f"D{honest}", 4242, 4242)
    assert run_pickup(config) == [honest]
    assert b"from userid 4242" in body(config, honest)


def test_oversized_drop_file_is_set_aside(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, max_size="1K")
    maildrop.ensure(cfg.spool)
    drop_id = maildrop.drop(cfg.spool, None, ["bob@example.org"], io.BytesIO(b"y" * 5000),
                            uid=os.getuid(), full_name=None)    # not by sendmail: no limit
    assert run_pickup(cfg) == []
    assert os.listdir(tmp_path / "spool" / "corrupt") == [f"maildrop-D{drop_id}"]


def test_pickup_after_a_crash_between_commit_and_unlink_queues_once(
        config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    drop_id = drop(config, b"Subject: once\n\nx\n")
    monkeypatch.setattr(maildrop, "_remove", lambda directory, name: None)   # "crash"
    assert run_pickup(config) == [drop_id]
    assert os.listdir(drop_dir(config)) == [f"D{drop_id}"]
    monkeypatch.undo()
    assert run_pickup(config) == []                  # found in the spool already
    assert os.listdir(drop_dir(config)) == []
    assert list(queued(config)) == [drop_id]


def test_stale_temporary_files_are_removed_fresh_ones_kept(config: Config) -> None:
    directory = drop_dir(config)
    (directory / "TSTALE").write_bytes(b"half")
    (directory / "TFRESH").write_bytes(b"half")
    old = time.time() - maildrop.STALE_TEMP - 60
    os.utime(directory / "TSTALE", (old, old))
    assert run_pickup(config) == []
    assert os.listdir(directory) == ["TFRESH"]


def test_pickup_takes_the_oldest_first_and_at_most_limit(
        config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    # ids are time-sortable to the millisecond; these five are a millisecond apart
    stamps = iter(1_800_000_000.0 + i / 1000 for i in range(5))
    monkeypatch.setattr(maildrop, "new_queue_id", lambda: new_queue_id(next(stamps)))
    ids = [drop(config, f"Subject: {i}\n\nx\n".encode()) for i in range(5)]
    assert run_pickup(config, limit=2) == ids[:2]
    assert run_pickup(config, limit=2, rounds=2) == ids[2:]
    assert sorted(queued(config)) == sorted(ids)


def test_a_failed_commit_leaves_the_drop_file(config: Config,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    drop_id = drop(config, b"x\n")

    async def broken(self: Spool, draft: Any, envelope: Any) -> None:
        draft.discard()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Spool, "commit", broken)
    assert run_pickup(config) == []
    assert os.listdir(drop_dir(config)) == [f"D{drop_id}"]
    monkeypatch.undo()
    assert run_pickup(config) == [drop_id]


def test_waiting_counts_complete_drops(config: Config) -> None:
    assert maildrop.waiting(config.spool) == 0
    drop(config, b"x\n")
    (drop_dir(config) / "Tpartial").write_bytes(b"")
    assert maildrop.waiting(config.spool) == 1


# --- sendmail: options ------------------------------------------------------------------


def test_options_getopt_style() -> None:
    o = sendmail.parse(["-t", "-oi", "-fme@example.org", "-F", "Me", "a@example.org",
                        "-oem", "-odb", "-B", "8BITMIME", "-N", "never", "-v", "--", "-x@y"])
    assert (o.mode, o.extract, o.ignore_dots, o.sender, o.full_name, o.verbose) == (
        "m", True, True, "me@example.org", "Me", True)
    assert o.recipients == ["a@example.org", "-x@y"]
    assert sendmail.parse(["-ti"]).extract and sendmail.parse(["-ti"]).ignore_dots
    assert sendmail.parse(["-f", "", "x"]).sender == ""
    assert sendmail.parse(["-r", "a@b.example"]).sender == "a@b.example"
    assert sendmail.parse(["-bs"]).mode == "s"
    assert sendmail.parse(["-bp"]).mode == "p"
    assert sendmail.parse(["-q"]).mode == "q"
    assert sendmail.parse(["-q30m"]).mode == "q"
    assert sendmail.parse(["-bi"]).mode == "i"
    assert sendmail.parse(["-I"]).mode == "i"
    assert sendmail.parse(["-C", "/x.toml"]).config == "/x.toml"
    assert sendmail.parse(["-c/y.toml"]).config == "/y.toml"
    assert not sendmail.parse(["-oem"]).ignore_dots


@pytest.mark.parametrize("argv", [["-Z"], ["-f"], ["-bd"], ["-bz"], ["-t", "-C"]])
def test_bad_options_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(sendmail.Failure) as info:
        sendmail.parse(argv)
    assert info.value.status == sendmail.EX_USAGE


def test_config_path_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAYORI_CONFIG", "/from/env.toml")
    assert sendmail.config_path(sendmail.parse(["-C", "/given.toml"])) == "/given.toml"
    assert sendmail.config_path(sendmail.parse([])) == "/from/env.toml"
    monkeypatch.delenv("TAYORI_CONFIG")
    expected = sendmail.DEFAULT_CONFIG if os.path.exists(sendmail.DEFAULT_CONFIG) else None
    assert sendmail.config_path(sendmail.parse([])) == expected


# --- sendmail: addresses, header section, Bcc ------------------------------------------


def test_addresses_lists_names_and_qualification() -> None:
    assert sendmail.addresses("Bob <bob@example.org>, carol@example.net, root", HOST) == [
        "bob@example.org", "carol@example.net", f"root@{HOST}"]
    assert sendmail.addresses("undisclosed-recipients:;", HOST) == []
    assert sendmail.addresses("team: a@example.org, b@example.org;", HOST) == [
        "a@example.org", "b@example.org"]
    assert sendmail.addresses("jö@exämple.org", HOST) == ["jö@exämple.org"]
    for bad in ("a@@example.org", "<>", "a@-bad-.example", "foo bar@x.example"):
        with pytest.raises(sendmail.Failure) as info:
            sendmail.addresses(bad, HOST)
        assert info.value.status == sendmail.EX_DATAERR, bad


def test_checked_sender() -> None:
    assert sendmail.checked_sender("<>", HOST) == ""
    assert sendmail.checked_sender("", HOST) == ""
    assert sendmail.checked_sender("<me@example.org>", HOST) == "me@example.org"
    assert sendmail.checked_sender("www-data", HOST) == f"www-data@{HOST}"
    with pytest.raises(sendmail.Failure):
        sendmail.checked_sender("me@@example.org", HOST)


def fields_and_rest(message: bytes) -> tuple[list[list[bytes]], bytes]:
    fields, rest = sendmail.split_header(maildrop.normalised(io.BytesIO(message)))
    return fields, b"".join(rest)


def test_t_takes_to_cc_bcc_and_bcc_is_removed() -> None:
    message = (b"From: me@example.org\nTo: Bob <bob@example.org>,\n carol@example.org\n"
               b"Cc: dave@example.net\nBcc: eve@example.net\nSubject: s\n\nBcc: in the body\n")
    fields, rest = fields_and_rest(message)
    assert sendmail.extracted_recipients(fields, HOST) == [
        "bob@example.org", "carol@example.org", "dave@example.net", "eve@example.net"]
    kept = b"".join(sendmail.without_hidden(fields))
    assert kept == (b"From: me@example.org\r\nTo: Bob <bob@example.org>,\r\n carol@example.org"
                    b"\r\nCc: dave@example.net\r\nSubject: s\r\n")
    assert rest == b"\r\nBcc: in the body\r\n"


def test_t_prefers_resent_fields() -> None:
    fields, _ = fields_and_rest(b"To: old@example.org\nResent-To: new@example.org\n"
                                b"Resent-Bcc: hidden@example.org\n\nx\n")
    assert sendmail.extracted_recipients(fields, HOST) == ["new@example.org",
                                                            "hidden@example.org"]
    assert b"Resent-Bcc" not in b"".join(sendmail.without_hidden(fields))


def test_read_message_dot_rule(tmp_path: Path) -> None:
    def read(data: bytes, ignore_dots: bool) -> bytes:
        with sendmail.read_message(io.BytesIO(data), ignore_dots, 0) as message:
            return message.read()

    assert read(b"a\n.\nb\n", False) == b"a\n"
    assert read(b"a\r\n.\r\nb\r\n", False) == b"a\r\n"
    assert read(b"a\n.\nb\n", True) == b"a\n.\nb\n"
    assert read(b"a\n..\n. \n", False) == b"a\n..\n. \n"
    with pytest.raises(sendmail.Failure) as info:
        sendmail.read_message(io.BytesIO(b"x\n" * 100), True, 50)
    assert info.value.status == sendmail.EX_DATAERR


# --- sendmail -bs (the engine over a pair of pipes) -----------------------------------


def test_bs_session_drops_each_accepted_message(config: Config) -> None:
    read_fd, write_fd = os.pipe()
    dialog = (b"EHLO local\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
              b"DATA\r\nSubject: via -bs\r\n\r\n..dot\r\n.\r\n"
              b"MAIL FROM:<>\nRCPT TO:<far@nowhere.invalid>\nRCPT TO:<Postmaster>\nDATA\n"
              b"x\n.\nQUIT\n")
    os.write(write_fd, dialog)
    os.close(write_fd)
    out = io.BytesIO()
    strict = make_config(Path(config.spool).parent, remote=False)
    try:
        status = sendmail.SmtpOnStdio(strict, sendmail.Options(mode="s"), read_fd, out).run()
    finally:
        os.close(read_fd)
    assert status == 0
    codes = [line[:4] for line in out.getvalue().split(b"\r\n") if line]
    replies = [c for c in codes if c[3:] == b" "]
    assert replies == [b"220 ", b"250 ", b"250 ", b"250 ", b"354 ", b"250 ",
                       b"250 ", b"550 ", b"250 ", b"354 ", b"250 ", b"221 "]
    ids = re.findall(rb"queued as (\w+)", out.getvalue())
    assert len(ids) == 2
    files = sorted(os.listdir(drop_dir(config)))
    assert files == sorted(f"D{i.decode()}" for i in ids)
    first = (drop_dir(config) / f"D{ids[0].decode()}").read_bytes().split(b"\n", 1)
    meta = json.loads(first[0])
    assert (meta["sender"], meta["recipients"], meta["helo"]) == (
        "alice@example.org", ["bob@example.org"], "local")
    assert first[1] == b"Subject: via -bs\r\n\r\n.dot\r\n"
    second = json.loads((drop_dir(config) / f"D{ids[1].decode()}").read_bytes()
                        .split(b"\n", 1)[0])
    assert (second["sender"], second["recipients"]) == ("", [f"Postmaster@{HOST}"])
    assert b"STARTTLS" not in out.getvalue()


def test_crlf_for_bs_input() -> None:
    session = sendmail.SmtpOnStdio(make_config(Path("/nonexistent")), sendmail.Options())
    assert session._crlf(b"a\nb\r\nc\r") == b"a\r\nb\r\nc\r"
    assert session._crlf(b"\nd\n") == b"\nd\r\n"


# --- an ordinary user ------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_an_unprivileged_user_can_drop_but_not_look(tmp_path: Path) -> None:
    """The point of mode 1733: nobody (uid 65534) creates a drop file and cannot list
    the directory; the daemon (root here) picks the file up as nobody's."""
    import shutil
    import tempfile

    top = tempfile.mkdtemp(prefix="tayori-maildrop-", dir="/tmp")
    try:
        os.chmod(top, 0o755)
        cfg = make_config(Path(top))
        maildrop.ensure(cfg.spool)
        pid = os.fork()
        if pid == 0:   # the child: become nobody, submit, try to look around
            status = 0
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                maildrop.drop(cfg.spool, None, ["bob@example.org"], io.BytesIO(b"hi\n"),
                              uid=os.getuid(), full_name=None)
                status |= 0 if maildrop.waiting(cfg.spool) is None else 2
                try:
                    os.listdir(maildrop.path_of(cfg.spool))
                    status |= 4
                except PermissionError:
                    pass
            except BaseException:
                status |= 1
            os._exit(status)
        _, wait_status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(wait_status) == 0
        (path,) = Path(maildrop.path_of(cfg.spool)).iterdir()
        assert path.stat().st_uid == 65534
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        (queue_id,) = run_pickup(cfg)
        env = queued(cfg)[queue_id]
        assert env.sender == f"nobody@{HOST}"
        assert b"(tayori, from userid 65534)" in body(cfg, queue_id)
    finally:
        shutil.rmtree(top)


def test_drop_failures_map_to_sysexits() -> None:
    def status(number: int) -> int:
        return sendmail._drop_failure(OSError(number, os.strerror(number)), "/spool")[0]

    import errno

    assert status(errno.ENOENT) == sendmail.EX_TEMPFAIL
    assert status(errno.EACCES) == sendmail.EX_CANTCREAT
    assert status(errno.EPERM) == sendmail.EX_CANTCREAT
    assert status(errno.EROFS) == sendmail.EX_CANTCREAT
    assert status(errno.ENOSPC) == sendmail.EX_TEMPFAIL
    assert status(errno.EDQUOT) == sendmail.EX_TEMPFAIL
