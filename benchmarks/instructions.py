"""Machine instructions a greylist postgrey decision takes: a figure no shared machine blurs.

CPU time on these machines moves by a quarter within an hour for the same
code; instructions counted by callgrind (valgrind) do not. One process builds
the policy server as ``greylist postgrey`` does (SQLite store in a temporary
--dbdir, postgrey's replies and log lines, written to /dev/null) and hands it
requests as a client's reads, each followed by the end of a loop round (its
rows written); the figure is the difference between a run of ``start`` and one
of ``start + requests`` requests, divided by ``requests``, so start-up does not
count. What would make two runs differ is held still: the clock (a counter,
not the time, so the 0.2 s windows end after the same decisions), the
checkpoint thread (its once-a-second work is not a decision's), string hashing
(PYTHONHASHSEED) and, where ``setarch`` is there, address randomisation.

Two requests: the benchmark's own (6 attributes, as benchmarks/policy_servers.py
sends) and one as Postfix 3.7 sends it (31 attributes).

And the cache lines a decision finds cold (``cold_lines_per_decision``): with one
persistent client the server waits between requests, and on a virtual machine
whose idle processor halts, the next request finds the caches taken by others.
Then a decision costs what it touches more than what it executes: in this
harness, 14.5 us with warm caches against 79 us after a 32 MiB sweep (a server
answering DUNNO without deciding: 3.2 against 20 us). Counted by cachegrind with
caches of fixed sizes (32 KiB L1, 4 MiB last level), a buffer twice the last
level written before each request: the lines of code and data missed in the last
level, against a run with the same sweeps and no requests between them. Over
a whole batch of held writes (1,024 requests) at least: over 300, where they
fell in the batch's cycle moved the figure by 3%, more than a change measured.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def postfix_request(n: int) -> bytes:
    """A request as Postfix 3.7's smtpd sends it at RCPT (every attribute, most empty)."""
    return (f"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
            f"client_address=10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}\nclient_name=unknown\n"
            f"client_port=4{n % 10000:04d}\nreverse_client_name=unknown\nserver_address=192.0.2.25\n"
            f"server_port=25\nhelo_name=host{n}.example.com\nsender=s{n}@example.org\n"
            f"recipient=r{n}@example.net\nrecipient_count=0\nqueue_id=\ninstance={n:x}.6565d1b3.a5b2c.0\n"
            f"size=0\netrn_domain=\nstress=\nsasl_method=\nsasl_username=\nsasl_sender=\nccert_subject=\n"
            f"ccert_issuer=\nccert_fingerprint=\nccert_pubkey_fingerprint=\nencryption_protocol=TLSv1.3\n"
            f"encryption_cipher=TLS_AES_256_GCM_SHA384\nencryption_keysize=256\npolicy_context=\n"
            f"compatibility_level=3.6\nmail_version=3.7.11\n\n").encode()


#: the simulated caches (cachegrind's --I1, --D1, --LL: size, ways, line) and the sweep
CACHES = ("--I1=32768,8,64", "--D1=32768,8,64", "--LL=4194304,16,64")
LINE = 64
SWEEP = 8 << 20


def harness(count: int, shape: str, cold: int = 0, decide_cold: bool = True) -> None:
    """Decide ``count`` requests in this process (run under callgrind by :func:`measure`),
    then ``cold`` more, each after a sweep of the caches (with ``decide_cold`` False: the
    sweeps alone, the baseline of the cold figure)."""
    import tempfile
    import time

    ticks = [1.8e9]

    def clock() -> float:  # advances by the call, not by the time: the same in every run
        ticks[0] += 2e-5
        return ticks[0]

    time.time = time.monotonic = time.perf_counter = clock  # before greylist imports them

    import socket

    import greylist.stores.checkpointer as checkpointer
    from benchmarks.policy_servers import request
    from greylist.adapters import postgrey as pg
    from greylist.adapters.logwriter import LogWriter
    from greylist.adapters.policyd import Client, PolicyServer, Replies
    from greylist.config import load

    checkpointer.EVERY = 1e6  # its thread's work is not a decision's
    make = postfix_request if shape == "postfix" else request
    with tempfile.TemporaryDirectory() as dbdir:
        plan = pg.parse(["--inet=127.0.0.1:0", f"--dbdir={dbdir}"])
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        server = PolicyServer(listener, load(plan.flags, {}), "instructions",
                              replies=Replies(plan.action, plan.text, plan.header, "1"),
                              line_format=pg.postgrey_line, program="greylist-postgrey")
        server.greylister.prepare()
        server.greylister.try_store()
        server.log_writer = LogWriter(server.loop, "greylist-postgrey", fd=os.open(os.devnull, os.O_WRONLY))
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        client = Client(server, ours)
        round_end = server.loop.at_round_end
        greylisted = 0

        def answers() -> int:  # read as Postfix would; each a greylisting (every triplet is new)
            seen = 0
            try:
                while chunk := theirs.recv(1 << 20):
                    seen += chunk.count(b"action=DEFER_IF_PERMIT ")
            except BlockingIOError:
                pass
            return seen

        sweep = bytearray(SWEEP if cold else 0)
        blank = bytes(len(sweep) // LINE)
        decided = count + (cold if decide_cold else 0)
        for n in range(count + cold):
            if n >= count:
                sweep[::LINE] = blank  # a line in every LINE bytes: the caches hold nothing of ours
                if not decide_cold:
                    continue
            client.received(make(n))
            for callback in round_end:
                callback()
            if n % 64 == 63:  # before the socket's buffer is full (a small send costs it ~1 KiB)
                greylisted += answers()
        greylisted += answers()
        if not cold:  # the cold runs differ in their requests only, not in the rows left to close
            server.write_log()
            server.greylister.close()
    if greylisted != decided:
        raise SystemExit(f"{greylisted} of {decided} requests greylisted")


def _run(tool: list[str], harness_args: list[str]) -> subprocess.CompletedProcess:
    command = ["valgrind", *tool, sys.executable, str(HERE / "instructions.py"), "--harness", *harness_args]
    if shutil.which("setarch"):
        command = ["setarch", os.uname().machine, "-R"] + command
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=str(HERE.parent))
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=HERE.parent, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"valgrind run failed ({done.returncode}): {done.stderr[-2000:]}")
    return done


def _count(count: int, shape: str) -> int:
    done = _run(["--tool=callgrind", "--callgrind-out-file=/dev/null"], [str(count), shape])
    found = re.findall(r"Collected : (\d+)", done.stderr)
    if not found:
        raise RuntimeError(f"callgrind counted nothing: {done.stderr[-2000:]}")
    return int(found[-1])


def _missed(count: int, cold: int, decide_cold: bool) -> int:
    """Lines missed in the simulated last level (code read, data read and written)."""
    import tempfile

    with tempfile.NamedTemporaryFile(prefix="cachegrind.") as out:
        _run(["--tool=cachegrind", "--cache-sim=yes", *CACHES, f"--cachegrind-out-file={out.name}"],
             [str(count), "benchmark", str(cold), "1" if decide_cold else "0"])
        text = out.read().decode()
    events = re.search(r"^events: (.*)$", text, re.M).group(1).split()
    totals = dict(zip(events, map(int, re.search(r"^summary: (.*)$", text, re.M).group(1).split())))
    return totals["ILmr"] + totals["DLmr"] + totals["DLmw"]


def measure(requests: int = 4000, start: int = 2000, cold: int = 1024) -> dict:
    if not shutil.which("valgrind"):
        return {"skipped": "needs valgrind (Debian's valgrind package)"}
    runs = [(n, shape) for shape in ("benchmark", "postfix") for n in (start, start + requests)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        totals = dict(zip(runs, pool.map(lambda run: _count(*run), runs)))
        missed = list(pool.map(lambda decide: _missed(start, cold, decide), (True, False)))
    out = {}
    for shape, figure in (("benchmark", "per_decision"), ("postfix", "per_decision_postfix_request")):
        out[figure] = round((totals[(start + requests, shape)] - totals[(start, shape)]) / requests)
    out["cold_lines_per_decision"] = round((missed[0] - missed[1]) / cold)
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    if sys.argv[1:2] == ["--harness"]:
        harness(int(sys.argv[2]), sys.argv[3], *(int(a) for a in sys.argv[4:6]))
    else:
        print(measure())
