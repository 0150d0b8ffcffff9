"""The log writer never waits for its reader and never hands it half a line run into another."""

from __future__ import annotations

import fcntl
import os
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from greylist.adapters import logwriter
from greylist.adapters.logwriter import LogWriter


class Timers:
    """call_later that only remembers: the test decides when a retry happens."""

    def __init__(self) -> None:
        self.pending = []

    def call_later(self, _delay, callback):
        timer = Timer(callback)
        self.pending.append(timer)
        return timer


class Timer:
    def __init__(self, callback) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def read_all(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


steps = st.lists(st.one_of(st.tuples(st.just("write"), st.integers(1, 40), st.integers(0, 300)),
                           st.tuples(st.just("read"), st.integers(0, 5000), st.just(0)),
                           st.tuples(st.just("retry"), st.just(0), st.just(0))), max_size=60)


@settings(max_examples=150, deadline=None)
@given(steps)
def test_every_line_arrives_whole_or_is_counted_as_dropped(script):
    read, write = os.pipe()
    os.set_blocking(read, False)
    fcntl.fcntl(write, 1031, 4096)  # F_SETPIPE_SZ: a small pipe fills at once
    saved = logwriter.BACKLOG
    logwriter.BACKLOG = 3000  # a small backlog drops lines early
    timers = Timers()
    writer = LogWriter(timers, "test", fd=write)
    sent, received = 0, b""
    try:
        for kind, count, size in script:
            if kind == "write":
                data = b"".join(b"test: n=%d %s\n" % (sent + i, b"x" * size) for i in range(count))
                sent += count
                writer.write(data)
            elif kind == "read":
                try:
                    received += os.read(read, count) if count else b""
                except BlockingIOError:
                    pass
            else:
                for timer in [t for t in timers.pending if not t.cancelled]:
                    timers.pending.remove(timer)
                    timer.callback()
        for _ in range(1000):  # the reader is back for good: everything left arrives
            received += read_all(read)
            live = [t for t in timers.pending if not t.cancelled]
            if not live and not writer.unwritten and not writer.dropped:
                break
            timers.pending = []
            for timer in live:
                timer.callback()
        received += read_all(read)
    finally:
        logwriter.BACKLOG = saved
        os.close(read)
        os.close(write)
    assert received.endswith(b"\n") or not received
    numbers, dropped = [], 0
    for line in received.splitlines():
        assert line.count(b"test:") == 1, line  # whole, never run into another
        if b"log_lines_dropped=" in line:
            dropped += int(line.split(b"log_lines_dropped=")[1])
        else:
            numbers.append(int(line.split(b"n=")[1].split()[0]))
    assert numbers == sorted(numbers)  # in order
    assert len(numbers) + dropped == sent  # each written once or counted


def test_a_server_stopping_with_its_reader_stuck_drains_without_a_loop():
    """greylist serve drains after asyncio's loop is closed: no retry can be scheduled
    then, and the lines the reader takes in the moment given still arrive."""
    import asyncio

    read, write = os.pipe()
    fcntl.fcntl(write, 1031, 4096)
    loop = asyncio.new_event_loop()
    writer = LogWriter(loop, "test", fd=write)
    writer.write(b"".join(b"test: n=%d %s\n" % (n, b"x" * 100) for n in range(200)))  # 20 KiB > the pipe
    assert writer.unwritten
    loop.close()
    writer.write(b"test: last\n")  # no retry to schedule: kept
    chunks = []

    def reader() -> None:  # the log reader, back in time for the drain
        while chunk := os.read(read, 1 << 16):
            chunks.append(chunk)

    thread = threading.Thread(target=reader)
    thread.start()
    writer.drain(5.0)
    os.close(write)
    thread.join(5)
    os.close(read)
    got = b"".join(chunks)
    assert got.endswith(b"test: last\n") and got.count(b"\n") == 201
