"""A small event loop on ``selectors``: readers, timers and signals, nothing else.

``greylist policyd`` needs no coroutines, executors, transports or TLS, and
``import asyncio`` alone costs about 9 MB of resident memory and a little CPU
per callback; postgrey, the server we are measured against, runs in 24 MB.
This loop offers the part of asyncio's loop interface that
:mod:`greylist.adapters.acceptor` uses (``time``, ``add_reader``,
``remove_reader``, ``call_at``, ``call_later``, ``add_signal_handler``,
``run_forever``, ``stop``, ``close``), so a server may run on either.
"""

from __future__ import annotations

import heapq
import selectors
import signal
import socket
from itertools import count
from time import monotonic


class Timer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, Timer]] = []
        self.sequence = count()
        self.running = False
        self.signals: dict[int, object] = {}
        self.pending_signals: list[int] = []
        self.waker, self.wakee = socket.socketpair()
        self.waker.setblocking(False)
        self.wakee.setblocking(False)
        self.selector.register(self.wakee, selectors.EVENT_READ, self._drain_signals)

    def time(self) -> float:
        return monotonic()

    def add_reader(self, fd: int, callback) -> None:
        self.selector.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def call_at(self, when: float, callback) -> Timer:
        timer = Timer(callback)
        heapq.heappush(self.timers, (when, next(self.sequence), timer))
        return timer

    def call_later(self, delay: float, callback) -> Timer:
        return self.call_at(monotonic() + delay, callback)

    def add_signal_handler(self, signum: int, callback) -> None:
        """The callback runs in the loop, not in the signal handler."""
        self.signals[signum] = callback
        signal.set_wakeup_fd(self.waker.fileno(), warn_on_full_buffer=False)
        signal.signal(signum, lambda number, frame: self.pending_signals.append(number))

    def _drain_signals(self) -> None:
        try:
            while self.wakee.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while self.pending_signals:
            callback = self.signals.get(self.pending_signals.pop(0))
            if callback is not None:
                callback()

    def stop(self) -> None:
        self.running = False

    def run_forever(self) -> None:
        self.running = True
        timers, select = self.timers, self.selector.select
        while self.running:
            timeout = None
            while timers and timers[0][2].cancelled:
                heapq.heappop(timers)
            if timers:
                timeout = max(0.0, timers[0][0] - monotonic())
            for key, _events in select(timeout):
                key.data()
                if not self.running:
                    return
            now = monotonic()
            while timers and timers[0][0] <= now:
                _when, _seq, timer = heapq.heappop(timers)
                if not timer.cancelled:
                    timer.callback()
            if self.pending_signals:
                self._drain_signals()

    def close(self) -> None:
        for signum in self.signals:
            signal.signal(signum, signal.SIG_DFL)
        if self.signals:
            signal.set_wakeup_fd(-1)
        self.selector.close()
        self.waker.close()
        self.wakee.close()
