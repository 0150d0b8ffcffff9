"""greylist-wrap as a real subprocess with real pipes, as tcpserver runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import STANDIN, parse_log, wrapper_command, base_env
from simulator.commands import read_standin_report

SESSION = b"HELO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nRSET\r\nNOOP\r\nVRFY x\r\nQUIT\r\n"
EXPECTED = (b"220 mx.test cqgreylist - reconnect later\r\n250 mx.test\r\n250 ok\r\n"
            b"450 Rcpt to <> - you are greylisted try again\r\n451 you are greylisted try again\r\n"
            b"250 ready\r\n250 noop\r\n502 not implemented\r\n221 mx.test Bye\r\n")


def age_entry(store_dir: Path, ip: str, seconds: float) -> None:
    path = store_dir / ip.split(".")[0] / ip
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_new_client_gets_the_tempfail_dialogue(wrapper, store_dir):
    result = wrapper.run(stdin=SESSION)
    assert result.stdout == EXPECTED
    assert result.returncode == 0
    assert (store_dir / "192" / "192.0.2.10").exists()
    [log] = parse_log(result.stderr)
    assert log["ip"] == "192.0.2.10" and log["verdict"] == "tempfail" and log["reason"] == "new"
    assert float(log["decision_ms"]) >= 0 and "age" in log


def test_retry_after_delay_execs_the_program(wrapper, store_dir, tmp_path):
    wrapper.run()
    age_entry(store_dir, "192.0.2.10", 61)
    report = tmp_path / "report.txt"
    result = wrapper.run(stdin=b"MAIL FROM:<a@b>\r\nQUIT\r\n", STANDIN_REPORT=str(report),
                         TCPLOCALPORT="25")
    assert result.stdout == b"220 standin ESMTP\r\n250 ok\r\n221 standin bye\r\n"
    info = read_standin_report(report)
    # exec, not fork: the program has the wrapper's pid, its argv and environment unchanged
    [log] = parse_log(result.stderr)
    assert info["pid"] == int(log["pid"])
    assert info["argv"][1:] == ["arg1", "arg two"]
    assert info["env"]["TCPREMOTEIP"] == "192.0.2.10" and info["env"]["TCPLOCALPORT"] == "25"
    assert log["verdict"] == "pass" and log["reason"] == "passed"
    assert float(log["age"]) >= 61


def test_program_gets_default_sigpipe_and_sigxfsz(wrapper):
    """Python ignores SIGPIPE and SIGXFSZ; ignored signals survive exec unless we reset them."""
    result = wrapper.run(program=["/bin/grep", "SigIgn", "/proc/self/status"], RELAYCLIENT="")
    mask = int(result.stdout.split()[1], 16)
    assert not mask & (1 << (13 - 1)), "SIGPIPE still ignored"
    assert not mask & (1 << (25 - 1)), "SIGXFSZ still ignored"


def test_too_soon_is_tempfailed_again(wrapper):
    wrapper.run()
    log = parse_log(wrapper.run().stderr)[0]
    assert (log["verdict"], log["reason"]) == ("tempfail", "too-soon")
    assert 0 < float(log["retry_in"]) <= 60


@pytest.mark.parametrize("var", ["RELAYCLIENT", "WHITELISTED"])
def test_whitelisted_client_never_touches_the_store(tmp_path, var):
    from conftest import Wrapper

    missing = tmp_path / "no-such-store"
    w = Wrapper(f"file://{missing}", tmp_path)
    result = w.run(stdin=b"QUIT\r\n", **{var: ""})
    assert result.stdout.startswith(b"220 standin")
    assert not missing.exists()
    assert parse_log(result.stderr)[0]["reason"] == var.lower()


def test_variable_beats_run_script_flag(wrapper):
    """tcprules sets GREYLIST_DELAY per netblock; it overrides the run script's --delay."""
    wrapper.run(args=["--delay", "3600"])
    result = wrapper.run(args=["--delay", "3600"], GREYLIST_DELAY="0")
    assert parse_log(result.stderr)[0]["reason"] == "passed"


def test_enhanced_codes_in_the_dialogue(wrapper):
    result = wrapper.run(stdin=b"RCPT TO:<x@y>\r\nQUIT\r\n", args=["--enhanced-codes"],
                         GREYLIST_MESSAGE="Greylisted, see https://example.org/grey")
    assert b"450 4.7.1 Rcpt to <> - Greylisted, see https://example.org/grey in 60 s\r\n" in result.stdout


@pytest.mark.parametrize("ip,why", [(None, "not set"), ("../../etc/passwd", "not an IP"),
                                    ("1.2.3.4; rm -rf /", "not an IP"), ("", "not an IP")])
def test_missing_or_bad_tcpremoteip(wrapper, store_dir, ip, why):
    result = wrapper.run(ip=ip)
    assert result.stdout == b"421 mx.test service temporarily unavailable, closing transmission channel\r\n"
    assert result.returncode == 111
    assert why in parse_log(result.stderr)[0]["error"]
    assert list(store_dir.iterdir()) == []


@pytest.mark.parametrize("program", [["/nonexistent/qmail-smtpd"], [os.devnull]])
def test_program_missing_or_not_executable(wrapper, program):
    result = wrapper.run(program=program, GREYLIST_DELAY="0", RELAYCLIENT="")
    assert result.stdout.startswith(b"421 mx.test")
    assert result.returncode == 111
    assert b"Traceback" not in result.stdout + result.stderr
    [line] = parse_log(result.stderr)  # one line per connection, even now
    assert "cannot run" in line["error"] and line["verdict"] == "error"


def test_no_program_is_a_usage_error(wrapper):
    result = wrapper.run(program=[])
    assert result.stdout.startswith(b"421 ") and b"usage" in result.stderr


def test_bad_setting_answers_421_and_says_which(wrapper):
    result = wrapper.run(GREYLIST_DELAY="soon")
    assert result.stdout.startswith(b"421 ")
    assert "GREYLIST_DELAY" in parse_log(result.stderr)[0]["error"]


def test_a_store_url_of_no_kind_we_have_is_a_bad_setting_not_a_failing_store(wrapper):
    """A typo in the scheme passed every client ungreylisted (a store that failed, on_error
    pass), an error a connection; now it is the setting's error, as a bad delay is: 421."""
    result = wrapper.run(GREYLIST_STORE="sqlte:///var/lib/greylist.db")
    assert result.stdout.startswith(b"421 ")
    line = parse_log(result.stderr)[0]
    assert "unknown store URL" in line["error"] and "verdict" in line and line.get("reason") != "store-error"


def test_unwritable_store_fails_open_by_default(tmp_path):
    from conftest import Wrapper

    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    w = Wrapper(f"file://{blocker}", tmp_path)
    result = w.run()
    assert result.stdout.startswith(b"220 standin")
    log = parse_log(result.stderr)[0]
    assert (log["verdict"], log["reason"], log["on_error"]) == ("pass", "store-error", "pass")
    assert "cannot" in log["error"]
    closed = w.run(GREYLIST_ON_ERROR="tempfail", stdin=SESSION)
    assert closed.stdout == EXPECTED
    assert parse_log(closed.stderr)[0]["verdict"] == "tempfail"


def test_known_client_passes_even_if_the_disk_is_full(wrapper, store_dir):
    wrapper.run()
    age_entry(store_dir, "192.0.2.10", 120)
    cmd = wrapper.command + STANDIN
    code = ("import resource, os, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)); "
            "os.execv(sys.argv[1], sys.argv[1:])")
    result = subprocess.run([sys.executable, "-c", code] + cmd, input=b"QUIT\r\n",
                            env=wrapper.env(), capture_output=True, timeout=20)
    assert result.stdout.startswith(b"220 standin")
    assert parse_log(result.stderr)[0]["reason"] == "store-error"


HOSTILE = [
    (b"HELO " + b"x" * 1000 + b"\r\nQUIT\r\n", b"500 line too long\r\n221 mx.test Bye\r\n"),
    (b"HELO a\nRCPT TO:<b>\nQUIT\n", b"250 mx.test\r\n450 Rcpt to <> - you are greylisted try again\r\n221 mx.test Bye\r\n"),
    (b"HE\x00LO\r\nRCPT\x00TO\r\nQUIT\r\n", b"502 not implemented\r\n450 Rcpt to <> - you are greylisted try again\r\n221 mx.test Bye\r\n"),
    (b"\xff\xfe\xfd\r\n\xc3\x28 MAIL\r\nQUIT\r\n", b"502 not implemented\r\n502 not implemented\r\n221 mx.test Bye\r\n"),
    (b"HELO a\r\nMAIL FROM:<a@b", b"250 mx.test\r\n"),  # EOF mid-line: close quietly
    (b"", b""),
]


@pytest.mark.parametrize("stdin,replies", HOSTILE)
def test_hostile_input(wrapper, stdin, replies):
    result = wrapper.run(stdin=stdin)
    assert result.stdout == b"220 mx.test cqgreylist - reconnect later\r\n" + replies
    assert result.returncode == 0
    assert b"Traceback" not in result.stderr


def test_too_many_commands_closes(wrapper):
    result = wrapper.run(stdin=b"NOOP\r\n" * 500)
    assert result.stdout.endswith(b"421 mx.test too many commands, closing\r\n")
    assert result.stdout.count(b"250 noop") == 100


def test_idle_timeout_answers_421(wrapper):
    proc = subprocess.Popen(wrapper.command + STANDIN, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=wrapper.env(GREYLIST_TIMEOUT="1"))
    started = time.monotonic()
    proc.stdin.write(b"HELO a\r\n")
    proc.stdin.flush()
    out = proc.stdout.read()  # stdin stays open: only the idle timeout can end this
    proc.stdin.close()
    proc.wait(timeout=20)
    assert out.endswith(b"250 mx.test\r\n421 mx.test timeout\r\n")
    assert time.monotonic() - started < 15


def test_fifty_concurrent_connections_from_one_new_ip(wrapper, store_dir):
    procs = [subprocess.Popen(wrapper.command + STANDIN,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=wrapper.env(ip="203.0.113.50")) for _ in range(50)]
    results = [p.communicate(b"RCPT TO:<x@y>\r\nQUIT\r\n", timeout=60) for p in procs]
    reasons = []
    for (out, err), p in zip(results, procs):
        assert p.returncode == 0, err
        assert out == (b"220 mx.test cqgreylist - reconnect later\r\n"
                       b"450 Rcpt to <> - you are greylisted try again\r\n221 mx.test Bye\r\n")
        [log] = parse_log(err)
        assert "error" not in log
        reasons.append(log["reason"])
    assert set(reasons) <= {"new", "too-soon"} and "new" in reasons
    files = [p for p in (store_dir / "203").iterdir()]
    assert [f.name for f in files] == ["203.0.113.50"]


HEAVY = {"argparse", "logging", "tabulate", "redis", "asyncio", "re", "dataclasses", "typing",
         "inspect", "socket", "enum", "json", "subprocess", "sqlite3", "datetime", "urllib",
         "greylist.stores.memory", "greylist.stores.keyfilter", "greylist.stores.checkpointer"}


EXEC_PROBE = (
    "import os, sys\n"
    "def fake_exec(*a):\n"
    "    mods = sorted(sys.modules)\n"
    "    import json; print(json.dumps(mods)); sys.stdout.flush(); os._exit(0)\n"
    "os.execvp = fake_exec\n"
    "from greylist.adapters.wrap import main\n"
    "main(['/bin/true'])\n"
)


def modules_at_exec(env: dict[str, str]) -> tuple[set[str], dict[str, str]]:
    """The modules a fresh interpreter has loaded when the wrapper's pass path reaches exec,
    and the wrapper's log line."""
    result = subprocess.run([sys.executable, "-c", EXEC_PROBE], env=env, capture_output=True, timeout=20)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout)), parse_log(result.stderr)[0]


@pytest.mark.parametrize("kind", ["file", "sqlite", "redis"])
def test_pass_path_imports_nothing_heavy(kind, wrapper, store_dir, tmp_path, request):
    """A fresh interpreter running the pass path: none of the slow modules load."""
    from greylist.core.policy import Record
    from greylist.stores import open_store

    url = {"file": f"file://{store_dir}", "sqlite": f"sqlite://{tmp_path}/g.db"}.get(kind)
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
    with open_store(url) as store:  # a known client, so the wrapper takes the pass path
        store.put("192.0.2.10", Record(1000.0, 1000.0, 1), 3600)
    env = wrapper.env(GREYLIST_STORE=url, GREYLIST_MAX_AGE="100000d")
    modules, log = modules_at_exec(env)
    store_module = {"file": "greylist.stores.filetree", "sqlite": "greylist.stores.sqlite",
                    "redis": "greylist.stores.redisstore"}[kind]
    assert store_module in modules
    assert not HEAVY & modules, HEAVY & modules
    assert log["reason"] == "known"


def test_subnet_key_lets_a_farm_retry_from_another_host(wrapper, store_dir):
    first = wrapper.run(ip="192.0.2.10", GREYLIST_KEY="subnet", GREYLIST_DELAY="0")
    log = parse_log(first.stderr)[0]
    assert (log["reason"], log["key"]) == ("new", "192.0.2.0/24")
    retry = wrapper.run(ip="192.0.2.99", GREYLIST_KEY="subnet", GREYLIST_DELAY="0")
    assert parse_log(retry.stderr)[0]["reason"] == "passed"
    assert (store_dir / "192" / "192.0.2.0_24").exists()


def test_whitelist_file_networks_and_names(wrapper, store_dir, tmp_path):
    wl = tmp_path / "whitelist"
    wl.write_text("198.51.100.0/24\ngoogle.com\n")
    by_net = wrapper.run(ip="198.51.100.20", GREYLIST_WHITELIST=str(wl))
    by_name = wrapper.run(ip="203.0.113.5", GREYLIST_WHITELIST=str(wl), TCPREMOTEHOST="mail-a.google.com",
                          GREYLIST_HOSTNAME_VERIFIED="1")
    other = wrapper.run(ip="203.0.113.6", GREYLIST_WHITELIST=str(wl), TCPREMOTEHOST="mail.example",
                        GREYLIST_HOSTNAME_VERIFIED="1")
    unverified = wrapper.run(ip="203.0.113.7", GREYLIST_WHITELIST=str(wl), TCPREMOTEHOST="mx.google.com")
    assert [parse_log(r.stderr)[0]["reason"] for r in (by_net, by_name, other, unverified)] == \
        ["whitelisted", "whitelisted", "new", "new"]
    assert "not verified" in parse_log(unverified.stderr)[0]["hostname_ignored"]
    assert not (store_dir / "198").exists() and not (store_dir / "203" / "203.0.113.5").exists()


def test_missing_whitelist_is_logged_and_greylisting_goes_on(wrapper):
    result = wrapper.run(GREYLIST_WHITELIST="/nonexistent/whitelist")
    log = parse_log(result.stderr)[0]
    assert log["reason"] == "new" and "cannot read whitelist" in log["whitelist_error"]


def test_triplet_key_in_the_wrapper_is_a_clear_error(wrapper):
    result = wrapper.run(GREYLIST_KEY="triplet")
    assert result.stdout.startswith(b"421 ")
    assert "greylist-spp" in parse_log(result.stderr)[0]["error"]


def test_whitelist_lookup_imports_nothing_heavy(wrapper, tmp_path):
    wl = tmp_path / "whitelist"
    wl.write_text("198.51.100.0/24\n2001:db8::/32\nexample.org\n")
    for _ in range(2):  # the second run reads the compiled cache
        modules, log = modules_at_exec(wrapper.env(ip="198.51.100.3", GREYLIST_WHITELIST=str(wl)))
        assert log["reason"] == "whitelisted"
        assert "greylist.whitelist" in modules and not HEAVY & modules, HEAVY & modules


def test_help_lists_every_setting(wrapper):
    from greylist.config import SETTINGS

    result = subprocess.run(wrapper.command + ["--help"], capture_output=True, timeout=20)
    assert result.returncode == 0
    for _name, flag, env, *_ in SETTINGS:
        assert flag.encode() in result.stdout and env.encode() in result.stdout


@pytest.fixture
def read_only_tree(tmp_path):
    """A cqgreylist tree on a file system mounted read-only (needs root and mount rights)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and the right to mount a tmpfs")
    try:
        (mnt / "192").mkdir()
        known = mnt / "192" / "192.0.2.10"
        known.touch()
        os.utime(known, (time.time() - 3600,) * 2)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_read_only_store_fails_open_and_known_clients_still_pass(read_only_tree, tmp_path):
    """cqgreylist tempfailed every new client forever when it could not write its tree."""
    from conftest import Wrapper

    w = Wrapper(f"file://{read_only_tree}", tmp_path)
    for ip in ("192.0.2.10", "198.51.100.1"):
        result = w.run(ip=ip)
        assert result.stdout.startswith(b"220 standin"), (ip, result.stdout, result.stderr)
        log = parse_log(result.stderr)[0]
        assert log["reason"] == "store-error" and "Read-only file system" in log["error"], log
    closed = w.run(ip="198.51.100.1", GREYLIST_ON_ERROR="tempfail", stdin=SESSION)
    assert closed.stdout == EXPECTED


def test_directory_the_wrapper_may_not_write(tmp_path, store_dir):
    """Permissions: an immutable directory refuses even root (EPERM), as a wrong owner would."""
    from conftest import Wrapper

    (store_dir / "192").mkdir()
    if os.geteuid() != 0 or subprocess.run(["chattr", "+i", str(store_dir / "192")],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and chattr")
    try:
        result = Wrapper(f"file://{store_dir}", tmp_path).run(ip="192.0.2.44")
        assert result.stdout.startswith(b"220 standin")
        log = parse_log(result.stderr)[0]
        assert log["reason"] == "store-error" and "Operation not permitted" in log["error"]
    finally:
        subprocess.run(["chattr", "-i", str(store_dir / "192")], capture_output=True)


def test_shadow_mode_lets_a_new_client_through_and_logs_what_enforcing_would_do(wrapper, store_dir):
    result = wrapper.run(GREYLIST_MODE="shadow")
    assert result.stdout.startswith(b"220 standin")  # qmail-smtpd got the connection
    log = parse_log(result.stderr)[0]
    assert (log["verdict"], log["shadow"], log["reason"]) == ("pass", "tempfail", "new")
    assert (store_dir / "192" / "192.0.2.10").exists()  # recorded exactly as enforcing would
    log = parse_log(wrapper.run(GREYLIST_MODE="shadow").stderr)[0]
    assert (log["verdict"], log["shadow"], log["reason"]) == ("pass", "tempfail", "too-soon")
    log = parse_log(wrapper.run(GREYLIST_MODE="shadow", GREYLIST_DELAY="0").stderr)[0]
    assert (log["verdict"], log["shadow"], log["reason"]) == ("pass", "pass", "passed")


def test_whitelist_given_twice_counts_both_files(wrapper, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("192.0.2.0/24\n")
    b.write_text("198.51.100.\n")  # a partial address, as postgrey and tcprules write it
    args = ["--whitelist", str(a), "--whitelist", str(b)]
    reasons = [parse_log(wrapper.run(ip=ip, args=args).stderr)[0]["reason"]
               for ip in ("192.0.2.5", "198.51.100.5", "203.0.113.5")]
    assert reasons == ["whitelisted", "whitelisted", "new"]


def test_creating_a_missing_store_directory_is_logged(tmp_path):
    from conftest import Wrapper

    w = Wrapper(f"file://{tmp_path}/new/store", tmp_path)
    first = parse_log(w.run().stderr)[0]
    assert "created the missing store directory" in first["store_warning"]
    assert "store_warning" not in parse_log(w.run(ip="192.0.2.11").stderr)[0]


@pytest.mark.parametrize("content", [b"inf 0", b"1e308 0", b"nan 0", b"-5 -1"])
def test_an_absurd_entry_never_crashes_a_reply_and_delays_at_most_delay_plus_skew(wrapper, store_dir, content):
    entry = store_dir / "192" / "192.0.2.10"
    entry.parent.mkdir()
    entry.write_bytes(content)
    future = time.time() + 30 * 86400  # touch -d '+30 days'
    os.utime(entry, (future, future))
    result = wrapper.run(stdin=b"RCPT TO:<a@b>\r\nQUIT\r\n", GREYLIST_ENHANCED="1")
    assert result.stdout.startswith(b"220 mx.test cqgreylist")
    assert b"450 4.7.1 Rcpt to <> - you are greylisted try again in 60 s" in result.stdout
    assert parse_log(result.stderr)[0]["reason"] == "new"
