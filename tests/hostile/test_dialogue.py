"""Hostile SMTP input: every reply is a valid SMTP line, and every session ends within its bounds."""

from __future__ import annotations

import re
import subprocess
import time

from hypothesis import given, settings, strategies as st

from greylist.adapters.smtp import MAX_COMMANDS, MAX_SESSION_BYTES, Dialogue, TempfailSession

REPLY = re.compile(rb"^[2345]\d\d[ -][\x20-\x7e]*\r\n$")
chunks = st.lists(st.one_of(st.binary(max_size=700), st.sampled_from(
    [b"HELO x\r\n", b"RCPT TO:<a@b>\r\n", b"QUIT\r\n", b"\r\n", b"\n", b"DATA\r\n", b"x" * 600])), max_size=40)


@settings(max_examples=400)
@given(chunks, st.booleans(), st.one_of(st.floats(0, 1e12), st.floats(allow_nan=True, allow_infinity=True)))
def test_every_reply_is_a_valid_smtp_line_and_the_session_is_bounded(parts, enhanced, retry_in):
    session = TempfailSession(Dialogue("mx.test", "greylisted", enhanced, retry_in))
    out = [session.greeting()]
    for data in parts:
        if session.closed:
            break
        out.append(session.feed(data))
    lines = b"".join(out).split(b"\r\n")[:-1]
    assert all(REPLY.match(line + b"\r\n") for line in lines), lines
    assert len(lines) <= MAX_COMMANDS + 2
    assert session.received <= MAX_SESSION_BYTES + 700 or session.closed


def test_a_flood_without_line_feed_is_cut_at_the_byte_bound():
    session = TempfailSession(Dialogue("mx.test", "greylisted"))
    replies = b""
    sent = 0
    while not session.closed and sent < 10 * MAX_SESSION_BYTES:
        replies += session.feed(b"x" * 4096)
        sent += 4096
    assert session.closed and sent <= MAX_SESSION_BYTES + 4096
    assert replies.endswith(b"421 mx.test too many commands, closing\r\n")


def test_the_wrapper_ends_a_trickling_session_at_its_deadline(wrapper):
    """One byte every 0.3 s keeps the idle timer happy; the session limit still ends it."""
    proc = subprocess.Popen(wrapper.command + ["/bin/true"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL,
                            env=wrapper.env(GREYLIST_TIMEOUT="1", GREYLIST_SESSION_LIMIT="2"))
    started = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - started < 10:
            try:
                proc.stdin.write(b"N")
                proc.stdin.flush()
            except BrokenPipeError:
                break
            time.sleep(0.3)
        out = proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
    assert out.endswith(b"421 mx.test session too long, closing\r\n")
    assert time.monotonic() - started < 5
