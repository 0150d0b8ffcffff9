"""The tempfail dialogue, reply for reply, and the hostile-input line reader."""

from __future__ import annotations

from hypothesis import given, strategies as st

from greylist.adapters.smtp import MAX_LINE, Dialogue, LineReader

REFERENCE = [  # shared/reference/cqgreylist-behaviour.md
    (b"HELO client.example", "250 mx.test", False),
    (b"EHLO client.example", "250 hello", False),
    (b"MAIL FROM:<a@example.org>", "250 ok", False),
    (b"RCPT TO:<b@example.net>", "450 Rcpt to <> - you are greylisted try again", False),
    (b"DATA", "451 you are greylisted try again", False),
    (b"RSET", "250 ready", False),
    (b"NOOP", "250 noop", False),
    (b"VRFY postmaster", "502 not implemented", False),
    (b"EXPN list", "502 not implemented", False),
    (b"HELP", "502 not implemented", False),
    (b"STARTTLS", "502 not implemented", False),
    (b"rcpt to:<lower@case>", "450 Rcpt to <> - you are greylisted try again", False),
    (b"QUITTING", "221 mx.test Bye", True),  # first four characters, as cqgreylist
    (b"QUIT", "221 mx.test Bye", True),
]


def test_dialogue_reply_for_reply():
    d = Dialogue("mx.test", "you are greylisted try again")
    assert d.greeting == "220 mx.test cqgreylist - reconnect later"
    assert d.timeout == "421 mx.test timeout"
    for line, reply, close in REFERENCE:
        assert d.answer(line) == (reply, close), line


def test_enhanced_codes_and_retry_hint():
    d = Dialogue("mx.test", "greylisted, please try again", enhanced=True, retry_in=42.2)
    assert d.answer(b"RCPT TO:<x@y>")[0] == "450 4.7.1 Rcpt to <> - greylisted, please try again in 43 s"
    assert d.answer(b"DATA")[0] == "451 4.7.1 greylisted, please try again in 43 s"


def test_crlf_bare_lf_and_split_reads():
    r = LineReader()
    assert r.feed(b"HELO a\r\nMA") == [b"HELO a"]
    assert r.feed(b"IL FROM:<>\nRC") == [b"MAIL FROM:<>"]
    assert r.feed(b"PT TO:<x>\r\n") == [b"RCPT TO:<x>"]


def test_overlong_line_is_answered_once_and_dropped():
    r = LineReader()
    out = r.feed(b"X" * 600)
    assert out == [None]
    assert r.feed(b"Y" * 600) == []
    assert r.feed(b"tail\r\nQUIT\r\n") == [b"QUIT"]
    assert r.feed(b"A" * (MAX_LINE - 2) + b"\r\n") == [b"A" * (MAX_LINE - 2)]
    assert r.feed(b"A" * (MAX_LINE - 1) + b"\r\n") == [None]


@given(st.lists(st.binary(max_size=2000), max_size=20))
def test_any_byte_stream_yields_bounded_lines(chunks):
    r = LineReader()
    d = Dialogue("mx.test", "m")
    for chunk in chunks:
        for line in r.feed(chunk):
            if line is not None:
                assert len(line) < MAX_LINE and b"\n" not in line
                reply, _ = d.answer(line)
                assert reply[:3].isdigit()
        assert len(r.buffer) < MAX_LINE
