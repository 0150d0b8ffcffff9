"""``greylist policyd``: a Postfix policy server on the same service.

Postfix asks it once per recipient (``check_policy_service`` in
``smtpd_recipient_restrictions``) with the policy delegation protocol:
``name=value`` lines, an empty line, and one ``action=...`` reply followed by
an empty line, several requests per connection. A tempfail is
``action=DEFER_IF_PERMIT <message>`` (Postfix answers 450 4.7.1 unless a later
restriction rejects anyway); anything else is ``action=DUNNO``, and a client
that passed after waiting gets an ``X-Greylist`` header, as postgrey adds.

One process, one event loop (a small one on epoll: see
:mod:`greylist.adapters.eventloop`), one service with its store opened once: a
connection costs a socket, not a thread. Everything a client controls is
bounded: an attribute is cut to 512 characters (as postgrey does, and the
request is still decided: a long HELO name is no way around greylisting),
a request to 32 KiB and 100 attributes, an idle connection to 300 s. The
number of connections is bounded below the descriptor limit; at the bound
the connection idle the longest is closed to make room (Postfix reconnects
when it needs to), with a log line, so a new client is always answered and
the accept loop never spins. Decisions are committed together, at most
``COMMIT_WINDOW`` seconds after the first (a store such as SQLite then pays
one commit for hundreds of decisions; a crash costs those clients one more
delay, never mail). A garbage or incomplete request is answered
DUNNO and logged, never with a crash.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import sys
import time
from collections import deque
from heapq import nsmallest
from itertools import repeat
from operator import attrgetter

from greylist.adapters import reloads
from greylist.adapters.acceptor import Acceptor, SocketSession, largest_backlog, raise_descriptor_limit
from greylist.adapters.eventloop import Loop
from greylist.adapters.logwriter import ERR, INFO, NOTICE, STOP_WAIT, WARNING, LogWriter, prefixed
from greylist.adapters.smtp import tempfail_text
from greylist.core.keys import BadAddress, parse_ip
from greylist.core.policy import PASSED, TEMPFAIL, Verdict
from greylist.service import COMMIT_WINDOW, Connection, Greylister, log_line

MAX_LINE = 2048          # longer lines are read to their end and their value cut
MAX_VALUE = 512          # postgrey's cut
MAX_REQUEST = 32 * 1024
MAX_ATTRIBUTES = 100
_EQUALS, _ONCE = repeat("="), repeat(1)  # the arguments of every request line's split
IDLE_TIMEOUT = 300.0
#: how often (in parts of the idle timeout) the server looks for idle clients
SWEEPS = 4
LOG_WINDOW = 0.2         # log lines are written together, at most this late
LOG_BATCH = 64           # or when this many wait (256 held every client 1 ms)
DEFAULT_MAX_CONNECTIONS = 4000
#: at the connection bound, the connections idle the longest are found this many at a time
EVICT_BATCH = 64
_LAST = attrgetter("last")


class RequestError(ValueError):
    """The request cannot be read; the connection is answered and closed."""


class RequestReader:
    """Policy requests from a byte stream: ``feed`` returns the complete ones (sans-IO)."""

    __slots__ = ("buffer", "attrs", "size", "skipping", "garbage", "truncated")

    def __init__(self) -> None:
        self.buffer = b""
        self.attrs: dict[str, str] = {}
        self.size = 0
        self.skipping = False  # inside an over-long line, after its first MAX_LINE bytes
        self.garbage = ""
        self.truncated: list[str] = []

    def feed(self, data: bytes) -> list[dict[str, str]]:
        """Complete requests (attributes; ``_garbage`` and ``_truncated`` note what was odd).

        ``size`` counts the bytes of the request being read (skipped ones too), not of the
        read: several requests in one read (a client that sends its next before the answer)
        are each bounded, and answered, however many a read holds."""
        # find(), not `b"\r" not in data`: bytes' `in` first tries its operand as an integer
        # and formats the TypeError it then clears (1,800 instructions, a fifth of a parse)
        if (len(data) <= MAX_LINE and data.find(b"\n\n") == len(data) - 2 > 0 and data.find(b"\r") < 0
                and data[:1] != b"\n" and not (self.buffer or self.attrs or self.skipping or self.garbage)):
            return [self._whole(data)]  # Postfix's usual read: exactly one request
        self.buffer += data
        done = []
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                if self.size + len(self.buffer) > MAX_REQUEST:
                    raise RequestError(f"a request larger than {MAX_REQUEST} bytes")
                if len(self.buffer) > MAX_LINE:
                    if not self.skipping:
                        self._line(self.buffer)  # keep its name and the start of its value
                    self.skipping = True
                    self.size += len(self.buffer)
                    self.buffer = b""
                return done
            self.size += end + 1
            if self.size > MAX_REQUEST:
                raise RequestError(f"a request larger than {MAX_REQUEST} bytes")
            line, self.buffer = self.buffer[:end], self.buffer[end + 1:]
            if self.skipping:
                self.skipping = False
                continue
            if not line.rstrip(b"\r"):
                done.append(self._complete())
                continue
            self._line(line)

    def _whole(self, data: bytes) -> dict[str, str]:
        """One whole request with no line that can be over-long. Postfix's requests
        (some 30 lines) are read in one step per line and a few checks of the whole:
        read line by line in Python, they were a tenth of a decision's work."""
        text = data[:-2].decode("utf-8", "replace")
        lines = text.split("\n")
        if len(lines) <= MAX_ATTRIBUTES and "=" in text:
            try:
                attrs = dict(map(str.split, lines, _EQUALS, _ONCE))  # line.split("=", 1), all in C
            except ValueError:  # a line without "=": garbage, said below
                pass
            else:
                names = "".join(attrs)
                # no name to strip or cut, no value to cut. Names of letters, digits and "_"
                # (Postfix's), checked as bytes: str.isprintable() asks the Unicode tables
                # about each character (10,700 instructions for a real request's 31 names).
                # Lengths from the totals, else from the lines (a real request's are all
                # under 100 characters), else name by name and value by value: each pass
                # over a real request's 31 items costs some 12,000 instructions.
                if (names.encode().replace(b"_", b"").isalnum()
                        and ((len(names) <= 100 and len(text) <= MAX_VALUE) or max(map(len, lines)) <= 100
                             or (max(map(len, attrs)) <= 100
                                 and (len(text) <= MAX_VALUE or max(map(len, attrs.values())) <= MAX_VALUE)))):
                    return attrs
        for line in lines:
            self._attribute(line)  # garbage, a name to strip, a value to cut, too many
        return self._complete()

    def _complete(self) -> dict[str, str]:
        request = self.attrs
        if self.garbage:
            request["_garbage"] = self.garbage
        if self.truncated:
            request["_truncated"] = ",".join(self.truncated)
        self.attrs, self.garbage, self.truncated = {}, "", []
        self.size = 0
        return request

    def _line(self, raw: bytes) -> None:
        self._attribute(raw.rstrip(b"\r\n").decode("utf-8", "replace"))

    def _attribute(self, text: str) -> None:
        name, eq, value = text.partition("=")
        if not eq:
            self.garbage = self.garbage or text[:60]
            return
        if len(self.attrs) >= MAX_ATTRIBUTES:
            raise RequestError(f"more than {MAX_ATTRIBUTES} attributes")
        if len(value) > MAX_VALUE:
            value = value[:MAX_VALUE]
            self.truncated.append(name.strip()[:40])
        self.attrs[name.strip()[:100]] = value

    @property
    def partial(self) -> bool:
        return bool(self.attrs or self.buffer or self.garbage)


class Replies:
    """What the server answers, as data: the action for a tempfail, its text and the
    header of mail that passed after waiting. Ours by default; ``greylist postgrey``
    gives postgrey's (``--greylist-action``, ``--greylist-text`` with ``%s`` seconds
    left and ``%r`` the recipient's domain, ``--x-greylist-header`` with ``%t``
    seconds waited, ``%v`` version, ``%d`` date, ``%h`` host name, and 4.2.0 in
    front of the text for clients that give ``etrn_domain``, postgrey's work-around
    for Exchange)."""

    def __init__(self, action: str = "DEFER_IF_PERMIT", text: str | None = None,
                 header: str | None = None, version: str = "") -> None:
        self.action = action
        self.text = text
        self.header = header
        self.version = version

    def tempfail(self, config, verdict: Verdict, attrs: dict[str, str]) -> str:
        if self.text is None:
            # Postfix puts 450 4.7.1 in front itself: the text only, with the hint if asked for.
            text = tempfail_text(config.message, config.enhanced, verdict.retry_in).removeprefix("4.7.1 ")
        else:
            text = self.text
            if "etrn_domain" in attrs and not text[:1].isdigit():
                text = "4.2.0 " + text
            if "%s" in text:
                text = text.replace("%s", str(max(0, int(verdict.retry_in + 0.999))), 1)
            if "%r" in text:
                domain = attrs.get("recipient", "").rpartition("@")[2]
                if not (domain.isascii() and domain.isprintable()):  # the client's text, in our reply
                    domain = "".join(c if " " < c <= "~" else "?" for c in domain)
                text = text.replace("%r", domain, 1)
        return f"action={self.action} {text}"

    def passed(self, config, verdict: Verdict) -> str:
        host = config.hostname or os.uname().nodename
        if self.header is None:
            return (f"action=PREPEND X-Greylist: delayed {int(verdict.age)} seconds by greylist at {host}; "
                    f"{time.strftime('%a, %d %b %Y %H:%M:%S %z')}")
        header = self.header.replace("%t", str(int(verdict.age)), 1).replace("%v", self.version, 1)
        header = header.replace("%d", time.strftime("%a, %d %b %Y %H:%M:%S %Z"), 1).replace("%h", host, 1)
        return f"action=PREPEND {header}"


OUR_REPLIES = Replies()


def action_for(config, verdict: Verdict, shadow: bool = False, attrs: dict[str, str] | None = None,
               replies: Replies = OUR_REPLIES) -> str:
    """The action line; in shadow mode nobody was delayed, so no X-Greylist header."""
    if verdict.action == TEMPFAIL:
        return replies.tempfail(config, verdict, attrs or {})
    if verdict.reason == PASSED and not shadow:
        return replies.passed(config, verdict)
    return "action=DUNNO"


def answer(greylister, attrs: dict[str, str], replies: Replies = OUR_REPLIES) -> tuple[str, dict[str, object]]:
    """The reply line for one request, and its log fields."""
    if attrs.get("request") != "smtpd_access_policy":
        return "action=DUNNO", {"verdict": "error", "error": "not an smtpd_access_policy request"
                                + (f" ({attrs['_garbage']!r})" if "_garbage" in attrs else "")}
    if not attrs.get("client_address"):
        return "action=DUNNO", {"verdict": "error", "error": "no client_address in the request"}
    try:
        ip = parse_ip(attrs["client_address"])
    except BadAddress as exc:
        return "action=DUNNO", {"verdict": "error", "error": str(exc)}
    sender, recipient = attrs.get("sender", ""), attrs.get("recipient", "")
    # client_name is Postfix's verified name (its PTR resolves back to the address);
    # reverse_client_name is the unverified PTR, the client's own claim: never used
    host = attrs.get("client_name") or ""
    if host == "unknown":
        host = ""
    outcome = greylister.decide(Connection(ip, host, sender, recipient or "<>", host_verified=True))
    reply = action_for(outcome.config, outcome.verdict, outcome.shadow is not None, attrs, replies)
    fields = outcome.fields()
    # Decided wherever Postfix asks, as postgrey does: a site that asks in
    # smtpd_data_restrictions (or with smtpd_delay_reject=no) is greylisted there, not
    # passed. Postfix takes a header only before the message and within a transaction
    # (it warns and ignores PREPEND at END-OF-MESSAGE, CONNECT, EHLO and HELO).
    state = attrs.get("protocol_state", "RCPT").upper()
    if state != "RCPT":
        fields["state"] = state[:20]
        if state not in HEADER_STATES and reply.startswith("action=PREPEND "):
            reply = "action=DUNNO"
            fields["header"] = "none at this stage"
    return reply, fields


#: the verdicts of a decision's log line (a request that could not be decided is "error")
DECISIONS = frozenset({"pass", "tempfail"})


#: what is left of a decision's line under quiet: the event it noted, and whose
QUIET_FIELDS = frozenset({"ip", "whitelisted_after", "_request"})


#: the fields of a decision's line that say nothing more than the decision
PLAIN_FIELDS = frozenset({"ip", "from", "to", "verdict", "reason", "age", "retry_in", "key", "decision_ms",
                          "_request", "shadow", "header", "state", "truncated"})


def _level(names) -> int:
    """ERR where one of a line's field ``names`` is an error, WARNING where one is a warning,
    else INFO."""
    level = INFO
    for name in names:
        if name == "error" or name.endswith("_error"):
            return ERR
        if name.endswith("warning"):
            level = WARNING
    return level


def noteworthy(fields: dict[str, object]) -> bool:
    """A decision's line says more than the decision: a store that failed (on_error passed
    the client), held rows lost, a whitelist unreadable. Such a line is written however
    quiet the log is asked to be, or a store down would pass every client unsaid."""
    return _level(fields.keys() - PLAIN_FIELDS) < INFO


#: lines postgrey writes at its log level 1 (syslog's warning): a client auto-whitelisted, the
#: nightly clean-up, a reload; and ours of the kind: connections refused at the bound
LEVEL_1 = frozenset({"whitelisted_after", "expire", "reloaded", "refused"})


def priority(fields: dict[str, object]) -> int:
    """A line's syslog priority, as postgrey's Net::Server gives its own: an error err, what
    postgrey logs at its level 1 (and our warnings) warning, a decision notice, the rest
    (the start's lines) info. A monitor watching mail.err, or ``journalctl -p err``, then
    sees a store that failed."""
    unusual = fields.keys() - PLAIN_FIELDS  # a decision's usual line has none
    if unusual:
        level = _level(unusual)
        if level < INFO:
            return level
        if not LEVEL_1.isdisjoint(unusual):
            return WARNING
    return NOTICE if fields.get("verdict") in DECISIONS else INFO


#: the protocol states where Postfix adds a PREPEND's header (smtpd_check.c)
HEADER_STATES = frozenset({"RCPT", "MAIL", "DATA"})


class Messages:
    """postgrey's rule for the X-Greylist header: once a message. Postfix asks once per
    recipient, each with the message's ``instance``; when several recipients' triplets pass
    after waiting, the first gets the header and the others DUNNO, or the message would
    carry a header a recipient. Like postgrey, the last 10 instances are remembered (its
    list starts as ten "0"s, so an instance "0" never gets one either); a request with no
    instance (Exim) always gets it."""

    __slots__ = ("recent",)

    def __init__(self, size: int = 10) -> None:
        self.recent: deque[str] = deque(["0"] * size, maxlen=size)

    def first_time(self, instance: str | None) -> bool:
        if instance is None:
            return True
        if instance in self.recent:
            return False
        self.recent.appendleft(instance)
        return True


def _safe_line(line_format, program: str, fields: dict[str, object], exc: Exception, levels: bool = False) -> bytes:
    """A line that could not be formatted with the others: each alone, in our own format if
    need be, or a line saying so (never the window's other lines lost with it)."""
    try:
        line = line_format(program, fields)
    except Exception:  # noqa: BLE001
        try:
            line = log_line(program, {k: v for k, v in fields.items() if not k.startswith("_")})
        except Exception:  # noqa: BLE001
            fields = {"verdict": "error",
                      "error": f"internal error {type(exc).__name__}: a log line could not be written"}
            line = log_line(program, fields)
    try:
        return prefixed(line, priority(fields)) if levels else line
    except Exception:  # noqa: BLE001 - a field name that is no string: the line, unmarked
        return line


class Client(SocketSession):
    """One Postfix connection on the event loop."""

    __slots__ = ("server", "reader")

    #: the server closes idle clients from one timer (PolicyServer.sweep): a timer a
    #: connection, made and cancelled, was 1.7% and 2.5% of a connection's CPU with one
    #: client connecting for each request (two runs of alternating turns, 13 each; their
    #: controls 0.997 and 1.002); 50 such clients' p99 was no different (15 turns)
    timed = False

    def __init__(self, server: "PolicyServer", sock: socket.socket) -> None:
        super().__init__(server.loop, sock, server.idle_timeout)
        self.server = server
        self.reader = RequestReader()
        self.start()

    def received(self, data: bytes) -> None:
        try:
            requests = self.reader.feed(data)
        except RequestError as exc:
            self.server.log({"verdict": "error", "error": str(exc)})
            self.reply("action=DUNNO")
            self.close()
            return
        for attrs in requests:
            answer_line, fields = self.server.answer(attrs)
            self.server.log(fields)
            if not self.reply(answer_line) or self.server.one_request:
                self.close()
                return

    def unwatch(self, fd: int) -> None:
        self.loop.forget_reader(fd)  # our loop; the socket is closed next, and only we hold it

    def reply(self, line: str) -> bool:
        return self.send(line.encode("utf-8", "replace") + b"\n\n")

    def ended(self) -> None:
        if self.reader.partial:
            self.server.log({"verdict": "error", "error": "connection closed in the middle of a request"})

    def closing(self) -> None:
        self.server.clients.pop(self, None)
        self.server.room()


class PolicyServer:
    """The listening socket, the clients, and the one greylisting service."""

    def __init__(self, listener: socket.socket, config, where: str, idle_timeout: float = IDLE_TIMEOUT,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, replies: Replies = OUR_REPLIES,
                 quiet: bool = False, test_time: bool = False, one_request: bool = False,
                 line_format=None, program: str = "greylist-policyd", nightly_expiry: bool = False,
                 levels: bool | None = None) -> None:
        self.replies = replies
        #: how a request's log line is written: ours (log_line), or postgrey's words for
        #: greylist postgrey (given the request itself, as field "_request")
        self.line_format = line_format or log_line
        self.request_in_log = line_format is not None
        self.one_request = one_request  # postgrey --exim: Exim opens a connection per query
        self.quiet = quiet
        # postgrey's policy_test_time attribute, for differential tests only: a client that
        # could set our clock could pass any triplet, so it is off unless asked for
        self.test_time = test_time
        self.now: float | None = None
        self.listener = listener
        self.config = config
        self.where = where
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.greylister = Greylister(config, clock=self.clock, commit_window=COMMIT_WINDOW, in_rounds=True,
                                     report=self.log)
        self.program = program
        self.lines: list[dict[str, object]] = []  # log lines (their fields) of this window
        self.messages = Messages()  # one X-Greylist header a message
        self.log_timer = None
        self.clients: dict[Client, None] = {}  # in order of arrival
        self.loop = Loop()  # not asyncio's: 9 MB less resident memory, less work per callback
        self.loop.at_round_end.append(self.greylister.write_owed)  # the round's rows, written together
        self.log_writer = LogWriter(self.loop, self.program, levels=levels)  # levels: see LogWriter
        self.loop.on_error = self.internal_error
        self.acceptor = Acceptor(self.loop, listener, self.accepted, self.at_bound, self.accept_failed,
                                 self.read_the_rest)
        self.fresh: list[Client] | None = None  # accepted this round, read once its accepts are done
        self.evicted = 0
        #: the next to close at the bound (the idle longest last), each with its ``last`` then
        self.evictable: list[tuple[Client, float]] = []
        self.nightly = None  # postgrey's nightly clean-up (greylist postgrey)
        if nightly_expiry:
            from greylist.adapters.nightly import NightlyExpiry, needs_expiry

            if needs_expiry(config.store):
                self.nightly = NightlyExpiry(self.loop, config, self.log)

    def internal_error(self, exc: Exception, callback) -> None:
        """A callback raised: a bug of ours. Logged as one; the client it served is
        disconnected (Postfix asks again on a new connection) and the others go on."""
        where = getattr(callback, "__qualname__", type(callback).__name__)
        self.log({"verdict": "error", "error": f"internal error {type(exc).__name__} in {where}: {exc}"})
        owner = getattr(callback, "__self__", None)
        if isinstance(owner, SocketSession):
            owner.close()

    def log(self, fields: dict[str, object]) -> None:
        """One line per request, formatted and written with the others of its window:
        at most ``LOG_WINDOW`` seconds after the first, at once when ``LOG_BATCH`` are
        waiting, and when the server stops. A log reader (multilog, journald) then
        wakes once per window, not per request, and the lines are formatted in one hot
        loop; a crash loses the lines of at most one window, as it loses the window's
        held decisions."""
        if self.quiet and fields.get("verdict") in DECISIONS and not noteworthy(fields):
            # postgrey's -q: no decision is logged, but every error and warning is, and
            # what postgrey logs at that level: a client auto-whitelisted now
            if "whitelisted_after" not in fields:
                return
            fields = {name: value for name, value in fields.items() if name in QUIET_FIELDS}
        lines = self.lines
        lines.append(fields)
        if len(lines) == 1 and self.log_timer is None:
            self.log_timer = self.loop.call_later(LOG_WINDOW, self.write_log)
        elif len(lines) >= LOG_BATCH:
            self.write_log()

    def write_log(self) -> None:
        """The window's lines, to a writer that never waits for the log reader."""
        if self.log_timer is not None:
            self.log_timer.cancel()
            self.log_timer = None
        if not self.lines:
            return
        lines, self.lines = self.lines, []
        line_format, levels = self.line_format, self.log_writer.levels
        try:
            if levels:
                data = b"".join([prefixed(line_format(self.program, fields), priority(fields)) for fields in lines])
            else:
                data = b"".join([line_format(self.program, fields) for fields in lines])
        except Exception as exc:  # noqa: BLE001 - a field that cannot be written: our bug, said once
            data = b"".join(_safe_line(line_format, self.program, fields, exc, levels) for fields in lines)
        self.log_writer.write(data)

    def clock(self) -> float:
        return time.time() if self.now is None else self.now

    def answer(self, attrs: dict[str, str]) -> tuple[str, dict[str, object]]:
        self.now = None
        if self.test_time and "policy_test_time" in attrs:
            try:
                self.now = float(attrs["policy_test_time"])
            except ValueError:
                pass
        try:
            reply, fields = answer(self.greylister, attrs, self.replies)
        except Exception as exc:  # noqa: BLE001 - a bug of ours is logged as one, and mail goes on
            return "action=DUNNO", {"verdict": "error", "error": f"internal error {type(exc).__name__}: {exc}"}
        if reply.startswith("action=PREPEND ") and not self.messages.first_time(attrs.get("instance")):
            reply = "action=DUNNO"
            fields["header"] = "added already"  # to this message, for an earlier recipient
        if "_truncated" in attrs:
            fields["truncated"] = attrs["_truncated"]
        if self.request_in_log:
            fields["_request"] = attrs
        self.greylister.flush_in_time(self.loop)
        return reply, fields

    def start(self) -> None:
        loop = self.loop
        loop.add_signal_handler(signal.SIGTERM, loop.stop)
        loop.add_signal_handler(signal.SIGINT, loop.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        reloads.release()  # a SIGHUP that came as it started reloads it now
        self.acceptor.resume()
        loop.call_later(self.idle_timeout / SWEEPS, self.sweep)
        if self.nightly is not None:
            self.nightly.start()

    def sweep(self) -> None:
        """Close the clients silent for the idle timeout, at most a SWEEPS-th of it late
        (Postfix closes its own after smtpd_policy_service_max_idle, 300 s by default: this
        is for clients that never do). The clients are walked in order of arrival, not of
        their last request, so all of them. The next sweep is set first: a failure here (a
        bug, logged by the loop) must not end the sweeps."""
        now = self.loop.time()
        idle = self.idle_timeout
        self.loop.call_later(idle / SWEEPS, self.sweep)
        for client in [client for client in self.clients if now - client.last >= idle]:
            client.idled()
            client.close()

    def reload(self) -> None:
        said = self.greylister.reload()
        self.log({"reloaded": "whitelists and store", **({"store_warning": "; ".join(said)} if said else {})})

    def room(self) -> None:
        if not self.acceptor.accepting and len(self.clients) < self.max_connections:
            self.acceptor.resume()

    def at_bound(self) -> bool:
        """Never full: a connection accepted at the bound closes the one idle the longest
        (see accepted). Room is made for a connection that is there, not before each try to
        accept: the try that ends a round finds none, and a connection was closed for it
        (one more a round than were accepted, two for a lone one). The bound is kept 64
        descriptors below the limit, so the one accepted before another is closed always
        has its descriptor."""
        return False

    def accept_failed(self, exc: OSError) -> None:
        self.log({"error": f"accept: {exc.strerror}", "connections": len(self.clients)})

    def accepted(self, sock: socket.socket, _address) -> None:
        """Postfix writes its request as soon as it has connected, so it is nearly always
        here already, and it is answered in this round of the loop, not the next (a busy
        server's round is every other client's request: it doubled a new connection's
        wait). The round's first connection is answered at once (a quiet server's only
        one); the others once the round's accepts are done: accepting all, then answering
        all, cost 12% less CPU a request than taking turns (50 clients, a connection per
        request, medians of 5 turns: 69.4 against 78.9 us, p50 3.2 against 3.8 ms; 10
        clients 72.0 against 73.9 us, p99 1.6 against 2.2 ms; one client unchanged)."""
        if len(self.clients) >= self.max_connections:
            self.make_room()
        client = Client(self, sock)  # left blocking: a session reads and writes with MSG_DONTWAIT
        self.clients[client] = None
        if self.fresh is None:
            self.fresh = []
            self.read_now(client)
        else:
            self.fresh.append(client)

    def read_the_rest(self) -> None:
        """The round's accepts are done: read the connections it left (see accepted)."""
        fresh, self.fresh = self.fresh, None
        for client in fresh or ():
            self.read_now(client)

    def read_now(self, client: Client) -> None:
        try:
            client.readable()
        except Exception as exc:  # noqa: BLE001 - as the loop does: our bug costs this client only
            self.internal_error(exc, client.readable)

    def finish(self) -> None:
        """Stopping (SIGTERM): every request already sent is answered before its connection
        closes, on connections already accepted and on those waiting in the listen queue.
        The loop stops at the end of a round, and requests that arrived during that round
        (or whose connections were not accepted yet) would otherwise be cut off: Postfix
        would answer its client 451 4.3.5 (server configuration problem) for each. Open
        connections first: at the connection bound, accepting closes the one idle longest."""
        for client in list(self.clients):
            self.read_now(client)
        if self.acceptor.accepting:
            try:
                self.acceptor.accept()  # one round: up to BATCH, each read as it is accepted
            except Exception as exc:  # noqa: BLE001 - a bug of ours: logged, the others still answered
                self.internal_error(exc, self.acceptor.accept)

    def make_room(self) -> None:
        """At the bound: close the connection idle the longest (Postfix reconnects).

        The idle longest are found EVICT_BATCH at a time, in one pass over the clients: a
        pass for each connection accepted at the bound cost some 170 us of CPU at 4,000
        (198 us a connection, against 24 now), which a local program opening
        connections and holding them could make the server spend. A candidate that has
        asked since it was found, or has gone, is passed over. The others keep their
        order, and every client not found then was less idle and has only become less
        idle since, so the first candidate left is the connection idle the longest now."""
        candidates = self.evictable
        while True:
            if not candidates:
                found = nsmallest(EVICT_BATCH, self.clients, key=_LAST)
                if not found:
                    return
                candidates.extend((client, client.last) for client in reversed(found))
            oldest, last = candidates.pop()
            if not oldest.closed and oldest.last == last:
                break
        self.evicted += 1
        if self.evicted == 1 or self.evicted % 1000 == 0:
            self.log({"refused": "connection limit", "limit": self.max_connections,
                      "action": "closed the connection idle the longest", "times": self.evicted})
        oldest.close()

    def serve(self) -> None:
        try:
            self.loop.run_forever()
        finally:
            self.finish()
            if self.nightly is not None:
                self.nightly.close()
            for client in list(self.clients):
                client.close()
            said = self.greylister.close()
            if said:
                self.log({"store_warning": "; ".join(said)})
            self.acceptor.close()
            self.loop.close()
            self.write_log()
            self.log_writer.drain(STOP_WAIT)


def _clear_unix_path(path: str) -> None:
    """Make way for our socket at ``path``: a stale socket of an earlier run is removed, but
    nothing else. Postgrey (Net::Server) unlinks whatever is there; an admin's typo in
    --unix would delete that file, and a second server would take a live server's socket
    (the first then serves nobody, and removes the second's socket when it stops).
    Raises OSError when something other than a stale socket is in the way."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket; it is left as it is")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        pass  # nobody listens: stale
    except FileNotFoundError:
        return  # gone meanwhile
    except OSError as exc:  # a full queue or a hung server: someone is there
        raise OSError(f"{path}: a server seems to be listening ({exc.strerror or exc})") from None
    else:
        raise OSError(f"another server is listening on {path}")
    finally:
        probe.close()
    os.unlink(path)


def _remove_unix_path(path: str, identity: tuple[int, int] | None) -> None:
    """At exit, our socket's name goes, and only ours (a successor may have bound its own)."""
    try:
        st = os.lstat(path)
        if identity is not None and (st.st_dev, st.st_ino) == identity:
            os.unlink(path)
    except OSError:
        pass


def unix_path(listen: str) -> str | None:
    """The socket's path of a ``unix:/path`` listener, None for a TCP one."""
    return listen[len("unix:"):] if listen.startswith("unix:") else None


def _bound(family: int, address: tuple) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    return sock


def _any_address(port: int) -> socket.socket:
    """``*:PORT``: every address, IPv6 and IPv4 on one socket (Net::Server, so postgrey,
    binds ``[::]`` for ``*``); IPv4's only where the system has no IPv6."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        sock = None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::", port))
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRNOTAVAIL:  # IPv6 turned off; anything else is an error
                raise
    return _bound(socket.AF_INET, ("0.0.0.0", port))


def make_listener(listen: str, backlog: int | None = None, socket_mode: int = 0o660) -> tuple[socket.socket, str]:
    """A listening socket on ``HOST:PORT``, ``[IPv6]:PORT``, ``*:PORT`` or ``unix:/path``, and its name.

    The listen queue is as long as the system allows unless ``backlog`` says
    otherwise (postgrey's ``--listen-queue-size``): a full queue makes Postfix's
    connection attempts wait a SYN retransmit, a second each."""
    if backlog is None:
        backlog = largest_backlog()
    path = unix_path(listen)
    if path is not None:
        _clear_unix_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The socket is born with its mode (no chmod after bind: that follows a link put in
        # its place meanwhile, as root); a bound socket's mode is 0777 less the umask.
        mask = os.umask(0o777 & ~socket_mode)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(mask)
        where = listen
    else:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        if not port.isdigit() or int(port) > 65535:
            raise ValueError(f"--listen {listen!r}: use HOST:PORT (a port up to 65535) or unix:/path")
        if host == "*":
            sock = _any_address(int(port))
        else:
            sock = _bound(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, int(port)))
        where = ("[%s]:%d" if sock.family == socket.AF_INET6 else "%s:%d") % sock.getsockname()[:2]
    sock.listen(backlog)
    sock.setblocking(False)
    return sock, where


def serve(listen: str, config, max_connections: int = DEFAULT_MAX_CONNECTIONS, replies: Replies = OUR_REPLIES,
          backlog: int | None = None, socket_mode: int = 0o660, quiet: bool = False, after_bind=None,
          program: str = "greylist-policyd", test_time: bool = False, one_request: bool = False,
          line_format=None, nightly_expiry: bool = False, ready=None,
          notes: list[dict[str, object]] | None = None, levels: bool | None = None) -> int:
    """Listen, then (``after_bind``: drop privileges, daemonize) serve until SIGTERM;
    ``ready`` is called once it answers and its signal handlers are in place. ``notes``:
    log lines (their fields) for the admin, written with the start's. ``levels``: each log
    line marked with its priority (None: where stderr is journald's)."""
    limit = raise_descriptor_limit()
    max_connections = max(1, min(max_connections, limit - 64))
    sock, where = make_listener(listen, backlog, socket_mode)
    path = unix_path(listen)
    identity = None
    if path is not None:
        st = os.lstat(path)
        identity = (st.st_dev, st.st_ino)
    server = PolicyServer(sock, config, where, max_connections=max_connections, replies=replies, quiet=quiet,
                          test_time=test_time, one_request=one_request, line_format=line_format,
                          program=program, nightly_expiry=nightly_expiry, levels=levels)
    server.greylister.prepare()  # before after_bind() may drop privileges
    if after_bind is not None:
        after_bind()
    server.start()
    server.log({"started": where, "store": config.store, "key": config.key, "delay": config.delay,
                "max_connections": max_connections})
    for note in notes or ():
        server.log(note)
    unusable = server.greylister.try_store()
    if unusable is not None:
        server.log({"error": f"store unusable at start: {unusable}", "on_error": config.on_error})
    server.write_log()
    print(f"{program.replace('-', ' ')}: listening on {where}", file=sys.stderr, flush=True)
    if ready is not None:
        ready()
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    finally:
        if path is not None:
            _remove_unix_path(path, identity)
    return 0
