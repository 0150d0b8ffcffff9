"""Log readers on sample lines of each format, and the counterfactual replay."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import datetime, timezone

import pytest
from hypothesis import given, strategies as st

from greylist.config import Config
from greylist.stores.memory import MemoryStore
from simulator.replay.formats import LogError, detect, parse, tai64n
from simulator.replay.replay import replay, rescale, retry_model
from simulator.scenario import load


def tai(unix: int, nanos: int = 0) -> str:
    return "@" + format((1 << 62) + 10 + unix, "016x") + format(nanos, "08x")


T0 = int(datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc).timestamp())


def test_tai64n_labels():
    assert tai64n(tai(T0, 500_000_000)[1:]) == T0 + 0.5
    assert tai64n("400000003c6b4d6a0c2fd0e4") == pytest.approx(1013665120.204460, abs=1e-6)


TCPSERVER = f"""{tai(T0)} tcpserver: status: 1/40
{tai(T0)} tcpserver: pid 101 from 192.0.2.1
{tai(T0)} tcpserver: ok 101 mx.example:198.51.100.1:25 :192.0.2.1::40001
{tai(T0 + 1)} tcpserver: pid 102 from 2001:db8::7
{tai(T0 + 2)} tcpserver: pid 103 from 203.0.113.9
{tai(T0 + 2)} tcpserver: deny 103 mx.example:198.51.100.1:25 :203.0.113.9::40002
{tai(T0 + 3)} qmail-smtpd: something else entirely
{tai(T0 + 4)} tcpserver: end 101 status 0
not a log line at all
{tai(T0 + 5)} tcpserver: pid 104 from 300.1.1.1
"""


def test_tcpserver_multilog():
    log = parse(io.StringIO(TCPSERVER), "auto")
    assert log.format == "tcpserver"
    assert log.events == [(T0, "192.0.2.1"), (T0 + 1, "2001:db8::7")]  # the denied one dropped
    assert [n for n, _ in log.bad] == [9, 10]
    assert log.lines == 10 and log.ignored == 6


def test_tcpserver_syslog_and_iso_stamps():
    text = ("Mar  2 09:00:00 mx tcpserver: pid 1 from 192.0.2.1\n"
            "2026-03-02T09:00:05.250+00:00 mx tcpserver: pid 2 from 192.0.2.2\n")
    log = parse(io.StringIO(text), "tcpserver", year=2026)
    assert log.events == [(T0, "192.0.2.1"), (T0 + 5.25, "192.0.2.2")]


def test_postfix_connect_lines_with_year_and_new_year_wrap():
    text = ("Dec 31 23:59:58 mx postfix/smtpd[26895]: connect from mail.example[192.0.2.1]\n"
            "Dec 31 23:59:59 mx postfix/smtpd[26895]: disconnect from mail.example[192.0.2.1]\n"
            "Jan  1 00:00:01 mx postfix/smtpd[26896]: connect from unknown[2001:db8::1]\n"
            "Jan  1 00:00:02 mx postfix/submission/smtpd[26897]: connect from x[192.0.2.3]\n"
            "Jan  1 00:00:03 mx postfix/smtpd[26898]: connect from x[not-an-ip]\n")
    log = parse(io.StringIO(text), "auto", year=2025)
    assert log.format == "postfix"
    new_year = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()
    assert log.events == [(new_year - 2, "192.0.2.1"), (new_year + 1, "2001:db8::1"),
                          (new_year + 2, "192.0.2.3")]
    assert log.bad == [(5, "not an IP address: 'not-an-ip'")]


def test_our_own_wrapper_lines():
    text = (f"{tai(T0)} greylist-wrap: pid=5 ip=192.0.2.1 verdict=tempfail reason=new age=0\n"
            f"{tai(T0 + 60)} greylist-wrap: pid=6 ip=192.0.2.1 verdict=pass reason=passed age=60\n"
            f"{tai(T0 + 61)} greylist-wrap: pid=7 verdict=error error=\"TCPREMOTEIP is not set\"\n"
            f"{tai(T0 + 62)} tcpserver: pid 8 from 192.0.2.9\n")
    log = parse(io.StringIO(text), "auto")
    assert log.format == "wrapper"
    assert log.events == [(T0, "192.0.2.1"), (T0 + 60, "192.0.2.1")]


def test_jsonl_and_csv():
    text = ('{"time": %d, "ip": "192.0.2.1", "sender": "a@b"}\n'
            '{"time": "2026-03-02T09:00:10Z", "ip": "::ffff:192.0.2.2"}\n'
            '{"time": "yesterday", "ip": "192.0.2.3"}\n[1, 2]\n{broken\n'
            '{"time": %d.5, "ip": "2001:db8::1"}\n{"time": %d, "ip": "192.0.2.4"}\n') % (T0, T0 + 20, T0 + 30)
    log = parse(io.StringIO(text), "jsonl")
    assert log.events == [(T0, "192.0.2.1"), (T0 + 10, "192.0.2.2"), (T0 + 20.5, "2001:db8::1"),
                          (T0 + 30, "192.0.2.4")]
    assert [n for n, _ in log.bad] == [3, 4, 5]
    with pytest.raises(LogError, match="cannot be read as jsonl"):
        parse(io.StringIO('{"time": 1}\nnope\n'), "jsonl")
    csv_text = f"time,ip,recipient\n{T0},192.0.2.1,x@y\n{T0 + 1},bad,x@y\n\n{T0 + 2},192.0.2.2\n"
    log = parse(io.StringIO(csv_text), "auto")
    assert log.format == "csv" and [ip for _, ip in log.events] == ["192.0.2.1", "192.0.2.2"]
    assert log.bad == [(3, "needs a valid time and ip")]


def test_mostly_garbage_stops_with_a_clear_message():
    garbage = "\n".join(f"{tai(T0)} tcpserver: pid {i} from 192.0.2.1" if i == 0 else "x" * i
                        for i in range(10))
    with pytest.raises(LogError, match="9 of 10 lines cannot be read as tcpserver"):
        parse(io.StringIO(garbage), "tcpserver")
    with pytest.raises(LogError, match="cannot tell the log format"):
        detect(["hello", "world"])


def logged(server):
    """Both classes of logged clients added up (the tests below are about retries, not classes)."""
    from simulator.metrics import ClassStats

    total = ClassStats("all", "legit")
    for stats in server.stats.values():
        for field in ("messages", "connections", "tempfails", "delivered", "given_up"):
            setattr(total, field, getattr(total, field) + getattr(stats, field))
        total.delays += stats.delays
    return total


def test_counterfactual_log_returns_count_as_retries():
    model = retry_model(load(), "postfix")
    events = [(T0, "192.0.2.1"), (T0 + 120, "192.0.2.1"), (T0 + 10, "192.0.2.2")]
    events.sort()
    server = replay(events, Config(delay=60), MemoryStore(), model)
    stats = logged(server)
    # 192.0.2.1: tempfailed, the log shows it back at +120 s (before Postfix's 300 s):
    # that connection passes and delivers both messages. 192.0.2.2 retries as Postfix would.
    assert stats.messages == 3 and stats.given_up == 0 and stats.delivered == 3
    assert sorted(stats.delays) == [120.0, pytest.approx(300.0, abs=300)]
    assert stats.connections == 4


def test_retry_model_none_uses_only_the_log():
    events = [(T0, "192.0.2.1"), (T0 + 10, "192.0.2.2"), (T0 + 120, "192.0.2.1")]
    server = replay(events, Config(delay=60), MemoryStore(), retry_model(load(), "none"))
    stats = logged(server)
    assert stats.delivered == 2 and stats.given_up == 1 and stats.connections == 3


def test_rescale_to_a_target_rate():
    events = [(float(i * 10), "192.0.2.1") for i in range(11)]  # 11 in 100 s
    scaled, factor = rescale(events, 11 / 50)
    assert factor == 0.5 and scaled[-1][0] == 50.0


def test_replay_command_end_to_end(tmp_path):
    log = tmp_path / "current"
    lines = [f"{tai(T0 + 30 * i)} tcpserver: pid {i} from 192.0.2.{i % 7}" for i in range(200)]
    lines.insert(5, "garbled")
    log.write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, "-m", "simulator.cli", "replay", str(log), "--json", "-",
                          "--quiet"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["run"]["logged_connections"] == 200 and report["run"]["bad_lines"] == 1
    assert "line 6: no timestamp" in out.stderr
    assert report["overall"]["legit_lost"] == 0
    compare = subprocess.run([sys.executable, "-m", "simulator.cli", "replay", str(log),
                              "--compare", "delay=60,3600"], capture_output=True, text=True)
    assert "delay=3600" in compare.stdout
    missing = subprocess.run([sys.executable, "-m", "simulator.cli", "replay", str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_our_own_log_replays_without_synthetic_retries(tmp_path):
    lines = [f"{tai(T0)} greylist-wrap: pid=1 ip=192.0.2.1 verdict=tempfail reason=new age=0",
             f"{tai(T0 + 400)} greylist-wrap: pid=2 ip=192.0.2.1 verdict=pass reason=passed age=400",
             f"{tai(T0 + 10)} greylist-wrap: pid=3 ip=192.0.2.2 verdict=tempfail reason=new age=0"]
    log = tmp_path / "current"
    log.write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, "-m", "simulator.cli", "replay", str(log), "--json", "-",
                          "--quiet"], capture_output=True, text=True)
    report = json.loads(out.stdout)
    assert report["run"]["retry_model"] == "none"
    legit, spam = report["classes"]
    # 192.0.2.1 came back after 400 s: a correspondent, delivered both times. 192.0.2.2 never
    # came back: counted as spam and, with no synthetic retries, stopped, as it was in reality
    assert (legit["class"], legit["messages"], legit["delivered"], legit["lost"]) == ("returning clients", 2, 2, 0)
    assert (spam["messages"], spam["stopped"]) == (1, 1)
    assert report["overall"]["spam_stopped_share"] == 1.0


def shadow_line(t: float, ip: str, shadow: str, reason: str) -> str:
    stamp = datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{stamp} greylist-wrap: pid=7 ip={ip} verdict=pass shadow={shadow} reason={reason} age=0\n"


SHADOW = "".join([
    shadow_line(T0, "192.0.2.1", "tempfail", "new"),
    shadow_line(T0 + 10, "192.0.2.1", "tempfail", "too-soon"),
    shadow_line(T0 + 100, "192.0.2.1", "pass", "passed"),
    shadow_line(T0 + 200, "192.0.2.2", "tempfail", "new"),   # never seen again
    shadow_line(T0 + 300, "192.0.2.3", "tempfail", "new"),
    shadow_line(T0 + 310, "192.0.2.3", "tempfail", "too-soon"),  # came back only too soon
    shadow_line(T0 + 400, "192.0.2.1", "pass", "known"),
])


def test_a_shadow_log_is_read_with_its_live_verdicts():
    log = parse(io.StringIO(SHADOW), "auto")
    assert log.format == "wrapper" and len(log.events) == 7 and len(log.shadow) == 7
    from simulator.replay.shadow import summarize

    s = summarize(log.shadow)
    assert s["would_tempfail"] == 5 and s["clients_would_tempfail"] == 3
    assert (s["clients_came_back_and_passed"], s["clients_came_back_too_soon_or_late"],
            s["clients_not_seen_again"]) == (1, 1, 1)
    assert s["not_seen_again_sample"] == ["192.0.2.2"]


def test_replay_of_a_shadow_log_reports_live_and_predicted(tmp_path):
    path = tmp_path / "current"
    path.write_text(SHADOW)
    result = subprocess.run([sys.executable, "-m", "simulator.cli", "replay", str(path), "--delay", "60"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "like postfix" in result.stdout  # a shadow log holds no retries: synthetic ones
    assert "live shadow decisions" in result.stdout
    assert "enforcing would have tempfailed" in result.stdout and "5 (71.4%)" in result.stdout
    report = json.loads(subprocess.run(
        [sys.executable, "-m", "simulator.cli", "replay", str(path), "--json", "-", "--quiet"],
        capture_output=True, text=True, timeout=60).stdout)
    assert report["run"]["shadow_log"]["clients_not_seen_again"] == 1


def test_greylist_serve_lines_replay_as_our_own_log():
    text = (f"{tai(T0)} tcpserver: status: 0/40\n"
            f"{tai(T0)} greylist-serve: pid=9 started=0:25 store=file:///x mode=enforce delay=60\n"
            f"{tai(T0 + 1)} tcpserver: pid 9 from 192.0.2.1\n"
            f"{tai(T0 + 1)} tcpserver: ok 9 mx:198.51.100.1:25 :192.0.2.1::4000\n"
            f"{tai(T0 + 1)} greylist-serve: pid=9 port=4000 ip=192.0.2.1 verdict=tempfail reason=new age=0\n"
            f"{tai(T0 + 70)} greylist-serve: pid=77 port=4001 ip=192.0.2.1 verdict=pass reason=passed age=69\n")
    log = parse(io.StringIO(text), "auto")
    assert log.format == "wrapper"
    assert log.events == [(T0 + 1, "192.0.2.1"), (T0 + 70, "192.0.2.1")]


TAI64NLOCAL = ("2026-03-02 10:00:00.123456789 tcpserver: status: 1/40\n"
               "2026-03-02 10:00:00.123456789 tcpserver: pid 101 from 192.0.2.1\n"
               "2026-03-02 10:00:01.500000000 tcpserver: pid 102 from 192.0.2.2\n")


def test_tai64nlocal_output_is_read_in_local_time_or_the_zone_given():
    from simulator.replay.formats import time_zone

    berlin = parse(io.StringIO(TAI64NLOCAL), "auto", tz=time_zone("Europe/Berlin"))
    assert berlin.format == "tcpserver" and [ip for _, ip in berlin.events] == ["192.0.2.1", "192.0.2.2"]
    assert berlin.events[0][0] == pytest.approx(T0 + 0.123456)  # 10:00 in Berlin is 09:00 UTC
    utc = parse(io.StringIO(TAI64NLOCAL), "auto", tz=time_zone("UTC"))
    assert utc.events[0][0] == pytest.approx(T0 + 3600.123456)


def test_replay_reads_tai64nlocal_in_the_machines_zone_by_default(tmp_path):
    import os

    log = tmp_path / "current.txt"
    log.write_text(TAI64NLOCAL)
    env = dict(os.environ, TZ="Europe/Berlin")
    report = json.loads(subprocess.run(
        [sys.executable, "-m", "simulator.cli", "replay", str(log), "--json", "-", "--quiet"],
        capture_output=True, text=True, timeout=60, env=env).stdout)
    assert report["run"]["logged_connections"] == 2 and report["run"]["format"] == "tcpserver"
    bad = subprocess.run([sys.executable, "-m", "simulator.cli", "replay", str(log), "--tz", "Mars/Olympus"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown time zone" in bad.stderr


POSTGREY_LOG = "\n".join([
    "Mar  2 09:00:00 mx postgrey[812]: Process Backgrounded",
    "Mar  2 09:00:00 mx postgrey[812]: action=greylist, reason=new, client_name=mx.example.org, "
    "client_address=192.0.2.5, sender=a@example.org, recipient=b@example.net",
    "Mar  2 09:00:05 mx postgrey[812]: action=greylist, reason=new, client_name=mx.example.org, "
    "client_address=192.0.2.5, sender=a@example.org, recipient=c@example.net",
    "Mar  2 09:06:00 mx postgrey[812]: action=pass, reason=triplet found, delay=360, client_name=mx.example.org, "
    "client_address=192.0.2.5, sender=a@example.org, recipient=b@example.net",
    "Mar  2 09:07:00 mx postgrey[812]: action=greylist, reason=new, client_name=unknown, "
    "client_address=203.0.113.9, sender=x@spam.example, recipient=b@example.net",
    "Mar  2 09:07:00 mx postgrey[812]: action=greylist, bogus line",
]) + "\n"


def test_postgreys_log_replays_with_its_envelope_and_its_own_retries(tmp_path):
    log = parse(io.StringIO(POSTGREY_LOG), "auto", year=2026)
    assert log.format == "postgrey" and len(log.events) == 4 and len(log.bad) == 1
    assert log.events[0] == (T0, "192.0.2.5", "a@example.org", "b@example.net")
    path = tmp_path / "mail.log"
    path.write_text(POSTGREY_LOG)
    report = json.loads(subprocess.run(
        [sys.executable, "-m", "simulator.cli", "replay", str(path), "--year", "2026", "--tz", "UTC",
         "--key", "triplet", "--delay", "300", "--json", "-", "--quiet"],
        capture_output=True, text=True, timeout=60).stdout)
    assert report["run"]["retry_model"] == "none"  # the log holds the real retries
    legit, spam = report["classes"]
    # the client 192.0.2.5 comes back (a correspondent): b@ after 6 min passes, c@ never
    # came back; the spammer's address is seen once: counted as spam, and stopped
    assert (legit["messages"], legit["delivered"], legit["lost"]) == (3, 2, 1)
    assert (spam["messages"], spam["stopped"]) == (1, 1)


def test_a_log_and_its_rotated_files_replay_as_one_in_any_order_compressed_or_not(tmp_path):
    """What logrotate leaves (Debian's mail.log, mail.log.1, mail.log.2.gz; bzip2 and xz
    where so set), given as the shell's mail.log* gives them, newest first: the same
    replay as the whole log in one file. An empty newest file is no error."""
    import bz2
    import gzip
    import lzma

    lines = POSTGREY_LOG.splitlines(keepends=True)
    whole = tmp_path / "whole.log"
    whole.write_text(POSTGREY_LOG)
    (tmp_path / "mail.log").write_text("")
    (tmp_path / "mail.log.1").write_text("".join(lines[4:]))
    (tmp_path / "mail.log.2.gz").write_bytes(gzip.compress("".join(lines[2:4]).encode()))
    (tmp_path / "mail.log.3.bz2").write_bytes(bz2.compress(lines[1].encode()))
    (tmp_path / "mail.log.4.xz").write_bytes(lzma.compress(lines[0].encode()))

    def replayed(*paths) -> dict:
        out = subprocess.run([sys.executable, "-m", "simulator.cli", "replay", *map(str, paths), "--year", "2026",
                              "--tz", "UTC", "--key", "triplet", "--delay", "300", "--json", "-", "--quiet"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    one = replayed(whole)
    rotated = replayed(*sorted(tmp_path.glob("mail.log*")))
    assert rotated["run"]["log"] == "mail.log, mail.log.1, mail.log.2.gz, mail.log.3.bz2, mail.log.4.xz"
    for part in ("run", "overall", "classes"):
        if part == "run":
            one[part].pop("log"), rotated[part].pop("log")
        assert rotated[part] == one[part], part
    assert one["run"]["logged_connections"] == 4


def test_a_log_through_a_pipe_is_read_once_compressed_or_not(tmp_path):
    """``simulate replay <(zcat ...)`` or ``<(cat mail.log.2.gz)``: a pipe can be read once;
    the file was opened twice (once for its first bytes) and the pipe's lines were lost."""
    import gzip
    import shlex

    (tmp_path / "mail.log.2.gz").write_bytes(gzip.compress(POSTGREY_LOG.encode()))
    (tmp_path / "mail.log").write_text(POSTGREY_LOG)
    out = subprocess.run(["bash", "-c", f"{shlex.join([sys.executable, '-m', 'simulator.cli', 'replay'])} "
                          f"<(cat {tmp_path}/mail.log.2.gz) <(cat {tmp_path}/mail.log) --year 2026 --json - --quiet"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["run"]["logged_connections"] == 8


def test_an_endless_line_is_read_in_part_and_the_lines_after_it_replayed(tmp_path):
    """A file with a line of megabytes (a binary file, or a log gone wrong): its first
    64 KiB are read (and found bad), the rest skipped, never held whole in memory."""
    from simulator.replay import formats

    lines = POSTGREY_LOG.splitlines(keepends=True)
    text = lines[1] + "x" * (3 * formats.MAX_LINE + 7) + "\n" + "".join(lines[2:])
    log = parse(io.StringIO(text), "postgrey", 2026)
    assert len(log.events) == 4 and log.lines == 6
    assert log.bad[0][0] == 2 and len(log.bad) == 2  # the long line, and the sample's bogus one
    read = list(formats._Lines(io.StringIO(text)))
    assert len(read) == 6 and max(map(len, read)) == formats.MAX_LINE


def test_rotated_files_across_a_new_year_line_up_and_a_yearless_log_is_never_in_the_future(tmp_path):
    """Syslog stamps have no year. Each file's first line is taken in the latest year that
    puts it in the past, so read in January, December's file is last year's and January's
    this year's: with this year for both (the old default), January came first."""
    from freezegun import freeze_time

    from simulator.replay.cli import read_logs

    december = tmp_path / "mail.log.1"
    december.write_text(POSTGREY_LOG.replace("Mar  2", "Dec 31"))
    january = tmp_path / "mail.log"
    january.write_text(POSTGREY_LOG.replace("Mar  2", "Jan  2"))
    with freeze_time("2027-01-10 12:00:00"):
        log = read_logs([str(january), str(december)], "auto", None, timezone.utc)
        crossing = parse(io.StringIO(POSTGREY_LOG.replace("Mar  2", "Dec 31").replace(
            "Dec 31 09:07", "Jan  1 09:07")), "auto", None, timezone.utc)
    stamps = [datetime.fromtimestamp(e[0], timezone.utc).strftime("%Y-%m-%d") for e in log.events]
    assert stamps == ["2026-12-31"] * 4 + ["2027-01-02"] * 4
    assert [datetime.fromtimestamp(e[0], timezone.utc).year for e in crossing.events] == [2026, 2026, 2026, 2027]
    assert parse(io.StringIO(POSTGREY_LOG), "auto", 2020, timezone.utc).events[0][0] == \
        datetime(2020, 3, 2, 9, tzinfo=timezone.utc).timestamp()  # --year says


def test_a_compressed_log_cut_short_replays_its_lines_up_to_the_cut_and_says_so(tmp_path):
    import gzip

    path = tmp_path / "mail.log.2.gz"
    data = gzip.compress(POSTGREY_LOG.encode() * 50)
    path.write_bytes(data[: len(data) // 2])  # a copy that did not finish
    out = subprocess.run([sys.executable, "-m", "simulator.cli", "replay", str(path), "--year", "2026",
                          "--json", "-", "--quiet"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"{path}: it ends early" in out.stderr and "replayed its lines up to there" in out.stderr
    assert 0 < json.loads(out.stdout)["run"]["logged_connections"] < 200


def test_postfix_log_with_rfc3339_stamps():
    """rsyslog's RFC 3339 stamps (RSYSLOG_FileFormat) and journald's short-iso: the zone is in the stamp."""
    text = ("2026-03-02T10:00:00.123456+01:00 mx postfix/smtpd[26895]: connect from a.example[192.0.2.1]\n"
            "2026-03-02T09:00:01Z mx postfix/smtpd[26896]: connect from unknown[2001:db8::1]\n"
            "2026-03-02T04:00:02-05:00 mx postfix/smtpd[26897]: disconnect from a.example[192.0.2.1]\n")
    log = parse(io.StringIO(text), "auto")
    assert log.format == "postfix"
    assert log.events == [(pytest.approx(T0 + 0.123456), "192.0.2.1"), (T0 + 1, "2001:db8::1")]


def test_clients_are_classified_by_behaviour_and_spam_retries_like_the_scenarios_bots():
    """Seen again after 5 min: a correspondent; seen once or rejected: spam, which retries
    like the scenario's spam sources, so a longer delay stops more of it."""
    from simulator.replay.replay import LEGIT, SPAM, returning, returning_share

    events = [(T0 + 3600 * i, "192.0.2.1") for i in range(6)]  # a correspondent, hourly
    events += [(T0 + 10 + i, f"198.51.100.{i}") for i in range(200)]  # 200 one-time clients
    events += [(T0 + 20, "203.0.113.9"), (T0 + 7200, "203.0.113.9")]  # back, but rejected
    events.sort()
    classes = returning(events, frozenset({"203.0.113.9"}))
    assert classes["192.0.2.1"] and not classes["198.51.100.3"] and not classes["203.0.113.9"]
    scenario = load()
    stopped = {}
    for delay in (60, 3600):
        server = replay(events, Config(delay=delay), MemoryStore(), retry_model(scenario, "postfix"),
                        spam_sources=scenario.of_kind("spam"), rejected=frozenset({"203.0.113.9"}))
        legit, spam = server.stats[LEGIT], server.stats[SPAM]
        assert legit.messages == 6 and spam.messages == 202
        assert legit.given_up == 0  # a correspondent retries as Postfix does: never lost
        stopped[delay] = spam.given_up / spam.messages
    assert 0.5 < stopped[60] < stopped[3600]
    # the correspondent's connections after the first quarter are all from an address seen
    # before; the one-time clients do not count
    assert returning_share(events, frozenset({"203.0.113.9"})) == 1.0


def test_postfix_rejections_mark_their_clients():
    text = ("Mar  2 09:00:00 mx postfix/smtpd[1]: connect from x[192.0.2.1]\n"
            "Mar  2 09:00:01 mx postfix/smtpd[1]: NOQUEUE: reject: RCPT from x[192.0.2.1]: 554 5.7.1 "
            "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org; "
            "from=<a@b> to=<c@d> proto=ESMTP helo=<x>\n"
            "Mar  2 09:00:02 mx postfix/smtpd[2]: NOQUEUE: reject: RCPT from y[192.0.2.2]: 450 4.7.1 "
            "Client host rejected: greylisted\n")
    log = parse(io.StringIO(text), "postfix", year=2026)
    assert log.rejected == {"192.0.2.1"}  # a 4xx is no rejection


def test_a_postfix_log_of_a_server_that_greylists_gets_no_invented_retries(tmp_path):
    text = ("Mar  2 09:00:00 mx postfix/smtpd[1]: connect from x[192.0.2.1]\n"
            "Mar  2 09:00:01 mx postfix/smtpd[1]: NOQUEUE: reject: RCPT from x[192.0.2.1]: 450 4.2.0 <b@example.net>: "
            "Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/example.net.html\n"
            "Mar  2 09:00:05 mx postfix/smtpd[2]: connect from y[192.0.2.2]\n")
    log = parse(io.StringIO(text), "postfix", year=2026)
    assert log.greylisted == 1 and not log.rejected
    path = tmp_path / "mail.log"
    path.write_text(text)
    report = json.loads(subprocess.run(
        [sys.executable, "-m", "simulator.cli", "replay", str(path), "--year", "2026", "--json", "-", "--quiet"],
        capture_output=True, text=True, timeout=60).stdout)
    assert report["run"]["retry_model"] == "none" and report["run"]["greylisting_rejections"] == 1


def test_our_policy_servers_lines_replay_with_their_envelopes():
    """greylist policyd's lines (one a recipient, with from= and to=) and greylist postgrey's
    shadow-mode lines through syslog (its --daemonize forwarder logs as postgrey[PID]): the
    events carry the envelope, quoted values read back; lines that decide nothing are ignored."""
    text = (
        "Mar  2 09:00:00 mx greylist[7]: greylist-policyd: started=127.0.0.1:10023 store=sqlite:///x\n"
        "Mar  2 09:00:01 mx greylist[7]: greylist-policyd: ip=192.0.2.1 from=a@example.org "
        "to=b@example.net verdict=tempfail reason=new age=0 retry_in=300\n"
        'Mar  2 09:00:02 mx greylist[7]: greylist-policyd: ip=192.0.2.2 from="odd \\"one\\"\\x07@example.org" '
        "to=c@example.net verdict=pass shadow=tempfail reason=new age=0\n"
        'Mar  2 09:00:03 mx greylist[7]: greylist-policyd: verdict=pass reason="not at RCPT (DATA)"\n'
        'Mar  2 09:00:04 mx greylist[7]: greylist-policyd: refused="connection limit" limit=4000\n'
        "Mar  2 09:05:02 mx postgrey[9]: greylist-postgrey: ip=192.0.2.1 from=a@example.org "
        "to=b@example.net verdict=pass shadow=pass reason=passed age=301\n")
    log = parse(io.StringIO(text), "auto", year=2026, tz=timezone.utc)
    assert log.format == "wrapper" and not log.bad and log.ignored == 3
    assert log.events == [(T0 + 1, "192.0.2.1", "a@example.org", "b@example.net"),
                          (T0 + 2, "192.0.2.2", 'odd "one"\x07@example.org', "c@example.net"),
                          (T0 + 302, "192.0.2.1", "a@example.org", "b@example.net")]
    assert log.shadow == [(T0 + 2, "192.0.2.2", "tempfail", "new"), (T0 + 302, "192.0.2.1", "pass", "passed")]


def test_a_log_mixing_lines_with_and_without_the_envelope_replays_connections():
    text = (f"{tai(T0)} greylist-wrap: pid=5 ip=192.0.2.1 verdict=tempfail reason=new age=0\n"
            f"{tai(T0 + 1)} greylist-policyd: ip=192.0.2.2 from=a@x to=b@y verdict=tempfail reason=new age=0\n")
    assert parse(io.StringIO(text), "auto").events == [(T0, "192.0.2.1"), (T0 + 1, "192.0.2.2")]


@given(st.dictionaries(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8),
                       st.text(max_size=40), max_size=6))
def test_our_log_lines_read_back_as_written(fields):
    """The reader is the writer's reverse (greylist.service.log_line), whatever a client put
    into a value: spaces, quotes, '=', backslashes, controls, any character."""
    from greylist.service import log_line
    from simulator.replay.formats import our_fields

    line = log_line("greylist-policyd", fields).decode("ascii")
    assert line.endswith("\n") and "\n" not in line[:-1]
    assert our_fields(line.removeprefix("greylist-policyd: ")) == fields


def test_replay_of_a_real_policy_servers_log_with_triplet_keys(tmp_path):
    """greylist policyd's own stderr, stamped as syslog stamps it, replayed with triplet keys."""
    from benchmarks.redis_server import free_port
    from conftest import base_env
    from simulator.commands import command
    import socket
    import time

    port = free_port()
    proc = subprocess.Popen([*command("greylist"), "policyd", "--listen", f"127.0.0.1:{port}", "--store",
                             f"sqlite://{tmp_path}/g.db", "--key", "triplet", "--delay", "1"],
                            env=base_env(), stderr=subprocess.PIPE, text=True)
    try:
        proc.stderr.readline(), proc.stderr.readline()  # started; listening on
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            for client, sender, wait in (("192.0.2.1", "a@example.org", 0), ("192.0.2.2", "c@example.org", 1.1),
                                         ("192.0.2.1", "a@example.org", 0)):
                time.sleep(wait)
                s.sendall(f"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={client}\n"
                          f"sender={sender}\nrecipient=b@example.net\n\n".encode())
                reply = b""
                while not reply.endswith(b"\n\n"):
                    reply += s.recv(4096) or b"\n\n"  # closed: the assertion below says so
                assert reply.startswith(b"action=")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    lines = [line for line in err.splitlines() if " ip=" in line]
    assert len(lines) == 3, err
    stamp = datetime.fromtimestamp(T0, timezone.utc)
    log = tmp_path / "mail.log"
    log.write_text("".join(f"{stamp:%b %d %H:%M}:{i * 2:02d} mx greylist[1]: {line}\n"
                           for i, line in enumerate(lines)))
    result = subprocess.run([sys.executable, "-m", "simulator.cli", "replay", str(log), "--key", "triplet",
                             "--delay", "1", "--tz", "UTC", "--year", "2026", "--json", "-", "--quiet"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)["run"]
    assert run["format"] == "wrapper" and run["logged_connections"] == 3 and run["bad_lines"] == 0
    assert run["retry_model"] == "none"  # an enforcing server's log holds its retries


def test_greylist_postgreys_own_lines_on_stderr_replay_as_postgreys():
    """greylist postgrey logs decisions in postgrey's words; on stderr (multilog) they have no
    postgrey[PID]: in front, and a Postfix queue id may come first. A decision postgrey has
    no words for (a store error) is in our own format, and a connection all the same."""
    text = (f"{tai(T0)} greylist-postgrey: started=127.0.0.1:10023 store=sqlite:///x\n"
            f"{tai(T0 + 1)} action=greylist, reason=new, client_name=unknown, client_address=192.0.2.1, "
            "sender=a@example.org, recipient=b@example.net\n"
            f"{tai(T0 + 400)} 4F2A: action=pass, reason=triplet found, delay=399, client_address=192.0.2.1, "
            "sender=a@example.org, recipient=b@example.net\n"
            # postgrey has no words for a store error: that decision is in our own format
            f"{tai(T0 + 500)} greylist-postgrey: ip=192.0.2.7 from=c@example.org to=b@example.net verdict=pass "
            'reason=store-error age=0 error="disk I/O error" on_error=pass decision_ms=0.02\n'
            f"{tai(T0 + 501)} greylist-postgrey: store_warning=\"12 held rows not written\"\n")
    log = parse(io.StringIO(text), "auto")
    assert log.format == "postgrey" and not log.bad and log.ignored == 2
    assert log.events == [(T0 + 1, "192.0.2.1", "a@example.org", "b@example.net"),
                          (T0 + 400, "192.0.2.1", "a@example.org", "b@example.net"),
                          (T0 + 500, "192.0.2.7", "c@example.org", "b@example.net")]
