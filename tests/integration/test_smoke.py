"""The smallest end-to-end check: one message in, one message queued, bytes intact."""

from __future__ import annotations

from harness import Tayori, queued_id, strip_received


def test_one_message_is_queued_byte_identical(tayori: Tayori) -> None:
    message = b"From: a@example.net\r\nSubject: hello\r\n\r\nbody\r\n"
    with tayori.client() as client:
        client.greeting_and_ehlo()
        reply = client.send_message("a@example.net", ["u@tayori.test"], message)
        assert reply.code == 250
        queue_id = queued_id(reply)
        client.expect_cmd("QUIT", 221)
    envelope = {e.queue_id: e for e in tayori.envelopes()}[queue_id]
    assert envelope.sender == "a@example.net"
    assert [r.address for r in envelope.recipients] == ["u@tayori.test"]
    assert strip_received(tayori.body(queue_id)) == message
