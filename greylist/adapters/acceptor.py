"""The listening side of our long-lived servers (``greylist serve``, ``greylist policyd``).

Both accept on an asyncio event loop, in batches, and must never spin: when
the process runs out of descriptors, accepting pauses for a moment (with a log
line) instead of waking up again at once for the same pending connection; when
the server is at its own bound, it either pauses (the kernel's backlog holds
the rest) or makes room, as the server decides.
"""

from __future__ import annotations

import socket
from typing import Callable

BATCH = 64
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


class Acceptor:
    """Accepts connections from ``listener`` and hands each to ``on_socket(sock, address)``.

    ``at_bound()`` is asked before each accept: True means the server is full and
    accepting pauses until :meth:`resume`; a server that makes room returns False.
    ``on_error(exc)`` logs an accept failure (out of descriptors, say).
    """

    def __init__(self, loop, listener: socket.socket, on_socket: Callable, at_bound: Callable[[], bool],
                 on_error: Callable[[OSError], None]) -> None:
        self.loop = loop
        self.listener = listener
        self.on_socket = on_socket
        self.at_bound = at_bound
        self.on_error = on_error
        self.accepting = False
        self.closed = False

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
        for _ in range(BATCH):
            if self.at_bound():
                self.pause()
                return
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: wait a little, never spin
                self.on_error(exc)
                self.pause()
                self.loop.call_later(RETRY_AFTER_EMFILE, self.resume)
                return
            self.on_socket(sock, address)
