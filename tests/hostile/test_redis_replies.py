"""A hostile or broken Redis: one deadline per command, malformed replies rejected."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from greylist.stores import open_store
from greylist.stores.base import StoreError


class FakeRedis:
    """Answers every command with ``reply``, ``trickle`` seconds between its bytes."""

    def __init__(self, reply: bytes, trickle: float = 0.0) -> None:
        self.reply, self.trickle = reply, trickle
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.port = self.sock.getsockname()[1]
        self.stop = False
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn: socket.socket) -> None:
        try:
            while conn.recv(4096):
                for i in range(len(self.reply)):
                    conn.sendall(self.reply[i:i + 1])
                    if self.trickle:
                        time.sleep(self.trickle)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop = True
        self.sock.close()


def test_a_trickling_server_holds_a_command_no_longer_than_its_timeout():
    server = FakeRedis(b"$20\r\n" + b"1800000000.0 1800000", trickle=0.05)
    try:
        store = open_store(f"redis://127.0.0.1:{server.port}/0?timeout=0.2")
        started = time.monotonic()
        with pytest.raises(StoreError, match="timed out|within 0.2 s"):
            store.get("192.0.2.1")
        assert time.monotonic() - started < 1.0  # it held 8 s with a per-read timeout
    finally:
        server.close()


@pytest.mark.parametrize("reply", [b"$-5\r\n", b"*-3\r\n", b":abc\r\n", b"$99999999999\r\n", b"?what\r\n",
                                   b"$x\r\n"])
def test_malformed_replies_are_store_errors_never_answers(reply):
    server = FakeRedis(reply)
    try:
        store = open_store(f"redis://127.0.0.1:{server.port}/0?timeout=0.5")
        with pytest.raises(StoreError, match="protocol error"):
            store.get("192.0.2.1")
    finally:
        server.close()


@pytest.mark.parametrize("reply,older", [
    (b"-ERR syntax error\r\n", True),  # what a Redis before 7.0 says to SET ... NX GET
    (b"-OOM command not allowed when used memory > 'maxmemory'.\r\n", False),
    (b"-READONLY You can't write against a read only replica.\r\n", False),
])
def test_only_a_syntax_error_is_taken_for_a_redis_without_set_nx_get(reply, older):
    """A new key is one SET NX GET; a server older than 7.0 rejects it as a syntax error, and
    the store then uses three commands for good. A full or read-only server's refusal is the
    store failing now (a StoreError), not its version. (Our own connection: redis-py's
    handshake would meet the stand-in's error first; it maps replies the same way, as the
    full real Redis of tests/stores/test_redis.py shows.)"""
    from greylist.core.policy import Record

    server = FakeRedis(reply)
    try:
        store = open_store(f"redis://127.0.0.1:{server.port}/0?timeout=1")
        with pytest.raises(StoreError):
            store.get_or_add("192.0.2.1", Record(1.0, 1.0, 0))
        assert (store.nx_get is False) is older
    finally:
        server.close()
