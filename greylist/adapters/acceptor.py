"""The listening side of our long-lived servers (``greylist serve``, ``greylist policyd``).

Both accept on an asyncio event loop, in batches, and must never spin: when
the process runs out of descriptors, accepting pauses for a moment (with a log
line) instead of waking up again at once for the same pending connection; when
the server is at its own bound, it either pauses (the kernel's backlog holds
the rest) or makes room, as the server decides.
"""

from __future__ import annotations

import _socket
import os
import socket
from typing import Callable

BATCH = 64
#: a session's reads and writes never wait, whether or not its socket was made
#: non-blocking (that is one more system call for every connection)
_DONTWAIT = socket.MSG_DONTWAIT
RETRY_AFTER_EMFILE = 0.1


def raise_descriptor_limit() -> int:
    """Connections cost a descriptor each: take the hard limit, return the soft one we got."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def largest_backlog() -> int:
    """The longest listen queue the system allows (net.core.somaxconn). A full queue drops
    a client's SYN, and the client waits a retransmit (a second) to try again: a burst of
    connections must find room, and an accept loop that is behind catches up."""
    backlog = socket.SOMAXCONN
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            backlog = max(backlog, int(f.read()))
    except (OSError, ValueError):
        pass
    return backlog


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """tcpserver's -g and -u, postgrey's --user and --group: after binding, as run scripts expect."""
    if gid is not None:
        os.setgroups([gid])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)


class Acceptor:
    """Accepts connections from ``listener`` and hands each to ``on_socket(sock, address)``.

    ``at_bound()`` is asked before each accept: True means the server is full and
    accepting pauses until :meth:`resume`; a server that makes room returns False.
    ``on_error(exc)`` logs an accept failure (out of descriptors, say).
    ``after_round()``, if given, is called once the round's accepts are done (however
    the round ended), so a server can leave work on its new sockets until then.
    """

    def __init__(self, loop, listener: socket.socket, on_socket: Callable, at_bound: Callable[[], bool],
                 on_error: Callable[[OSError], None], after_round: Callable[[], None] | None = None) -> None:
        self.loop = loop
        self.listener = listener
        self.on_socket = on_socket
        self.at_bound = at_bound
        self.on_error = on_error
        self.after_round = after_round
        self.accepting = False
        self.closed = False
        # socket.accept() turns the listener's family and type into enums at every call (a
        # tenth of the server's Python work a connection, with one request each): the
        # socket is made here from the accepted descriptor, with the numbers read once
        self._accept = getattr(listener, "_accept", None)
        self._kind = (int(listener.family), int(listener.type), listener.proto)

    def resume(self) -> None:
        if not self.accepting and not self.closed:
            self.loop.add_reader(self.listener.fileno(), self.accept)
            self.accepting = True

    def pause(self) -> None:
        if self.accepting:
            self.loop.remove_reader(self.listener.fileno())
            self.accepting = False

    def close(self) -> None:
        self.pause()
        self.closed = True
        self.listener.close()

    def accept(self) -> None:
        try:
            self._accept_round()
        finally:
            if self.after_round is not None:
                self.after_round()

    def _accept_round(self) -> None:
        for _ in range(BATCH):
            if self.at_bound():
                self.pause()
                return
            try:
                if self._accept is None:
                    sock, address = self.listener.accept()
                else:
                    fd, address = self._accept()
                    try:
                        # the C type: socket.socket adds a Python __init__ and close (for
                        # makefile's references), 5,000 instructions a connection
                        sock = _socket.socket(*self._kind, fd)
                    except OSError:  # gone already (its getsockname failed): never a leaked descriptor
                        os.close(fd)
                        continue
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: wait a little, never spin
                self.on_error(exc)
                self.pause()
                self.loop.call_later(RETRY_AFTER_EMFILE, self.resume)
                return
            self.on_socket(sock, address)


class _Untimed:
    """The timer of a session whose server finds its idle sessions itself: nothing to cancel."""

    __slots__ = ()

    def cancel(self) -> None:
        pass


UNTIMED = _Untimed()


class SocketSession:
    """One accepted connection on the loop: data as it comes, one lazy timer, closed once.

    The timer covers both the idle timeout and a whole-session deadline; it is
    moved only when it fires (not at every read), so a busy connection costs no
    timer work. Subclasses say what data, silence, the deadline and the end mean:
    :meth:`received`, :meth:`idled`, :meth:`expired`, :meth:`ended`.
    """

    __slots__ = ("loop", "sock", "fd", "last", "idle", "deadline", "timer", "closed")

    #: False: no timer of its own; its server closes the sessions silent for ``idle``
    #: itself, from one timer for all (a connection that lives for one request then
    #: costs no timer to make and cancel, and the heap no entry to clear out)
    timed = True

    def __init__(self, loop, sock: socket.socket, idle: float, deadline: float = float("inf")) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.closed = False
        self.last = loop.time()
        self.idle = idle
        self.deadline = self.last + deadline
        self.timer = None

    def start(self) -> None:
        """Listen for data and start the clock (after a greeting, say)."""
        self.loop.add_reader(self.fd, self.readable)
        self.timer = self.loop.call_at(min(self.last + self.idle, self.deadline), self._tick) if self.timed \
            else UNTIMED

    def send(self, data: bytes) -> bool:
        """Replies are a few hundred bytes at most; a client that does not read them is dropped."""
        try:
            return self.sock.send(data, _DONTWAIT) == len(data)
        except OSError:
            return False

    def readable(self) -> None:
        """Read what is there (the loop calls this when the socket is readable)."""
        if self.closed:
            return  # closed by another callback of the same round
        try:
            data = self.sock.recv(65536, _DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.ended()
            self.close()
            return
        self.last = self.loop.time()
        self.received(data)

    def _tick(self) -> None:
        now = self.loop.time()
        if now >= self.deadline:
            self.expired()
            self.close()
        elif now >= self.last + self.idle:
            self.idled()
            self.close()
        else:
            self.timer = self.loop.call_at(min(self.last + self.idle, self.deadline), self._tick)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:  # started: its reader is registered (and its clock runs, if timed)
            self.unwatch(self.fd)
            self.timer.cancel()
        try:
            self.sock.close()
        except OSError:
            pass
        self.closing()

    def unwatch(self, fd: int) -> None:
        """Stop watching the descriptor, which is closed next."""
        self.loop.remove_reader(fd)

    # -- what a subclass says --------------------------------------------------
    def received(self, data: bytes) -> None:
        raise NotImplementedError

    def idled(self) -> None:
        """Silent for ``idle`` seconds; the session closes after this."""

    def expired(self) -> None:
        """The whole-session deadline passed; the session closes after this."""

    def ended(self) -> None:
        """The client closed (or broke) the connection; the session closes after this."""

    def closing(self) -> None:
        """The session is closed: tell the server."""
