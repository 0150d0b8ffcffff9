"""CPU per connection of three ways to greylist, on the same traffic, in one run.

- ``tcpserver + greylist-wrap``: a Python process per connection (what we replace);
- ``tcpserver + /bin/true``: a do-nothing C program per connection, the floor
  of any process-per-connection design, C greylisters included;
- ``greylist serve``: tempfails answered in process, a process only for passes.

The traffic is the default scenario's mix (its share of tempfailed
connections, from a simulated day), over real loopback sockets: every
tempfailed client is new (an address not seen before, as spam bots are) and
speaks HELO, MAIL, RCPT, QUIT; every passing client is a known one (its entry
is in the file store) and PROGRAM is ``/bin/true`` in every setup, so what
differs is only the greylisting. CPU is the server's and its children's (user
+ system, from /proc), so the client's own cost is not counted.

Also: the resident memory of ``greylist serve`` holding 5,000 idle tempfail
sessions, and the time to a known client's first reply meanwhile.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from simulator.commands import command

CLIENT_SCRIPT = b"HELO bench.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nQUIT\r\n"
TICK = os.sysconf("SC_CLK_TCK")


def tempfail_share() -> float:
    """The default scenario's share of tempfailed connections (a simulated 6 hours)."""
    from greylist.config import Config
    from greylist.stores.memory import MemoryStore
    from simulator.scenario import load
    from simulator.simulation import RunOptions, simulate

    server = simulate(load(), Config(), MemoryStore(), RunOptions(duration=6 * 3600, seed=7))
    connections = sum(s.connections for s in server.stats.values())
    tempfails = sum(s.tempfails for s in server.stats.values())
    return tempfails / connections


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of a process (its reaped children included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / TICK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def client(port: int, source: str, timeout: float = 10.0) -> bytes:
    """One SMTP client: the dialogue if greeted by the greylister, else read to the end."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        first = s.recv(512)
        if b"cqgreylist" in first:
            s.sendall(CLIENT_SCRIPT)
        while True:
            data = s.recv(4096)
            if not data:
                break
            first += data
        return first
    except OSError:
        return b""
    finally:
        s.close()


def plan(connections: int, share: float) -> list[str]:
    """Source addresses in a fixed interleaved order: new ones (tempfailed) and known ones (passing)."""
    out, passes = [], 0
    for i in range(connections):
        if (i + 1) * (1 - share) >= passes + 1:
            out.append(f"127.0.2.{1 + passes % 250}")
            passes += 1
        else:
            out.append(f"127.1.{(i // 250) % 250}.{1 + i % 250}")
    return out


def known_store(directory: Path) -> str:
    from greylist.core.policy import Record
    from greylist.stores.filetree import FileStore

    store = FileStore(str(directory))
    now = time.time()
    for n in range(1, 251):
        store.put(f"127.0.2.{n}", Record(now - 7200, now - 3600, 3))
    return f"file://{directory}"


def start(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"{argv[0]} did not start: {line!r}")
    return proc, int(line)


def drive(port: int, sources: list[str], threads: int = 8) -> int:
    """All connections, ``threads`` at a time; returns how many got no answer at all."""
    failures = [0]
    lock = threading.Lock()
    queue = list(reversed(sources))

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                source = queue.pop()
            reply = client(port, source)
            if not reply and not source.startswith("127.0.2."):
                with lock:
                    failures[0] += 1

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return failures[0]


def one_setup(name: str, sources: list[str], work: Path) -> dict:
    directory = work / name
    directory.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GREYLIST_", "TCP"))}
    env.update(GREYLIST_STORE=known_store(directory / "store"), GREYLIST_HOSTNAME="mx.bench")
    common = ["-1", "-R", "-H", "-l", "mx.bench", "-c", "100", "127.0.0.1", "0"]
    if name == "tcpserver_wrap":
        argv = ["tcpserver", *common, *command("greylist-wrap"), "/bin/true"]
    elif name == "tcpserver_true":
        argv = ["tcpserver", *common, "/bin/true"]
    else:
        argv = [*command("greylist"), "serve", *common, "/bin/true"]
    proc, port = start(argv, env)
    try:
        client(port, "127.0.3.1")  # warm up: first imports, first store access
        before = cpu_seconds(proc.pid)
        started = time.perf_counter()
        failures = drive(port, sources)
        wall = time.perf_counter() - started
        time.sleep(0.3)  # the last children are reaped
        cpu = cpu_seconds(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    return {"cpu_ms_per_connection": round(1000 * cpu / len(sources), 4),
            "cpu_seconds": round(cpu, 3), "wall_seconds": round(wall, 3), "unanswered": failures}


def idle_sessions(count: int, work: Path) -> dict:
    """RSS of greylist serve with ``count`` idle tempfail sessions, and a known client's first reply."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * count + 200
    if hard < need:
        return {"idle_sessions": 0, "skipped": f"needs {need} descriptors, hard limit {hard}"}
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    directory = work / "idle"
    directory.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GREYLIST_", "TCP"))}
    env.update(GREYLIST_STORE=known_store(directory / "store"), GREYLIST_HOSTNAME="mx.bench")
    proc, port = start([*command("greylist"), "serve", "-1", "-R", "-H", "-l", "mx.bench",
                        "127.0.0.1", "0", "/bin/true"], env)
    socks = []
    try:
        rss_before = rss_mb(proc.pid)
        for i in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(10)
            s.bind((f"127.4.{i // 250}.{1 + i % 250}", 0))
            s.connect(("127.0.0.1", port))
            socks.append(s)
        greeted = sum(1 for s in socks if s.recv(100).startswith(b"220 mx.bench cqgreylist"))
        rss = rss_mb(proc.pid)
        times = []
        for _ in range(20):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(10)
            s.bind(("127.0.2.7", 0))
            started = time.perf_counter()
            s.connect(("127.0.0.1", port))
            s.recv(100)  # /bin/true closes: the first "reply" is the end of the connection
            times.append(time.perf_counter() - started)
            s.close()
        times.sort()
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(timeout=20)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return {"idle_sessions": greeted, "idle_rss_mb": round(rss, 1), "rss_mb_before": round(rss_before, 1),
            "known_first_reply_ms_p50": round(1000 * times[len(times) // 2], 2),
            "known_first_reply_ms_max": round(1000 * times[-1], 2)}


def measure(connections: int = 2000, idle: int = 5000) -> dict:
    if not shutil.which("tcpserver"):
        return {"skipped": "needs tcpserver (apt-get install ucspi-tcp)"}
    share = tempfail_share()
    sources = plan(connections, share)
    work = Path(tempfile.mkdtemp(prefix="greylist-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    try:
        runs = {name: one_setup(name, sources, work) for name in ("tcpserver_true", "tcpserver_wrap", "serve")}
        idle_figures = idle_sessions(idle, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    serve = runs["serve"]["cpu_ms_per_connection"]
    true = runs["tcpserver_true"]["cpu_ms_per_connection"]
    wrap = runs["tcpserver_wrap"]["cpu_ms_per_connection"]
    out = {
        "connections": connections, "tempfail_share": round(share, 4),
        "tcpserver_true_cpu_ms": true, "tcpserver_wrap_cpu_ms": wrap, "serve_cpu_ms": serve,
        "serve_vs_true": round(serve / true, 4) if true else None,
        "serve_vs_wrap": round(serve / wrap, 4) if wrap else None,
        # tempfailed clients that got no greylisting dialogue (/bin/true answers nobody: not counted)
        "unanswered_wrap": runs["tcpserver_wrap"]["unanswered"], "unanswered_serve": runs["serve"]["unanswered"],
        **idle_figures,
    }
    out["target_serve_below_half_of_true"] = bool(out["serve_vs_true"] is not None and out["serve_vs_true"] < 0.5)
    out["target_serve_below_tenth_of_wrap"] = bool(out["serve_vs_wrap"] is not None and out["serve_vs_wrap"] < 0.1)
    if "idle_rss_mb" in out:
        out["target_idle_rss_under_200mb"] = out["idle_rss_mb"] < 200 and out["idle_sessions"] == idle
        out["target_known_reply_under_100ms"] = out["known_first_reply_ms_max"] < 100
    return out


if __name__ == "__main__":
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(json.dumps(measure(*(int(a) for a in sys.argv[1:3])), indent=2))
