"""greylist serve against the real neighbours: tcpserver and tcprules (ucspi-tcp), swaks.

Loopback only: clients connect from 127.0.0.x source addresses, which the
rules tell apart. .ci/run installs ucspi-tcp and swaks.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import STANDIN, base_env
from simulator.commands import command

needs_ucspi = pytest.mark.skipif(
    not (shutil.which("tcpserver") and shutil.which("tcprules")),
    reason="needs ucspi-tcp (apt-get install ucspi-tcp)")
needs_swaks = pytest.mark.skipif(not shutil.which("swaks"), reason="needs swaks (apt-get install swaks)")


def compile_rules(tmp: Path, rules: str) -> Path:
    cdb = tmp / "tcp.smtp.cdb"
    subprocess.run(["tcprules", str(cdb), str(tmp / "tcp.smtp.tmp")], input=rules.encode(), check=True)
    return cdb


def parse_lines(text: str, program: str = "greylist-serve:") -> list[dict[str, str]]:
    import shlex

    return [dict(p.split("=", 1) for p in shlex.split(line)[1:] if "=" in p)
            for line in text.splitlines() if line.startswith(program)]


class Serve:
    """``greylist serve`` (or the real tcpserver, for comparison) as a real process."""

    def __init__(self, tmp: Path, args: list[str], program: list[str], env: dict[str, str] | None = None,
                 real_tcpserver: bool = False, preexec=None, stderr=None) -> None:
        self.log_path = tmp / ("tcpserver.log" if real_tcpserver else "serve.log")
        head = ["tcpserver"] if real_tcpserver else command("greylist") + ["serve"]
        self.proc = subprocess.Popen(head + ["-1"] + args + ["127.0.0.1", "0"] + program,
                                     env=env or base_env(), stdout=subprocess.PIPE,
                                     stderr=self.log_path.open("wb") if stderr is None else stderr,
                                     preexec_fn=preexec)
        line = self.proc.stdout.readline()
        assert line.strip().isdigit(), (line, self.log_path.read_text())
        self.port = int(line)

    def connect(self, source: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.bind((source, 0))
        s.connect(("127.0.0.1", self.port))
        return s

    def talk(self, source: str = "127.0.0.1", script: bytes = b"QUIT\r\n") -> bytes:
        s = self.connect(source)
        s.sendall(script)
        out = b""
        try:
            while True:
                data = s.recv(4096)
                if not data:
                    break
                out += data
        except OSError:
            pass
        s.close()
        return out

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=20)


@pytest.fixture
def servers():
    started: list[Serve] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def dump_program(tmp: Path) -> list[str]:
    """PROGRAM that writes its environment (sorted) to a file named by its client, then greets."""
    script = tmp / "dump.sh"
    script.write_text('#!/bin/sh\nenv | sort > "$DUMP_DIR/$TCPREMOTEIP"\nprintf "220 dump\\r\\n"\n')
    return ["/bin/sh", str(script)]


@needs_ucspi
def test_program_sees_the_same_environment_as_under_real_tcpserver(tmp_path, servers):
    cdb = compile_rules(tmp_path, '127.0.0.1:allow,RELAYCLIENT="",GREYLIST_DELAY="0",FOO="x y"\n'
                                  '127.0.0.2:deny\n'
                                  '127.0.0.:allow,WHITELISTED=""\n'
                                  ':allow\n')
    results = {}
    for kind in ("tcpserver", "serve"):
        out = tmp_path / kind
        out.mkdir()
        env = base_env(DUMP_DIR=str(out), GREYLIST_STORE=f"file://{tmp_path}/store")
        s = Serve(tmp_path, ["-v", "-R", "-H", "-l", "mx.local", "-x", str(cdb)], dump_program(tmp_path),
                  env, real_tcpserver=kind == "tcpserver")
        servers.append(s)
        replies = {ip: s.talk(ip) for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.3")}
        time.sleep(0.3)
        s.stop()
        results[kind] = replies, {p.name: p.read_text() for p in out.iterdir()}, s.log()
    (t_replies, t_env, t_log), (s_replies, s_env, s_log) = results["tcpserver"], results["serve"]
    assert t_replies == s_replies == {"127.0.0.1": b"220 dump\r\n", "127.0.0.2": b"",
                                      "127.0.0.3": b"220 dump\r\n"}
    assert sorted(t_env) == sorted(s_env) == ["127.0.0.1", "127.0.0.3"]

    def comparable(text: str) -> list[str]:
        skip = ("TCPLOCALPORT=", "TCPREMOTEPORT=", "DUMP_DIR=", "_=")
        return [line for line in text.splitlines() if not line.startswith(skip)]

    for ip in t_env:
        assert comparable(t_env[ip]) == comparable(s_env[ip]), ip
    assert "FOO=x y" in s_env["127.0.0.1"] and "WHITELISTED=" in s_env["127.0.0.3"]
    # tcpserver's -v lines, in tcpserver's format
    for log in (t_log, s_log):
        assert "tcpserver: status: 0/40" in log
        assert "tcpserver: deny " in log and " from 127.0.0.2" in log
        assert ":127.0.0.1::" in log and "mx.local:127.0.0.1:" in log
    reasons = {f["ip"]: f["reason"] for f in parse_lines(s_log) if "ip" in f}
    assert reasons == {"127.0.0.1": "relayclient", "127.0.0.3": "whitelisted"}


@needs_ucspi
@needs_swaks
def test_swaks_greylisted_then_delivered_deny_and_relayclient(tmp_path, servers):
    cdb = compile_rules(tmp_path, '127.0.0.5:deny\n127.0.0.9:allow,RELAYCLIENT=""\n:allow\n')
    s = Serve(tmp_path, ["-v", "-R", "-H", "-x", str(cdb), "--delay", "1", "--store",
                         f"file://{tmp_path}/store", "--hostname", "mx.test"], STANDIN)
    servers.append(s)

    def swaks(source: str) -> subprocess.CompletedProcess:
        return subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(s.port), "--local-interface",
                               source, "--from", "alice@example.org", "--to", "bob@example.net",
                               "--helo", "client.example", "--timeout", "10"],
                              capture_output=True, text=True, timeout=30)

    first = swaks("127.0.0.1")
    assert "<** 450 Rcpt to <> - you are greylisted try again" in first.stdout
    assert "220 mx.test cqgreylist - reconnect later" in first.stdout
    time.sleep(1.2)
    second = swaks("127.0.0.1")
    assert second.returncode == 0 and "250 ok queued" in second.stdout
    denied = swaks("127.0.0.5")
    assert denied.returncode != 0 and "220" not in denied.stdout
    relay = swaks("127.0.0.9")
    assert relay.returncode == 0 and "250 ok queued" in relay.stdout
    s.stop()
    reasons = [(f["ip"], f["reason"]) for f in parse_lines(s.log()) if "ip" in f]
    assert reasons == [("127.0.0.1", "new"), ("127.0.0.1", "passed"), ("127.0.0.9", "relayclient")]


def test_two_thousand_idle_sessions_and_a_known_client_is_still_served(tmp_path, servers):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4200:
        pytest.skip(f"needs 4,200 descriptors (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4200), hard))
    try:
        s = Serve(tmp_path, ["-R", "-H", "--store", f"file://{tmp_path}/store", "--hostname", "mx.test"],
                  STANDIN)
        servers.append(s)
        idle = []
        for i in range(2000):
            c = s.connect(f"127.0.{1 + i // 250}.{1 + i % 250}")
            idle.append(c)
        for c in idle[::100]:  # each got its greeting and waits for us to time out
            assert c.recv(100).startswith(b"220 mx.test cqgreylist")
        from greylist.core.policy import Record
        from greylist.stores.filetree import FileStore

        now = time.time()
        FileStore(str(tmp_path / "store")).put("127.1.0.1", Record(now - 7200, now - 3600, 4))
        started = time.monotonic()
        reply = s.talk("127.1.0.1", b"QUIT\r\n")  # a known client: handed to PROGRAM at once
        assert reply.startswith(b"220 standin")
        assert time.monotonic() - started < 5
        for c in idle:
            c.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def established(port: int, count: int, within: float = 1.5) -> int:
    """How many of ``count`` connections at once the kernel completes, nobody accepting:
    a full listen queue drops a SYN, and that client waits a retransmit (a second)."""
    import select

    socks = []
    for i in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.bind((f"127.0.{1 + i // 250}.{1 + i % 250}", 0))
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    done, waiting, deadline = 0, socks[:], time.monotonic() + within
    while waiting and time.monotonic() < deadline:
        _, ready, _ = select.select([], waiting, [], max(0.0, deadline - time.monotonic()))
        for s in ready:
            waiting.remove(s)
            done += s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    for s in socks:
        s.close()
    return done


@pytest.mark.parametrize("flags, room", [([], None), (["-b", "20"], 21)])
def test_a_burst_of_connections_finds_room_in_the_listen_queue(tmp_path, servers, flags, room):
    """The listen queue is as long as the system allows unless -b says otherwise: with
    tcpserver's 20, a burst beyond what the server had accepted lost its SYNs, each client
    a second's retransmit (2,000 connections took 92 s to open, and 0.05 s now). The server
    is stopped here so that the kernel's queue alone holds the burst."""
    s = Serve(tmp_path, ["-R", "-H", *flags, "--store", f"file://{tmp_path}/store"], STANDIN)
    servers.append(s)
    if room is None:  # Linux queues one more than the backlog
        from greylist.adapters.acceptor import largest_backlog

        room = min(200, largest_backlog() + 1)
    os.kill(s.proc.pid, signal.SIGSTOP)
    try:
        assert established(s.port, 200) == room
    finally:
        os.kill(s.proc.pid, signal.SIGCONT)


def test_children_are_bounded_by_c_and_queued_passes_wait(tmp_path, servers):
    slow = tmp_path / "slow.sh"
    slow.write_text('#!/bin/sh\nprintf "220 slow\\r\\n"\nsleep 1\n')
    rules = compile_rules(tmp_path, ':allow,RELAYCLIENT=""\n')
    s = Serve(tmp_path, ["-R", "-H", "-c", "1", "-x", str(rules), "--store", f"file://{tmp_path}/store"],
              ["/bin/sh", str(slow)])
    servers.append(s)
    a, b = s.connect(), s.connect("127.0.0.2")
    started = time.monotonic()
    assert a.recv(100) == b"220 slow\r\n"
    assert b.recv(100) == b"220 slow\r\n"  # only once the first child ended
    assert time.monotonic() - started >= 0.8


def test_sigterm_lets_a_session_finish_and_sighup_rereads_the_whitelist(tmp_path, servers):
    listed = tmp_path / "clients"
    listed.write_text("")
    s = Serve(tmp_path, ["-R", "-H", "--whitelist", str(listed), "--store", f"file://{tmp_path}/store",
                         "--hostname", "mx.test", "--grace", "5"], STANDIN)
    servers.append(s)
    assert s.talk("127.0.0.7").startswith(b"220 mx.test cqgreylist")
    listed.write_text("127.0.0.7\n")
    s.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20  # the reload is seen at once, on a loaded machine a little later
    while not s.talk("127.0.0.7").startswith(b"220 standin") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert s.talk("127.0.0.7").startswith(b"220 standin")
    c = s.connect("127.0.0.8")
    assert c.recv(100).startswith(b"220 mx.test cqgreylist")
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert s.proc.poll() is None  # a session is still open: it may finish
    c.sendall(b"RCPT TO:<x@y>\r\nQUIT\r\n")
    assert c.recv(200).startswith(b"450")
    c.close()
    assert s.proc.wait(timeout=5) == 0
    with pytest.raises(OSError):
        s.connect()


def test_a_sighup_while_it_starts_reloads_it_once_it_can_and_never_kills_it(tmp_path):
    """systemd's ExecReload (kill -HUP) right after its start: SIGHUP's default action ended
    a greylist serve still starting, and SMTP was refused until its restart. It is held
    from the server's first line, and reloads it once its handler is in place."""
    from conftest import paused_with_reloads_held

    for attempt in range(5):
        log = tmp_path / f"serve{attempt}.log"
        proc = subprocess.Popen([*command("greylist"), "serve", "-1", "-R", "-H", "-l", "mx.test", "--store",
                                 f"file://{tmp_path}/store", "127.0.0.1", "0", *STANDIN], env=base_env(),
                                stdout=subprocess.PIPE, stderr=log.open("wb"))
        try:
            held = paused_with_reloads_held(proc.pid)
            if held:
                proc.send_signal(signal.SIGHUP)
                proc.send_signal(signal.SIGCONT)
                port = proc.stdout.readline()
                assert port.strip().isdigit(), f"it did not survive: {proc.wait(10)}"
                with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as c:
                    assert c.recv(100).startswith(b"220 mx.test cqgreylist")
        finally:
            proc.terminate()
            proc.wait(10)
        if held:
            assert "reloaded=" in log.read_text(), log.read_text()
            return
    raise AssertionError("SIGHUP was never held while it started")


def test_missing_rules_drop_connections_unless_x_capital(tmp_path, servers):
    for extra, expect in (([], b""), (["-X"], b"220 mx.test cqgreylist")):
        run = tmp_path / ("X" if extra else "plain")
        run.mkdir()
        s = Serve(run, ["-R", "-H", "-x", str(tmp_path / "none.cdb"), *extra, "--store",
                             f"file://{tmp_path}/store", "--hostname", "mx.test"], STANDIN)
        servers.append(s)
        assert s.talk().startswith(expect) if expect else s.talk() == expect
        s.stop()
    assert "unable to read" in servers[0].log()


def test_bad_command_lines_are_refused_clearly(tmp_path):
    for args, message in ((["-Z", "0", "25", "true"], "option -Z not recognized"),
                          (["-c", "many", "0", "25", "true"], "-c needs a positive whole number"),
                          (["0", "25"], "need host, port and program"),
                          (["--delay", "soon", "0", "25", "true"], "not a duration"),
                          (["0", "nosuchport", "true"], "unknown port name")):
        result = subprocess.run(command("greylist") + ["serve", *args], capture_output=True, text=True,
                                env=base_env(), timeout=20)
        assert result.returncode == 100 and message in result.stderr, (args, result.stderr)


def test_a_program_that_cannot_run_gets_a_421_and_the_server_lives_on(tmp_path, servers):
    rules = compile_rules(tmp_path, ':allow,RELAYCLIENT=""\n')
    s = Serve(tmp_path, ["-R", "-H", "-x", str(rules), "--store", f"file://{tmp_path}/store",
                         "--hostname", "mx.test"], ["/nonexistent/qmail-smtpd"])
    servers.append(s)
    assert s.talk().startswith(b"421 mx.test")
    assert s.talk().startswith(b"421 mx.test")
    assert s.proc.poll() is None
    assert "cannot run /nonexistent/qmail-smtpd" in s.log()


def test_a_failing_store_follows_on_error(tmp_path, servers):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for on_error, expect in (("pass", b"220 standin"), ("tempfail", b"220 mx.test cqgreylist")):
        run = tmp_path / on_error
        run.mkdir()
        s = Serve(run, ["-R", "-H", "--store", f"file://{blocker}/store", "--on-error", on_error,
                             "--hostname", "mx.test"], STANDIN)
        servers.append(s)
        assert s.talk().startswith(expect)
        s.stop()
        assert "reason=store-error" in s.log()
    # a store that fails as it opens is said at start, and mail still flows
    run = tmp_path / "sqlite"
    run.mkdir()
    s = Serve(run, ["-R", "-H", "--store", f"sqlite://{blocker}/greylist.sqlite", "--hostname", "mx.test"], STANDIN)
    servers.append(s)
    assert s.talk().startswith(b"220 standin")
    s.stop()
    assert "error=\"store unusable at start: cannot open" in s.log() and "on_error=pass" in s.log(), s.log()


def test_a_bug_in_a_timed_flush_is_logged_as_ours_and_the_server_goes_on(tmp_path):
    """The store's timed flush raising something that is not a store failure: a bug of
    ours, on our log in our format (not asyncio's traceback), and the server serves on."""
    script = f"""
import sys
from greylist.stores import sqlite
real_flush, calls = sqlite.SqliteStore.flush, []
def flush(self, wait=True):
    calls.append(1)
    if len(calls) == 1:
        raise KeyError("a bug of ours")
    return real_flush(self, wait)
sqlite.SqliteStore.flush = flush
from greylist.adapters import serve
sys.exit(serve.main(["-1", "-R", "-H", "--store", "sqlite://{tmp_path}/g.db", "--hostname", "mx.test",
                     "127.0.0.1", "0"] + {STANDIN!r}))
"""
    python = os.path.join(os.path.dirname(command("greylist")[0]), "python")
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([python, "-c", script], env=base_env(), stdout=subprocess.PIPE, stderr=log)
    try:
        port = int(proc.stdout.readline())

        def talk(source: str) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
                s.sendall(b"QUIT\r\n")
                return s.recv(1000)

        assert talk("127.0.0.2").startswith(b"220 mx.test cqgreylist")  # held: the timer flushes it
        deadline = time.monotonic() + 10
        while "a bug of ours" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert talk("127.0.0.3").startswith(b"220 mx.test cqgreylist")
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)
    lines = [line for line in parse_lines(log_path.read_text()) if line.get("verdict") == "error"]
    assert [line["error"] for line in lines] == [
        "internal error KeyError in Greylister._timed_flush: 'a bug of ours'"]
    assert "Traceback" not in log_path.read_text()


def test_serve_runs_as_the_user_it_is_told(tmp_path, servers):
    if os.getuid() != 0:
        pytest.skip("dropping privileges needs root")
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/tmp"))  # nobody can reach it, unlike pytest's 0700 tree
    os.chmod(base, 0o755)
    store = base / "store"
    store.mkdir()
    os.chown(store, 65534, 65534)
    s = Serve(tmp_path, ["-R", "-H", "-u", "65534", "-g", "65534", "--store", f"file://{store}",
                         "--hostname", "mx.test"], STANDIN)
    servers.append(s)
    assert s.talk().startswith(b"220 mx.test cqgreylist")
    entry = store / "127" / "127.0.0.1"
    assert entry.exists() and entry.stat().st_uid == 65534
    status = Path(f"/proc/{s.proc.pid}/status").read_text()
    assert "\nUid:\t65534\t65534\t65534\t65534" in status
    shutil.rmtree(base)


def test_a_log_reader_that_stops_reading_never_stops_the_service(tmp_path, servers):
    """tcpserver would block with its log pipe full (multilog stuck on a full disk), and
    every client with it; greylist serve goes on and keeps the lines for the reader."""
    read, write = os.pipe()  # a log pipe nobody reads for now
    s = Serve(tmp_path, ["-v", "-H", "--store", f"file://{tmp_path}/store", "--hostname", "mx.test"], STANDIN,
              stderr=write)
    servers.append(s)
    os.close(write)
    try:
        for i in range(800):
            reply = s.talk(f"127.0.{1 + i // 250}.{1 + i % 250}", b"QUIT\r\n")
            assert reply.startswith(b"220 mx.test"), (i, reply)
        os.set_blocking(read, False)
        logged = b""
        deadline = time.monotonic() + 20
        while logged.count(b"greylist-serve: pid=") < 800 and time.monotonic() < deadline:
            try:
                logged += os.read(read, 1 << 16)
            except BlockingIOError:
                time.sleep(0.05)
        assert logged.count(b"greylist-serve: pid=") >= 800  # and nothing lost: 1 MiB is kept
    finally:
        s.stop()
        os.close(read)
