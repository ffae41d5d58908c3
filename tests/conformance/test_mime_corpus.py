"""The MIME corpus (../shared/testdata/mime) is received byte-identical (DESIGN §2.3).

Each message goes in twice: over DATA (line ends made CRLF, dot-stuffed on the wire), and
over BDAT with BODY=BINARYMIME exactly as the file holds it. What tayori stores, minus its
own Received header, must equal what the client meant to send, byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import SHARED, Client, Tayori, queued_id, shared_data, strip_received

MIME = SHARED / "mime"
FILES = sorted([*MIME.glob("*.eml"), *MIME.glob("cpython-email/*.txt")]) if MIME.exists() else []


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def dot_stuff(data: bytes) -> bytes:
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def test_corpus_present() -> None:
    shared_data("mime")
    assert len(FILES) >= 40


@pytest.fixture(scope="module")
def mime_server(tmp_path_factory: pytest.TempPathFactory) -> Tayori:
    instance = Tayori(tmp_path_factory.mktemp("mime"))
    instance.start()
    yield instance  # type: ignore[misc]
    instance.stop()


def _begin(client: Client, body: str) -> None:
    client.expect_cmd(f"MAIL FROM:<corpus@example.net> BODY={body}", 250)
    client.expect_cmd("RCPT TO:<u@tayori.test>", 250)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_received_byte_identical(mime_server: Tayori, path: Path) -> None:
    original = path.read_bytes()
    message = crlf(original)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    with mime_server.client() as client:
        client.greeting_and_ehlo()
        _begin(client, "8BITMIME")
        client.expect_cmd("DATA", 354)
        client.send(dot_stuff(message) + b".\r\n")
        over_data = queued_id(client.expect(250))
        _begin(client, "BINARYMIME")
        client.send(b"BDAT %d LAST\r\n" % len(original) + original)
        over_bdat = queued_id(client.expect(250))
    assert strip_received(mime_server.body(over_data)) == message
    assert strip_received(mime_server.body(over_bdat)) == original
