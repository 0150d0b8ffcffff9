"""greylist postgrey: postgrey's command line, replies and whitelists, and the real postgrey beside it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.policy_servers import stop
from benchmarks.redis_server import free_port
from conftest import answers_on, base_env
from greylist.adapters.postgrey import DEFAULT_TEXT, PostgreyError, parse
from simulator.commands import command

POSTGREY = "/usr/sbin/postgrey"
DEBIAN_WHITELIST = Path("/etc/postgrey/whitelist_clients")


def test_postgreys_units_and_defaults():
    warnings: list[str] = []
    plan = parse(["--inet=10023", "--dbdir=/var/lib/postgrey", "--retry-window=6h", "--max-age=10",
                  "--auto-whitelist-clients", "--whitelist-clients=/nonexistent/wl"], warnings.append)
    assert plan.listen == "localhost:10023"  # postgrey binds localhost when only a port is given
    assert parse(["--inet=*:10023"]).listen == "*:10023"  # every address: policyd's test listens so
    # the last of an option counts, as with Getopt::Long, and Perl's false is the default
    later = parse(["--inet=1", "--delay=60", "--delay=0", "--dbdir=/a", "--dbdir=/b", "--user=0",
                   "--socketmode=0", "--greylist-text=Wait", "--greylist-text=0", "--pidfile=0"])
    assert later.flags["delay"] == "300" and later.flags["store"] == "sqlite:///b/greylist.sqlite"
    assert (later.user, later.user_given, later.socket_mode, later.text, later.pidfile) == \
        ("postgrey", False, 0o666, DEFAULT_TEXT, None)
    assert parse(["--inet=1", "--store=memory://", "--dbdir=/x"]).flags["store"] == "memory://"  # ours wins
    assert plan.flags["store"] == "sqlite:///var/lib/postgrey/greylist.sqlite"
    assert (plan.flags["delay"], plan.flags["max_age"], plan.flags["retry_window"]) == ("300", "10d", "6h")
    assert plan.flags["key"] == "triplet-subnet" and plan.flags["auto_whitelist"] == "5"
    assert plan.flags["whitelist"] == "" and "can't open /nonexistent/wl" in warnings[0]
    assert parse(["-u", "/run/pg.sock", "--retry-window=3", "--lookup-by-host", "--auto-whitelist-clients",
                  "0"]).flags["retry_window"] == "3d"
    assert parse(["--unix=/run/pg.sock", "--lookup-by-host"]).flags["key"] == "triplet"
    assert parse(["--inet=10023", "--auto-whitelist-clients=0"]).flags["auto_whitelist"] == "0"
    assert parse(["--inet=10023", "--privacy", "--exim"]).flags["privacy"] == "1"
    assert parse(["--inet=10023", "--exim"]).one_request
    assert parse(["--inet=10023", "--delay=+60"]).flags["delay"] == "60"  # Getopt::Long's =i takes a sign
    for bad, message in ((["--inet=10023", "--noaction"], "not supported"), ([], "--unix or --inet"),
                         (["--inet=10023", "--retry-window=2w"], "number of days"),
                         (["--inet=10023", "--delay=soon"], "whole number"), (["--bogus"], "Unknown option: bogus"),
                         (["--inet=10023", "--delay=-5"], "whole number of 0 or more"),
                         (["--inet=10023", "--greylist-text=wait\naction=OK"], "--greylist-text: .*printable"),
                         (["--inet=10023", "--x-greylist-header=X\x1b"], "--x-greylist-header")):
        with pytest.raises(PostgreyError, match=message):
            parse(bad)


def test_arguments_that_are_no_option_are_ignored_as_postgrey_ignores_them():
    """Debian's init script always passes "$POSTGREY_TEXT_OPT", an empty argument unless
    POSTGREY_TEXT is set; postgrey's Getopt::Long leaves such arguments alone."""
    warnings: list[str] = []
    plan = parse(["--pidfile=/run/postgrey.pid", "--daemonize", "--inet=10023", ""], warnings.append)
    assert plan.listen == "localhost:10023" and plan.daemonize and not [w for w in warnings if "argument" in w]
    parse(["--inet=10023", "stray"], warnings.append)
    assert "argument 'stray' is not an option: ignored" in warnings[-1]


@pytest.mark.skipif(not DEBIAN_WHITELIST.exists(), reason="needs Debian's postgrey package (its whitelists)")
def test_debians_whitelist_files_read_with_no_unreadable_line():
    from greylist.whitelist import ClientWhitelist, load_recipients

    listed = ClientWhitelist.parse(DEBIAN_WHITELIST.read_text(), str(DEBIAN_WHITELIST))
    assert listed.warnings == ()
    assert listed.matches_name("mail-wr1-f41.google.com") or listed.has_names
    assert load_recipients("/etc/postgrey/whitelist_recipients").matches("postmaster@example.org")


def ask(sock: socket.socket, t: float | None = None, **attrs: str) -> str:
    attrs = {"request": "smtpd_access_policy", "protocol_state": "RCPT", "client_name": "mx.example.org",
             "sender": "a@example.org", "recipient": "b@example.net", **attrs}
    if t is not None:
        attrs.update(policy_test_time=str(int(t)), instance=f"i{int(t)}")
    sock.sendall("".join(f"{k}={v}\n" for k, v in attrs.items()).encode() + b"\n")
    data = b""
    while not data.endswith(b"\n\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def start(cmd: list[str], port: int, env=None, log_file: Path | None = None) -> subprocess.Popen:
    # postgrey logs a lot (to stderr unless it daemonizes): never into a pipe nobody reads
    log = open(log_file or os.devnull, "w") if cmd[0] == POSTGREY else subprocess.PIPE
    proc = subprocess.Popen(cmd, env=env or base_env(), stdout=subprocess.DEVNULL, stderr=log, text=True)
    if answers_on(port):
        return proc
    proc.kill()
    raise AssertionError(f"{cmd[0]} did not start" + (f": {proc.stderr.read()}" if proc.stderr else ""))


def ours(tmp_path: Path, port: int, *extra: str) -> subprocess.Popen:
    user = ["--user", "root"] if os.geteuid() == 0 else []
    return start([*command("greylist"), "postgrey", f"--inet=127.0.0.1:{port}", f"--dbdir={tmp_path}", *user,
                  *extra], port)


def test_debian_default_options_and_postgreys_replies(tmp_path):
    port = free_port()
    proc = ours(tmp_path, port, "--delay=1", "--greylist-text=Wait %s s for %r",
                "--x-greylist-header=X-Greylist: %t s at %h")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert ask(s, client_address="192.0.2.5") == "action=DEFER_IF_PERMIT Wait 1 s for example.net"
            assert ask(s, client_address="192.0.2.6", etrn_domain="") == \
                "action=DEFER_IF_PERMIT 4.2.0 Wait 1 s for example.net"  # Exchange's work-around
            time.sleep(1.1)
            # the same /24 after the delay: passes, with postgrey's header format
            assert ask(s, client_address="192.0.2.77") == "action=PREPEND X-Greylist: 1 s at mx.test"
            assert ask(s, client_address="192.0.2.5", helo_name="h" * 3000) == "action=DUNNO"
    finally:
        stop(proc)


def test_version_and_refusals_on_the_command_line():
    out = subprocess.run([*command("greylist"), "postgrey", "--version"], capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 0 and out.stdout.startswith("postgrey 1.37")
    bad = subprocess.run([*command("greylist"), "postgrey", "--inet=1", "--noaction"], capture_output=True,
                         text=True, timeout=20)
    assert bad.returncode == 1 and "--noaction" in bad.stderr and "not supported" in bad.stderr
    # no abbreviations, as postgrey's Getopt::Long has it: --del=60 is no --delay=60
    for argv in (["--del=60"], ["--max", "35"], ["--whitelist-client=/etc/x"]):
        name = argv[0][2:].split("=")[0]
        short = subprocess.run([*command("greylist"), "postgrey", "--inet=127.0.0.1:1", *argv],
                               capture_output=True, text=True, timeout=20, env=base_env())
        assert short.returncode == 1 and f"Unknown option: {name}" in short.stderr, short
        if Path(POSTGREY).exists():
            theirs = subprocess.run([POSTGREY, "--inet=127.0.0.1:1", *argv], capture_output=True, text=True,
                                    timeout=20)
            assert theirs.returncode == 1 and f"Unknown option: {name}" in theirs.stderr, theirs


def test_help_lists_every_option_of_postgreys_own_help_and_ours():
    """An admin who swapped the binary types --help to look an option up: postgrey's usage,
    each of its options there (as the installed postgrey's --help lists them, where it is
    installed), every option we take, and nothing of the module's docstring markup."""
    import re

    from greylist.adapters.postgrey import LONG

    for argv in (["--help"], ["-h"], ["--man"]):
        out = subprocess.run([*command("greylist"), "postgrey", *argv], capture_output=True, text=True,
                             timeout=20)
        assert out.returncode == 0 and out.stdout.startswith("Usage:") and out.stderr == ""
    listed = set(re.findall(r"--([a-z][a-z0-9-]*)", out.stdout))
    hidden = {"man", "noaction", "no-action", "syslogfacility", "facility", "accept-test-time"}
    assert {o.rstrip("=") for o in LONG} - hidden <= listed  # aliases, the refused, the tests' own aside
    assert "``" not in out.stdout and ":class:" not in out.stdout
    assert "greylist migrate postgrey:///var/lib/postgrey" in out.stdout
    if Path(POSTGREY).exists():
        theirs = subprocess.run([POSTGREY, "--help"], capture_output=True, text=True, timeout=20)
        options = set(re.findall(r"^\s+(?:-\w, )?--([a-z][a-z0-9-]*)", theirs.stdout + theirs.stderr, re.M))
        assert len(options) > 25 and options <= listed, options - listed


STREAM = [  # (seconds after T, client, sender, recipient)
    (0, "192.0.2.5", "a@example.org", "b@example.net"),
    (10, "192.0.2.5", "a@example.org", "b@example.net"),            # too soon
    (400, "192.0.2.9", "a@example.org", "b@example.net"),           # same /24, after the delay: passes
    (500, "192.0.2.5", "a@example.org", "b@example.net"),           # known
    (600, "192.0.2.5", "prvs=news=0123abcdef@example.org", "b@example.net"),
    (1000, "192.0.2.5", "prvs=news=0987fedcba@example.org", "b@example.net"),  # reversed BATV: the same
    (1100, "198.51.100.1", "list-bounces-123-x=y@lists.example", "c@example.net"),
    (1500, "198.51.100.1", "list-bounces-456-x=y@lists.example", "c@example.net"),  # VERP digits
    (1600, "203.0.113.7", "<>", "d@example.net"),
    (1610, "203.0.113.7", "", "d@example.net"),
    (2000, "203.0.113.7", "", "d@example.net"),
    (3 * 86400, "203.0.113.8", "a@example.org", "e@example.net"),
    (3 * 86400 + 300, "203.0.113.8", "a@example.org", "e@example.net"),  # exactly the delay
    # BATV in capitals: one message passes after its retry, the next (a new tag) is known to us
    (4 * 86400, "192.0.2.50", "PRVS=0123ABCDEF=news@example.org", "f@example.net"),
    (4 * 86400 + 400, "192.0.2.50", "PRVS=0123ABCDEF=news@example.org", "f@example.net"),
    (4 * 86400 + 500, "192.0.2.50", "PRVS=4567ABCDEF=news@example.org", "f@example.net"),
    # an IPv4 client written as IPv4-mapped IPv6 (Postfix writes it as IPv4) retries as IPv4
    (5 * 86400, "::ffff:192.0.2.60", "g@example.org", "h@example.net"),
    (5 * 86400 + 400, "192.0.2.60", "g@example.org", "h@example.net"),
    # Debian's whitelist lists debian.org; Postfix never sends a name ending in a dot
    (5 * 86400 + 500, "192.0.2.61", "g@example.org", "h@example.net", "debian.org."),
    # SRS: the next message from the same forwarded sender has a new hash and time stamp
    (5 * 86400 + 600, "192.0.2.62", "SRS0=aaaa=T1=orig.example=u@fwd.example", "k@example.net"),
    (5 * 86400 + 1000, "192.0.2.62", "SRS0=aaaa=T1=orig.example=u@fwd.example", "k@example.net"),
    (5 * 86400 + 1100, "192.0.2.62", "SRS0=bbbb=T2=orig.example=u@fwd.example", "k@example.net"),
    # BATV as btv1 (and msprvs1): the next message has a new tag
    (5 * 86400 + 1200, "192.0.2.63", "btv1==0123abcdef==bob@example.org", "l@example.net"),
    (5 * 86400 + 1600, "192.0.2.63", "btv1==0123abcdef==bob@example.org", "l@example.net"),
    (5 * 86400 + 1700, "192.0.2.63", "btv1==4567abcdef==bob@example.org", "l@example.net"),
    # a triplet last seen 36 days ago: --max-age is 35 (the last of the stream: postgrey's
    # nightly clean-up would delete it in the next night, and others with it)
    (6 * 86400, "192.0.2.70", "i@example.org", "j@example.net"),
    (6 * 86400 + 400, "192.0.2.70", "i@example.org", "j@example.net"),
    (42 * 86400 + 500, "192.0.2.70", "i@example.org", "j@example.net"),
]


#: Differences from postgrey that are ours on purpose, by the stream's index.
DELIBERATE = {
    # the null sender written "<>" and "" is one sender to us (Postfix sends ""), two
    # triplets to postgrey, so its first-seen time, and the header's seconds, differ
    10: "the null sender as <> and as the empty string is one sender",
    # postgrey strips a BATV tag only from "prvs=" in small letters and keys on the rest;
    # to us the sender is the same person whatever the case: the next message passes
    15: "a BATV tag in capital letters is a BATV tag",
    # postgrey keys ::ffff:192.0.2.60 on its IPv6 /64, so the retry from 192.0.2.60 is new
    17: "an IPv4-mapped IPv6 address is the IPv4 client",
    # a DNS name with its root's dot is the same name (valid_hostname() in Postfix makes
    # such a client_name "unknown", so only another client can send it)
    18: "a client name ending in a dot is the name without it",
    # postgrey keys on the whole SRS address and strips only prvs= tags; we undo SRS and
    # the other BATV forms, so the sender's next message is known
    21: "an SRS address is its original sender",
    24: "a btv1== (or msprvs1=) BATV tag is a BATV tag",
    # postgrey keeps a triplet past --max-age until its nightly clean-up (02:00-07:00)
    # deletes it, and passes it meanwhile; to us --max-age is the age it is known for
    27: "a triplet last seen longer than --max-age ago is new, whether or not deleted yet",
}
#: (postgrey's action, ours) where they differ: only the header's seconds for the null
#: sender; the capital BATV tag, the mapped address, the dotted name, SRS and btv1
#: greylisted by postgrey once more, passed by us; the forgotten triplet greylisted by us
DELIBERATE_ACTIONS = {10: ("PREPEND", "PREPEND"), 15: ("DEFER_IF_PERMIT", "DUNNO"),
                      17: ("DEFER_IF_PERMIT", "PREPEND"), 18: ("DEFER_IF_PERMIT", "DUNNO"),
                      21: ("DEFER_IF_PERMIT", "DUNNO"), 24: ("DEFER_IF_PERMIT", "DUNNO"),
                      27: ("DUNNO", "DEFER_IF_PERMIT")}
#: in the log the same difference shows one request earlier: "" after "<>" is a new triplet
#: to postgrey (reason=new), an early retry to us (both greylist it)
DELIBERATE_IN_LOG = {**DELIBERATE, 9: DELIBERATE[10]}


#: Perl's false for options postgrey reads as `$opt{x} || default`: each is its default
PERL_FALSE = ["--delay=0", "--max-age=0", "--ipv4cidr=0", "--ipv6cidr=00", "--greylist-action=0",
              "--greylist-text=0", "--x-greylist-header=0", "--listen-queue-size=0", "--syslog-facility=0"]


def normalise(reply: str) -> str:
    """The header's version and date differ by design; the seconds and the action must not."""
    if reply.startswith("action=PREPEND X-Greylist: delayed "):
        return " ".join(reply.split()[:5])
    return reply


@pytest.mark.skipif(not Path(POSTGREY).exists(), reason="needs Debian's postgrey (apt-get install postgrey)")
@pytest.mark.parametrize("options", [[], ["--privacy"], PERL_FALSE])
def test_the_same_request_stream_gets_the_same_answers_as_the_real_postgrey(tmp_path, options):
    """Differential: both servers on one stream, their clocks moved by policy_test_time;
    with --privacy too, and then our database holds no address, only hashes; and with
    options postgrey reads as `$opt{x} || default`, where 0 or "" is the default (we took
    --delay=0 as no delay, --ipv4cidr=0 would not start). Their log lines too: ours are
    postgrey's, word for word, and Debian's logcheck rules for postgrey pass over them as
    over postgrey's own."""
    if os.geteuid() != 0:
        pytest.skip("postgrey runs as its own user: needs root to start it here")
    import tempfile

    t0 = 1_800_000_000
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    answers, logs = answers_of_both([dict(t=t0 + dt, client_address=ip, sender=sender, recipient=rcpt,
                                          client_name=host[0] if host else "unknown" if n % 3 else "mx.example.org",
                                          **({"queue_id": f"4F2A{n}"} if n % 4 == 1 else {}))
                                     for n, (dt, ip, sender, rcpt, *host) in enumerate(STREAM)], options, keep=base)
    if "--privacy" in options:
        import sqlite3

        with sqlite3.connect(base / "ours" / "greylist.sqlite") as db:
            keys = [row[0] for row in db.execute("SELECT key FROM greylist")]
        assert keys and all(len(k.removeprefix("awl|")) == 40 and "@" not in k for k in keys), keys
    shutil.rmtree(base, ignore_errors=True)
    differences = {i: (STREAM[i], a, b) for i, (a, b) in enumerate(zip(answers["postgrey"], answers["ours"]))
                   if a != b}
    assert set(differences) == set(DELIBERATE), differences
    # what each answers there: which of the two greylists, and who passes
    actions = {i: (a.split()[0].removeprefix("action="), b.split()[0].removeprefix("action="))
               for i, (_, a, b) in differences.items()}
    assert actions == DELIBERATE_ACTIONS, actions
    assert len(logs["postgrey"]) == len(logs["ours"]) == len(STREAM), logs
    differences = {i: (a, b) for i, (a, b) in enumerate(zip(logs["postgrey"], logs["ours"])) if a != b}
    assert set(differences) == set(DELIBERATE_IN_LOG), differences
    probe = logs["postgrey"][:1] + ["action=greylist, client_address=192.0.2.1"]  # no reason=: reported
    assert ignored_by_logcheck(probe) == probe[:1]
    assert ignored_by_logcheck(logs["ours"]) == logs["ours"]


@pytest.mark.skipif(not Path(POSTGREY).exists(), reason="needs Debian's postgrey (apt-get install postgrey)")
def test_one_x_greylist_header_a_message_however_many_recipients_waited(tmp_path):
    """Postfix asks once per recipient, all with the message's `instance`: postgrey adds its
    header for the first recipient whose triplet passed after waiting and answers DUNNO for
    the others of that message (it remembers the last 10 instances), so a message gets one
    X-Greylist header, not one a recipient. Both servers on one stream, both logs compared."""
    if os.geteuid() != 0:
        pytest.skip("postgrey runs as its own user: needs root to start it here")
    t0 = 1_800_000_000
    rcpts = ["r1@example.net", "r2@example.net", "r3@example.net"]
    stream = [(0, "m1", r) for r in rcpts] + [(0, "m2", "r4@example.net")]  # all new: greylisted
    stream += [(400, "m3", r) for r in rcpts]  # the retry: three passes, one message
    stream += [(400, "m4", "r4@example.net"), (401, "m3", "r4@example.net")]  # another message; m3 again
    answers, logs = answers_of_both([dict(client_address="192.0.2.5", recipient=rcpt, instance=instance,
                                          policy_test_time=str(t0 + dt)) for dt, instance, rcpt in stream])
    answers = {name: [a.split(" X-Greylist")[0] for a in got] for name, got in answers.items()}
    logs = {name: [line.split("action=", 1)[1] for line in got] for name, got in logs.items()}
    assert [a.split()[0] for a in answers["postgrey"]] == \
        ["action=DEFER_IF_PERMIT"] * 4 + ["action=PREPEND", "action=DUNNO", "action=DUNNO", "action=PREPEND",
                                          "action=DUNNO"]
    assert answers["ours"] == answers["postgrey"]
    assert logs["ours"] == logs["postgrey"]


LOGCHECK_RULES = Path("/etc/logcheck/ignore.d.server/postgrey")


def ignored_by_logcheck(lines: list[str]) -> list[str]:
    """The lines, as syslog writes them (postgrey[PID]: ...), that Debian's logcheck rules for
    postgrey pass over: egrep -f, as logcheck runs them (they come with the postgrey package)."""
    stamped = [f"Nov 26 12:00:00 mx postgrey[4242]: {line}" for line in lines]
    kept = subprocess.run(["grep", "-E", "-f", str(LOGCHECK_RULES)], input="\n".join(stamped) + "\n",
                          capture_output=True, text=True).stdout.splitlines()
    return [line for line, full in zip(lines, stamped) if full in kept]


def migrate(base: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """greylist migrate from the postgrey database in ``base`` (then removed) to our SQLite file."""
    db = f"sqlite://{tmp_path}/greylist.sqlite"
    result = subprocess.run([*command("greylist"), "migrate", f"postgrey://{base}", db, "--json"],
                            capture_output=True, text=True, timeout=60, env=base_env())
    shutil.rmtree(base, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    return result, __import__("json").loads(result.stdout)


@pytest.mark.skipif(not (Path(POSTGREY).exists() and shutil.which("db_dump")),
                    reason="needs Debian's postgrey and db_dump (apt-get install postgrey db-util)")
def test_postgreys_database_migrates_and_known_triplets_are_not_greylisted_again(tmp_path):
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("postgrey runs as its own user: needs root to start it here")
    t0 = int(time.time()) - 7200  # recent: migrate skips what has expired (or lies in the future)
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    os.chmod(base, 0o755)
    shutil.chown(base, "postgrey")
    port = free_port()
    proc = start([POSTGREY, f"--inet=127.0.0.1:{port}", f"--dbdir={base}", "--auto-whitelist-clients=1"], port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert ask(s, t0, client_address="192.0.2.5").startswith("action=DEFER_IF_PERMIT")
            assert ask(s, t0 + 400, client_address="192.0.2.5").startswith("action=PREPEND")  # passed
            assert ask(s, t0 + 500, client_address="198.51.100.7", recipient="x@example.net").startswith(
                "action=DEFER_IF_PERMIT")  # pending
    finally:
        stop(proc)
    result, counts = migrate(base, tmp_path)
    assert counts["read"] == 3 and counts["copied"] == 3  # two triplets and one client's tally
    port = free_port()
    user = ["--user", "root"]
    proc = start([*command("greylist"), "postgrey", f"--inet=127.0.0.1:{port}", f"--dbdir={tmp_path}",
                  "--accept-test-time", "--auto-whitelist-clients=2", *user], port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert ask(s, t0 + 900, client_address="192.0.2.5") == "action=DUNNO"  # known: not greylisted again
            assert ask(s, t0 + 901, client_address="198.51.100.7", recipient="x@example.net").startswith(
                "action=PREPEND")  # pending for 401 s: passes, as under postgrey
            assert ask(s, t0 + 902, client_address="203.0.113.1").startswith("action=DEFER_IF_PERMIT")
    finally:
        stop(proc)


def test_a_database_root_left_unwritable_is_said_at_start_and_mail_flows():
    """The README's migrate run as root and its chown forgotten: the server, as the postgrey
    user, may read the file but not write it. Each held decision failed at the flush,
    unlogged, and every retry was greylisted as new again for as long as its sender
    retried (then bounced: mail lost). It is a store that failed now: said at start with
    what to mend, and each request follows on_error (pass), logged."""
    import pwd
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("the server drops to the postgrey user: needs root to start it here")
    try:
        pwd.getpwnam("postgrey")
    except KeyError:
        pytest.skip("needs the postgrey user (apt-get install postgrey)")
    base = Path(tempfile.mkdtemp(dir="/tmp"))  # as /var/lib/postgrey: the postgrey user's
    os.chmod(base, 0o755)
    shutil.chown(base, "postgrey")
    try:
        made = subprocess.run([*command("greylist"), "migrate", "memory://", f"sqlite://{base}/greylist.sqlite"],
                              capture_output=True, text=True, timeout=60, env=base_env())
        assert made.returncode == 0 and (base / "greylist.sqlite").stat().st_uid == 0, made.stderr
        port = free_port()
        proc = start([*command("greylist"), "postgrey", f"--inet=127.0.0.1:{port}", f"--dbdir={base}"], port)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                answers = [ask(s, client_address="192.0.2.5") for _ in range(3)]
        finally:
            stop(proc)
        log = proc.stderr.read()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert answers == ["action=DUNNO"] * 3, log  # was: greylisted, and again at every retry
    start_line = next(line for line in log.splitlines() if "store unusable at start" in line)
    assert "readonly database" in start_line and "runs as postgrey" in start_line and "chown postgrey" in start_line
    assert log.count("reason=store-error") == 3 and log.count("on_error=pass") == 4


@pytest.mark.skipif(not (Path(POSTGREY).exists() and shutil.which("db_dump")),
                    reason="needs Debian's postgrey and db_dump (apt-get install postgrey db-util)")
def test_a_privacy_database_brings_its_auto_whitelisted_clients_and_says_what_it_cannot(tmp_path):
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("postgrey runs as its own user: needs root to start it here")
    t0 = int(time.time()) - 7200
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    os.chmod(base, 0o755)
    shutil.chown(base, "postgrey")
    port = free_port()
    proc = start([POSTGREY, f"--inet=127.0.0.1:{port}", f"--dbdir={base}", "--auto-whitelist-clients=1",
                  "--privacy"], port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert ask(s, t0, client_address="192.0.2.5").startswith("action=DEFER_IF_PERMIT")
            assert ask(s, t0 + 400, client_address="192.0.2.5").startswith("action=PREPEND")  # counted
    finally:
        stop(proc)
    result, counts = migrate(base, tmp_path)
    assert (counts["copied"], counts["unreadable"]) == (1, 1)  # the client's tally; the hashed triplet
    assert "1 triplets are postgrey --privacy hashes" in result.stderr
    port = free_port()
    proc = start([*command("greylist"), "postgrey", f"--inet=127.0.0.1:{port}", f"--dbdir={tmp_path}",
                  "--accept-test-time", "--auto-whitelist-clients=1", "--privacy", "--user", "root"], port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            # a new triplet from the auto-whitelisted client: not greylisted, as under postgrey
            assert ask(s, t0 + 900, client_address="192.0.2.5", recipient="new@example.net") == "action=DUNNO"
            assert ask(s, t0 + 901, client_address="203.0.113.1").startswith("action=DEFER_IF_PERMIT")
    finally:
        stop(proc)


@pytest.mark.skipif(not Path(POSTGREY).exists(), reason="needs Debian's postgrey (apt-get install postgrey)")
def test_exim_mode_answers_one_request_a_connection_as_postgrey_does(tmp_path):
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("postgrey runs as its own user: needs root to start it here")
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    os.chmod(base, 0o755)
    shutil.chown(base, "postgrey")
    two = b"".join(f"request=smtpd_access_policy\nclient_address=192.0.2.{i}\nsender=a@example.org\n"
                   f"recipient=b@example.net\n\n".encode() for i in (1, 2))
    got = {}
    for name, cmd in (("postgrey", [POSTGREY]), ("ours", [*command("greylist"), "postgrey"])):
        port = free_port()
        proc = start([*cmd, f"--inet=127.0.0.1:{port}", f"--dbdir={base}", "--exim"], port)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(two)
                data = b""
                while chunk := s.recv(4096):
                    data += chunk  # until the server closes
            got[name] = data.count(b"action=")
        finally:
            stop(proc)
    shutil.rmtree(base, ignore_errors=True)
    assert got == {"postgrey": 1, "ours": 1}


def _unix_answers(path: Path, seconds: float = 20) -> bool:
    """A request answered on the socket at ``path``: a server ready, not one that is only
    listening. The kernel takes a connection as soon as the socket listens, and Net::Server
    listens before it hands the socket to its user and drops root: a test that connected
    and looked then found both still root's (seen under load)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(max(0.2, deadline - time.monotonic()))
                s.connect(str(path))
                if ask(s, client_address="192.0.2.1").startswith("action="):
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def test_daemonize_returns_once_the_pid_file_is_there_and_a_reload_is_safe(tmp_path):
    """An init script's start and, at once, its reload (config management does just that):
    when the command returns, the pid file is there and SIGHUP reloads. It returned at its
    first fork, before the pid file was written and before the handler was in place, so
    the reload found no pid file or killed the server. A server that cannot start makes
    the command fail instead of returning 0."""
    as_root = ["--user=root", "--group=root"] if os.geteuid() == 0 else []
    for attempt in range(5):
        port = free_port()
        pidfile = tmp_path / f"postgrey{attempt}.pid"
        subprocess.run([*command("greylist"), "postgrey", f"--inet=127.0.0.1:{port}", f"--dbdir={tmp_path}",
                        "--daemonize", f"--pidfile={pidfile}", *as_root], env=base_env(), timeout=30,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pid = int(pidfile.read_text())  # there when the command returned
        try:
            os.kill(pid, signal.SIGHUP)  # reloaded, not killed
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                assert ask(s, client_address="192.0.2.5").startswith("action=DEFER_IF_PERMIT")
        finally:
            os.kill(pid, signal.SIGTERM)
    cannot = subprocess.run([*command("greylist"), "postgrey", f"--inet=127.0.0.1:{free_port()}",
                             f"--dbdir={tmp_path}", "--daemonize", f"--pidfile={tmp_path}/no/such/dir/p.pid",
                             *as_root], env=base_env(), timeout=30, capture_output=True, text=True)
    assert cannot.returncode == 1 and "ended as it started" in cannot.stderr, cannot


@pytest.mark.skipif(not Path(POSTGREY).exists(), reason="needs Debian's postgrey (apt-get install postgrey)")
def test_the_unix_socket_and_the_pid_file_belong_to_the_user_as_postgreys_do(tmp_path):
    """--unix with --socketmode=0660: Postfix reaches the socket through its group, so the
    socket must be the postgrey user's and group's, as Net::Server hands it over before it
    drops root. Both remove socket and pid file at exit where the directory lets the user.
    One deliberate difference: postgrey hands over its pid file too, and then Debian's init
    script cannot reload it (start-stop-daemon will not match on a non-root pid file alone,
    tested here): ours stays root's, and the init-script test reloads it."""
    import pwd
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("postgrey runs as its own user: needs root to start it here")
    entry = pwd.getpwnam("postgrey")
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    os.chmod(base, 0o755)
    got = {}
    try:
        for name, cmd in (("postgrey", [POSTGREY]), ("ours", [*command("greylist"), "postgrey"])):
            home = base / name
            home.mkdir()
            shutil.chown(home, "postgrey", "postgrey")  # as /var/spool/postfix/postgrey and /run/postgrey
            sock, pid = home / "socket", home / "postgrey.pid"
            # postgrey writes its pid file only when it daemonizes (as Debian's init script has it)
            subprocess.run([*cmd, f"--unix={sock}", "--socketmode=0660", f"--dbdir={home}", "--daemonize",
                            f"--pidfile={pid}"], env=base_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30, check=True)
            assert _unix_answers(sock), f"{name} did not start"
            server = int(pid.read_text())
            try:
                st, pst = sock.stat(), pid.stat()
                got[name] = {"socket": (st.st_uid, st.st_gid, oct(st.st_mode & 0o777)),
                             "pid file": (pst.st_uid, pst.st_gid), "server runs as": _uid(server)}
                if shutil.which("start-stop-daemon"):  # Debian's init script's reload
                    reload = subprocess.run(["start-stop-daemon", "--stop", "--signal", "1", "--quiet",
                                             "--pidfile", str(pid)], capture_output=True, text=True)
                    got[name]["reload"] = reload.returncode == 0 or reload.stderr.strip()
            finally:
                os.kill(server, signal.SIGTERM)
                deadline = time.monotonic() + 20
                while Path(f"/proc/{server}").exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
            got[name]["left at exit"] = sorted(p.name for p in (sock, pid) if p.exists())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    user = (entry.pw_uid, entry.pw_gid)
    reloads = shutil.which("start-stop-daemon") is not None
    # bookworm's start-stop-daemon refuses; an older one signals
    assert got["postgrey"].pop("reload", None) in ((
        f"start-stop-daemon: matching only on non-root pidfile {base}/postgrey/postgrey.pid is insecure",
        True) if reloads else (None,))
    assert got["ours"].pop("reload", None) == (True if reloads else None)
    assert got["postgrey"] == {"socket": (*user, "0o660"), "pid file": user, "server runs as": user[0],
                               "left at exit": []}
    assert got["ours"] == {**got["postgrey"], "pid file": (0, 0)}


@pytest.mark.skipif(not Path(POSTGREY).exists(), reason="needs Debian's postgrey (apt-get install postgrey)")
@pytest.mark.parametrize("options", [[], ["--lookup-by-host", "--auto-whitelist-clients=1"],
                                     ["--privacy", "--auto-whitelist-clients=2"],
                                     ["--delay=120", "--retry-window=6h", "--ipv4cidr=28", "--ipv6cidr=56"]])
def test_a_random_stream_of_400_requests_gets_postgreys_answers(tmp_path, options):
    """Seeded traffic over IPv4 and IPv6 clients, case, +tags, every BATV form, SRS, VERP,
    the null sender and addresses that are hardly addresses, clients whose names or
    addresses Debian's whitelist lists (names, /regex/ lines, partial addresses) and
    names that only look alike, at gaps around the delay, the hour and the retry window:
    not one answer differs. Its words and its span (within --max-age, 35 days) keep out
    the deliberate differences, which the stream above lists (DELIBERATE): each BATV form
    here has one tag, each SRS address one original sender."""
    import random

    if os.geteuid() != 0:
        pytest.skip("postgrey runs as its own user: needs root to start it here")
    rng = random.Random(5)
    senders = ["a@example.org", "News@Example.org", "prvs=0123abcdef=bob@example.org",
               "prvs=bob=0987fedcba@example.org", "SRS0=ab12=TT=orig.example=u@fwd.example",
               "list-bounces-123-x=y@lists.example", "user+tag@example.org", "",
               "btv1==0123abcdef==bob@example.org", "msprvs1=17aaaaaaaa=bob@example.org",
               "SRS1=xx=fwd.example==cd34=TT=orig2.example=v@fwd2.example", "prvs=12=bob@example.org",
               "user+@example.org", "noat", "a@", "@b", "a1b22c333@ex.org", '"quoted user"@example.org']
    recipients = ["b@example.net", "C@Example.net", "postmaster@example.net", "d+x@example.net",
                  "POSTMASTER@example.net", "abuse@x.org", "postmaster", "x@postmaster", "b"]
    clients = ["192.0.2.5", "192.0.2.9", "198.51.100.7", "2001:db8::5", "2001:db8::6", "203.0.113.4",
               "2001:DB8::5", "2001:db8:0:1::5", "66.216.126.174", "195.235.39.7", "195.235.40.7"]
    names = ["unknown", "mx.example.org", "mail7.telekom.de", "MAIL7.TELEKOM.DE", "x.debian.org",
             "ms-smtp-03.rr.com", "sv12pub.verizon.net", "notdebian.org", "gnu.org.evil.com", "xgnu.org"]
    t, stream = 1_800_000_000, []
    for _ in range(400):
        t += 86400 if rng.random() < 0.03 else rng.choice([1, 30, 200, 299, 300, 301, 900, 3599, 3600, 3601, 4000])
        if stream and rng.random() < 0.5:  # a retry of one of the last few
            stream.append((t, *rng.choice(stream[-8:])[1:]))
        else:
            stream.append((t, rng.choice(clients), rng.choice(senders), rng.choice(recipients),
                           rng.choice(names)))
    assert stream[-1][0] - stream[0][0] < 35 * 86400
    answers, logs = answers_of_both([dict(t=at, client_address=ip, sender=sender, recipient=rcpt, client_name=host)
                                     for at, ip, sender, rcpt, host in stream], options)
    assert answers["ours"] == answers["postgrey"]
    # and the clients postgrey says it auto-whitelisted, in its words, at the same requests
    assert logs["ours"] == logs["postgrey"]
    if "--auto-whitelist-clients=1" in options:
        assert sum(line.startswith("whitelisted: ") for line in logs["ours"]) > 3
    assert sum(a.startswith("action=DEFER_IF_PERMIT") for a in answers["ours"]) > 10  # both kinds seen
    assert sum(a.startswith("action=PREPEND") for a in answers["ours"]) > 5


def answers_of_both(requests: list[dict], options: list[str] = (),
                    keep: Path | None = None) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The real postgrey's answers and ours to the same requests (``ask``'s arguments), each
    server started with ``options`` on a fresh database of its own, in one connection; and
    each one's log lines of decisions (and of clients auto-whitelisted). ``keep``: a directory (reachable by the postgrey
    user) to run in and leave, for a test that reads a database afterwards."""
    import tempfile

    base = keep or Path(tempfile.mkdtemp(dir="/tmp"))  # the postgrey user must reach it: pytest's tree is 0700
    os.chmod(base, 0o755)
    answers, logs = {}, {}
    try:
        for name in ("postgrey", "ours"):
            directory = base / name
            directory.mkdir()
            shutil.chown(directory, "postgrey")
            port = free_port()
            argv = [POSTGREY, f"--inet=127.0.0.1:{port}", f"--dbdir={directory}", *options] \
                if name == "postgrey" else [*command("greylist"), "postgrey", f"--inet=127.0.0.1:{port}",
                                            f"--dbdir={directory}", "--accept-test-time", *options]
            proc = start(argv, port, log_file=base / "postgrey.log")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    answers[name] = [normalise(ask(s, **attrs)) for attrs in requests]
            finally:
                stop(proc)
            text = (base / "postgrey.log").read_text() if name == "postgrey" else proc.stderr.read()
            logs[name] = [line for line in text.splitlines() if "action=" in line or line.startswith("whitelisted: ")]
    finally:
        if keep is None:
            shutil.rmtree(base, ignore_errors=True)
    return answers, logs


def passed_with_file(option: str, text: str, labels: list[str], requests: list[dict]) -> dict[str, list[str]]:
    """The labels of the requests each server passed (DUNNO), both given a file of ``text``
    as ``option`` (a whitelist, say), readable by the postgrey user."""
    import tempfile

    directory = Path(tempfile.mkdtemp(dir="/tmp"))
    os.chmod(directory, 0o755)
    listed = directory / "list"
    listed.write_text(text)
    listed.chmod(0o644)
    try:
        answers, _ = answers_of_both([dict(t=1_800_000_000, **attrs) for attrs in requests],
                                     [f"{option}={listed}"])
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {name: [label for label, a in zip(labels, got) if a == "action=DUNNO"] for name, got in answers.items()}


@pytest.mark.skipif(not Path(POSTGREY).exists(), reason="needs Debian's postgrey (apt-get install postgrey)")
def test_a_client_whitelist_matches_as_postgreys_does():
    """A site's own whitelist_clients.local, side by side with the real postgrey: a /regex/
    ignores case, as postgrey's qr{...}i (ours did not: /^MAIL\\d+\\.Example\\.ORG$/ missed
    mail12.example.org). Two deliberate differences, both partial addresses: `a.b` is a.b.0.0/16
    to us, as postgrey's own comment says, where postgrey reads it as a.b.0.0/24; and
    `a.b.c.` (as tcprules writes a prefix) is that /24 to us, a name that matches nothing to it."""
    if os.geteuid() != 0:
        pytest.skip("postgrey runs as its own user: needs root to start it here")
    clients = [("192.0.2.1", "mail12.example.org"), ("192.0.2.2", "MAIL7.EXAMPLE.ORG"),
               ("192.0.2.3", "mail.example.org"), ("192.0.2.4", "mx.example.com"), ("192.0.2.5", "example.com.evil"),
               ("198.51.0.9", "unknown"), ("198.51.7.7", "unknown"), ("203.0.113.9", "unknown"),
               ("2001:db8:5:1::1", "unknown"), ("2001:db8:6::1", "unknown")]
    passed = passed_with_file("--whitelist-clients", "/^MAIL\\d+\\.Example\\.ORG$/\nExample.COM\n198.51\n"
                              "203.0.113.\n2001:db8:5::/48\n", [ip for ip, _ in clients],
                              [dict(client_address=ip, client_name=name) for ip, name in clients])
    assert passed["postgrey"] == ["192.0.2.1", "192.0.2.2", "192.0.2.4", "198.51.0.9", "2001:db8:5:1::1"], passed
    assert passed["ours"] == ["192.0.2.1", "192.0.2.2", "192.0.2.4", "198.51.0.9", "198.51.7.7", "203.0.113.9",
                              "2001:db8:5:1::1"], passed


@pytest.mark.skipif(not Path(POSTGREY).exists(), reason="needs Debian's postgrey (apt-get install postgrey)")
def test_a_recipient_whitelist_matches_as_postgreys_does():
    """postgrey's rules for whitelist_recipients: user@ and user@domain also match a +extension,
    a bare domain its subdomains, /regex/ ignores case (we matched addresses and domains
    exactly, so postmaster+abuse-reports@ or mail to a subdomain was greylisted after the swap,
    and a /regex/ line was taken for a domain). One deliberate difference: @domain (Postfix's
    access(5) form) is that domain to us; postgrey reads it but matches nothing with it."""
    if os.geteuid() != 0:
        pytest.skip("postgrey runs as its own user: needs root to start it here")
    recipients = ["postmaster+reports@a.example", "POSTMASTER@A.EXAMPLE", "abuse+z@example.com", "abuse@example.com",
                  "abuse@example.com.evil", "bob@example.com", "y@EXAMPLE.org", "y@sub.example.org",
                  "y@notexample.org", "LIST-news@lists.example", "list-news@lists.example.evil",
                  "x@example.net", "x@sub.example.net"]
    passed = passed_with_file("--whitelist-recipients", "postmaster@\nabuse@example.com\nexample.org\n@example.net\n"
                              "/^list-[a-z]+@lists\\.example$/\n", recipients,
                              [dict(client_address=f"192.0.2.{n}", recipient=rcpt)
                               for n, rcpt in enumerate(recipients)])
    assert passed["postgrey"] == ["postmaster+reports@a.example", "POSTMASTER@A.EXAMPLE", "abuse+z@example.com",
                                  "abuse@example.com", "y@EXAMPLE.org", "y@sub.example.org",
                                  "LIST-news@lists.example"], passed
    assert passed["ours"] == passed["postgrey"] + ["x@example.net", "x@sub.example.net"]


@pytest.mark.skipif(not Path(POSTGREY).exists(), reason="needs Debian's postgrey (apt-get install postgrey)")
def test_decided_at_data_and_end_of_message_as_postgrey_decides():
    """A site that has postgrey in smtpd_data_restrictions or smtpd_end_of_data_restrictions
    keeps its greylisting after the swap (ours answered DUNNO outside RCPT: all that mail
    passed). One deliberate difference: a pass at END-OF-MESSAGE is DUNNO, not postgrey's
    PREPEND, which Postfix ignores there with a warning in its log."""
    if os.geteuid() != 0:
        pytest.skip("postgrey runs as its own user: needs root to start it here")
    t = 1_800_000_000
    one = dict(protocol_state="DATA", client_address="192.0.2.1", sender="a@example.org", recipient="b@example.net")
    many = dict(protocol_state="DATA", client_address="198.51.100.1", sender="a@example.org", recipient="")
    end = dict(protocol_state="END-OF-MESSAGE", client_address="203.0.113.1", sender="c@example.org", recipient="")
    requests = [dict(t=t, **one), dict(t=t, **many), dict(t=t, **end), dict(t=t + 100, **one),
                dict(t=t + 400, **one), dict(t=t + 401, **many), dict(t=t + 402, **end), dict(t=t + 500, **end)]
    answers, _ = answers_of_both(requests)
    differences = {i: (a, b) for i, (a, b) in enumerate(zip(answers["postgrey"], answers["ours"])) if a != b}
    assert differences == {6: (answers["postgrey"][6], "action=DUNNO")}, differences
    assert answers["postgrey"][6].startswith("action=PREPEND X-Greylist: delayed 402")
    assert [a.split()[0] for a in answers["ours"]] == ["action=DEFER_IF_PERMIT"] * 4 + \
        ["action=PREPEND", "action=PREPEND", "action=DUNNO", "action=DUNNO"]

INIT_SCRIPT = Path("/etc/init.d/postgrey")


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"PPid:\t{pid}\n" in (entry / "status").read_text():
                found.append(int(entry.name))
        except OSError:
            pass  # ended meanwhile
    return found


def _listening_inode(port: int) -> str:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            return fields[9]
    raise AssertionError(f"nothing listens on port {port}")


@pytest.mark.skipif(not (INIT_SCRIPT.exists() and shutil.which("start-stop-daemon")
                         and Path("/lib/lsb/init-functions").exists()),
                    reason="needs Debian's postgrey package (its init script), start-stop-daemon and "
                           "/lib/lsb/init-functions (sysvinit-utils)")
def test_debians_init_script_runs_greylist_postgrey_with_one_path_changed():
    """Debian's own /etc/init.d/postgrey with DAEMON= pointing at greylist-postgrey (and, for
    the test, its pid file and defaults file in a scratch directory): start (with its
    --daemonize, --pidfile and the empty "$POSTGREY_TEXT_OPT" it always passes), reload,
    stop. The daemon and its syslog forwarder run as postgrey; the forwarder holds neither
    the listening socket (a restart could not bind) nor the caller's output pipe."""
    import pwd
    import sys
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("the init script starts it as root, to become the postgrey user")
    daemon = Path(sys.executable).parent / "greylist-postgrey"
    if not daemon.exists():
        pytest.skip("needs the installed package's greylist-postgrey (make install)")
    base = Path(tempfile.mkdtemp(dir="/tmp"))  # the postgrey user must reach it: pytest's tree is 0700
    os.chmod(base, 0o755)
    (base / "db").mkdir()
    shutil.chown(base / "db", "postgrey")
    port = free_port()
    (base / "default").write_text(f'POSTGREY_OPTS="--inet=127.0.0.1:{port} --dbdir={base}/db --delay=1"\n'
                                  '#POSTGREY_TEXT="Your customized rejection message here"\n')
    script = INIT_SCRIPT.read_text()
    for old, new in (("DAEMON=/usr/sbin/postgrey\n", f"DAEMON={daemon}\n"),
                     ("PIDFILE=/var/run/$DAEMON_NAME.pid", f"PIDFILE={base}/postgrey.pid"),
                     ("/etc/default/$DAEMON_NAME", f"{base}/default")):
        assert old in script, f"Debian's init script changed: no {old!r}"
        script = script.replace(old, new)
    (base / "postgrey.init").write_text(script)
    postgrey_uid = pwd.getpwnam("postgrey").pw_uid

    def init(action: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", str(base / "postgrey.init"), action], capture_output=True, text=True,
                              timeout=60, env=base_env())

    pid = None
    try:
        started = init("start")  # returns: nothing of ours keeps its output pipes open
        assert started.returncode == 0, started.stderr
        pid = int((base / "postgrey.pid").read_text())  # written before start returned
        assert answers_on(port)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert ask(s, client_address="192.0.2.5") == \
                "action=DEFER_IF_PERMIT Greylisted, see http://postgrey.schweikert.ch/help/example.net.html"
        forwarders = _children(pid)
        assert len(forwarders) == 1, forwarders
        assert _uid(pid) == postgrey_uid and _uid(forwarders[0]) == postgrey_uid
        listener = f"socket:[{_listening_inode(port)}]"
        held = [os.readlink(fd) for fd in Path(f"/proc/{forwarders[0]}/fd").iterdir()]
        assert listener not in held, held

        assert init("reload").returncode == 0
        time.sleep(1.1)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert ask(s, client_address="192.0.2.5").startswith("action=PREPEND X-Greylist: delayed 1 seconds")

        stopped = init("stop")
        assert stopped.returncode == 0, stopped.stderr
        assert not Path(f"/proc/{pid}").exists()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{forwarders[0]}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # it reads the last lines, then ends
        assert not Path(f"/proc/{forwarders[0]}").exists()
        pid = None
        with socket.socket() as again:  # the port is free for the next start
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(("127.0.0.1", port))
    finally:
        if pid is None and (base / "postgrey.pid").exists():
            pid = int((base / "postgrey.pid").read_text())  # failed before it was read
        if pid is not None and Path(f"/proc/{pid}").exists():
            os.kill(pid, 15)
        shutil.rmtree(base, ignore_errors=True)


def test_decisions_are_logged_in_postgreys_words_and_the_rest_in_ours():
    from greylist.adapters.postgrey import postgrey_line

    request = {"client_address": "192.0.2.5", "client_name": "0", "sender": "", "recipient": "b@example.net",
               "queue_id": "4F2A"}

    def line(**fields) -> str:
        return postgrey_line("greylist-postgrey", {"ip": "192.0.2.5", "age": 0, **fields,
                                                   "_request": fields.get("_request", request)}).decode()

    # client_name "0" and an empty sender are left out, as Perl's truth leaves them out
    assert line(verdict="pass", reason="auto-whitelisted") == \
        "4F2A: action=pass, reason=client AWL, client_address=192.0.2.5, recipient=b@example.net\n"
    assert "reason=client whitelist," in line(verdict="pass", reason="whitelisted")
    assert "reason=recipient whitelist," in line(verdict="pass", reason="whitelisted-recipient")
    assert "reason=early-retry (17s missing)," in line(verdict="tempfail", reason="too-soon", retry_in=16.2)
    cut = line(verdict="tempfail", reason="new", truncated="helo_name")
    assert cut.endswith(", recipient=b@example.net, truncated=helo_name\n")  # a long attribute, cut, said
    assert ignored_by_logcheck([cut.rstrip("\n")]) or not LOGCHECK_RULES.exists()
    assert line(verdict="tempfail", reason="new", _request={**request, "sender": "a\x01\u00e9\nx@y"}) == \
        "4F2A: action=greylist, reason=new, client_address=192.0.2.5, sender=a%01%C3%A9%0Ax@y, " \
        "recipient=b@example.net\n"  # as Net::Server writes postgrey's log: never a second line
    # the nightly clean-up (greylist.adapters.nightly), as postgrey words its own
    cleaning = [postgrey_line("greylist-postgrey", {"expire": "started", "pid": 7}).decode().rstrip("\n"),
                postgrey_line("greylist-postgrey", {"expire": "done", "scanned": 10, "removed": 4}).decode()
                .rstrip("\n")]
    assert cleaning == ["cleaning up old entries...", "cleaning main database finished. before: 10, after: 6"]
    assert ignored_by_logcheck(cleaning) == cleaning or not LOGCHECK_RULES.exists()
    # what postgrey has no words for: our own line (and never the request's dict in it)
    for ours in (line(verdict="pass", shadow="tempfail", reason="new"),
                 line(verdict="pass", reason="store-error"), line(verdict="error", error="no client_address")):
        assert ours.startswith("greylist-postgrey: ip=192.0.2.5 ") and "_request" not in ours, ours


def test_a_postgrey_database_left_unmigrated_is_said_at_start_with_the_command(tmp_path):
    """The binary swapped and the migration forgotten: every client postgrey knew would be
    greylisted again, and nothing said why. The start says it, with the command; it says
    nothing where there is no postgrey.db, or where our database holds data already."""
    (tmp_path / "postgrey.db").write_bytes(b"\0" * 4096)

    def start_log(*extra: str) -> str:
        port = free_port()
        proc = ours(tmp_path, port, *extra)
        try:  # answered: it is serving, its start's lines written (its port answers before that)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                assert ask(s, client_address="192.0.2.9").startswith("action=")
        finally:
            stop(proc)
        return proc.stderr.read()

    log = start_log()
    warning = next(line for line in log.splitlines() if "warning=" in line)
    assert "is new: the clients postgrey knew are greylisted again" in warning
    assert f"greylist migrate postgrey://{tmp_path} sqlite://{tmp_path}/greylist.sqlite" in warning
    from greylist.core.policy import Record
    from greylist.stores import open_store

    store = open_store(f"sqlite://{tmp_path}/greylist.sqlite")  # as a migration leaves it
    store.put("awl|192.0.2.5", Record(time.time(), time.time(), 5))
    store.close()
    assert "warning=" not in start_log()
    (tmp_path / "greylist.sqlite").unlink()
    (tmp_path / "postgrey.db").unlink()
    assert "warning=" not in start_log()
    (tmp_path / "postgrey.db").write_bytes(b"")
    assert "warning=" not in start_log(f"--store=sqlite://{tmp_path}/other.sqlite")  # not --dbdir's file


def test_a_port_past_65535_is_a_clear_error_not_a_traceback():
    with pytest.raises(PostgreyError, match="a port up to 65535, not '999999'"):
        parse(["--inet=999999"])
    out = subprocess.run([*command("greylist"), "postgrey", "--inet=127.0.0.1:70000", "--user=root"],
                         capture_output=True, text=True, timeout=20, env=base_env())
    assert out.returncode == 1 and "ERROR: --inet takes [HOST:]PORT" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_store_url_of_no_kind_we_have_stops_the_start():
    """It started, and passed every request ungreylisted (store unusable, on_error pass)."""
    out = subprocess.run([*command("greylist"), "postgrey", "--inet=127.0.0.1:1", "--store=sqlte:///x.db",
                          "--user=root"], capture_output=True, text=True, timeout=20, env=base_env())
    assert out.returncode == 1 and "ERROR: --store: unknown store URL 'sqlte:///x.db'" in out.stderr, out.stderr


def test_quiet_logs_no_decision_but_every_error_as_postgrey_does(tmp_path):
    """postgrey's -q is its log level 1: no action line at all, greylist or pass, and -v does
    not undo it in either order. Ours dropped passes only, and with them the passes that
    a failing store let through (on_error pass): a store down passed every client with
    nothing in the log but the one line that said so first."""
    def log_of(dbdir: Path, *requests: dict) -> list[str]:
        port = free_port()
        proc = start([*command("greylist"), "postgrey", "-q", "-v", f"--inet=127.0.0.1:{port}", f"--dbdir={dbdir}",
                      *(["--user", "root"] if os.geteuid() == 0 else [])], port)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                for attrs in requests:
                    assert ask(s, **attrs).startswith("action=")
        finally:
            stop(proc)
        return [line for line in proc.stderr.read().splitlines() if "started=" not in line and "listening" not in line]

    greylisted = {"client_address": "192.0.2.5"}
    assert log_of(tmp_path, greylisted, greylisted, {"client_address": "192.0.2.7", "recipient": "postmaster@x.org"},
                  {"request": "garbage"}) == \
        ["greylist-postgrey: verdict=error error=\"not an smtpd_access_policy request\""]
    (tmp_path / "not-a-directory").write_text("")
    failing = log_of(tmp_path / "not-a-directory", greylisted, {"client_address": "192.0.2.6"})
    assert "store unusable at start" in failing[0]
    assert [line.count("reason=store-error") for line in failing[1:]] == [1, 1], failing
    assert all("on_error=pass" in line and "Not a directory" in line for line in failing)

    def quiet(*options: str) -> bool:
        return parse(["--inet=10023", *options]).quiet

    assert quiet("-q", "-v") and quiet("-v", "-q") and quiet("--quiet") and not quiet("-v") and not quiet()


@pytest.mark.skipif(not Path(POSTGREY).exists(), reason="needs Debian's postgrey (apt-get install postgrey)")
def test_a_client_auto_whitelisted_is_logged_in_postgreys_words_even_when_quiet():
    """postgrey says "whitelisted: NAME[ADDRESS]" when a client's passes reach
    --auto-whitelist-clients, at its log level 1, so -q keeps it (and logcheck reports it):
    an admin sees which clients skip greylisting from then on. Ours said nothing."""
    if os.geteuid() != 0:
        pytest.skip("postgrey runs as its own user: needs root to start it here")
    t0 = 1_800_000_000
    requests = []
    for i, (ip, name) in enumerate([("192.0.2.5", "mx.example.org"), ("2001:db8::25", "unknown"),
                                    ("198.51.100.7", "")]):
        requests += [dict(t=t0 + 10 * i, client_address=ip, client_name=name, sender=f"s{i}@example.org"),
                     dict(t=t0 + 400 + 10 * i, client_address=ip, client_name=name, sender=f"s{i}@example.org"),
                     dict(t=t0 + 500 + 10 * i, client_address=ip, client_name=name, sender=f"t{i}@example.org")]
    answers, logs = answers_of_both(requests, ["-q", "--auto-whitelist-clients=1"])
    assert answers["ours"] == answers["postgrey"]
    assert [answer.split()[0] for answer in answers["ours"]] == ["action=DEFER_IF_PERMIT", "action=PREPEND",
                                                                  "action=DUNNO"] * 3  # the third: client AWL
    assert logs["ours"] == logs["postgrey"] == [
        "whitelisted: mx.example.org[192.0.2.5]", "whitelisted: unknown[2001:DB8:0:0:0:0:0:25]",
        "whitelisted: 198.51.100.7"]


def test_under_journald_each_line_carries_its_priority_as_postgreys_syslog_lines_do(tmp_path):
    """Under systemd (the contrib unit) stderr is journald's stream, which names itself in
    JOURNAL_STREAM; unmarked, every line was info, so `journalctl -p err` and a syslog's
    mail.err never showed a failing store. Lines now begin with the priority postgrey's
    Net::Server gives its own (journald takes the mark off): a decision notice, a client
    auto-whitelisted warning, an error err. Where stderr is anything else, no mark."""
    def lines(journal: bool) -> list[str]:
        read, write = os.pipe()
        st = os.fstat(write)
        stream = f"{st.st_dev}:{st.st_ino}" if journal else f"{st.st_dev}:{st.st_ino + 1}"
        port, dbdir = free_port(), tmp_path / ("journal" if journal else "pipe")
        dbdir.mkdir()
        proc = subprocess.Popen([*command("greylist"), "postgrey", f"--inet=127.0.0.1:{port}", f"--dbdir={dbdir}",
                                 "--auto-whitelist-clients=1", "--accept-test-time",
                                 *(["--user", "root"] if os.geteuid() == 0 else [])],
                                env=base_env(JOURNAL_STREAM=stream), stdout=subprocess.DEVNULL, stderr=write)
        os.close(write)
        try:
            assert answers_on(port)
            t0 = 1_800_000_000
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                assert ask(s, t0, client_address="192.0.2.5").startswith("action=DEFER_IF_PERMIT")
                assert ask(s, t0 + 301, client_address="192.0.2.5").startswith("action=PREPEND")
                assert ask(s, request="garbage") == "action=DUNNO"
        finally:
            stop(proc)
        with os.fdopen(read) as f:
            return [line for line in f.read().splitlines() if "listening on" not in line]

    marked = lines(journal=True)
    assert [line[:3] for line in marked] == ["<6>", "<5>", "<4>", "<4>", "<3>"], marked
    assert marked[1].startswith("<5>action=greylist, reason=new")
    assert marked[2] == "<4>whitelisted: mx.example.org[192.0.2.5]"
    assert marked[4].startswith("<3>greylist-postgrey: verdict=error")
    plain = lines(journal=False)
    assert len(plain) == 5 and not any(line.startswith("<") for line in plain), plain


def test_a_lines_priority_is_postgreys_and_its_mark_comes_off_for_syslog():
    from greylist.adapters.logwriter import INFO, prefixed, priority_of
    from greylist.adapters.policyd import priority

    assert priority({"ip": "192.0.2.5", "verdict": "tempfail", "reason": "new"}) == 5
    assert priority({"verdict": "pass", "reason": "passed", "whitelisted_after": 5}) == 4
    assert priority({"expire": "started"}) == priority({"reloaded": "whitelists and store"}) == 4
    assert priority({"verdict": "pass", "reason": "new", "store_warning": "3 held rows not written"}) == 4
    assert priority({"verdict": "pass", "reason": "store-error", "error": "disk full", "on_error": "pass"}) == 3
    assert priority({"verdict": "pass", "whitelist_error": "cannot read"}) == 3
    assert priority({"started": "127.0.0.1:10023"}) == 6
    two = prefixed(b"whitelisted: 192.0.2.5\naction=pass, reason=triplet found\n", 4)
    assert two == b"<4>whitelisted: 192.0.2.5\n<4>action=pass, reason=triplet found\n"
    assert [priority_of(line) for line in two.splitlines(keepends=True)] == \
        [(4, b"whitelisted: 192.0.2.5\n"), (4, b"action=pass, reason=triplet found\n")]
    assert priority_of(b"greylist postgrey: listening\n") == (INFO, b"greylist postgrey: listening\n")
    assert priority_of(b"<x>odd\n") == (INFO, b"<x>odd\n")
