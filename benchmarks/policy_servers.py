"""greylist postgrey against the real postgrey, side by side in one run.

Both servers get the same work: requests for new triplets (every one a
lookup and a write), from 1, 10 and 50 clients, each client either keeping
its connection (as Postfix does) or opening one per request. Measured per
setting: requests per second, the server's CPU per request (user + system
from /proc) and the p99 time to an answer; and the servers' resident memory
idle, after the run, and holding 1,000 idle connections. Skipped where
postgrey is not installed (apt-get install postgrey).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from simulator.commands import command

POSTGREY = "/usr/sbin/postgrey"
TICK = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    from benchmarks.serve_cpu import rss_mb as rss

    return rss(pid)


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(n: int) -> bytes:
    return (f"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=10.{n >> 16 & 255}."
            f"{n >> 8 & 255}.{n & 255}\nclient_name=unknown\nsender=s{n}@example.org\n"
            f"recipient=r{n}@example.net\n\n").encode()


def exchange(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    got = b""
    while not got.endswith(b"\n\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        got += chunk


def drive(port: int, clients: int, per_client: int, persistent: bool, offset: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        mine = []
        sock = socket.create_connection(("127.0.0.1", port), timeout=30) if persistent else None
        for i in range(per_client):
            n = offset + c * per_client + i
            started = time.perf_counter()
            if persistent:
                exchange(sock, request(n))
            else:
                with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                    exchange(s, request(n))
            mine.append(time.perf_counter() - started)
        if sock:
            sock.close()
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, sorted(latencies)


def start(kind: str, directory: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    if kind == "postgrey":
        argv = [POSTGREY, f"--inet=127.0.0.1:{port}", f"--dbdir={directory}"]
    else:
        argv = [*command("greylist"), "postgrey", f"--inet=127.0.0.1:{port}", f"--dbdir={directory}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREYLIST_")}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            time.sleep(0.2)
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{kind} did not start")


def server_pid(proc: subprocess.Popen) -> int:
    """postgrey (Net::Server) may run its work in a child; take the process that listens."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    kids = children.read_text().split() if children.exists() else []
    return int(kids[0]) if kids else proc.pid


def measure(requests: int = 4000, idle: int = 1000, settings=((1, True), (10, True), (50, True),
                                                              (1, False), (10, False), (50, False))) -> dict:
    if not Path(POSTGREY).exists() or os.geteuid() != 0:
        return {"skipped": "needs Debian's postgrey, run as root (it switches to its own user)"}
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    os.chmod(base, 0o755)
    out: dict = {}
    try:
        for kind in ("postgrey", "ours"):
            directory = base / kind
            directory.mkdir()
            shutil.chown(directory, "postgrey")
            proc, port = start(kind, directory)
            try:
                pid = server_pid(proc)
                out[f"{kind}_rss_idle_mb"] = round(rss_mb(pid), 1)
                offset = 0
                for clients, persistent in settings:
                    name = f"{kind}_{'persistent' if persistent else 'new'}_{clients}"
                    per_client = max(1, requests // clients)
                    before = cpu(pid)
                    wall, lat = drive(port, clients, per_client, persistent, offset)
                    used = cpu(pid) - before
                    count = per_client * clients
                    offset += count
                    out[f"{name}_per_second"] = round(count / wall)
                    out[f"{name}_cpu_us"] = round(1e6 * used / count, 1)
                    out[f"{name}_p99_ms"] = round(1000 * lat[int(0.99 * (len(lat) - 1))], 2)
                out[f"{kind}_rss_after_mb"] = round(rss_mb(pid), 1)
                socks = []
                for _ in range(idle):
                    socks.append(socket.create_connection(("127.0.0.1", port), timeout=30))
                time.sleep(0.5)
                out[f"{kind}_rss_idle_connections_mb"] = round(rss_mb(pid), 1)
                for s in socks:
                    s.close()
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for clients, persistent in settings:
        key = f"{'persistent' if persistent else 'new'}_{clients}"
        theirs, ours = out[f"postgrey_{key}_cpu_us"], out[f"ours_{key}_cpu_us"]
        out[f"cpu_ratio_{key}"] = round(ours / theirs, 3) if theirs else None
        out[f"speed_ratio_{key}"] = round(out[f"ours_{key}_per_second"] / out[f"postgrey_{key}_per_second"], 3)
    return out


if __name__ == "__main__":
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 4000), indent=2))
