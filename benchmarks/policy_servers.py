"""greylist postgrey against the real postgrey, side by side in one run.

Both servers get the same work: requests for new triplets (every one a
lookup and a write), from 1, 10 and 50 clients, each client either keeping
its connection (as Postfix does) or opening one per request. Measured per
setting: requests per second, the server's CPU per request (user + system
from /proc) and the p99 time to an answer; and the servers' resident memory
idle, after the run (with ``triplets``, after that many triplets are stored), and
holding 1,000 idle connections. Skipped where
postgrey is not installed (apt-get install postgrey).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
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


def drive(port: int, clients: int, per_client: int, persistent: bool, offset: int) -> tuple[float, list[float]]:
    """``clients`` clients, each asking its next request when the last is answered
    (Postfix's smtpd processes do the same), on one event loop in this thread.

    Not a thread per client: 50 Python threads measure the interpreter's lock
    (a waiting thread may sit out a 5 ms switch interval) more than the server.
    Time is counted from the request's first byte (or, with a connection per
    request, from the connect) to the end of the answer."""
    import selectors

    selector = selectors.DefaultSelector()
    latencies: list[float] = []
    left = {c: per_client for c in range(clients)}
    host = ("127.0.0.1", port)

    class Slot:
        __slots__ = ("c", "sock", "started", "got", "n")

    def ask(slot: Slot) -> None:
        slot.n = offset + slot.c * per_client + (per_client - left[slot.c])
        slot.got = b""
        slot.started = time.perf_counter()
        if persistent:
            slot.sock.sendall(request(slot.n))
            return
        slot.sock = socket.socket()
        slot.sock.setblocking(False)
        slot.sock.connect_ex(host)
        selector.register(slot.sock, selectors.EVENT_WRITE, slot)

    slots = []
    for c in range(clients):
        slot = Slot()
        slot.c = c
        if persistent:
            slot.sock = socket.create_connection(host, timeout=30)
            slot.sock.setblocking(False)
            selector.register(slot.sock, selectors.EVENT_READ, slot)
        slots.append(slot)
    started = time.perf_counter()
    for slot in slots:
        ask(slot)
    busy = clients
    while busy:
        events = selector.select(30)
        if not events:
            raise TimeoutError("the server did not answer within 30 s")
        for key, mask in events:
            slot = key.data
            if mask & selectors.EVENT_WRITE:  # connected: send, then wait for the answer
                selector.modify(slot.sock, selectors.EVENT_READ, slot)
                slot.sock.sendall(request(slot.n))
                continue
            chunk = slot.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            slot.got += chunk
            if not slot.got.endswith(b"\n\n"):
                continue
            latencies.append(time.perf_counter() - slot.started)
            if not persistent:
                selector.unregister(slot.sock)
                slot.sock.close()
            left[slot.c] -= 1
            if left[slot.c]:
                ask(slot)
            else:
                busy -= 1
                if persistent:
                    selector.unregister(slot.sock)
                    slot.sock.close()
    selector.close()
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
                                                              (1, False), (10, False), (50, False)),
            triplets: int = 0) -> dict:
    """``triplets``: fill each server's database up to this many triplets (50 clients)
    before the memory is measured again (the issue asks after 100,000)."""
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
                if triplets > offset:
                    drive(port, 50, (triplets - offset) // 50, True, offset)
                    offset += (triplets - offset) // 50 * 50
                out["triplets"] = offset
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
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 4000,
                             triplets=int(sys.argv[2]) if len(sys.argv) > 2 else 0), indent=2))
