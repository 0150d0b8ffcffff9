"""Log lines to stderr that never make a long-lived server wait for its log reader.

``greylist policyd`` and ``greylist serve`` write one line per request or
connection to stderr: a pipe to multilog, or journald's socket. When the
reader stops (multilog on a full disk, a stopped journald) a blocking write
would stop every answer with it, and mail with them. Here a write that the
pipe does not take is kept, up to :data:`BACKLOG` bytes, and tried again a
moment later; beyond that the oldest lines go, counted, and once the reader
is back a line says how many. Stopping, the server gives the reader a
moment to take what is left (:meth:`LogWriter.drain`).
"""

from __future__ import annotations

import os
import time

from greylist.service import log_line

#: syslog's priorities (RFC 5424), as postgrey's Net::Server maps its log levels 0-3 to them
ERR, WARNING, NOTICE, INFO = 3, 4, 5, 6

BACKLOG = 1 << 20   # bytes of lines kept while the log reader is behind
RETRY = 0.2         # seconds between tries while it is
STOP_WAIT = 2.0     # seconds a stopping server gives the reader for the last lines


def journal_stream(fd: int = 2) -> bool:
    """Is ``fd`` journald's stream? systemd names it in JOURNAL_STREAM (device:inode) for a
    unit's stdout and stderr. A line there may begin with its priority (``<3>``: the unit's
    SyslogLevelPrefix, on by default), which the journal takes off and keeps, so that
    ``journalctl -p err`` and a syslog's ``mail.err`` show our errors: unmarked, every line
    is info."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def prefixed(lines: bytes, priority: int) -> bytes:
    """``lines`` (one log entry's, each ending in a newline), each marked ``<priority>``."""
    mark = b"<%d>" % priority
    return mark + lines[:-1].replace(b"\n", b"\n" + mark) + lines[-1:]


def priority_of(line: bytes) -> tuple[int, bytes]:
    """A line's priority mark taken off (see :func:`prefixed`); INFO where it has none."""
    if line[:1] == b"<" and line[2:3] == b">" and line[1:2].isdigit():
        return int(line[1:2]), line[3:]
    return INFO, line


class LogWriter:
    """Writes to descriptor ``fd`` (stderr) without waiting. ``loop`` gives ``call_later``
    (this package's loop or asyncio's), for the retries. ``levels``: its reader takes each
    line's priority from a ``<N>`` in front (journald, greylist postgrey's syslog
    forwarder); None: where fd is journald's stream."""

    def __init__(self, loop, program: str, fd: int = 2, levels: bool | None = None) -> None:
        self.loop = loop
        self.program = program
        self.fd = fd
        self.levels = journal_stream(fd) if levels is None else levels
        self.unwritten = b""  # lines the reader has not taken yet
        self.dropped = 0      # lines dropped because it did not
        self.midline = False  # the reader has the start of unwritten's first line
        self.note_end = 0     # where the note of dropped lines ends, until it is written
        self.retry = None

    def write(self, data: bytes) -> None:
        self.unwritten += data
        self.flush()

    def flush(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        if self.dropped and len(self.unwritten) < BACKLOG // 2:  # the reader caught up: say so
            note = log_line(self.program, {"error": "the log reader fell behind",
                                           "log_lines_dropped": self.dropped})
            if self.levels:
                note = prefixed(note, ERR)
            first = self.unwritten.find(b"\n") + 1 if self.midline else 0
            self.unwritten = self.unwritten[:first] + note + self.unwritten[first:]
            self.note_end = first + len(note)  # never dropped in turn: it counts the others
            self.dropped = 0
        if not self.unwritten:
            return
        try:
            blocking = os.get_blocking(self.fd)
            if blocking:
                os.set_blocking(self.fd, False)
            try:
                while self.unwritten:  # a pipe may take part of it
                    taken = os.write(self.fd, self.unwritten)
                    if taken:
                        self.midline = self.unwritten[taken - 1:taken] != b"\n"
                    self.unwritten = self.unwritten[taken:]
                    self.note_end = max(0, self.note_end - taken)
            finally:
                if blocking:
                    os.set_blocking(self.fd, True)
        except BlockingIOError:
            pass  # the reader is behind: kept for the next try
        except OSError:
            self.unwritten = b""  # no stderr to write to: nothing to keep
            self.note_end = 0
        excess = len(self.unwritten) - BACKLOG
        if excess > 0:
            # whole lines go, never the rest of one the pipe took the start of (the reader
            # would get half a line run into another)
            first = max(self.unwritten.find(b"\n") + 1 if self.midline else 0, self.note_end)
            cut = self.unwritten.find(b"\n", first + excess) + 1 or len(self.unwritten)
            self.dropped += self.unwritten.count(b"\n", first, cut)
            self.unwritten = self.unwritten[:first] + self.unwritten[cut:]
        if self.unwritten or self.dropped:
            try:
                self.retry = self.loop.call_later(RETRY, self.flush)
            except RuntimeError:  # asyncio's loop is closed: the server is stopping, drain() goes on
                self.retry = None

    def drain(self, seconds: float) -> None:
        """Stopping (the loop no longer runs): wait up to ``seconds`` for the reader."""
        import select

        deadline = time.monotonic() + seconds
        self.flush()
        while (self.unwritten or self.dropped) and time.monotonic() < deadline:
            try:
                select.select([], [self.fd], [], max(0.0, deadline - time.monotonic()))
            except (OSError, ValueError):
                return
            self.flush()
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
