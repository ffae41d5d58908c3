"""Unit tests for tayori.deliver.maildir: content, names, folders, quota, errors, and that
``new/`` never shows a partial file, with threads and processes delivering at once."""

from __future__ import annotations

import errno
import hashlib
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from tayori.deliver import maildir
from tayori.deliver.maildir import MaildirError, Quota, Usage, deliver, usage, valid_folder
from tayori.errors import Reply

HOST = "mx.tayori.test"
NAME = re.compile(r"(\d+)\.M(\d+)P(\d+)Q(\d+)R([0-9a-f]{16})\.(.+),S=(\d+),W=(\d+)")
DEADLINE = 60.0


def spool_file(directory: Path, body: bytes, name: str = "body") -> Path:
    path = directory / name
    path.write_bytes(body)
    return path


def message(n: int = 0, lines: int = 20) -> bytes:
    head = f"From: a@x.example\r\nSubject: message {n}\r\n\r\n"
    return head.encode() + b"".join(b"line %d of %d\r\n" % (i, n) for i in range(lines))


def stored(sender: str, rcpt: str, body: bytes) -> bytes:
    """What the file must hold: the trace headers, then the body with LF line ends."""
    return f"Return-Path: <{sender}>\nDelivered-To: {rcpt}\n".encode() + \
        body.replace(b"\r\n", b"\n")


def put(box: Path, path: Path, **options: object) -> str:
    options.setdefault("return_path", "a@x.example")
    options.setdefault("delivered_to", "u@y.example")
    options.setdefault("hostname", HOST)
    return deliver(str(box), str(path), **options)  # type: ignore[arg-type]


def files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []


def crlf_size(data: bytes) -> int:
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


# --- content and names ------------------------------------------------------------------


def test_file_is_trace_headers_then_message_with_lf(tmp_path: Path) -> None:
    body = message(1) + b".leading dot\r\nFrom the start\r\n\r\n"
    box = tmp_path / "box"
    name = put(box, spool_file(tmp_path, body))
    [path] = files(box / "new")
    assert path.name == name
    data = path.read_bytes()
    assert data == stored("a@x.example", "u@y.example", body)
    match = NAME.fullmatch(name)
    assert match, name
    assert int(match.group(3)) == os.getpid()
    assert match.group(6) == HOST
    assert int(match.group(7)) == len(data) == path.stat().st_size
    assert int(match.group(8)) == crlf_size(data)   # what IMAP's RFC822.SIZE will be
    assert abs(int(match.group(1)) - time.time()) < 60
    assert files(box / "tmp") == [] and files(box / "cur") == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for sub in ("", "tmp", "new", "cur"):
        assert stat.S_IMODE((box / sub).stat().st_mode) == 0o700


def test_null_sender_and_utf8_addresses(tmp_path: Path) -> None:
    body = "Subject: ünïcode\r\n\r\nтекст\r\n".encode()
    box = tmp_path / "box"
    put(box, spool_file(tmp_path, body), return_path="", delivered_to="ユーザー@例え.jp")
    [path] = files(box / "new")
    assert path.read_bytes() == stored("", "ユーザー@例え.jp", body)
    assert path.read_bytes().startswith(b"Return-Path: <>\nDelivered-To: ")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_line_ends_across_read_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          chunk: int) -> None:
    """A CRLF split between two reads is one line end; bare CR and bare LF stay as they
    are (BINARYMIME); a CR at the very end is kept."""
    monkeypatch.setattr(maildir, "CHUNK", chunk)
    body = b"a\r\nb\rc\nd\r\r\n\r\n\r\nend\r"
    box = tmp_path / "box"
    name = put(box, spool_file(tmp_path, body))
    data = (box / "new" / name).read_bytes()
    assert data.endswith(b"a\nb\rc\nd\r\n\n\nend\r")
    match = NAME.fullmatch(name)
    assert match and int(match.group(7)) == len(data)
    assert int(match.group(8)) == crlf_size(data)


def test_message_without_final_line_end(tmp_path: Path) -> None:
    body = b"Subject: x\r\n\r\nno line end"
    box = tmp_path / "box"
    put(box, spool_file(tmp_path, body))
    [path] = files(box / "new")
    assert path.read_bytes() == stored("a@x.example", "u@y.example", body)


def test_hostname_escaped_as_the_spec_says(tmp_path: Path) -> None:
    name = put(tmp_path / "box", spool_file(tmp_path, message()), hostname="a/b:c,d.example")
    assert ".a\\057b\\072c\\054d.example,S=" in name
    assert "/" not in name and ":" not in name


def test_bad_arguments_are_value_errors(tmp_path: Path) -> None:
    path = spool_file(tmp_path, message())
    for options in ({"return_path": "a@x\r\nBcc: evil@x"}, {"delivered_to": "u@y\n"},
                    {"delivered_to": ""}, {"hostname": ""}, {"folder": "../../etc"}):
        with pytest.raises(ValueError):
            put(tmp_path / "box", path, **options)
    assert not (tmp_path / "box").exists()


def test_link_never_overwrites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Were a name ever to repeat, the link fails and another name is taken."""
    names = iter(["1.same", "1.same", "2.other"])
    monkeypatch.setattr(maildir, "_unique_base", lambda host: next(names))
    box = tmp_path / "box"
    first = put(box, spool_file(tmp_path, message(1)))
    second = put(box, spool_file(tmp_path, message(2), "second"))
    assert first.startswith("1.same,S=") and second.startswith("2.other,S=")
    assert (box / "new" / first).read_bytes() == stored("a@x.example", "u@y.example",
                                                        message(1))
    assert files(box / "tmp") == []


def test_large_message_streams_in_bounded_memory(tmp_path: Path) -> None:
    body = message(0, lines=0) + (b"x" * 998 + b"\r\n") * 20_000   # 20 MB
    path = spool_file(tmp_path, body)
    tracemalloc.start()
    try:
        name = put(tmp_path / "box", path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * maildir.CHUNK + 1_000_000, peak
    size = (tmp_path / "box" / "new" / name).stat().st_size
    assert size == len(stored("a@x.example", "u@y.example", body))


# --- concurrency ------------------------------------------------------------------------


def check_complete(box: Path, expected: dict[str, bytes]) -> None:
    """Every file in new/ is one whole expected message (keyed by its Return-Path)."""
    seen = set()
    for path in files(box / "new"):
        data = path.read_bytes()
        sender = data.split(b"\n", 1)[0].decode().removeprefix("Return-Path: <")[:-1]
        assert data == stored(sender, "u@y.example", expected[sender]), path.name
        match = NAME.fullmatch(path.name)
        assert match and int(match.group(7)) == len(data)
        seen.add(sender)
    assert seen == set(expected)


def test_unique_names_with_threads(tmp_path: Path) -> None:
    box = tmp_path / "box"
    threads, each = 8, 40
    expected = {f"t{t}-{i}@x.example": message(t * 1000 + i)
                for t in range(threads) for i in range(each)}
    bodies = {sender: spool_file(tmp_path, body, sender) for sender, body in expected.items()}
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(each):
                sender = f"t{t}-{i}@x.example"
                put(box, bodies[sender], return_path=sender)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(DEADLINE)
    assert not errors and not any(w.is_alive() for w in workers)
    assert len(files(box / "new")) == threads * each
    check_complete(box, expected)
    assert files(box / "tmp") == []


DELIVER_SCRIPT = """
import sys
from tayori.deliver.maildir import deliver
box, proc, count, spool = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
for i in range(count):
    deliver(box, f"{spool}/p{proc}-{i}", return_path=f"p{proc}-{i}@x.example",
            delivered_to="u@y.example", hostname="mx.tayori.test", folder=sys.argv[5])
"""


def deliver_in_processes(box: Path, spool: Path, processes: int, each: int,
                         folder: str = "") -> dict[str, bytes]:
    """Start ``processes`` Python processes each delivering ``each`` messages into
    ``box`` at once; the messages by sender."""
    expected = {}
    for p in range(processes):
        for i in range(each):
            expected[f"p{p}-{i}@x.example"] = body = message(p * 1000 + i, lines=5 + i)
            spool_file(spool, body, f"p{p}-{i}")
    children = [subprocess.Popen([sys.executable, "-c", DELIVER_SCRIPT, str(box), str(p),
                                  str(each), str(spool), folder], stderr=subprocess.PIPE)
                for p in range(processes)]
    for child in children:
        _, err = child.communicate(timeout=DEADLINE)
        assert child.returncode == 0, err.decode()
    return expected


def test_unique_names_with_processes(tmp_path: Path) -> None:
    """Several processes at once, the mailbox not there yet: they race to create it."""
    box = tmp_path / "a" / "b" / "box"
    spool = tmp_path / "spool"
    spool.mkdir()
    expected = deliver_in_processes(box, spool, processes=4, each=50)
    names = [p.name for p in files(box / "new")]
    assert len(names) == len(set(names)) == 200
    assert len({NAME.fullmatch(n).group(3) for n in names}) == 4   # type: ignore[union-attr]
    check_complete(box, expected)


def test_new_never_shows_a_partial_file(tmp_path: Path) -> None:
    """One thread writes large messages while another reads every file it sees in new/:
    each is whole (written and fsync'd in tmp/ before the link)."""
    box = tmp_path / "box"
    body = message(0, lines=0) + b"y" * 4_000_000 + b"\r\n"
    path = spool_file(tmp_path, body)
    whole = stored("a@x.example", "u@y.example", body)
    digest = hashlib.sha256(whole).digest()
    rounds = 6
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for _ in range(rounds):
                put(box, path)
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    checked: set[str] = set()
    deadline = time.monotonic() + DEADLINE
    while not done.is_set() or len(checked) < len(files(box / "new")):
        assert time.monotonic() < deadline, "timed out"
        for found in files(box / "new"):
            if found.name not in checked:
                assert hashlib.sha256(found.read_bytes()).digest() == digest, found.name
                checked.add(found.name)
    thread.join(DEADLINE)
    assert not errors
    assert len(checked) == rounds


# --- folders and ownership --------------------------------------------------------------


def test_folder_is_a_maildirplusplus_subfolder(tmp_path: Path) -> None:
    box = tmp_path / "box"
    name = put(box, spool_file(tmp_path, message()), folder="Lists")
    folder = box / ".Lists"
    assert (folder / "new" / name).is_file()
    assert (folder / "maildirfolder").is_file()
    assert (folder / "maildirfolder").stat().st_size == 0
    for sub in ("tmp", "new", "cur"):   # the root is a Maildir (INBOX) as well
        assert (box / sub).is_dir() and (folder / sub).is_dir()
        assert stat.S_IMODE((folder / sub).stat().st_mode) == 0o700
    assert files(box / "new") == []
    put(box, spool_file(tmp_path, message()), folder="Lists.tayori")
    assert len(files(box / ".Lists.tayori" / "new")) == 1
    assert usage(str(box)).messages == 2


@pytest.mark.parametrize("name, ok", [
    ("Lists", True), ("a.b", True), ("user+tag=x@y-z_1", True), ("with space", True),
    ("", False), ("INBOX", False), ("inbox", False), (".x", False), ("x.", False),
    ("a..b", False), ("a/b", False), ("..", False), ("x\n", False), ("&x", False),
    ("ünï", False), (" x", False), ("~x", False), ("x" * 201, False)])
def test_valid_folder(name: str, ok: bool) -> None:
    assert valid_folder(name) is ok


def test_created_parents_and_ownership(tmp_path: Path) -> None:
    """The Maildir belongs to ``owner``; parents made above it take the owner of the
    directory they were made in, mode 0711."""
    if os.geteuid() != 0:
        pytest.skip("chown to other users needs root")
    base = tmp_path / "base"
    base.mkdir()
    os.chown(base, 4321, 4322)
    nobody = pwd.getpwnam("nobody")
    owner = (nobody.pw_uid, nobody.pw_gid)
    box = base / "example.org" / "alice"
    name = put(box, spool_file(tmp_path, message()), owner=owner, folder="Lists")
    domain = base / "example.org"
    assert (domain.stat().st_uid, domain.stat().st_gid) == (4321, 4322)
    assert stat.S_IMODE(domain.stat().st_mode) == 0o711
    for path in (box, box / "new", box / "cur", box / "tmp", box / ".Lists",
                 box / ".Lists" / "new", box / ".Lists" / "maildirfolder",
                 box / ".Lists" / "new" / name):
        assert (path.stat().st_uid, path.stat().st_gid) == owner, path


def test_no_link_put_in_place_of_a_directory_being_made_is_followed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone puts a link where a missing parent is about to be made (the race a
    user who may write above the Maildir could try): the delivery fails (451 4.2.0), and
    nothing is made where the link points."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real_mkdir = os.mkdir

    def racing_mkdir(path: str, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        if os.path.basename(path) == "parent":
            os.symlink(elsewhere, path, dir_fd=dir_fd)
        real_mkdir(path, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mkdir", racing_mkdir)
    with pytest.raises(MaildirError) as caught:
        put(tmp_path / "parent" / "box", spool_file(tmp_path, message()))
    assert caught.value.reply.status == "4.2.0"
    assert str(tmp_path / "parent") in caught.value.reply.text
    assert list(elsewhere.iterdir()) == []


# --- quota ------------------------------------------------------------------------------


def test_usage_counts_names_and_stats(tmp_path: Path) -> None:
    box = tmp_path / "box"
    assert usage(str(box)) == Usage(0, 0)
    first = put(box, spool_file(tmp_path, message()))
    size = (box / "new" / first).stat().st_size
    os.rename(box / "new" / first, box / "cur" / (first + ":2,S"))
    put(box, spool_file(tmp_path, message()), folder="Lists")
    (box / "cur" / "123.no-size-here:2,").write_bytes(b"z" * 100)    # stat'ed
    (box / ".Trash" / "cur").mkdir(parents=True)
    (box / ".Trash" / "cur" / "1.x,S=5000:2,ST").write_bytes(b"")    # S= believed
    (box / "tmp" / "9.partial").write_bytes(b"p" * 999)              # not counted
    (box / "new" / ".hidden").write_bytes(b"h")                       # not a message
    assert usage(str(box)) == Usage(2 * size + 100 + 5000, 4)


def test_quota_bytes(tmp_path: Path) -> None:
    box = tmp_path / "box"
    body = spool_file(tmp_path, message())
    name = put(box, body, quota=Quota(bytes=10_000))
    size = (box / "new" / name).stat().st_size
    put(box, body, quota=Quota(bytes=2 * size))           # exactly full is allowed
    with pytest.raises(MaildirError) as caught:
        put(box, body, quota=Quota(bytes=3 * size - 1))
    reply = caught.value.reply
    assert (reply.code, reply.status, reply.text) == (452, "4.2.2", "Mailbox full")
    assert not reply.is_permanent
    assert len(files(box / "new")) == 2 and files(box / "tmp") == []
    put(box, body, quota=Quota(bytes=3 * size, messages=3))


def test_quota_messages_counts_folders(tmp_path: Path) -> None:
    box = tmp_path / "box"
    body = spool_file(tmp_path, message())
    put(box, body, quota=Quota(messages=2))
    put(box, body, quota=Quota(messages=2), folder="Lists")
    with pytest.raises(MaildirError) as caught:
        put(box, body, quota=Quota(messages=2))
    assert caught.value.reply.code == 452
    with pytest.raises(MaildirError):
        put(box, body, quota=Quota(messages=2), folder="Lists")
    assert usage(str(box)).messages == 2
    assert files(box / "tmp") == files(box / ".Lists" / "tmp") == []


def test_maildirsize_appended_when_present(tmp_path: Path) -> None:
    box = tmp_path / "box"
    body = spool_file(tmp_path, message())
    put(box, body)
    assert not (box / "maildirsize").exists()    # never created
    (box / "maildirsize").write_text("1000000S,100C\n123 1\n")
    name = put(box, body, folder="Lists")
    size = (box / ".Lists" / "new" / name).stat().st_size
    assert (box / "maildirsize").read_text() == f"1000000S,100C\n123 1\n{size} 1\n"


# --- errors -----------------------------------------------------------------------------


def failure(call: Callable[[], object]) -> Reply:
    with pytest.raises(MaildirError) as caught:
        call()
    return caught.value.reply


def test_missing_message_file(tmp_path: Path) -> None:
    reply = failure(lambda: put(tmp_path / "box", tmp_path / "gone"))
    assert (reply.code, reply.status) == (451, "4.3.0")
    assert not (tmp_path / "box").exists()


def test_file_where_a_parent_directory_should_be(tmp_path: Path) -> None:
    (tmp_path / "example.org").write_text("not a directory")
    box = tmp_path / "example.org" / "alice"
    reply = failure(lambda: put(box, spool_file(tmp_path, message())))
    assert (reply.code, reply.status) == (451, "4.2.0")
    assert reply.text == f"Cannot deliver to mailbox {box}: Not a directory"


@pytest.mark.parametrize("sub", ["new", "tmp"])
def test_file_where_new_or_tmp_should_be(tmp_path: Path, sub: str) -> None:
    box = tmp_path / "box"
    box.mkdir()
    (box / sub).write_text("oops")
    reply = failure(lambda: put(box, spool_file(tmp_path, message())))
    assert (reply.code, reply.status) == (451, "4.2.0")
    assert reply.text == f"Cannot deliver to mailbox {box / sub}: Not a directory"


def test_symlink_in_the_maildir_is_not_followed(tmp_path: Path) -> None:
    box = tmp_path / "box"
    put(box, spool_file(tmp_path, message()))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rename(box / "new", tmp_path / "old-new")
    (box / "new").symlink_to(elsewhere)
    reply = failure(lambda: put(box, spool_file(tmp_path, message())))
    assert (reply.code, reply.status) == (451, "4.2.0")
    assert str(box / "new") in reply.text
    assert list(elsewhere.iterdir()) == [] and files(box / "tmp") == []


def test_symlinked_root_is_followed(tmp_path: Path) -> None:
    """The root's own path is the operator's: a symbolic link there is fine."""
    real = tmp_path / "real"
    put(real, spool_file(tmp_path, message()))
    (tmp_path / "link").symlink_to(real)
    put(tmp_path / "link", spool_file(tmp_path, message()))
    assert len(files(real / "new")) == 2


def as_nobody(call: Callable[[], object]) -> str:
    """Run ``call`` in a forked child with the ``nobody`` user's ids; the reply of the
    MaildirError it raised (or what went wrong) as text."""
    nobody = pwd.getpwnam("nobody")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: report, and leave without running pytest's cleanup
        status = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            try:
                call()
                text = "delivered"
            except MaildirError as exc:
                text = f"{exc.reply.code} {exc.reply.status} {exc.reply.text}"
            except BaseException as exc:
                text = f"raised {exc!r}"
            os.write(write, text.encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        text = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, text
    return text


def test_permission_denied_is_temporary_and_names_the_path(tmp_path: Path) -> None:
    """EACCES; as root, the delivery runs in a child process as ``nobody``."""
    base = Path(tempfile.mkdtemp(prefix="tayori-maildir-"))   # pytest's tmp_path is 0700
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir(mode=0o700)
        body = spool_file(base, message())
        body.chmod(0o644)
        box = locked / "box"
        expected = f"451 4.2.0 Cannot deliver to mailbox {box}: Permission denied"
        if os.geteuid() == 0:
            assert as_nobody(lambda: put(box, body)) == expected
        else:
            locked.chmod(0o500)
            reply = failure(lambda: put(box, body))
            assert f"{reply.code} {reply.status} {reply.text}" == expected
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("code, expected", [
    (errno.ENOSPC, (452, "4.3.1", "Insufficient system storage")),
    (errno.EDQUOT, (452, "4.2.2", "Mailbox full (disk quota exceeded)")),
    (errno.EIO, (451, "4.3.0", None))])
def test_disk_errors_while_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   code: int, expected: tuple[int, str, str | None]) -> None:
    def full(fd: int, header: bytes, source: int) -> tuple[int, int]:
        os.write(fd, header)
        raise OSError(code, "something private the reply must not show")

    monkeypatch.setattr(maildir, "_copy", full)
    box = tmp_path / "box"
    reply = failure(lambda: put(box, spool_file(tmp_path, message())))
    assert (reply.code, reply.status) == expected[:2]
    if expected[2] is not None:
        assert reply.text == expected[2]
    else:
        assert reply.text == f"Mailbox {box / 'tmp'} unavailable: {os.strerror(code)}"
    assert "private" not in reply.text
    assert files(box / "new") == [] and files(box / "tmp") == []


# --- several mailboxes at once ---------------------------------------------------------------


@pytest.mark.parametrize("body", [b"Subject: x\r\n\r\nline\r\n", b"a\rb\r\n\r\nc\nd\r\r\n",
                                  b"no final line end"])
def test_copies_store_what_single_deliveries_store(tmp_path: Path, body: bytes) -> None:
    path = spool_file(tmp_path, body)
    boxes = [tmp_path / f"box{i}" for i in range(3)]
    names = maildir.deliver_copies(
        [maildir.Copy(str(box), f"u{i}@example.org") for i, box in enumerate(boxes)],
        str(path), return_path="a@example.net", hostname="mx.example.org")
    single = put(tmp_path / "single", path, delivered_to="u0@example.org",
                 return_path="a@example.net")
    for i, (box, name) in enumerate(zip(boxes, names, strict=True)):
        assert isinstance(name, str)
        assert (box / "new" / name).read_bytes() == stored("a@example.net",
                                                           f"u{i}@example.org", body)
        assert name.split(",", 1)[1] == single.split(",", 1)[1]   # the same S= and W=
        assert files(box / "tmp") == []


def test_one_failing_copy_does_not_stop_the_others(tmp_path: Path) -> None:
    path = spool_file(tmp_path, message())
    (tmp_path / "blocked").write_text("a file where a Maildir should be")
    results = maildir.deliver_copies(
        [maildir.Copy(str(tmp_path / "ok1"), "a@x"),
         maildir.Copy(str(tmp_path / "blocked" / "box"), "b@x"),
         maildir.Copy(str(tmp_path / "full"), "c@x", quota=Quota(messages=0)),
         maildir.Copy(str(tmp_path / "ok2"), "d@x")],
        str(path), return_path="", hostname="h")
    assert isinstance(results[0], str) and isinstance(results[3], str)
    assert isinstance(results[1], MaildirError) and results[1].reply.status == "4.2.0"
    assert isinstance(results[2], MaildirError) and results[2].reply.status == "4.2.2"
    assert files(tmp_path / "full" / "new") == [] and files(tmp_path / "full" / "tmp") == []


def test_a_missing_spool_file_fails_every_copy(tmp_path: Path) -> None:
    results = maildir.deliver_copies([maildir.Copy(str(tmp_path / "a"), "a@x"),
                                      maildir.Copy(str(tmp_path / "b"), "b@x")],
                                     str(tmp_path / "gone"), return_path="", hostname="h")
    assert [r.reply.status for r in results if isinstance(r, MaildirError)] == ["4.3.0"] * 2
