"""Servers' CPU a request measured at the same moments: one client alternating between them.

On a shared virtual machine a server's CPU a request moves by 10-25% from one
turn of requests to the next, so a change of a few percent, measured in turns
of its own, is lost (two runs of the same comparison once read -9% and +2%).
Here one client sends each request to every server in turn, each answered
before the next (a persistent connection each, or a new connection per
request), so that all of them meet the same moments of the machine; each
server's CPU is the scheduler's count for all its threads. Per turn, each
server's figure is divided by the first server's, and the median of the turns
is reported. Two copies of the same code read 0.996 apart (9 turns of 2,000
requests), a change of 4% showed as 0.964 and 0.952. Each server's caches are
taken by the others' work between its requests, so its microseconds are more
than alone (ours 116 beside postgrey and another copy, some 85 alone): compare
revisions with each other; benchmarks/policy_servers.py measures against postgrey.

    python benchmarks/alternate.py 9d34fa7 HEAD          # two revisions of greylist postgrey
    python benchmarks/alternate.py postgrey worktree     # Debian's postgrey, the files as they are
    python benchmarks/alternate.py worktree python:/tmp/system/bin/python   # another Python's build

A server is ``postgrey`` (Debian's, run as root), ``worktree`` (this checkout's
files), a git revision, or ``python:PATH``: greylist as installed for that
interpreter (a venv's python), to compare builds of Python; each is run as
``greylist postgrey`` on a database of its own. Every request is a new
triplet, as in benchmarks/policy_servers.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _tree(revision: str, into: Path) -> Path:
    """The greylist package of ``revision``: this checkout's for worktree, else git's copy."""
    if revision == "worktree":
        return ROOT
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "greylist"], capture_output=True,
                             check=False)
    if archive.returncode != 0:
        raise SystemExit(f"{revision}: not a revision of this repository ({archive.stderr.decode().strip()})")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _ask(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    answer = sock.recv(4096)
    while not answer.endswith(b"\n\n"):
        more = sock.recv(4096)
        if not more:
            raise ConnectionError("closed before its answer")
        answer += more


def measure(servers: list[str], turns: int = 9, requests: int = 2000, new_connection: bool = False) -> dict:
    """CPU a request of each server (medians of the turns) and its ratio to the first's."""
    from benchmarks.policy_servers import cpu, installed_in, request, server_pid, start, stop

    if len(servers) < 2:
        raise ValueError("name two servers or more")
    if turns < 1 or requests < 1:
        raise ValueError("at least one turn of one request")
    if any(server.startswith("-") for server in servers):  # git archive would take it as an option
        raise ValueError("a server is postgrey, worktree, a git revision or python:PATH")
    pythons = {server: installed_in(server.removeprefix("python:")) for server in servers
               if server.startswith("python:")}
    if "postgrey" in servers and (not Path("/usr/sbin/postgrey").exists() or os.geteuid() != 0):
        return {"skipped": "postgrey needs Debian's postgrey, run as root (it switches to its own user)"}
    names = [f"{name}#{n}" if servers.count(name) > 1 else name for n, name in enumerate(servers)]
    base = Path(tempfile.mkdtemp(prefix="alternate."))
    os.chmod(base, 0o755)
    running: dict[str, tuple[subprocess.Popen, int, int]] = {}
    try:
        for n, (name, server) in enumerate(zip(names, servers)):
            directory = base / f"db{n}"
            directory.mkdir()
            if os.geteuid() == 0:  # both switch to postgrey's user, as benchmarks/policy_servers.py runs them
                try:
                    shutil.chown(directory, "postgrey")
                except LookupError:
                    pass  # no such user: greylist postgrey stays root
            if server.startswith("python:"):
                proc, port = start("ours", directory, python=pythons[server])
            else:
                tree = None if server == "postgrey" else _tree(server, base / f"tree{n}")
                proc, port = start("postgrey" if tree is None else "ours", directory, tree)
            running[name] = (proc, port, server_pid(proc))
        conns = {name: socket.create_connection(("127.0.0.1", port), timeout=30)
                 for name, (_proc, port, _pid) in running.items()}
        cpu_us: dict[str, list[float]] = {name: [] for name in names}
        sent = 0
        for _ in range(turns):
            before = {name: cpu(pid) for name, (_proc, _port, pid) in running.items()}
            for i in range(requests):
                data = request(sent + i)
                first = i % len(names)  # who goes first turns too: the first of a round pays more
                for name in names[first:] + names[:first]:
                    if new_connection:
                        conns[name].close()
                        conns[name] = socket.create_connection(("127.0.0.1", running[name][1]), timeout=30)
                    _ask(conns[name], data)
            sent += requests
            for name, (_proc, _port, pid) in running.items():
                cpu_us[name].append(1e6 * (cpu(pid) - before[name]) / requests)
        for conn in conns.values():
            conn.close()
    finally:
        for proc, _port, _pid in running.values():
            stop(proc)
        shutil.rmtree(base, ignore_errors=True)
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    out: dict = {"turns": turns, "requests": requests, "new_connection": new_connection}
    for name in names:
        ratios = sorted(ours / theirs for ours, theirs in zip(cpu_us[name], cpu_us[names[0]]))
        out[name] = {"cpu_us": round(median(cpu_us[name]), 1), "ratio": round(median(ratios), 3),
                     "ratio_range": [round(ratios[0], 3), round(ratios[-1], 3)]}
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("servers", nargs="+", help="postgrey, worktree, a git revision or python:PATH; the first is the reference")
    parser.add_argument("--turns", type=int, default=9)
    parser.add_argument("--requests", type=int, default=2000, help="requests a turn, to each server")
    parser.add_argument("--new-connection", action="store_true", help="a connection per request")
    args = parser.parse_args(argv)
    try:
        result = measure(args.servers, args.turns, args.requests, args.new_connection)
    except ValueError as exc:
        parser.error(str(exc))
    if "skipped" in result:
        print(result["skipped"], file=sys.stderr)
        return 1
    for name, figures in result.items():  # the servers, by name, in the order given
        if not isinstance(figures, dict):
            continue
        low, high = figures["ratio_range"]
        print(f"{name:24} {figures['cpu_us']:8.1f} us a request   {figures['ratio']:.3f} of the first"
              f" (turns {low:.3f}-{high:.3f})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
