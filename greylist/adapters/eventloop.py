"""A small event loop on epoll: readers, timers and signals, nothing else.

``greylist policyd`` needs no coroutines, executors, transports or TLS, and
``import asyncio`` alone costs about 9 MB of resident memory and a little CPU
per callback; postgrey, the server we are measured against, runs in 24 MB.
This loop offers the part of asyncio's loop interface that
:mod:`greylist.adapters.acceptor` uses (``time``, ``add_reader``,
``remove_reader``, ``call_at``, ``call_later``, ``add_signal_handler``,
``run_forever``, ``stop``, ``close``), so a server may run on either.

It polls with epoll directly (poll where there is no epoll): ``selectors``
adds a few microseconds of Python to every wake-up, and a policy server
wakes up once per request.
"""

from __future__ import annotations

import heapq
import select
import signal
import socket
from itertools import count
from time import monotonic


class Timer:
    """A cancelled timer lets go of its callback at once (a closed session and all it
    holds would otherwise live until the timer's time, 300 s for an idle timeout)."""

    __slots__ = ("callback", "cancelled", "loop")

    def __init__(self, callback, loop: "Loop") -> None:
        self.callback = callback
        self.cancelled = False
        self.loop = loop

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.callback = None
            self.loop.cancelled += 1


class _Poll:
    """poll(2) with epoll's interface (seconds, -1 for ever), where there is no epoll."""

    def __init__(self) -> None:
        self.p = select.poll()
        self.register, self.unregister = self.p.register, self.p.unregister

    def poll(self, timeout: float = -1):
        return self.p.poll(None if timeout < 0 else timeout * 1000.0)

    def close(self) -> None:
        pass


class Loop:
    def __init__(self) -> None:
        self.poller = select.epoll() if hasattr(select, "epoll") else _Poll()
        self.forgets_closed = not isinstance(self.poller, _Poll)  # epoll drops a closed descriptor
        self.handlers: dict[int, object] = {}
        self.timers: list[tuple[float, int, Timer]] = []
        self.cancelled = 0  # cancelled timers still in the heap
        #: on_error(exc, callback): a callback raised; the loop goes on (None: the loop stops
        #: and the exception propagates). A server logs it as its bug and closes that session.
        self.on_error = None
        self.sequence = count()
        self.running = False
        self.signals: dict[int, object] = {}
        self.pending_signals: list[int] = []
        #: called once a round's events and timers are done, before the loop waits again:
        #: work that its callbacks leave to be done together (a store's rows, say)
        self.at_round_end: list = []
        self.waker, self.wakee = socket.socketpair()
        self.waker.setblocking(False)
        self.wakee.setblocking(False)
        self.add_reader(self.wakee.fileno(), self._drain_signals)

    def time(self) -> float:
        return monotonic()

    def add_reader(self, fd: int, callback) -> None:
        if fd in self.handlers:
            raise KeyError(f"descriptor {fd} is already watched")
        self.poller.register(fd, select.POLLIN)
        self.handlers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is None:
            return
        try:
            self.poller.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass  # closed already: the kernel forgot it

    def forget_reader(self, fd: int) -> None:
        """remove_reader for a descriptor about to be closed, that nothing else holds (no dup,
        no child): closing it takes it out of epoll, and the epoll_ctl call is saved (one
        system call of some ten a connection). poll(2) has no such rule: unregistered."""
        if self.handlers.pop(fd, None) is not None and self.forgets_closed is False:
            self.poller.unregister(fd)

    def call_at(self, when: float, callback) -> Timer:
        timer = Timer(callback, self)
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
        timers, poll, handlers, at_round_end = self.timers, self.poller.poll, self.handlers, self.at_round_end
        while self.running:
            for callback in at_round_end:
                try:
                    callback()
                except Exception as exc:  # noqa: BLE001 - as a reader's or a timer's
                    self._failed(exc, callback)
            timeout = -1.0
            if self.cancelled > 256 and 2 * self.cancelled > len(timers):
                # a connection per request leaves a cancelled timer each: clear them out
                # (as asyncio does) so the heap stays the size of the open sessions
                timers[:] = [entry for entry in timers if not entry[2].cancelled]
                heapq.heapify(timers)
                self.cancelled = 0
            while timers and timers[0][2].cancelled:
                heapq.heappop(timers)
                self.cancelled -= 1
            if timers:
                timeout = max(0.0, timers[0][0] - monotonic())
            try:
                ready = poll(timeout)
            except InterruptedError:
                continue
            for fd, _events in ready:
                handler = handlers.get(fd)
                if handler is not None:  # None: removed by an earlier callback of this round
                    try:
                        handler()
                    except Exception as exc:  # noqa: BLE001 - reported; one client never stops a server
                        self._failed(exc, handler)
                if not self.running:
                    return
            now = monotonic()
            while timers and timers[0][0] <= now:
                _when, _seq, timer = heapq.heappop(timers)
                if timer.cancelled:
                    self.cancelled -= 1
                else:
                    timer.cancelled = True  # fired: cancelling it later changes nothing
                    callback = timer.callback
                    try:
                        callback()
                    except Exception as exc:  # noqa: BLE001 - as above
                        self._failed(exc, callback)
            if self.pending_signals:
                self._drain_signals()

    def _failed(self, exc: Exception, callback) -> None:
        if self.on_error is None:
            raise exc
        self.on_error(exc, callback)

    def close(self) -> None:
        for signum in self.signals:
            signal.signal(signum, signal.SIG_DFL)
        if self.signals:
            signal.set_wakeup_fd(-1)
        self.poller.close()
        self.handlers.clear()
        self.waker.close()
        self.wakee.close()
