"""Shared fixtures: the installed wrapper as a real subprocess, a stand-in smtpd."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "simulator" / "standin_smtpd.py"


def wrapper_command() -> list[str]:
    """The installed greylist-wrap beside this interpreter, else the source script."""
    installed = Path(sys.executable).parent / "greylist-wrap"
    if installed.exists():
        return [str(installed)]
    return [sys.executable, str(ROOT / "bin" / "greylist-wrap")]


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
        program = program if program is not None else [sys.executable, str(STANDIN), "arg1", "arg two"]
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on a free loopback port and a unix socket, for one test session."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            message = "redis-server is not installed (apt-get install redis-server)"
            if os.environ.get("CI"):
                pytest.fail(message)  # in CI these tests must run, not skip
            pytest.skip(message)
        self.dir = tempfile.mkdtemp(prefix="greylist-redis-")
        self.port = free_port()
        self.socket = f"{self.dir}/redis.sock"
        self.exe = exe
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--unixsocket", self.socket,
             "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"redis+unix://{self.socket}"

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as c:
            c.sendall(b"FLUSHALL\r\n")
            c.recv(64)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server) -> str:
    if redis_server.proc.poll() is not None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url
