"""Unit tests for tayori.deliver.pipe: what the program gets (input, environment, user),
how its exit is judged (sysexits, signals, output in the reply), the time limit and the
process group, and programs that stop reading."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import stat
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvloop

from tayori.deliver import pipe
from tayori.deliver.pipe import PipeRequest, run_pipe
from tayori.errors import Reply

HOST = "mx.tayori.test"
DEADLINE = 30.0
BODY = b"From: a@x.example\r\nSubject: hello\r\n\r\nline one\r\nline two\r\n"
CAPTURE = """#!/bin/sh
# stdin to $1, the environment to $2, the uid to $3; then exit ${4:-0}
cat > "$1"
env > "$2"
[ -n "$3" ] && id -u > "$3"
exit "${4:-0}"
"""


def script(directory: Path, text: str, name: str = "prog") -> Path:
    path = directory / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def spool(directory: Path, body: bytes = BODY) -> Path:
    path = directory / "body"
    path.write_bytes(body)
    return path


def request(command: str, message: Path, **options: object) -> PipeRequest:
    options.setdefault("sender", "a@x.example")
    options.setdefault("recipient", "user+tag@example.org")
    options.setdefault("original_recipient", options["recipient"])
    options.setdefault("hostname", HOST)
    options.setdefault("timeout", DEADLINE)
    return PipeRequest(command=command, message_path=str(message),
                       **options)  # type: ignore[arg-type]


def run(req: PipeRequest, *, plain_asyncio: bool = False) -> Reply:
    """On uvloop, as the daemon runs (its subprocess API differs from asyncio's: this is
    where the two part ways), or on plain asyncio, tayori's fallback."""
    factory = None if plain_asyncio else uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(run_pipe(req), DEADLINE + pipe.KILL_WAIT +
                                           pipe.PIPES_GRACE + 10))


def environment(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def dead(pid: int) -> Callable[[], bool]:
    return lambda: not alive(pid)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# --- delivered ----------------------------------------------------------------------------


def test_exit_0_delivers_headers_message_and_environment(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setenv("TAYORI_SECRET", "do-not-pass")
    prog = script(tmp_path, CAPTURE)
    got, env = tmp_path / "got", tmp_path / "env"
    reply = run(request(f"{prog} {got} {env}", spool(tmp_path),
                        original_recipient="alias@example.org"))
    assert reply == pipe.DELIVERED
    assert reply.code == 250 and reply.status == "2.0.0"
    assert got.read_bytes() == (b"Return-Path: <a@x.example>\n"
                                b"Delivered-To: user+tag@example.org\n" +
                                BODY.replace(b"\r\n", b"\n"))
    values = environment(env)
    me = pwd.getpwuid(os.geteuid())
    expected = {
        "PATH": "/usr/bin:/bin", "SHELL": "/bin/sh", "LANG": "C",
        "HOME": me.pw_dir, "USER": me.pw_name, "LOGNAME": me.pw_name,
        "SENDER": "a@x.example", "RECIPIENT": "user+tag@example.org",
        "ORIGINAL_RECIPIENT": "alias@example.org",
        "LOCAL": "user+tag", "DOMAIN": "example.org", "EXTENSION": "tag",
    }
    assert {key: values.get(key) for key in expected} == expected
    # Nothing else of ours: only what the shell adds itself (and TZ, when we have it).
    assert set(values) - set(expected) <= {"PWD", "SHLVL", "_", "OLDPWD", "TZ"}
    assert "TAYORI_SECRET" not in values


def test_null_sender_and_no_extension(tmp_path: Path) -> None:
    prog = script(tmp_path, CAPTURE)
    got, env = tmp_path / "got", tmp_path / "env"
    reply = run(request(f"{prog} {got} {env}", spool(tmp_path), sender="",
                        recipient="plain@example.org"))
    assert reply.code == 250
    assert got.read_bytes().startswith(b"Return-Path: <>\nDelivered-To: plain@example.org\n")
    values = environment(env)
    assert values["SENDER"] == "" and values["EXTENSION"] == ""
    assert values["LOCAL"] == "plain" and values["ORIGINAL_RECIPIENT"] == "plain@example.org"


def test_extension_delimiters(tmp_path: Path) -> None:
    prog = script(tmp_path, CAPTURE)
    env = tmp_path / "env"
    assert run(request(f"{prog} /dev/null {env}", spool(tmp_path), recipient="u-x+y@d.example",
                       extension_delimiter="-+")).code == 250
    assert environment(env)["EXTENSION"] == "x+y"
    assert run(request(f"{prog} /dev/null {env}", spool(tmp_path), recipient="+a@d.example",
                       )).code == 250
    assert environment(env)["EXTENSION"] == ""   # a leading delimiter does not count


def test_crlf_and_no_headers(tmp_path: Path) -> None:
    prog = script(tmp_path, CAPTURE)
    got = tmp_path / "got"
    assert run(request(f"{prog} {got} /dev/null", spool(tmp_path),
                       line_ends="crlf")).code == 250
    assert got.read_bytes() == (b"Return-Path: <a@x.example>\r\n"
                                b"Delivered-To: user+tag@example.org\r\n" + BODY)
    assert run(request(f"{prog} {got} /dev/null", spool(tmp_path), line_ends="crlf",
                       add_headers=False)).code == 250
    assert got.read_bytes() == BODY


def test_lf_conversion_across_chunk_boundaries(tmp_path: Path) -> None:
    # A CRLF split between two reads, a bare CR and a bare LF, and a CR at the very end.
    head = b"x" * (pipe.CHUNK - 1)
    body = head + b"\r\nbare\rcr and bare\nlf\r\nlast\r"
    prog = script(tmp_path, CAPTURE)
    got = tmp_path / "got"
    assert run(request(f"{prog} {got} /dev/null", spool(tmp_path, body),
                       add_headers=False)).code == 250
    assert got.read_bytes() == head + b"\nbare\rcr and bare\nlf\nlast\r"


def test_command_line_is_split_without_a_shell(tmp_path: Path) -> None:
    prog = script(tmp_path, '#!/bin/sh\nout=$1\nshift\nprintf "%s|" "$@" > "$out"\n',
                  "args")
    out = tmp_path / "args.out"
    # No shell: $RECIPIENT, ; and > stay literal words.
    reply = run(request(f"{prog} {out} 'two words' $RECIPIENT; \"a'b\" '>x'",
                        spool(tmp_path)))
    assert reply.code == 250
    assert out.read_text() == "two words|$RECIPIENT;|a'b|>x|"
    assert not (tmp_path / "x").exists()
    # ... unless the operator writes one.
    reply = run(request(f"sh -c 'echo \"$RECIPIENT\" > {out}'", spool(tmp_path)))
    assert reply.code == 250
    assert out.read_text() == "user+tag@example.org\n"


# --- judged by the exit status ------------------------------------------------------------


@pytest.mark.parametrize(("status", "code", "enhanced"), [
    (75, 451, "4.3.0"),
    (67, 550, "5.1.1"),
    (68, 550, "5.1.2"),
    (64, 554, "5.3.0"),
    (65, 554, "5.6.0"),
    (71, 451, "4.3.0"),
    (73, 554, "5.2.0"),
    (74, 451, "4.3.0"),
    (77, 554, "5.7.0"),
    (78, 451, "4.3.5"),
    (1, 554, "5.3.0"),
    (100, 554, "5.3.0"),
])
def test_exit_status_mapping(tmp_path: Path, status: int, code: int, enhanced: str) -> None:
    prog = script(tmp_path, CAPTURE)
    reply = run(request(f"{prog} /dev/null /dev/null '' {status}", spool(tmp_path)))
    assert (reply.code, reply.status) == (code, enhanced)
    assert f"exit status {status}" in reply.text


def test_failure_quotes_the_programs_output(tmp_path: Path) -> None:
    prog = script(tmp_path, "#!/bin/sh\ncat >/dev/null\necho 'to stdout'\n"
                  "printf 'no such \\033[31mmailbox\\tx\\n\\n' >&2\nexit 1\n")
    reply = run(request(str(prog), spool(tmp_path)))
    assert (reply.code, reply.status) == (554, "5.3.0")
    assert reply.text.split("\n") == ["command failed with exit status 1", "to stdout",
                                      "no such ?[31mmailbox x"]
    reply.to_bytes()   # a valid reply: no CR, renders


def test_long_output_is_cut(tmp_path: Path) -> None:
    prog = script(tmp_path, "#!/bin/sh\ni=0\nwhile [ $i -lt 20000 ]; do\n"
                  "  echo \"line $i of a program that talks a lot\"; i=$((i+1))\ndone\n"
                  "exit 70\n")
    reply = run(request(str(prog), spool(tmp_path)))
    assert (reply.code, reply.status) == (554, "5.3.0")
    lines = reply.text.split("\n")
    assert lines[0] == "command failed: internal software error (exit status 70)"
    assert lines[1] == "line 0 of a program that talks a lot"
    assert lines[-1] == "..." and len(lines) == 1 + pipe.OUTPUT_LINES + 1
    assert len(reply.text) < pipe.OUTPUT_CHARS + 200
    one_long = script(tmp_path, "#!/bin/sh\nhead -c 3000 /dev/zero | tr '\\0' x\nexit 1\n",
                      "long")
    reply = run(request(str(one_long), spool(tmp_path)))
    assert reply.text.split("\n")[1] == "x" * pipe.OUTPUT_CHARS + "..."


def test_enhanced_status_in_the_output_takes_precedence(tmp_path: Path) -> None:
    prog = script(tmp_path, "#!/bin/sh\necho '4.2.2 mailbox full'\nexit 1\n")
    reply = run(request(str(prog), spool(tmp_path)))
    assert (reply.code, reply.status) == (452, "4.2.2")
    assert reply.text.split("\n") == ["command failed (exit status 1)", "mailbox full"]
    prog = script(tmp_path, "#!/bin/sh\necho '5.1.1 no such user here'\nexit 75\n", "p2")
    reply = run(request(str(prog), spool(tmp_path)))
    assert (reply.code, reply.status) == (550, "5.1.1")
    # Not a status: a version number, or output of a program that succeeded.
    prog = script(tmp_path, "#!/bin/sh\necho '5.1.1x'\nexit 75\n", "p3")
    assert run(request(str(prog), spool(tmp_path))).status == "4.3.0"
    prog = script(tmp_path, "#!/bin/sh\necho '5.1.1 fine'\nexit 0\n", "p4")
    assert run(request(str(prog), spool(tmp_path))).code == 250


def test_killed_by_a_signal_is_temporary(tmp_path: Path) -> None:
    prog = script(tmp_path, "#!/bin/sh\necho dying\nkill -9 $$\n")
    reply = run(request(str(prog), spool(tmp_path)))
    assert (reply.code, reply.status) == (451, "4.3.0")
    assert reply.text.split("\n") == ["command killed by signal 9 (SIGKILL)", "dying"]


# --- time limit and process group ---------------------------------------------------------


def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    prog = script(tmp_path, f"#!/bin/sh\necho $$ > {pids}.tmp\nsleep 60 &\n"
                  f"echo $! >> {pids}.tmp\nmv {pids}.tmp {pids}\necho started\nwait\n")
    started = time.monotonic()
    reply = run(request(str(prog), spool(tmp_path), timeout=1.0))
    assert time.monotonic() - started < 1.0 + pipe.PIPES_GRACE + 5
    assert (reply.code, reply.status) == (451, "4.3.0")
    assert reply.text.split("\n") == ["command timed out after 1s", "started"]
    numbers = [int(n) for n in pids.read_text().split()]
    assert len(numbers) == 2   # the script and its sleep
    for pid in numbers:
        wait_until(dead(pid), f"process {pid} to die")


def test_cancelled_delivery_kills_the_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    prog = script(tmp_path, f"#!/bin/sh\nsleep 60 &\necho $$ $! > {pids}.tmp\n"
                  f"mv {pids}.tmp {pids}\nwait\n")

    async def scenario() -> None:
        task = asyncio.create_task(run_pipe(request(str(prog), spool(tmp_path))))
        deadline = time.monotonic() + DEADLINE
        while not pids.exists():
            assert time.monotonic() < deadline, "the script never started"
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, DEADLINE)

    asyncio.run(scenario())
    for pid in (int(n) for n in pids.read_text().split()):
        wait_until(dead(pid), f"process {pid} to die")


def test_left_behind_processes_do_not_hold_the_delivery(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # The background sleep keeps stdout (and stdin) open after the script exits 0.
    prog = script(tmp_path, f"#!/bin/sh\nsleep 60 &\necho $! > {pids}\nexit 0\n")
    started = time.monotonic()
    reply = run(request(str(prog), spool(tmp_path), timeout=20))
    assert reply.code == 250
    assert time.monotonic() - started < 20
    os.kill(int(pids.read_text()), signal.SIGKILL)


# --- input not read -----------------------------------------------------------------------


@pytest.mark.parametrize(("status", "code"), [(0, 250), (75, 451)])
def test_program_that_does_not_read_stdin(tmp_path: Path, status: int, code: int) -> None:
    message = spool(tmp_path, BODY + (b"y" * 998 + b"\r\n") * 5000)   # 5 MB
    prog = script(tmp_path, f"#!/bin/sh\nexit {status}\n")
    assert run(request(str(prog), message)).code == code
    head = script(tmp_path, "#!/bin/sh\nhead -c 100 > /dev/null\nexit 0\n", "head")
    assert run(request(str(head), message)).code == 250


def test_large_message_in_bounded_memory(tmp_path: Path) -> None:
    message = spool(tmp_path, (b"z" * 1022 + b"\r\n") * (32 * 1024))   # 32 MiB
    prog = script(tmp_path, "#!/bin/sh\nwc -c > \"$1\"\n", "count")
    count = tmp_path / "count.out"
    tracemalloc.start()
    try:
        reply = run(request(f"{prog} {count}", message, add_headers=False))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply.code == 250
    assert int(count.read_text()) == 32 * 1024 * 1023
    assert peak < 8 * 1024 * 1024


# --- cannot run ---------------------------------------------------------------------------


def test_command_not_found_or_not_executable(tmp_path: Path) -> None:
    reply = run(request(str(tmp_path / "missing"), spool(tmp_path)))
    assert (reply.code, reply.status) == (451, "4.3.5")
    assert "No such file or directory" in reply.text
    reply = run(request("no-such-program-anywhere", spool(tmp_path)))
    assert (reply.code, reply.status) == (451, "4.3.5")
    plain = tmp_path / "plain"
    plain.write_text("#!/bin/sh\nexit 0\n")
    plain.chmod(0o644)   # no x bit: not even root may run it
    reply = run(request(str(plain), spool(tmp_path)))
    assert (reply.code, reply.status) == (451, "4.3.5")


@pytest.mark.parametrize("command", ["", "   ", "prog 'unbalanced"])
def test_invalid_command_line(tmp_path: Path, command: str) -> None:
    reply = run(request(command, spool(tmp_path)))
    assert (reply.code, reply.status) == (451, "4.3.5")


def test_unknown_user(tmp_path: Path) -> None:
    reply = run(request("/bin/true", spool(tmp_path), user="no-such-user-tayori"))
    assert (reply.code, reply.status) == (451, "4.3.5")


def test_missing_spool_file(tmp_path: Path) -> None:
    reply = run(request("/bin/true", tmp_path / "gone"))
    assert (reply.code, reply.status) == (451, "4.3.0")


def test_bad_arguments_raise(tmp_path: Path) -> None:
    for options in ({"recipient": "a\r\nb@x"}, {"sender": "a\0@x"}, {"line_ends": "cr"},
                    {"timeout": 0}, {"recipient": ""}):
        with pytest.raises(ValueError):
            run(request("/bin/true", spool(tmp_path), **options))


# --- as another user ----------------------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory that every user can reach (tmp_path's parents are private to us)."""
    path = Path(tempfile.mkdtemp(prefix="tayori-pipe-"))
    path.chmod(0o755)
    out = path / "out"
    out.mkdir()
    out.chmod(0o777 | stat.S_ISVTX)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can run a command as another user")
def test_runs_as_the_configured_user(tmp_path: Path, shared_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    prog = script(shared_dir, CAPTURE)
    out = shared_dir / "out"
    reply = run(request(f"{prog} {out}/got {out}/env {out}/uid", spool(tmp_path),
                        user="nobody"))
    assert reply.code == 250, reply
    assert int((out / "uid").read_text()) == nobody.pw_uid
    assert (out / "got").stat().st_uid == nobody.pw_uid
    assert (out / "got").stat().st_mode & 0o077 == 0   # umask 077
    values = environment(out / "env")
    assert values["USER"] == values["LOGNAME"] == "nobody"
    assert values["HOME"] == nobody.pw_dir
    assert (out / "got").read_bytes().endswith(BODY.replace(b"\r\n", b"\n"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can run a command as anyone")
def test_not_root_cannot_switch_user(tmp_path: Path) -> None:
    reply = run(request("/bin/true", spool(tmp_path), user="nobody"))
    assert (reply.code, reply.status) == (451, "4.3.5")


def test_unreadable_spool_kills_the_program(tmp_path: Path) -> None:
    # A directory opens, but reading it fails: the program must not see an end of input.
    prog = script(tmp_path, CAPTURE)
    got = tmp_path / "got"
    reply = run(request(f"{prog} {got} /dev/null", tmp_path))
    assert (reply.code, reply.status) == (451, "4.3.0")
    assert reply.text == "Cannot read the queued message"


def test_plain_asyncio_loop_too(tmp_path: Path) -> None:
    """Without uvloop tayori runs on asyncio's own loop: pipes work there as well."""
    out = tmp_path / "out"
    command = script(tmp_path, f'#!/bin/sh\ncat > "{out}"\nexit 0\n')
    reply = run(request(str(command), spool(tmp_path)), plain_asyncio=True)
    assert reply.code == 250
    assert out.read_bytes().endswith(BODY.replace(b"\r\n", b"\n"))
