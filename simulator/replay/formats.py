"""Readers for the logs admins have: each line becomes a connection, is ignored, or is bad.

Formats (``--format``, or ``auto`` to detect from the first lines):

- ``tcpserver``: ``tcpserver: pid PID from IP`` lines (one per connection; a
  later ``tcpserver: deny PID`` drops it), stamped by multilog (``@`` + TAI64N)
  or by syslog (``Oct 22 02:13:41 host ...`` or ISO 8601).
- ``postfix``: ``postfix/smtpd[PID]: connect from NAME[IP]`` syslog lines (no
  year in the stamp: ``--year``, by default the latest that puts the first line in the
  past, and a year is added when the months wrap).
- ``wrapper``: our own ``greylist-wrap: ... ip=IP verdict=...`` lines (and
  ``greylist serve``'s, ``greylist policyd``'s and ``greylist postgrey``'s),
  stamped as tcpserver's or by syslog; in shadow mode they also carry
  ``shadow=tempfail|pass``, kept in :attr:`ParsedLog.shadow`. Where every
  decision line shows the envelope (``from=``, ``to=``: the policy servers,
  one line a recipient), the events carry it, so triplet keys can be replayed.
- ``postgrey``: postgrey's own ``action=greylist, reason=new, client_name=...,
  client_address=..., sender=..., recipient=...`` lines, one a request (and
  ``greylist postgrey``'s, which decides in the same words, with or without
  syslog's ``postgrey[PID]:``): the envelope is there, so triplet keys can be
  replayed, and the log already holds the real retries (the retry model
  defaults to none).
- ``jsonl``: one JSON object a line, ``{"time": 1767571200.5, "ip": "192.0.2.1"}``;
  time is unix seconds or an ISO 8601 string; other fields are ignored.
- ``csv``: a header line naming ``time`` and ``ip`` columns, then rows.

Lines that are well-formed but not connections (tcpserver status lines, other
programs' output) are *ignored*; lines that cannot be read are *bad*, counted
with their line numbers; a file of mostly bad lines stops with a clear message.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import chain, islice
from typing import Iterable, Iterator

from greylist.core.keys import BadAddress, parse_ip

#: characters of a line read; the rest of a longer one is skipped
MAX_LINE = 64 * 1024
FORMATS = ("tcpserver", "postfix", "wrapper", "postgrey", "jsonl", "csv")
MAX_BAD_SHARE = 0.5
_MONTHS = {m: i + 1 for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"))}

_TAI = re.compile(r"^@([0-9a-fA-F]{24})\s+(.*)$")
_SYSLOG = re.compile(r"^([A-Z][a-z]{2})\s+(\d{1,2})\s+(\d{2}):(\d{2}):(\d{2})(\.\d+)?\s+\S+\s+(.*)$")
_ISO = re.compile(r"^(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?)\s+(?:[^\s:]+\s+)?(.*)$")
_TCP_FROM = re.compile(r"tcpserver: pid (\d+) from (\S+)\s*$")
_TCP_DENY = re.compile(r"tcpserver: deny (\d+) ")
_TCP_OTHER = re.compile(r"tcpserver: (status|ok|end|deny|fatal|warning|pid)\b")
_POSTFIX = re.compile(r"postfix(?:/[\w.-]+)*/smtpd\[\d+\]: connect from [^\[\s]*\[([^\]]+)\]")
_POSTFIX_GREYLISTED = re.compile(r"postfix(?:/[\w.-]+)*/smtpd\[\d+\]: (?:[0-9A-F]+|NOQUEUE): reject: RCPT "
                                 r"from .*: 4\d\d .*greylist", re.IGNORECASE)
_POSTFIX_REJECT = re.compile(r"postfix(?:/[\w.-]+)*/smtpd\[\d+\]: (?:[0-9A-F]+|NOQUEUE): reject: "
                             r"(?:RCPT|MAIL|DATA|CONNECT|EHLO|HELO) from [^\[\s]*\[([^\]]+)\]: 5")
_WRAPPER = re.compile(r"greylist-(?:wrap|serve|policyd|postgrey): (.*)$")
#: one field of our own log lines (greylist.service.log_line): a plain value, or a quoted
#: one with Python's escapes (\\, \", \xNN, \uNNNN, \UNNNNNNNN)
_FIELD = re.compile(r'([^\s="]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)')
#: postgrey's lines through syslog (postgrey[PID]: ...), or greylist postgrey's as it writes
#: them to stderr (multilog); a Postfix queue id may come first
_POSTGREY = re.compile(r"(?:^|\s)(?:[0-9A-Za-z]+: )?action=(greylist|pass), (.*)$")


class LogError(ValueError):
    """The log cannot be replayed (unreadable, mostly bad lines, unknown format)."""


@dataclass
class ParsedLog:
    # (unix time, canonical IP), or with the envelope (time, IP, sender, recipient)
    events: list[tuple] = field(default_factory=list)
    lines: int = 0
    ignored: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)
    format: str = ""
    #: shadow-mode lines: (unix time, IP, the verdict enforcing would have given, its reason)
    shadow: list[tuple[float, str, str, str]] = field(default_factory=list)
    #: addresses whose mail the log shows rejected for good (5xx): counted as spam by replay
    rejected: set[str] = field(default_factory=set)
    #: lines that show the logged server greylisting already (a 4xx "greylisted" reply):
    #: its retries are in the log, and replay invents none on top
    greylisted: int = 0
    #: why the file ended before its end (a compressed log cut short): its lines up to there are read
    cut: str = ""


def tai64n(label: str) -> float:
    """Unix time of a multilog TAI64N label (24 hex digits, without the @)."""
    seconds = int(label[:16], 16) - (1 << 62) - 10  # daemontools hard-codes TAI-UTC = 10 s
    return seconds + int(label[16:24], 16) / 1e9


def _iso(text: str, tz=None) -> float:
    """Unix time of an ISO 8601 stamp; one without an offset is in ``tz`` (None: this
    machine's local time, as tai64nlocal and syslog write it)."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None and tz is not None:
        value = value.replace(tzinfo=tz)
    return value.timestamp()  # a naive value is local time


def time_zone(name: str | None):
    """``--tz``: None or ``local`` for this machine's zone, ``UTC``, or an IANA name."""
    if name is None or name == "local":
        return None
    if name.upper() == "UTC":
        return timezone.utc
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise LogError(f"unknown time zone {name!r} (use local, UTC or a name such as Europe/Berlin)") from None


class _Stamps:
    """Timestamp prefixes: TAI64N, ISO 8601, or yearless syslog (with a year that wraps).

    ``year`` None: a yearless log's first line is in the latest year that puts it in the
    past (a December log read in January is last year's), as syslog's own readers take
    it; then a new year begins where the months wrap. Rotated files replayed together are
    each read so, and line up across the new year (all read as this year, January's file
    came before December's)."""

    def __init__(self, year: int | None, tz=None) -> None:
        self.year = year
        self.tz = tz
        self.last_month = 0

    def _latest_past_year(self, month: int, day: int, rest: tuple[int, int, int]) -> int:
        import time

        now = time.time()
        year = datetime.fromtimestamp(now, timezone.utc).year + 1
        for year in range(year, year - 9, -1):  # February 29th waits for a leap year
            try:
                if datetime(year, month, day, *rest, tzinfo=self.tz).timestamp() <= now + 86400:
                    return year
            except ValueError:
                continue
        return year

    def split(self, line: str) -> tuple[float, str] | None:
        m = _TAI.match(line)
        if m:
            return tai64n(m.group(1)), m.group(2)
        m = _ISO.match(line)
        if m:
            try:
                return _iso(m.group(1), self.tz), m.group(2)
            except ValueError:
                return None
        m = _SYSLOG.match(line)
        if m and m.group(1) in _MONTHS:
            month = _MONTHS[m.group(1)]
            day, rest = int(m.group(2)), (int(m.group(3)), int(m.group(4)), int(m.group(5)))
            if self.year is None:
                self.year = self._latest_past_year(month, day, rest)
            elif self.last_month and month < self.last_month:
                self.year += 1  # December to January: the log crossed a new year
            self.last_month = month
            try:
                t = datetime(self.year, month, day, *rest, tzinfo=self.tz).timestamp()
            except ValueError:
                return None
            return t + (float(m.group(6)) if m.group(6) else 0.0), m.group(7)
        return None


def _ip(text: str) -> str | None:
    try:
        return parse_ip(text)
    except BadAddress:
        return None


def detect(sample: list[str]) -> str:
    """The format of a log from its first lines."""
    scores = dict.fromkeys(FORMATS, 0)
    for line in sample:
        s = line.strip()
        if not s:
            continue
        if s.startswith("{"):
            scores["jsonl"] += 1
        if "tcpserver: pid" in s:
            scores["tcpserver"] += 1
        if "/smtpd[" in s and "connect from" in s:
            scores["postfix"] += 1
        if _WRAPPER.search(s) and " ip=" in s:
            scores["wrapper"] += 2  # beats tcpserver when both appear in one log
        if "action=" in s and "client_address=" in s and _POSTGREY.search(s):
            scores["postgrey"] += 2
    first = next((line for line in sample if line.strip()), "")
    if "," in first and {"time", "ip"} <= {c.strip().lower() for c in first.split(",")}:
        return "csv"
    best = max(scores, key=lambda k: scores[k])
    if scores[best] == 0:
        raise LogError("cannot tell the log format from its first lines; name it with --format "
                       f"({', '.join(FORMATS)})")
    return best


@contextmanager
def open_log(path: str) -> Iterator[io.TextIOBase]:
    """A log file as text, as logrotate left it: plain, or compressed with gzip (Debian's
    mail.log.2.gz and older), bzip2 or xz, told by its first bytes rather than its name.
    Opened once and peeked at, never read twice: a pipe (``<(zcat mail.log.*.gz)``) can
    be read only once, and opening it again found it empty."""
    with open(path, "rb") as raw:
        head = raw.peek(6)[:6]
        if head.startswith(b"\x1f\x8b"):
            import gzip

            binary = gzip.GzipFile(fileobj=raw)
        elif head.startswith(b"BZh"):
            import bz2

            binary = bz2.BZ2File(raw)
        elif head.startswith(b"\xfd7zXZ\x00"):
            import lzma

            binary = lzma.LZMAFile(raw)
        else:
            binary = raw
        with io.TextIOWrapper(binary, encoding="utf-8", errors="replace") as text:
            yield text


class _Lines:
    """A stream's lines, one at a time: a month of mail.log is never all in memory. A
    compressed file cut short (a copy that did not finish, a full disk) ends at the cut,
    its lines before it kept, and ``cut`` says why."""

    def __init__(self, stream: io.TextIOBase) -> None:
        self.stream = stream
        self.cut = ""

    def __iter__(self):
        count = 0
        readline = self.stream.readline
        try:
            while True:
                line = readline(MAX_LINE)
                if not line:
                    break
                if len(line) == MAX_LINE and not line.endswith("\n"):
                    # no log line is this long (a binary file given by mistake): its start is
                    # read (and found bad), the rest skipped, never held whole in memory
                    rest = line
                    while len(rest) == MAX_LINE and not rest.endswith("\n"):
                        rest = readline(MAX_LINE)
                count += 1
                yield line
        except EOFError as exc:  # gzip, bz2 and lzma: the compressed data ends before its end marker
            self.cut = f"it ends early ({exc})"
        except (OSError, ValueError, *_codec_errors()) as exc:  # corrupt compressed data, a bad disk
            self.cut = f"it cannot be read past line {count} ({exc})"


def _codec_errors() -> tuple:
    """What the decompressors raise for corrupt data (besides OSError and EOFError)."""
    errors = []
    for name, attribute in (("zlib", "error"), ("lzma", "LZMAError")):
        try:
            errors.append(getattr(__import__(name), attribute))
        except ImportError:  # a Python built without it reads no such file either
            pass
    return tuple(errors)


def parse(stream: io.TextIOBase, fmt: str = "auto", year: int | None = None, tz=None) -> ParsedLog:
    """Read a whole log; raise LogError when most of it cannot be read. An empty one is an
    empty log (a rotated log's newest file may be), whatever its format."""
    source = _Lines(stream)
    lines = iter(source)
    sample = list(islice(lines, 200))
    if fmt == "auto" and not any(line.strip() for line in sample):
        more = next(lines, None)
        if more is None:
            return ParsedLog(cut=source.cut)
        sample.append(more)
    if fmt == "auto":
        fmt = detect(sample[:200])
    if fmt not in FORMATS:
        raise LogError(f"unknown log format {fmt!r} (use {', '.join(FORMATS)} or auto)")
    out = ParsedLog(format=fmt)
    stamps = _Stamps(year, tz)
    reader = {"tcpserver": _tcpserver, "postfix": _postfix, "wrapper": _wrapper, "postgrey": _postgrey,
              "jsonl": _jsonl, "csv": _csv}[fmt]
    reader(chain(sample, lines), out, stamps)
    out.cut = source.cut
    considered = out.lines
    if considered and len(out.bad) > MAX_BAD_SHARE * considered:
        first = ", ".join(f"line {n}: {why}" for n, why in out.bad[:3])
        raise LogError(f"{len(out.bad)} of {considered} lines cannot be read as {fmt} ({first}); "
                       "is this the right --format?")
    out.events.sort(key=lambda e: e[0])
    return out


def merge(logs: list[ParsedLog]) -> ParsedLog:
    """Several logs as one (a log and its rotated files, given in any order): their
    connections in time order, their counts added up."""
    if len(logs) == 1:
        return logs[0]
    out = ParsedLog(format=next((log.format for log in logs if log.format), ""))
    for log in logs:
        out.events += log.events
        out.shadow += log.shadow
        out.bad += log.bad
        out.rejected |= log.rejected
        out.lines += log.lines
        out.ignored += log.ignored
        out.greylisted += log.greylisted
    out.events.sort(key=lambda e: e[0])
    out.shadow.sort(key=lambda s: s[0])
    return out


def _count(out: ParsedLog, lines: Iterable[str]):
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        out.lines += 1
        yield number, line


def _stamped(lines: Iterable[str], out: ParsedLog, stamps: _Stamps, missing: str = "no timestamp"):
    """(line number, time, text after the stamp) of each line; unstamped lines are bad."""
    for number, line in _count(out, lines):
        split = stamps.split(line)
        if split is None:
            out.bad.append((number, missing))
            continue
        yield number, split[0], split[1]


def _event(out: ParsedLog, number: int, t: float, address: str) -> bool:
    """Record a connection from ``address``, or a bad line if it is not an address."""
    ip = _ip(address)
    if ip is None:
        out.bad.append((number, f"not an IP address: {address[:40]!r}"))
        return False
    out.events.append((t, sys.intern(ip)))  # a client's every line shares one string
    return True


def _envelope(sender: str, recipient: str) -> tuple[str, str]:
    """An event's sender and recipient, one string each however often the log repeats them
    (a site's recipients, its correspondents: most of a long log's memory otherwise)."""
    return sys.intern(sender), sys.intern(recipient)


def _tcpserver(lines: Iterable[str], out: ParsedLog, stamps: _Stamps) -> None:
    by_pid: dict[str, int] = {}
    denied: set[int] = set()
    for number, t, rest in _stamped(lines, out, stamps):
        m = _TCP_FROM.search(rest)
        if m:
            if _event(out, number, t, m.group(2)):
                by_pid[m.group(1)] = len(out.events) - 1
            continue
        m = _TCP_DENY.search(rest)
        if m and m.group(1) in by_pid:
            denied.add(by_pid.pop(m.group(1)))
        out.ignored += 1
    if denied:
        out.events = [e for i, e in enumerate(out.events) if i not in denied]
        out.ignored += len(denied)


def _postfix(lines: Iterable[str], out: ParsedLog, stamps: _Stamps) -> None:
    for number, t, rest in _stamped(lines, out, stamps, "no syslog timestamp"):
        m = _POSTFIX.search(rest)
        if m:
            _event(out, number, t, m.group(1))
            continue
        out.ignored += 1
        if _POSTFIX_GREYLISTED.search(rest):
            out.greylisted += 1
            continue
        m = _POSTFIX_REJECT.search(rest)
        if m:
            try:
                out.rejected.add(parse_ip(m.group(1)))
            except BadAddress:
                pass


def our_fields(text: str) -> dict[str, str]:
    """The fields of one of our own log lines, quoted values read back (the reverse of
    greylist.service.log_line); text that is no field is passed over."""
    fields = {}
    for m in _FIELD.finditer(text):
        name, value = m.groups()
        if value[:1] == '"':
            try:
                value = value[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape")
            except UnicodeDecodeError:
                value = value[1:-1]
        fields[name] = value
    return fields


def our_decision(text: str) -> dict[str, str] | None:
    """The fields of one of our own decision lines; None for anything else (start-up,
    reload, refusal and error lines; a request outside RCPT)."""
    m = _WRAPPER.search(text)
    fields = our_fields(m.group(1)) if m else {}
    if not m or fields.get("verdict") in (None, "error") or "started" in fields or (
            "ip" not in fields and "to" not in fields):
        return None
    return fields


def _wrapper(lines: Iterable[str], out: ParsedLog, stamps: _Stamps) -> None:
    envelopes = True  # every decision line shows the envelope (a policy server's log)
    for number, t, rest in _stamped(lines, out, stamps):
        fields = our_decision(rest)
        if fields is None:
            out.ignored += 1  # start-up, reload, refusal lines; a request outside RCPT
        elif not _event(out, number, t, fields.get("ip", "")):
            out.bad[-1] = (number, "no valid ip= field")
        else:
            if "to" in fields:
                out.events[-1] += _envelope(fields.get("from", "<>"), fields["to"])
            else:
                envelopes = False
            if "shadow" in fields:
                out.shadow.append((t, out.events[-1][1], fields["shadow"], fields.get("reason", "")))
    if not envelopes:  # a wrapper's log, or one mixed: connections only
        out.events = [event[:2] for event in out.events]


def _postgrey(lines: Iterable[str], out: ParsedLog, stamps: _Stamps) -> None:
    for number, t, rest in _stamped(lines, out, stamps, "no syslog timestamp"):
        m = _POSTGREY.search(rest)
        if not m:
            # greylist postgrey writes a decision postgrey has no words for (a store error,
            # with on_error's answer) in our own format: a connection all the same
            ours = our_decision(rest)
            if ours is not None and "to" in ours and _event(out, number, t, ours.get("ip", "")):
                out.events[-1] += _envelope(ours.get("from", "<>"), ours["to"])
            elif ours is not None and "to" in ours:
                out.bad[-1] = (number, "no valid ip= field")
            else:
                out.ignored += 1  # its start-up lines, other programs
            continue
        fields = {}
        for part in m.group(2).split(", "):
            name, eq, value = part.partition("=")
            if eq:
                fields[name] = value
        if "client_address" not in fields or "recipient" not in fields:
            out.bad.append((number, "a postgrey line without client_address or recipient"))
            continue
        if _event(out, number, t, fields["client_address"]):
            t_, ip = out.events[-1]
            out.events[-1] = (t_, ip, *_envelope(fields.get("sender", ""), fields["recipient"]))


def _jsonl(lines: Iterable[str], out: ParsedLog, stamps: _Stamps) -> None:
    for number, line in _count(out, lines):
        try:
            obj = json.loads(line)
        except ValueError:
            out.bad.append((number, "not JSON"))
            continue
        if not isinstance(obj, dict):
            out.bad.append((number, "not a JSON object"))
            continue
        t = _time_field(obj.get("time"))
        ip = _ip(obj.get("ip")) if isinstance(obj.get("ip"), str) else None
        if t is None or ip is None:
            out.bad.append((number, "needs a valid time and ip"))
            continue
        out.events.append((t, ip))


def _csv(lines: Iterable[str], out: ParsedLog, stamps: _Stamps) -> None:
    rows = csv.reader(lines)
    try:
        header = [c.strip().lower() for c in next(rows)]
    except StopIteration:
        return
    if "time" not in header or "ip" not in header:
        raise LogError("the CSV header must name a time and an ip column")
    ti, ii = header.index("time"), header.index("ip")
    for number, row in enumerate(rows, 2):
        if not row or not any(c.strip() for c in row):
            continue
        out.lines += 1
        t = _time_field(row[ti] if len(row) > ti else None)
        ip = _ip(row[ii].strip()) if len(row) > ii else None
        if t is None or ip is None:
            out.bad.append((number, "needs a valid time and ip"))
            continue
        out.events.append((t, ip))


def _time_field(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if value == value and abs(value) < 1e11 else None
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            pass
        else:
            return number if number == number and abs(number) < 1e11 else None
        try:
            return _iso(text, timezone.utc)  # JSON and CSV stamps without an offset are UTC
        except ValueError:
            return None
    return None
