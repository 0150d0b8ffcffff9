"""Redis specifics: TTL expiry, URLs, and a server that is down or hangs."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from greylist.core.check import check
from greylist.core.policy import Policy, Record
from greylist.stores import StoreError, open_store
from greylist.stores.redisstore import Address


def raw(server, *args: str) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as c:
        c.sendall(("*%d\r\n" % len(args) + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)).encode())
        time.sleep(0.05)
        return c.recv(4096)


def test_keys_expire_by_ttl_so_no_cron_is_needed(redis_server, redis_url):
    store = open_store(redis_url)
    policy = Policy(delay=60, retry_window=3600, max_age=86400)
    now = time.time()
    check(store, "192.0.2.1", now, policy)
    ttl = int(raw(redis_server, "PTTL", "greylist:192.0.2.1").strip()[1:])
    assert 3590_000 < ttl <= 3600_000  # pending: the retry window
    check(store, "192.0.2.1", now + 120, policy)
    ttl = int(raw(redis_server, "PTTL", "greylist:192.0.2.1").strip()[1:])
    assert 86300_000 < ttl <= 86400_000  # known: max age from its last pass


def test_one_key_per_client(redis_server, redis_url):
    store = open_store(redis_url)
    for i in range(20):
        check(store, f"192.0.2.{i}", 1000.0, Policy())
    keys = raw(redis_server, "KEYS", "*")
    assert keys.count(b"greylist:") == 20 and store.size() == 20


@pytest.mark.parametrize("url,host,port,db,path,timeout", [
    ("redis://10.1.2.3:6380/2", "10.1.2.3", 6380, 2, None, 0.1),
    ("redis://[::1]:7000/0?timeout=0.5", "::1", 7000, 0, None, 0.5),
    ("redis://:secret@mx-redis/1", "mx-redis", 6379, 1, None, 0.1),
    ("redis+unix:///run/redis.sock?db=3&timeout=0.25", "127.0.0.1", 6379, 3, "/run/redis.sock", 0.25),
])
def test_urls(url, host, port, db, path, timeout):
    a = Address(url)
    assert (a.host, a.port, a.db, a.unix_path, a.timeout) == (host, port, db, path, timeout)


@pytest.mark.parametrize("url", ["redis://h:port/0", "redis://h/x", "redis+unix://rel.sock",
                                 "redis://h?timeout=-1", "redis://h?colour=red"])
def test_bad_urls(url):
    with pytest.raises(StoreError):
        Address(url)


def test_server_down_is_a_quick_store_error():
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot connect"):
        open_store(f"redis://127.0.0.1:{free}/0")
    assert time.monotonic() - started < 1


def test_hung_server_times_out_within_the_bound(redis_server, redis_url):
    store = open_store(redis_url + "?timeout=0.2")
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match="timed out"):
            store.get("192.0.2.1")
        assert time.monotonic() - started < 1.0
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)


def test_foreign_values_are_treated_as_absent(redis_server, redis_url):
    raw(redis_server, "SET", "greylist:192.0.2.7", "garbage")
    store = open_store(redis_url)
    assert store.get("192.0.2.7") is None
    assert check(store, "192.0.2.7", 1000.0, Policy()).reason == "new"
    assert store.get("192.0.2.7") == Record(1000.0, 1000.0, 0)


@pytest.mark.parametrize("lean", [True, False])
def test_a_long_lived_store_reconnects_after_redis_comes_back(redis_server, redis_url, lean):
    """greylist policyd keeps one store per thread: a Redis restart must not break it for good."""
    store = open_store(redis_url, lean=lean)
    assert check(store, "192.0.2.1", 1000.0, Policy()).reason == "new"
    redis_server.stop()
    with pytest.raises(StoreError):
        check(store, "192.0.2.2", 1000.0, Policy())
    with pytest.raises(StoreError):
        check(store, "192.0.2.2", 1000.0, Policy())  # still away: a clear error again
    redis_server.start()
    assert check(store, "192.0.2.3", 1000.0, Policy()).reason == "new"


@pytest.mark.parametrize("lean", [True, False])
def test_a_full_redis_is_a_store_error_and_what_it_holds_is_still_read(redis_server, redis_url, lean):
    """A Redis at its maxmemory with the noeviction policy (a shared cache's usual setting)
    refuses every write with an OOM reply: a store error, which the front ends pass the
    client by (on_error) and log as the store's, never our bug. What it holds is still
    read, and once there is room a new key is one command again: the refusal was taken for
    a server older than 7.0 (no SET NX GET), three commands a new key from then on."""
    store = open_store(redis_url, lean=lean)
    policy = Policy(delay=60, retry_window=3600, max_age=86400)
    assert check(store, "192.0.2.1", 1000.0, policy).reason == "new"
    assert raw(redis_server, "CONFIG", "SET", "maxmemory-policy", "noeviction").startswith(b"+OK")
    assert raw(redis_server, "CONFIG", "SET", "maxmemory", "1").startswith(b"+OK")  # any write is past it
    try:
        with pytest.raises(StoreError, match="maxmemory"):
            check(store, "192.0.2.2", 1000.0, policy)
        assert store.get("192.0.2.1") == Record(1000.0, 1000.0, 0)
    finally:
        raw(redis_server, "CONFIG", "SET", "maxmemory", "0")
    commands = store.ops.get("command", 0)
    assert check(store, "192.0.2.2", 1000.0, policy).reason == "new"
    assert store.nx_get is not False and store.ops["command"] - commands == 1
