"""Shared fixtures: the installed wrapper as a real subprocess, a stand-in smtpd."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from simulator.commands import ROOT, STANDIN_SMTPD, command

STANDIN = STANDIN_SMTPD  # the stand-in qmail-smtpd, an argv prefix


def wrapper_command() -> list[str]:
    """The installed greylist-wrap beside this interpreter, else the source script."""
    return command("greylist-wrap")


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GREYLIST_", "TCP", "RELAYCLIENT", "WHITELISTED"))}
    env["PYTHONPATH"] = str(ROOT)
    env["GREYLIST_HOSTNAME"] = "mx.test"
    env.update(extra)
    return env


class Wrapper:
    """Runs greylist-wrap as tcpserver would: own process, UCSPI env, real pipes."""

    def __init__(self, store_url: str, tmp: Path) -> None:
        self.store_url = store_url
        self.tmp = tmp
        self.command = wrapper_command()

    def env(self, ip: str | None = "192.0.2.10", **extra: str) -> dict[str, str]:
        env = base_env(**{"GREYLIST_STORE": self.store_url, **extra})
        if ip is not None:
            env["TCPREMOTEIP"] = ip
        return env

    def run(self, ip: str | None = "192.0.2.10", stdin: bytes = b"QUIT\r\n",
            args: list[str] | None = None, program: list[str] | None = None,
            timeout: float = 20, **extra: str) -> subprocess.CompletedProcess:
        program = program if program is not None else STANDIN + ["arg1", "arg two"]
        return subprocess.run(self.command + (args or []) + program, input=stdin,
                              env=self.env(ip, **extra), capture_output=True, timeout=timeout)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    d = tmp_path / "cqgreylist"
    d.mkdir()
    return d


@pytest.fixture
def wrapper(store_dir: Path, tmp_path: Path) -> Wrapper:
    return Wrapper(f"file://{store_dir}", tmp_path)


def parse_log(stderr: bytes) -> list[dict[str, str]]:
    """The wrapper's key=value lines (values may be double-quoted)."""
    import shlex

    lines = []
    for line in stderr.decode().splitlines():
        if line.startswith("greylist-wrap:"):
            lines.append(dict(part.split("=", 1) for part in shlex.split(line)[1:]))
    return lines


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free loopback port and a unix socket, for the session."""
    from benchmarks.redis_server import RedisServer

    try:
        server = RedisServer()
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))  # in CI these tests must run, not skip
        pytest.skip(str(exc))
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server) -> str:
    if redis_server.proc.poll() is not None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url


def paused_with_reloads_held(pid: int, seconds: float = 20) -> bool:
    """Stop a starting server (SIGSTOP) at a moment it holds SIGHUP blocked, as it does from
    its first line until its handler is in place. False: it never was (or its start
    outran us, seen only on an idle machine: the caller starts another)."""
    import signal
    import time

    deadline = time.monotonic() + seconds
    status = Path(f"/proc/{pid}/status")

    def has(field: str) -> bool:
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            return False
        return bool(int(fields.get(field, "0").strip(), 16) & (1 << (signal.SIGHUP - 1)))

    def blocked() -> bool:
        return has("SigBlk")

    while time.monotonic() < deadline:
        if has("SigCgt") and not blocked():
            return False  # its handler is in place already
        if blocked():
            os.kill(pid, signal.SIGSTOP)
            while "T" not in status.read_text().split("State:")[1][:4]:
                time.sleep(0.001)
            if blocked():
                return True
            os.kill(pid, signal.SIGCONT)  # released as we stopped it: too late for this one
            return False
        time.sleep(0.0005)
    return False


def answers_on(port: int, seconds: float = 20) -> bool:
    """Something accepts connections on the loopback port within ``seconds``."""
    import socket
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False
