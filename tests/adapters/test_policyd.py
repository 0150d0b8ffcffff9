"""greylist policyd as Postfix uses it: a real server process, real sockets."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from benchmarks.redis_server import free_port
from conftest import base_env
from simulator.commands import command


def request(**attrs: str) -> bytes:
    attrs = {"request": "smtpd_access_policy", "protocol_state": "RCPT", **attrs}
    return "".join(f"{k}={v}\n" for k, v in attrs.items()).encode() + b"\n"


class Client:
    def __init__(self, address) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(address)
        self.buffer = b""

    def ask(self, raw: bytes) -> str:
        self.sock.sendall(raw)
        while b"\n\n" not in self.buffer:
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError(f"closed; got {self.buffer!r}")
            self.buffer += data
        reply, self.buffer = self.buffer.split(b"\n\n", 1)
        return reply.decode()

    def close(self) -> None:
        self.sock.close()


class Lines:
    """A server's stderr read as it comes (on a thread): a test waits for the line it needs
    instead of sleeping a guess, which a loaded CI machine outlasts."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.ended = False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def wait_for(self, wanted, seconds: float = 20) -> bool:
        """A line for which ``wanted`` is true came within ``seconds``."""
        with self.changed:
            self.changed.wait_for(lambda: self.ended or any(map(wanted, self.lines)), seconds)
            return any(map(wanted, self.lines))

    def all(self, seconds: float = 10) -> list[str]:
        """Every line, once the server has ended."""
        self.thread.join(seconds)
        return list(self.lines)


def stored_clients(path) -> set[str]:
    """The client part of every key in the server's SQLite file, as another process sees it."""
    import sqlite3

    with sqlite3.connect(path) as db:
        return {row[0].split("|")[0] for row in db.execute("SELECT key FROM greylist")}


def stored_soon(path, client: str, seconds: float = 5.0) -> bool:
    """The server has committed a decision about ``client`` (within its window)."""
    deadline = time.monotonic() + seconds
    while client not in stored_clients(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return client in stored_clients(path)


@pytest.fixture
def policyd(tmp_path):
    servers = []

    def start(*args: str, listen: str | None = None, **env: str):
        listen = listen or f"127.0.0.1:{free_port()}"
        cmd = [*command("greylist"), "policyd", "--listen", listen,
               "--store", f"file://{tmp_path}/store", *args]
        proc = subprocess.Popen(cmd, env=base_env(**env), stderr=subprocess.PIPE, text=True)
        servers.append(proc)
        said = [proc.stderr.readline()]  # the "started" log line, a store's error, "listening on"
        while said[-1] and "listening on" not in said[-1] and len(said) < 5:
            said.append(proc.stderr.readline())
        assert "listening on" in said[-1], said
        if listen.startswith("unix:"):
            return proc, listen[5:]
        host, port = listen.rsplit(":", 1)
        return proc, (host, int(port))

    yield start
    for proc in servers:
        proc.terminate()
        proc.wait(timeout=10)


def test_greylists_the_triplet_then_passes_with_a_header(policyd):
    _, address = policyd("--key", "triplet", "--delay", "1")
    c = Client(address)
    ask = request(client_address="192.0.2.1", client_name="mail.example.org", sender="a@example.org",
                  recipient="b@example.net")
    assert c.ask(ask) == "action=DEFER_IF_PERMIT you are greylisted try again"
    assert c.ask(ask) == "action=DEFER_IF_PERMIT you are greylisted try again"  # too soon
    time.sleep(1.1)
    reply = c.ask(ask)
    assert reply.startswith("action=PREPEND X-Greylist: delayed 1 seconds by greylist")
    assert c.ask(ask) == "action=DUNNO"  # known now
    c.close()


def test_the_pass_that_auto_whitelists_a_client_says_so_on_its_line(policyd):
    proc, address = policyd("--key", "triplet", "--delay", "1", "--auto-whitelist", "1")
    lines = Lines(proc.stderr)
    c = Client(address)
    ask = request(client_address="192.0.2.1", client_name="mail.example.org", sender="a@example.org",
                  recipient="b@example.net")
    assert c.ask(ask).startswith("action=DEFER_IF_PERMIT")
    time.sleep(1.1)
    assert c.ask(ask).startswith("action=PREPEND X-Greylist")
    assert c.ask(ask.replace(b"a@example.org", b"other@example.org")) == "action=DUNNO"  # the client's AWL
    c.close()
    assert lines.wait_for(lambda line: "reason=auto-whitelisted" in line)
    reasons = [(line.split(" reason=")[1].split()[0], "whitelisted_after=1" in line)
               for line in lines.lines if " reason=" in line]
    assert reasons == [("new", False), ("passed", True), ("auto-whitelisted", False)], lines.lines


def test_decided_wherever_postfix_asks_and_a_header_only_where_postfix_adds_one(policyd):
    """A site that asks in smtpd_data_restrictions (or with smtpd_delay_reject=no) is
    greylisted there, as postgrey greylists it: it used to get DUNNO, all its mail passing
    ungreylisted. At DATA Postfix names the recipient only when there is one; at
    END-OF-MESSAGE it ignores a PREPEND (and warns), so a pass is DUNNO there."""
    proc, address = policyd("--key", "triplet", "--delay", "1")
    c = Client(address)
    envelope = dict(client_address="192.0.2.1", sender="a@example.org", recipient="b@example.net")
    assert c.ask(request(protocol_state="DATA", **envelope)).startswith("action=DEFER_IF_PERMIT")
    many = dict(client_address="192.0.2.2", sender="a@example.org")  # several recipients: none named
    assert c.ask(request(protocol_state="DATA", **many)).startswith("action=DEFER_IF_PERMIT")
    assert c.ask(request(protocol_state="END-OF-MESSAGE", client_address="192.0.2.3",
                         sender="c@example.org")).startswith("action=DEFER_IF_PERMIT")
    time.sleep(1.1)
    assert c.ask(request(protocol_state="DATA", **envelope)).startswith("action=PREPEND X-Greylist: delayed ")
    assert c.ask(request(protocol_state="DATA", **many)).startswith("action=PREPEND X-Greylist: delayed ")
    assert c.ask(request(protocol_state="END-OF-MESSAGE", client_address="192.0.2.3",
                         sender="c@example.org")) == "action=DUNNO"
    c.close()
    proc.terminate()
    log = proc.communicate(timeout=10)[1]
    lines = [line for line in log.splitlines() if "192.0.2.3" in line]
    assert "state=END-OF-MESSAGE" in lines[-1] and 'header="none at this stage"' in lines[-1], lines
    assert "reason=passed" in lines[-1]


def test_unix_socket_and_enhanced_message(policyd, tmp_path):
    _, path = policyd("--enhanced-codes", "--message", "Greylisted, see https://example.org/grey",
                      listen=f"unix:{tmp_path}/policy.sock")
    c = Client(path)
    assert c.ask(request(client_address="2001:db8::5", sender="", recipient="x@example.net")) == \
        "action=DEFER_IF_PERMIT Greylisted, see https://example.org/grey in 60 s"


def start_failing(listen: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([*command("greylist"), "policyd", "--listen", listen, "--store", f"file://{tmp_path}/store"],
                          env=base_env(), capture_output=True, text=True, timeout=30)


def test_the_unix_socket_is_born_with_its_mode_and_only_its_own_name_is_removed_at_exit(policyd, tmp_path):
    path = tmp_path / "policy.sock"
    proc, _ = policyd(listen=f"unix:{path}")
    assert oct(path.stat().st_mode & 0o7777) == oct(0o660)
    proc.terminate()
    proc.wait(timeout=10)
    assert not path.exists()  # its own socket: removed

    from greylist.adapters.policyd import make_listener

    for mode in (0o600, 0o666):  # postgrey's --socketmode, whatever the process's umask
        old = os.umask(0o077 if mode == 0o666 else 0)
        try:
            sock, _ = make_listener(f"unix:{tmp_path}/m{mode:o}.sock", socket_mode=mode)
        finally:
            os.umask(old)
        sock.close()
        assert (tmp_path / f"m{mode:o}.sock").stat().st_mode & 0o777 == mode

    proc, _ = policyd(listen=f"unix:{path}")
    path.rename(tmp_path / "moved.sock")
    successor = socket.socket(socket.AF_UNIX)
    successor.bind(str(path))  # a server started after it, on the same name
    proc.terminate()
    proc.wait(timeout=10)
    assert path.exists()  # not ours: left for the one that bound it
    successor.close()


def test_a_stale_socket_is_replaced_but_a_file_a_link_or_a_live_server_are_never_touched(policyd, tmp_path):
    path = tmp_path / "policy.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a crashed run's socket: nobody listens
    proc, address = policyd(listen=f"unix:{path}")
    assert Client(address).ask(request(client_address="192.0.2.7")).startswith("action=DEFER_IF_PERMIT")

    second = start_failing(f"unix:{path}", tmp_path)  # the live server keeps its socket
    assert second.returncode == 2
    assert f"another server is listening on {path}" in second.stderr
    assert Client(address).ask(request(client_address="192.0.2.8")).startswith("action=DEFER_IF_PERMIT")

    precious = tmp_path / "main.cf"
    precious.write_text("keep me\n")
    link = tmp_path / "link.sock"
    link.symlink_to(precious)
    for name, what in ((precious, "a file"), (link, "a link to a file")):
        result = start_failing(f"unix:{name}", tmp_path)
        assert result.returncode == 2, what
        assert f"{name} exists and is not a socket; it is left as it is" in result.stderr, what
    assert precious.read_text() == "keep me\n" and link.is_symlink()


def free_port_everywhere() -> int:
    """A port free on every address (free_port's is free on 127.0.0.1 only: a client's
    TIME_WAIT on 127.0.1.x, the benchmark's say, still holds it for a wildcard bind)."""
    family, host = (socket.AF_INET6, "::") if socket.has_ipv6 else (socket.AF_INET, "0.0.0.0")
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind((host, 0))
        return s.getsockname()[1]


def test_a_star_listens_on_every_address_ipv6_and_ipv4_as_postgreys_inet_does(policyd, tmp_path):
    port = free_port_everywhere()
    policyd(listen=f"*:{port}")
    addresses = [("127.0.0.1", port)]
    if socket.has_ipv6 and os.path.exists("/proc/net/if_inet6"):
        addresses.append(("::1", port))
    for n, address in enumerate(addresses):
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(request(client_address=f"192.0.2.{n + 1}"))
            assert s.recv(4096).startswith(b"action=DEFER_IF_PERMIT"), address


def test_garbage_requests_are_answered_and_the_server_lives_on(policyd):
    proc, address = policyd()
    c = Client(address)
    assert c.ask(b"hello\nworld\n\n") == "action=DUNNO"
    assert c.ask(b"request=something_else\n\n") == "action=DUNNO"
    assert c.ask(request(client_address="999.1.1.1")) == "action=DUNNO"
    assert c.ask(b"\xff\xfe=\x00\n\n") == "action=DUNNO"
    c.close()
    big = Client(address)
    assert big.ask(b"request=smtpd_access_policy\nx=" + b"y" * 5000 + b"\n\n") == "action=DUNNO"
    many = Client(address)
    assert many.ask(b"".join(b"a%d=b\n" % i for i in range(500)) + b"\n") == "action=DUNNO"
    half = Client(address)
    half.sock.sendall(b"request=smtpd_access_policy\nclient_add")
    half.close()
    ok = Client(address)
    assert ok.ask(request(client_address="192.0.2.77", sender="a@b", recipient="c@d")).startswith("action=")
    assert proc.poll() is None


def test_many_concurrent_clients(policyd):
    _, address = policyd("--delay", "0")
    replies: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        c = Client(address)
        for i in range(10):
            r = c.ask(request(client_address=f"198.51.{n}.{i}", sender="s@example.org",
                              recipient="r@example.net"))
            with lock:
                replies.append(r)
        c.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(replies) == 300
    assert all(r.startswith("action=DEFER_IF_PERMIT") for r in replies)


def test_a_store_it_cannot_open_is_said_at_start_and_mail_still_flows(tmp_path):
    port = free_port()
    proc = subprocess.Popen([*command("greylist"), "policyd", "--listen", f"127.0.0.1:{port}",
                             "--store", f"sqlite://{tmp_path}/no/such/dir/greylist.sqlite"],
                            env=base_env(), stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stderr.readline()]
        while "listening on" not in lines[-1] and lines[-1] and len(lines) < 10:
            lines.append(proc.stderr.readline())
        assert "started=" in lines[0] and "listening on" in lines[-1], lines
        assert "store unusable at start: cannot open" in lines[1] and "on_error=pass" in lines[1], lines
        assert Client(("127.0.0.1", port)).ask(request(client_address="192.0.2.1")) == "action=DUNNO"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_store_down_fails_open_and_says_so(policyd, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    proc, address = policyd("--store", f"file://{blocker}")
    c = Client(address)
    assert c.ask(request(client_address="192.0.2.1", sender="a@b", recipient="c@d")) == "action=DUNNO"
    c.close()
    proc.terminate()
    assert "store-error" in proc.stderr.read()


def test_a_hung_store_is_left_alone_for_a_while_and_every_client_answered_at_once(policyd):
    """A Redis that accepts connections and never answers (a stopped server, a partition
    from another MX): the first decision waits its timeout, and the next ones follow
    on_error at once, the store left alone for a second (then longer), so one event loop
    still answers every client. Each decision used to try it: 100 ms each, for everyone."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(100)  # the kernel completes the connections; nobody ever reads them
    try:
        proc, address = policyd("--store", f"redis://127.0.0.1:{hole.getsockname()[1]}", "--key", "triplet")
        c = Client(address)
        for n in range(30):
            assert c.ask(request(client_address=f"192.0.2.{n}", sender="a@b", recipient="c@d")) == "action=DUNNO"
        c.close()
        proc.terminate()
        lines = [line for line in proc.stderr.read().splitlines() if "reason=store-error" in line]
    finally:
        hole.close()
    assert len(lines) == 30
    tried = [line for line in lines if "store_retry_in=" not in line]
    assert 1 <= len(tried) <= 3, tried  # the first, and a retry each second the test took
    assert all("timed out" in line for line in lines)


def test_a_store_that_reads_but_cannot_write_fails_open_and_says_so(policyd, tmp_path):
    """A full disk (here the file-size limit, RLIMIT_FSIZE, on the running server): reads
    work, the held decisions cannot be written. That is a store failure like any other:
    the decisions of its rest follow on_error (pass) and log the failure. It was silent,
    and every retry was greylisted as new for as long as the disk stayed full."""
    import resource

    proc, address = policyd("--store", f"sqlite://{tmp_path}/g.db", "--key", "triplet")
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (128 * 1024, 128 * 1024))
    c = Client(address)
    answers = [c.ask(request(client_address=f"10.0.{n >> 8}.{n & 255}", sender="a@example.org",
                             recipient="b@example.net")) for n in range(5000)]
    c.close()
    proc.terminate()
    lines = proc.stderr.read().splitlines()
    failed = [line for line in lines if "reason=store-error" in line]
    assert failed and all("on_error=pass" in line and "g.db: " in line for line in failed), failed[:3]
    # how many decisions the failure cost, said in the line that tells of it: the write's own
    # at a round's end, or the decision's in which it failed (the first was seldom, CI)
    told = [line for line in lines if "error=" in line][0]
    assert "held rows not written: " in told, [line for line in lines if "error=" in line][:3]
    assert answers.count("action=DUNNO") == len(failed)  # each new triplet let through, and logged
    # each greylisted decision is in the file, or said to be lost, once (a decision that
    # failed as its round began writing may have a held row too)
    proc.wait(timeout=10)
    greylisted = {f"10.0.{n >> 8}.{n & 255}" for n, answer in enumerate(answers) if answer.startswith("action=DEFER")}
    lost = len(greylisted - stored_clients(tmp_path / "g.db"))
    said = sum(int(count) for count in re.findall(r"(\d+) held rows not written", "\n".join(lines)))
    tried = [line for line in failed if "store_retry_in=" not in line]  # not left alone: it tried the store
    assert lost <= said <= lost + len(tried), (lost, said, len(tried))


def test_held_decisions_it_cannot_write_are_logged_when_it_fails_not_at_a_next_decision(policyd, tmp_path):
    """The window's held decisions fail to be written (a full disk: RLIMIT_FSIZE) and no
    request comes after them (a quiet server, or one about to stop): the failure is logged
    when it happens. It waited for the next decision's log line, and a stopping server
    logged it nowhere. Killed, so that only what it said by itself is read."""
    import resource

    proc, address = policyd("--store", f"sqlite://{tmp_path}/g.db", "--key", "triplet")
    c = Client(address)
    c.ask(request(client_address="10.9.9.9", sender="a@example.org", recipient="b@example.net"))
    time.sleep(0.6)  # written: the table and one row
    largest = max(f.stat().st_size for f in tmp_path.glob("g.db*"))
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (largest + 1024, largest + 1024))
    log = Lines(proc.stderr)
    for n in range(300):
        c.ask(request(client_address=f"10.0.{n >> 8}.{n & 255}", sender="a@example.org",
                      recipient="b@example.net"))
    assert log.wait_for(lambda line: "error=" in line)  # the window's end, the failed write, the log's window
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    lines = log.all()
    decided = [line for line in lines if "reason=" in line]
    assert len(decided) == 301 and not any("error=" in line for line in decided)
    said = [line for line in lines if "error=" in line]
    assert len(said) == 1 and "reason=" not in said[0], lines[-3:]
    assert "on_error=pass" in said[0] and "held rows not written: " in said[0], said
    c.close()


def test_shadow_mode_answers_dunno_and_logs_the_would_be_verdict(policyd):
    proc, address = policyd("--delay", "60", "--mode", "shadow")
    client = Client(address)
    ask = request(client_address="192.0.2.7", sender="a@example.org", recipient="b@example.net")
    assert client.ask(ask) == "action=DUNNO"
    assert client.ask(ask) == "action=DUNNO"
    client.close()
    lines = [proc.stderr.readline() for _ in range(2)]
    assert "verdict=pass shadow=tempfail reason=new" in lines[0]
    assert "verdict=pass shadow=tempfail reason=too-soon" in lines[1]


def test_more_connections_than_descriptors_and_a_new_client_is_still_answered(tmp_path):
    """2,000 idle connections against a server limited to 1,024 descriptors: it closes the
    longest-idle ones to make room, says so once, never spins, and answers a new client."""
    import resource

    from benchmarks.redis_server import free_port

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2300:
        pytest.skip(f"the test itself needs 2,300 descriptors (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2300), hard))
    port = free_port()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    proc = subprocess.Popen([*command("greylist"), "policyd", "--listen", f"127.0.0.1:{port}",
                             "--store", f"file://{tmp_path}/store"], env=base_env(),
                            stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    idle = []
    try:
        proc.stderr.readline()
        proc.stderr.readline()
        for _ in range(2000):
            s = socket.socket()
            s.settimeout(10)
            s.connect(("127.0.0.1", port))
            idle.append(s)
        time.sleep(0.5)
        ticks = os.sysconf("SC_CLK_TCK")

        def cpu() -> float:
            fields = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks

        before = cpu()
        time.sleep(1.0)
        assert cpu() - before < 0.5  # no busy loop
        started = time.monotonic()
        c = Client(("127.0.0.1", port))
        reply = c.ask(request(client_address="192.0.2.200", sender="a@b", recipient="c@d"))
        assert reply == "action=DEFER_IF_PERMIT you are greylisted try again"
        assert time.monotonic() - started < 5
        c.close()
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        log = proc.stderr.read()
        proc.wait(timeout=10)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "refused=\"connection limit\"" in log and "limit=960" in log


def test_a_long_attribute_is_cut_and_the_request_still_decided(policyd):
    """A HELO name of 2,040 characters (Postfix passes it on) must not bypass greylisting."""
    _, address = policyd("--delay", "60")
    c = Client(address)
    reply = c.ask(request(client_address="192.0.2.31", helo_name="h" * 5000, sender="a@example.org",
                          recipient="b@example.net"))
    assert reply.startswith("action=DEFER_IF_PERMIT")
    assert c.ask(request(sender="a@b", recipient="c@d")) == "action=DUNNO"  # no client address
    c.close()


def test_only_postfixs_verified_client_name_is_matched_never_the_ptr_claim(policyd, tmp_path):
    listed = tmp_path / "clients"
    listed.write_text("google.com\n")
    _, address = policyd("--whitelist", str(listed))
    c = Client(address)
    claim = c.ask(request(client_address="203.0.113.9", client_name="unknown",
                          reverse_client_name="mx.google.com", sender="a@b", recipient="c@d"))
    assert claim.startswith("action=DEFER_IF_PERMIT")  # the PTR says google: its own claim
    verified = c.ask(request(client_address="203.0.113.10", client_name="mail-wr1-f41.google.com",
                             sender="a@b", recipient="c@d"))
    assert verified == "action=DUNNO"
    c.close()
    # a server reads its whitelist once and writes nothing beside it (it wrote clients.cache:
    # /etc/postgrey/whitelist_clients.cache, left in a package's directory); the wrapper,
    # which starts once per connection, still keeps its compiled cache
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("clients")) == ["clients"]
    from greylist.whitelist import load_clients

    assert load_clients(str(listed)).has_names and (tmp_path / "clients.cache").is_file()


def test_sqlite_decisions_are_committed_within_the_window_and_at_sigterm(policyd, tmp_path):
    """The server commits decisions together: another reader sees them within the window
    without further requests, and SIGTERM commits the rest."""
    path = tmp_path / "g.db"
    proc, address = policyd("--store", f"sqlite://{path}", "--key", "ip")
    c = Client(address)
    assert c.ask(request(client_address="192.0.2.7")).startswith("action=DEFER_IF_PERMIT")
    assert stored_soon(path, "192.0.2.7")
    assert c.ask(request(client_address="192.0.2.8")).startswith("action=DEFER_IF_PERMIT")
    proc.terminate()
    proc.wait(timeout=10)
    assert stored_clients(path) == {"192.0.2.7", "192.0.2.8"}


def test_a_new_database_is_checkpointed_and_its_log_stays_small(policyd, tmp_path):
    """A server that created its database and had no request in its first second never
    copied its log into it: the checkpoint thread had met the file empty and taken it for
    a rollback-mode database, and the -wal file grew for as long as the server ran (780 MB
    in 7 minutes at 2,700 decisions a second). The database file alone (without its log)
    must hold the decisions."""
    import shutil
    import sqlite3

    path = tmp_path / "g.db"
    proc, address = policyd("--store", f"sqlite://{path}", "--key", "ip")
    time.sleep(1.5)  # the checkpoint thread has looked at the file before any table was made
    c = Client(address)
    for n in range(200):
        assert c.ask(request(client_address=f"192.0.2.{n}")).startswith("action=DEFER_IF_PERMIT")
    alone = tmp_path / "alone"
    alone.mkdir()

    def in_file_alone() -> int:
        shutil.copy(path, alone / "g.db")
        try:
            with sqlite3.connect(alone / "g.db") as db:
                return db.execute("SELECT COUNT(*) FROM greylist").fetchone()[0]
        except sqlite3.DatabaseError:  # no table copied yet, or copied halfway through a write
            return 0

    deadline = time.monotonic() + 20
    while in_file_alone() < 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert in_file_alone() == 200
    assert (tmp_path / "g.db-wal").stat().st_size < 1 << 20


def test_a_write_lock_held_by_another_process_stalls_nobody_and_loses_no_retry(policyd, tmp_path):
    """An admin's sqlite3 shell (or any other writer) keeps the write lock: the server
    answers on, its decisions held and read back, so a client that retried after the
    delay passes; they are written once the lock is free, and the log says both. It
    used to wait the busy timeout (here an hour) with every client, then drop the
    window's decisions: every retry was greylisted as new for as long as the lock stayed."""
    import sqlite3

    path = tmp_path / "g.db"
    proc, address = policyd("--store", f"sqlite://{path}?timeout=60", "--key", "triplet", "--delay", "1")
    c = Client(address)
    envelope = dict(sender="a@example.org", recipient="b@example.net")
    assert c.ask(request(client_address="192.0.2.1", **envelope)).startswith("action=DEFER_IF_PERMIT")
    assert stored_soon(path, "192.0.2.1")
    blocker = sqlite3.connect(path, timeout=5, isolation_level=None)  # past a checkpoint's moment
    blocker.execute("BEGIN IMMEDIATE")
    try:
        assert c.ask(request(client_address="192.0.2.2", **envelope)).startswith("action=DEFER_IF_PERMIT")
        time.sleep(1.2)  # the delay, and several windows whose flush found the lock taken
        assert c.ask(request(client_address="192.0.2.2", **envelope)).startswith("action=PREPEND X-Greylist")
        assert "192.0.2.2" not in stored_clients(path)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert stored_soon(path, "192.0.2.2")
    assert c.ask(request(client_address="192.0.2.2", **envelope)) == "action=DUNNO"
    proc.terminate()
    log = proc.stderr.read()
    assert "holds the database's write lock" in log and "write lock was free again" in log, log


def _one_stored_then_locked(address, path):
    """192.0.2.1 decided and in the file; then another process takes the write lock (an
    admin's sqlite3 shell in a transaction), and 192.0.2.2 is decided, held."""
    import sqlite3

    c = Client(address)
    assert c.ask(request(client_address="192.0.2.1")).startswith("action=DEFER_IF_PERMIT")
    assert stored_soon(path, "192.0.2.1")
    blocker = sqlite3.connect(path, timeout=5, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    assert c.ask(request(client_address="192.0.2.2")).startswith("action=DEFER_IF_PERMIT")
    return c, blocker


def test_decisions_a_stopping_server_cannot_write_are_logged(policyd, tmp_path):
    """SIGTERM while another process keeps the write lock: the server waits its busy
    timeout for it, then says how many decisions were not written (those clients are
    greylisted once more), where it used to lose them without a word."""
    path = tmp_path / "g.db"
    proc, address = policyd("--store", f"sqlite://{path}?timeout=0.3", "--key", "ip")
    c, blocker = _one_stored_then_locked(address, path)
    try:
        proc.send_signal(signal.SIGTERM)
        log = proc.stderr.read()  # the lock still held until the server has ended
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    proc.wait(timeout=10)
    assert "store_warning=\"1 held rows not written: " in log and "database is locked" in log, log
    assert stored_clients(path) == {"192.0.2.1"}


def test_a_reload_while_another_process_holds_the_write_lock_stalls_nobody_and_loses_nothing(policyd, tmp_path):
    """SIGHUP reopens the store; its held decisions, which another process's write lock
    keeps out of the file, go to the store opened again and are written once the lock is
    free. The reload waited the busy timeout (here a minute) with every client, then lost
    them: a client that retried after the delay was greylisted once more."""
    path = tmp_path / "g.db"
    proc, address = policyd("--store", f"sqlite://{path}?timeout=60", "--key", "ip", "--delay", "1")
    log = Lines(proc.stderr)
    c, blocker = _one_stored_then_locked(address, path)  # the client answers within 10 s, or fails
    try:
        proc.send_signal(signal.SIGHUP)
        assert log.wait_for(lambda line: "reloaded=" in line)
        assert c.ask(request(client_address="192.0.2.3")).startswith("action=DEFER_IF_PERMIT")
        time.sleep(1.1)  # the delay
        assert c.ask(request(client_address="192.0.2.2")).startswith("action=PREPEND X-Greylist")
        assert stored_clients(path) == {"192.0.2.1"}
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    deadline = time.monotonic() + 20
    while stored_clients(path) != {"192.0.2.1", "192.0.2.2", "192.0.2.3"} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stored_clients(path) == {"192.0.2.1", "192.0.2.2", "192.0.2.3"}
    proc.terminate()
    said = "\n".join(log.all())
    assert "1 held rows kept for the reopened store" in said and "not written" not in said, said


def test_the_recipients_domain_in_a_reply_text_is_printable_ascii():
    """postgrey's %r puts the client's recipient domain into our reply: a control
    character there must not reach Postfix's reply line."""
    from greylist.adapters.policyd import Replies
    from greylist.config import load
    from greylist.core.policy import TEMPFAIL, Verdict

    replies = Replies(text="Greylisted, see http://example.org/%r.html")
    config = load({}, {})
    verdict = Verdict(TEMPFAIL, "new", 0.0, 300.0)
    assert replies.tempfail(config, verdict, {"recipient": "a@example.net"}) == \
        "action=DEFER_IF_PERMIT Greylisted, see http://example.org/example.net.html"
    line = replies.tempfail(config, verdict, {"recipient": "a@ex\rample\x1b.n\u00e9t"})
    assert line == "action=DEFER_IF_PERMIT Greylisted, see http://example.org/ex?ample?.n?t.html"


def test_a_bug_met_by_one_client_closes_that_connection_and_the_server_goes_on(tmp_path):
    """A callback that raises (here the request reader, made to fail on one input) is
    logged as our bug and costs that one connection, never the server."""
    port = free_port()
    script = f"""
from greylist.adapters import policyd
real_feed = policyd.RequestReader.feed
def feed(self, data):
    if b"poison" in data:
        raise KeyError("a bug of ours")
    return real_feed(self, data)
policyd.RequestReader.feed = feed
from greylist.config import load
policyd.serve("127.0.0.1:{port}", load({{"store": "sqlite://{tmp_path}/g.db"}}, {{}}))
"""
    python = os.path.join(os.path.dirname(command("greylist")[0]), "python")
    proc = subprocess.Popen([python, "-c", script], env=base_env(), stderr=subprocess.PIPE, text=True)
    try:
        proc.stderr.readline()  # the "started" log line
        proc.stderr.readline()  # "listening on"
        request = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.1\n"
                   b"sender=a@example.org\nrecipient=b@example.net\n\n")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as good, \
                socket.create_connection(("127.0.0.1", port), timeout=5) as bad:
            bad.sendall(b"poison\n\n")
            assert bad.recv(100) == b""  # disconnected
            good.sendall(request)
            assert good.recv(1000).startswith(b"action=DEFER_IF_PERMIT")
            good.sendall(request)
            assert good.recv(1000).startswith(b"action=DEFER_IF_PERMIT")
    finally:
        proc.terminate()
        log = proc.stderr.read()
        proc.wait(10)
    assert "internal error KeyError in " in log and "a bug of ours" in log and "Traceback" not in log
    assert proc.returncode == 0


def test_expire_and_the_qmail_front_ends_share_the_file_with_a_busy_policy_server(policyd, tmp_path):
    """Decisions held for a window take no lock: greylist expire from cron and the
    qmail-spp plugin on the same SQLite file get in while the server never pauses.
    And what the plugin wrote, the server reads, though its key filter (built again
    after expire) never had the key: the client that waited passes."""
    db = f"sqlite://{tmp_path}/g.db"
    _, address = policyd("--store", db, "--key", "triplet", "--delay", "1")
    busy, done = [0], threading.Event()

    def hammer():
        c = Client(address)
        while not done.is_set():
            busy[0] += 1
            c.ask(request(client_address=f"10.0.{busy[0] >> 8 & 255}.{busy[0] & 255}",
                          sender=f"s{busy[0]}@example.org", recipient="r@example.net"))
        c.close()

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        time.sleep(0.5)
        started = time.monotonic()
        expire = subprocess.run([*command("greylist"), "expire", "--store", db], env=base_env(),
                                capture_output=True, text=True, timeout=60)
        assert expire.returncode == 0, expire.stderr
        time.sleep(1.5)  # the server's key filter is built again meanwhile (a second's quiet)
        env = base_env(GREYLIST_STORE=db, GREYLIST_KEY="triplet", TCPREMOTEIP="192.0.2.9",
                       SMTPMAILFROM="a@example.org", SMTPRCPTTO="b@example.net")
        plugin = subprocess.run(command("greylist-spp"), env=env, capture_output=True, timeout=60)
        took = time.monotonic() - started
        assert plugin.stdout.startswith(b"E451"), plugin.stderr  # decided, not a store error
        assert b"store-error" not in plugin.stderr
        assert took < 10  # each waited at most one short flush, not its 2 s busy timeout
        time.sleep(1.2)  # the delay
        reply = Client(address).ask(request(client_address="192.0.2.9", sender="a@example.org",
                                            recipient="b@example.net"))
        assert reply.startswith("action=PREPEND X-Greylist: delayed"), reply
    finally:
        done.set()
        thread.join(10)
    assert busy[0] > 50


def test_a_log_reader_that_stops_reading_never_stops_the_answers(policyd):
    """multilog stuck on a full disk: the pipe fills, and the server goes on answering,
    keeps what it can (1 MiB) and says how many lines it dropped once the reader is back."""
    proc, address = policyd("--key", "triplet")  # its stderr is a pipe nobody reads now
    c = Client(address)
    for n in range(9000):
        reply = c.ask(request(client_address=f"10.1.{n >> 8 & 255}.{n & 255}", sender=f"s{n}@example.org",
                              recipient="r@example.net"))
        assert reply.startswith("action=DEFER_IF_PERMIT")
    c.close()
    lines, dropped, text = 0, 0, ""
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)
    deadline = time.monotonic() + 30
    while lines + dropped < 9000 and time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            time.sleep(0.05)
            continue
        text += chunk.decode()
        *whole, text = text.split("\n")
        for line in whole:
            assert line.count("greylist-policyd:") == 1, line  # never half a line run into another
            lines += line.startswith("greylist-policyd: ip=")
            if "log_lines_dropped=" in line:
                dropped += int(line.split("log_lines_dropped=")[1].split()[0])
    assert dropped and lines + dropped == 9000  # every line written or counted as dropped


@pytest.mark.parametrize("waiting", [1, 3])
def test_requests_waiting_when_their_connections_are_accepted_are_answered_in_that_round(tmp_path, waiting):
    """Postfix writes as soon as it has connected: each request is read and answered in
    the round its connection is accepted in (the first at once, the others once the
    round's accepts are done), not a round of the loop later, behind every other
    client's request of that round (it doubled a new connection's wait under load)."""
    from greylist.adapters.policyd import PolicyServer, make_listener
    from greylist.config import load

    listener, where = make_listener("127.0.0.1:0")
    server = PolicyServer(listener, load({"store": f"sqlite://{tmp_path}/g.db"}, {}), where)
    clients = [socket.create_connection(listener.getsockname(), timeout=5) for _ in range(waiting)]
    try:
        for n, client in enumerate(clients):
            client.sendall(request(client_address=f"192.0.2.{n + 1}", sender="a@example.org",
                                   recipient="b@example.net"))
        time.sleep(0.05)  # on loopback, the requests are in the server's sockets by now
        server.acceptor.accept()  # the listener's callback alone: no round of the loop
        assert server.fresh is None  # nothing left for a later round
        for client in clients:
            client.setblocking(False)
            assert client.recv(1000).startswith(b"action=DEFER_IF_PERMIT")
    finally:
        for client in clients:
            client.close()
    server.greylister.close()
    server.loop.close()
    listener.close()


def test_the_rows_a_rounds_decisions_owe_are_written_at_the_round_end(tmp_path, monkeypatch):
    """policyd's decisions leave the batch's rows to the end of the loop round, written
    together once the round's answers are out (see greylist.stores.sqlite.DRAIN_STEP)."""
    from greylist.adapters.policyd import PolicyServer, RequestReader, make_listener
    from greylist.config import load
    from greylist.stores import sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "HELD_ROWS", 200)
    listener, where = make_listener("127.0.0.1:0")
    server = PolicyServer(listener, load({"store": f"sqlite://{tmp_path}/g.db"}, {}), where)
    for n in range(203):  # the 200th begins writing the batch; three more decide meanwhile
        attrs = RequestReader().feed(request(client_address=f"192.0.{n // 200}.{n % 200 + 1}",
                                             sender="a@example.org", recipient="b@example.net"))[0]
        assert server.answer(attrs)[0].startswith("action=DEFER_IF_PERMIT")
    store = server.greylister._store
    assert store.owed == 4 * sqlite_store.DRAIN_STEP and len(store.todo) == 200  # owed, not written
    server.loop.call_later(0, server.loop.stop)
    server.loop.run_forever()  # one round: at least ROUND_ROWS (a statement's cost is mostly its start)
    assert store.owed == 0
    assert len(store.todo) == 200 - max(4 * sqlite_store.DRAIN_STEP, sqlite_store.ROUND_ROWS)
    server.greylister.close()
    server.loop.close()
    listener.close()


def test_stopping_answers_every_request_already_sent_before_closing(tmp_path):
    """SIGTERM stops the loop at the end of a round; requests that arrived during that
    round, on open connections and on connections still in the listen queue, are answered
    (and their decisions committed) before the server closes: not cut off, which Postfix
    turns into 451 4.3.5 for its client."""
    import sqlite3

    from greylist.adapters.policyd import PolicyServer, make_listener
    from greylist.config import load

    listener, where = make_listener("127.0.0.1:0")
    address = listener.getsockname()
    server = PolicyServer(listener, load({"store": f"sqlite://{tmp_path}/g.db", "key": "ip"}, {}), where)
    server.acceptor.resume()
    kept = [socket.create_connection(address, timeout=5) for _ in range(3)]
    time.sleep(0.05)
    server.acceptor.accept()  # open, idle connections, as Postfix keeps them
    assert len(server.clients) == 3
    late: list[socket.socket] = []

    def last_round() -> None:  # the round in which SIGTERM's handler stops the loop
        for n, sock in enumerate(kept):
            sock.sendall(request(client_address=f"192.0.2.{n + 1}"))
        for n in range(2):
            sock = socket.create_connection(address, timeout=5)  # not accepted yet
            sock.sendall(request(client_address=f"192.0.2.{n + 11}"))
            late.append(sock)
        time.sleep(0.05)
        server.loop.stop()

    server.loop.call_later(0, last_round)
    server.serve()
    try:
        for sock in kept + late:
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
            assert reply.startswith(b"action=DEFER_IF_PERMIT") and reply.endswith(b"\n\n"), reply
    finally:
        for sock in kept + late:
            sock.close()
    with sqlite3.connect(tmp_path / "g.db") as db:
        keys = {row[0] for row in db.execute("SELECT key FROM greylist")}
    assert keys == {"192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.11", "192.0.2.12"}


def test_the_header_is_added_once_a_message_as_postgrey_remembers_its_last_ten():
    from greylist.adapters.policyd import Messages

    messages = Messages()
    assert messages.first_time(None) and messages.first_time(None)  # Exim sends no instance
    assert not messages.first_time("0")  # postgrey's list starts as ten "0"s
    assert messages.first_time("m1") and not messages.first_time("m1")
    for n in range(10):
        assert messages.first_time(f"other{n}")
    assert messages.first_time("m1")  # ten later messages pushed it out, as in postgrey


def test_a_sighup_while_it_starts_reloads_it_once_it_can_and_never_kills_it(tmp_path):
    """systemd's ExecReload (kill -HUP) right after its start, or an init script's reload:
    SIGHUP's default action ended a server still reading its whitelists and opening its
    store. It is held from the server's first line, and reloads it once its handler is in
    place."""
    from conftest import answers_on, paused_with_reloads_held

    for attempt in range(5):
        port = free_port()
        proc = subprocess.Popen([*command("greylist"), "policyd", "--listen", f"127.0.0.1:{port}",
                                 "--store", f"sqlite://{tmp_path}/g{attempt}.db"],
                                env=base_env(), stderr=subprocess.PIPE, text=True)
        try:
            held = paused_with_reloads_held(proc.pid)
            if held:
                proc.send_signal(signal.SIGHUP)
                proc.send_signal(signal.SIGCONT)
                c = Client(("127.0.0.1", port)) if answers_on(port) else None
                assert c is not None, f"it did not survive: {proc.wait(10)}"
                assert c.ask(request(client_address="192.0.2.1")).startswith("action=DEFER_IF_PERMIT")
                c.close()
        finally:
            proc.terminate()
            log = proc.stderr.read()
            proc.wait(10)
        if held:
            assert "reloaded=" in log, log
            return
    raise AssertionError("SIGHUP was never held while it started")


def serve_started(server, delay: float, callback) -> None:
    """Run a server in this process as its command runs it (start: signals, the sweep),
    ``callback`` called ``delay`` seconds in; pytest's signal handlers are put back."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        server.start()
        server.loop.call_later(delay, callback)
        server.serve()
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_at_the_bound_the_connection_idle_the_longest_is_closed_found_a_batch_at_a_time(monkeypatch):
    """At the connection bound each new connection, and only one that is there, closes the
    one idle the longest (each try to accept closed one: the try that found none too, so
    four clients of four were three). The idle longest are found a batch at a time
    (EVICT_BATCH, 2 here), not in a pass over all clients per connection (some 170 us a
    connection at 4,000); a candidate that asked since it was found is passed over, and
    the next is looked for again."""
    from greylist.adapters import policyd
    from greylist.config import load

    monkeypatch.setattr(policyd, "EVICT_BATCH", 2)
    passes = []
    real = policyd.nsmallest

    def counted(n, clients, key):
        passes.append(len(clients))
        return real(n, clients, key=key)

    monkeypatch.setattr(policyd, "nsmallest", counted)
    listener, where = policyd.make_listener("127.0.0.1:0")
    address = listener.getsockname()
    server = policyd.PolicyServer(listener, load({"store": "memory://", "key": "ip"}, {}), where,
                                  max_connections=4)
    socks: dict[str, socket.socket] = {}
    kept: list[str] = []
    steps = [lambda: socks.update({name: socket.create_connection(address, timeout=5) for name in "abcd"})]
    steps += [lambda name=name: socks[name].sendall(request(client_address="192.0.2.1")) for name in "abcd"]
    steps += [lambda: socks.update(e=socket.create_connection(address, timeout=5)),   # closes a; b is next
              lambda: socks["b"].sendall(request(client_address="192.0.2.1")),    # b asks: no longer idle
              lambda: socks.update(f=socket.create_connection(address, timeout=5)),   # b passed over: c
              lambda: socks.update(g=socket.create_connection(address, timeout=5)),   # d, found with c
              lambda: kept.extend(name for name, sock in socks.items()
                                  if any(c.sock.getpeername() == sock.getsockname() for c in server.clients)),
              server.loop.stop]

    def step() -> None:
        steps.pop(0)()
        if steps:
            server.loop.call_later(0.1, step)

    serve_started(server, 0.1, step)
    assert sorted(kept) == ["b", "e", "f", "g"]  # a, c and d closed, one for each newcomer
    assert passes == [4, 4]  # e's found a and b; f's (b had asked) found c and d; g took d
    for name, sock in socks.items():  # every request answered, the closed ones' too
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        assert data.count(b"action=DEFER_IF_PERMIT") == {"a": 1, "b": 2, "c": 1, "d": 1}.get(name, 0), name
        sock.close()


def test_a_client_silent_for_the_idle_timeout_is_closed_and_one_that_asks_is_kept():
    """Clients have no timer of their own: the server's sweep closes the ones silent for
    the idle timeout (at most a SWEEPS-th of it late) and leaves the others open."""
    from greylist.adapters.policyd import SWEEPS, PolicyServer, make_listener
    from greylist.config import load

    listener, where = make_listener("127.0.0.1:0")
    address = listener.getsockname()
    idle = 0.6  # six of the busy client's requests in it: a slow moment of the machine is no silence
    server = PolicyServer(listener, load({"store": "memory://", "key": "ip"}, {}), where, idle_timeout=idle)
    quiet = socket.create_connection(address, timeout=5)
    busy = socket.create_connection(address, timeout=5)
    seen: list[tuple[float, int, bool]] = []
    started = time.monotonic()

    def ask() -> None:  # every tenth of a second: never silent for the idle timeout
        busy.sendall(request(client_address="192.0.2.7"))
        seen.append((time.monotonic() - started, len(server.clients),
                     any(client.sock.getpeername() == busy.getsockname() for client in server.clients)))
        if time.monotonic() - started < 4 * idle:
            server.loop.call_later(0.1, ask)
        else:
            server.loop.stop()

    serve_started(server, 0.1, ask)
    assert quiet.recv(4096) == b""  # closed by the server
    early = [clients for at, clients, _kept in seen if at < idle - 0.05]
    late = [(clients, kept) for at, clients, kept in seen if at > idle * (1 + 1 / SWEEPS) + 0.3]
    assert early and all(clients == 2 for clients in early)  # not before its time
    assert late and all(clients == 1 and kept for clients, kept in late)  # the quiet one, not the busy one
    answers = b""
    while answers.count(b"\n\n") < len(seen) and (chunk := busy.recv(4096)):
        answers += chunk
    assert answers.count(b"action=") == len(seen)
    busy.close()


def test_a_sweep_that_fails_is_logged_as_our_bug_and_the_next_one_still_runs(monkeypatch):
    from greylist.adapters import policyd
    from greylist.config import load

    listener, where = policyd.make_listener("127.0.0.1:0")
    server = policyd.PolicyServer(listener, load({"store": "memory://"}, {}), where, idle_timeout=0.2)
    failed: list[object] = []

    def idled(client) -> None:  # a bug, the first time only
        if not failed:
            failed.append(client)
            raise RuntimeError("a bug")

    monkeypatch.setattr(policyd.Client, "idled", idled)
    logged: list[dict] = []
    monkeypatch.setattr(server, "log", logged.append)
    quiet = socket.create_connection(listener.getsockname(), timeout=5)
    open_then: list[int] = []

    def look() -> None:
        open_then.append(len(server.clients))
        server.loop.stop()

    serve_started(server, 1.0, look)
    assert failed and any("internal error RuntimeError in PolicyServer.sweep" in str(f.get("error")) for f in logged)
    assert open_then == [0]  # closed by a later sweep
    assert quiet.recv(4096) == b""
    quiet.close()


def test_a_listen_port_past_65535_is_a_clear_error_not_a_traceback():
    out = subprocess.run([*command("greylist"), "policyd", "--listen", "127.0.0.1:70000", "--store", "memory://"],
                         capture_output=True, text=True, timeout=20, env=base_env())
    assert out.returncode == 2 and "use HOST:PORT (a port up to 65535)" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
