"""The wrapper on the shared stores: races on SQLite and Redis, two MX hosts, Redis failing."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from conftest import STANDIN, Wrapper, parse_log


def concurrent(wrapper: Wrapper, n: int, ip: str, **env: str) -> list[dict]:
    procs = [subprocess.Popen(wrapper.command + STANDIN,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=wrapper.env(ip=ip, **env)) for _ in range(n)]
    logs = []
    for p in procs:
        out, err = p.communicate(b"RCPT TO:<x@y>\r\nQUIT\r\n", timeout=60)
        assert p.returncode == 0, err
        assert out.endswith(b"450 Rcpt to <> - you are greylisted try again\r\n221 mx.test Bye\r\n"), out
        [log] = parse_log(err)
        assert "error" not in log, log
        logs.append(log)
    return logs


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_fifty_concurrent_connections_leave_one_entry(kind, tmp_path, request):
    from greylist.stores import open_store

    url = f"sqlite://{tmp_path}/g.db" if kind == "sqlite" else request.getfixturevalue("redis_url")
    logs = concurrent(Wrapper(url, tmp_path), 50, "203.0.113.50")
    reasons = [log["reason"] for log in logs]
    assert reasons.count("new") == 1 and set(reasons) == {"new", "too-soon"}
    with open_store(url) as store:
        assert [k for k, _ in store.scan()] == ["203.0.113.50"]


def test_two_mx_hosts_share_one_redis(redis_url, tmp_path):
    """Tempfailed on mx1, the client's retry reaches mx2 after the delay and passes."""
    mx1, mx2 = Wrapper(redis_url, tmp_path), Wrapper(redis_url, tmp_path)
    first = mx1.run(ip="198.51.100.23", GREYLIST_HOSTNAME="mx1.example", GREYLIST_DELAY="1")
    assert first.stdout.startswith(b"220 mx1.example cqgreylist")
    time.sleep(1.1)
    second = mx2.run(ip="198.51.100.23", GREYLIST_HOSTNAME="mx2.example", GREYLIST_DELAY="1")
    assert second.stdout.startswith(b"220 standin")
    assert parse_log(second.stderr)[0]["reason"] == "passed"


@pytest.mark.parametrize("how", ["stopped", "hung"])
def test_redis_failing_mid_run_every_connection_is_answered(how, redis_server, redis_url, tmp_path):
    w = Wrapper(redis_url + "?timeout=0.1", tmp_path)
    assert parse_log(w.run(ip="192.0.2.1").stderr)[0]["reason"] == "new"
    if how == "stopped":
        redis_server.stop()
    else:
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        for on_error, greeting in (("pass", b"220 standin"), ("tempfail", b"220 mx.test cqgreylist")):
            started = time.monotonic()
            result = w.run(ip="192.0.2.2", GREYLIST_ON_ERROR=on_error)
            assert time.monotonic() - started < 5
            assert result.stdout.startswith(greeting)
            assert b"Traceback" not in result.stdout + result.stderr
            log = parse_log(result.stderr)[0]
            assert log["reason"] == "store-error" and "redis at 127.0.0.1" in log["error"]
            assert float(log["decision_ms"]) < 1000
    finally:
        if how == "hung":
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        else:
            redis_server.start()
