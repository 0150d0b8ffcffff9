"""End to end with the real neighbours: tcpserver (ucspi-tcp), tcprules and swaks.

Loopback only. .ci/run installs ucspi-tcp and swaks; a machine without them
skips these tests with the reason.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.redis_server import free_port
from conftest import STANDIN, base_env, parse_log, wrapper_command

pytestmark = pytest.mark.skipif(
    not (shutil.which("tcpserver") and shutil.which("swaks") and shutil.which("tcprules")),
    reason="needs ucspi-tcp and swaks (apt-get install ucspi-tcp swaks)",
)


class Server:
    def __init__(self, tmp: Path, env: dict[str, str], rules: str | None = None):
        self.port = free_port()
        args = ["tcpserver", "-v", "-R", "-H", "-c", "10"]
        if rules is not None:
            (tmp / "tcp.smtp").write_text(rules)
            subprocess.run(["tcprules", str(tmp / "tcp.smtp.cdb"), str(tmp / "tcp.smtp.tmp")],
                           input=rules.encode(), check=True)
            args += ["-x", str(tmp / "tcp.smtp.cdb")]
        args += ["127.0.0.1", str(self.port)] + wrapper_command() + STANDIN
        self.log = tmp / "tcpserver.log"
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                                     stderr=self.log.open("wb"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        time.sleep(0.3)  # let the probe connection's wrapper finish

    def swaks(self) -> subprocess.CompletedProcess:
        return subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(self.port),
                               "--from", "alice@example.org", "--to", "bob@example.net",
                               "--helo", "client.example", "--timeout", "10"],
                              capture_output=True, text=True, timeout=30)

    def stop(self) -> list[dict[str, str]]:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        return parse_log(self.log.read_bytes())


def test_swaks_is_greylisted_then_delivered(tmp_path, store_dir):
    env = base_env(GREYLIST_STORE=f"file://{store_dir}", GREYLIST_DELAY="2")
    server = Server(tmp_path, env)
    try:
        first = server.swaks()
        assert first.returncode == 24, first.stdout  # swaks: error at RCPT
        assert "<** 450 Rcpt to <> - you are greylisted try again" in first.stdout
        time.sleep(2.2)
        second = server.swaks()
        assert second.returncode == 0, second.stdout
        assert "250 ok queued" in second.stdout
    finally:
        logs = server.stop()
    reasons = [line["reason"] for line in logs]
    assert "new" in reasons and reasons[-1] == "passed"
    assert (store_dir / "127" / "127.0.0.1").exists()


def test_tcprules_whitelisting_skips_the_store(tmp_path, store_dir):
    env = base_env(GREYLIST_STORE=f"file://{store_dir}")
    server = Server(tmp_path, env, rules='127.:allow,WHITELISTED=""\n')
    try:
        result = server.swaks()
        assert result.returncode == 0, result.stdout
    finally:
        logs = server.stop()
    assert logs[-1]["reason"] == "whitelisted"
    assert list(store_dir.iterdir()) == []


def test_tcprules_sets_a_per_netblock_delay(tmp_path, store_dir):
    env = base_env(GREYLIST_STORE=f"file://{store_dir}", GREYLIST_DELAY="3600")
    server = Server(tmp_path, env, rules='127.0.0.1:allow,GREYLIST_DELAY="0"\n')
    try:
        server.swaks()
        result = server.swaks()
        assert result.returncode == 0, result.stdout
    finally:
        server.stop()
