"""The SMTP side of a tempfail, as data: replies defined once, lines read safely.

cqgreylist answers the whole SMTP dialogue itself when it tempfails, so that
the client sees a 4xx at RCPT and queues the message; :class:`Dialogue`
follows cqgreylist's replies one for one (the table in README.md, "Installing
in front of qmail-smtpd"). The reader is bytes-only: no line is ever decoded, so
non-UTF-8 input cannot raise, and a line is capped at 512 bytes (RFC 5321
4.5.3.1.4) so a hostile client cannot make us buffer without bound.
"""

from __future__ import annotations

MAX_LINE = 512
MAX_COMMANDS = 100
#: Bytes one tempfail session may send in all: 100 commands of 512 bytes fit
#: (a real MTA sends a few hundred bytes before it gets its 450).
MAX_SESSION_BYTES = 64 * 1024


def tempfail_text(message: str, enhanced: bool, retry_in: float) -> str:
    """The text after a 4xx code: ``MESSAGE``, or ``4.7.1 MESSAGE in N s`` with enhanced codes.

    Shared by the wrapper's dialogue, the qmail-spp plugin and the policy server.
    """
    if not enhanced:
        return message
    # retry_in comes from the policy, bounded by delay + clock skew; a value that is not
    # a finite number still gets a reply, without the hint
    hint = f" in {max(1, int(retry_in + 0.999))} s" if 0 < retry_in < 1e9 else ""
    return f"4.7.1 {message}{hint}"


class Dialogue:
    """Replies of the greylisting dialogue for one host name and message."""

    def __init__(self, host: str, message: str, enhanced: bool = False, retry_in: float = 0.0):
        self.host = host
        text = tempfail_text(message, enhanced, retry_in)
        if enhanced:  # the enhanced code leads: 450 4.7.1 Rcpt to <> - MESSAGE in N s
            code, _, rest = text.partition(" ")
            rcpt = f"450 {code} Rcpt to <> - {rest}"
        else:
            rcpt = f"450 Rcpt to <> - {text}"
        data = f"451 {text}"
        self.replies = {
            b"HELO": f"250 {host}",
            b"EHLO": "250 hello",
            b"MAIL": "250 ok",
            b"RCPT": rcpt,
            b"DATA": data,
            b"RSET": "250 ready",
            b"NOOP": "250 noop",
        }
        self.greeting = f"220 {host} cqgreylist - reconnect later"
        self.bye = f"221 {host} Bye"
        self.unknown = "502 not implemented"
        self.too_long = "500 line too long"
        self.timeout = f"421 {host} timeout"
        self.too_many = f"421 {host} too many commands, closing"
        self.too_long_session = f"421 {host} session too long, closing"

    def answer(self, line: bytes) -> tuple[str, bool]:
        """The reply to one command line (without its line ending), and whether to close."""
        verb = line[:4].upper()
        if verb == b"QUIT":
            return self.bye, True
        return self.replies.get(verb, self.unknown), False


def unavailable(host: str) -> str:
    """The reply when we cannot decide at all: the client keeps the mail and retries."""
    return f"421 {host} service temporarily unavailable, closing transmission channel"


def encode(reply: str) -> bytes:
    return reply.encode("utf-8", "replace") + b"\r\n"


class LineReader:
    """Splits a byte stream into command lines: CRLF or bare LF, at most MAX_LINE bytes.

    ``feed`` returns the complete lines; an over-long line is returned once as
    ``None`` (answer "too long") and the rest of it, up to its LF, is dropped.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.skipping = False

    def feed(self, data: bytes) -> list[bytes | None]:
        self.buffer += data
        lines: list[bytes | None] = []
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) >= MAX_LINE and not self.skipping:
                    lines.append(None)
                    self.skipping = True
                if self.skipping:
                    self.buffer = b""
                return lines
            line, self.buffer = self.buffer[:end], self.buffer[end + 1 :]
            if self.skipping:
                self.skipping = False
                continue
            if len(line) + 1 > MAX_LINE:
                lines.append(None)
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            lines.append(line)


class TempfailSession:
    """The greylisting dialogue of one connection as a state machine, with no I/O.

    The wrapper drives it from a blocking loop and ``greylist serve`` from its
    event loop, so both answer byte for byte the same. Bounded: the idle
    timeout (the driver calls :meth:`idle`), a whole-session deadline the
    driver enforces with :meth:`expired`, :data:`MAX_COMMANDS` lines and
    :data:`MAX_SESSION_BYTES` bytes; past a bound the session answers 421 and
    closes, so no client holds it longer than it allows.
    """

    __slots__ = ("dialogue", "reader", "commands", "received", "closed")

    def __init__(self, dialogue: Dialogue) -> None:
        self.dialogue = dialogue
        self.reader = LineReader()
        self.commands = 0
        self.received = 0
        self.closed = False

    def greeting(self) -> bytes:
        return encode(self.dialogue.greeting)

    def feed(self, data: bytes) -> bytes:
        """The replies to what the client sent; sets :attr:`closed` when the session ends."""
        out = []
        self.received += len(data)
        if self.received > MAX_SESSION_BYTES:
            self.closed = True
            return encode(self.dialogue.too_many)
        for line in self.reader.feed(data):
            self.commands += 1
            if self.commands > MAX_COMMANDS:
                self.closed = True
                out.append(encode(self.dialogue.too_many))
                break
            if line is None:
                out.append(encode(self.dialogue.too_long))
                continue
            reply, close = self.dialogue.answer(line)
            out.append(encode(reply))
            if close:
                self.closed = True
                break
        return b"".join(out)

    def idle(self) -> bytes:
        """The reply when the client has been silent for the idle timeout; the session ends."""
        self.closed = True
        return encode(self.dialogue.timeout)

    def expired(self) -> bytes:
        """The reply when the whole-session deadline has passed; the session ends."""
        self.closed = True
        return encode(self.dialogue.too_long_session)
