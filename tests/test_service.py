"""The greylisting service on every store, with an injected clock: every reason,
whitelists, failures, shadow mode, per-client settings and the log line."""

from __future__ import annotations

import shutil
import time

import pytest
from hypothesis import given, settings, strategies as st

from greylist.config import ConfigError, load
from greylist.core.policy import PASS, TEMPFAIL
from greylist.service import Connection, Greylister, log_line, quoted_line
from greylist.stores import open_store
from greylist.stores.base import Store, StoreError


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "file", "sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "redis":
        return request.getfixturevalue("redis_url")
    return {"memory": "memory://", "file": f"file://{tmp_path}/store",
            "sqlite": f"sqlite://{tmp_path}/greylist.db"}[request.param]


def service(store_url: str, clock: Clock, **flags: str) -> Greylister:
    config = load({"store": store_url, "delay": "60", **flags}, {})
    store = open_store(store_url)  # one store for the service's life, as policyd and serve keep it
    return Greylister(config, store, clock=clock)


def reasons(g: Greylister, clock: Clock, steps, conn=None) -> list[tuple[str, str]]:
    out = []
    for at in steps:
        clock.now = at
        o = g.decide(conn or Connection("192.0.2.1"))
        out.append((o.verdict.action, o.verdict.reason))
    return out


def test_every_policy_reason_on_every_store(store_url):
    clock = Clock()
    g = service(store_url, clock)
    t = clock.now
    assert reasons(g, clock, [t, t + 30, t + 61, t + 3600]) == [
        (TEMPFAIL, "new"), (TEMPFAIL, "too-soon"), (PASS, "passed"), (PASS, "known")]


def test_tcprules_variables_skip_the_store(tmp_path):
    clock = Clock()
    g = Greylister(load({"store": f"file://{tmp_path}/none"}, {}), clock=clock)
    assert g.decide(Connection("192.0.2.1", relay=True)).verdict.reason == "relayclient"
    assert g.decide(Connection("192.0.2.1", whitelisted=True)).verdict.reason == "whitelisted"
    assert not (tmp_path / "none").exists()


def test_client_whitelist_by_network_and_verified_name(store_url, tmp_path):
    listed = tmp_path / "clients"
    listed.write_text("198.51.100.0/24\ngoogle.com\n")
    clock = Clock()
    g = service(store_url, clock, whitelist=str(listed))
    assert g.decide(Connection("198.51.100.7")).verdict.reason == "whitelisted"
    verified = Connection("203.0.113.9", "mail-wr1-f41.google.com", host_verified=True)
    assert g.decide(verified).verdict.reason == "whitelisted"
    assert g.decide(Connection("203.0.113.10", "google.com.evil.example", host_verified=True)
                    ).verdict.reason == "new"
    # a PTR name the client controls is its own claim: ignored, and the log says why
    claimed = g.decide(Connection("203.0.113.11", "mx.google.com"))
    assert claimed.verdict.reason == "new" and "not verified" in claimed.fields()["hostname_ignored"]
    trusting = service(store_url, Clock(), whitelist=str(listed), hostname_verified="1")
    assert trusting.decide(Connection("203.0.113.12", "mx.google.com")).verdict.reason == "whitelisted"


def test_recipient_whitelist_and_triplet_keys(store_url, tmp_path):
    listed = tmp_path / "rcpts"
    listed.write_text("postmaster@\n")
    clock = Clock()
    g = service(store_url, clock, key="triplet", whitelist_recipients=str(listed), auto_whitelist="2")
    o = g.decide(Connection("192.0.2.1", "", "a@example.org", "Postmaster@example.net"))
    assert o.verdict.reason == "whitelisted-recipient" and o.key is None
    steps = []
    for i, rcpt in enumerate(["b@example.net", "c@example.net", "d@example.net"]):
        conn = Connection("192.0.2.1", "", "a@example.org", rcpt)
        # passes after waiting count at most once an hour, as postgrey counts them
        steps += reasons(g, clock, [clock.now + 1, clock.now + 100, clock.now + 200], conn)
        clock.now += 1800
    # counted at the first pass (t+100) and at the third (an hour later): whitelisted from then on
    assert steps == [(TEMPFAIL, "new"), (PASS, "passed"), (PASS, "known")] * 2 + [
        (TEMPFAIL, "new"), (PASS, "passed"), (PASS, "auto-whitelisted")]
    clock.now += 1
    o = g.decide(Connection("192.0.2.1", "", "z@example.org", "d@example.net"))
    assert o.verdict.reason == "auto-whitelisted"
    assert o.fields()["key"] == "192.0.2.1|z@example.org|d@example.net"


def test_unreadable_whitelist_is_logged_and_greylisting_still_applies(store_url, tmp_path):
    g = service(store_url, Clock(), whitelist=str(tmp_path / "missing"))
    o = g.decide(Connection("192.0.2.1"))
    assert o.verdict.reason == "new" and "cannot read whitelist" in o.fields()["whitelist_error"]


class BrokenStore(Store):
    """A store whose server went away: every operation raises StoreError."""

    closed = 0

    def transaction(self):
        raise StoreError("connection refused")

    def close(self):
        BrokenStore.closed += 1


@pytest.mark.parametrize("on_error,action", [("pass", PASS), ("tempfail", TEMPFAIL)])
def test_store_failure_follows_on_error(on_error, action):
    g = Greylister(load({"on_error": on_error, "store": "memory://"}, {}), BrokenStore())
    o = g.decide(Connection("192.0.2.1"))
    assert (o.verdict.action, o.verdict.reason) == (action, "store-error")
    assert o.fields()["error"] == "connection refused" and o.fields()["on_error"] == on_error


def test_a_failed_store_is_opened_again_at_the_next_decision(tmp_path):
    """(A long-lived server's, once it has rested: see the test of STORE_RETRY.)"""
    blocker = tmp_path / "blocker"
    blocker.write_text("")  # a file where the store's directory should be: ENOTDIR
    g = Greylister(load({"store": f"file://{blocker}/store"}, {}), keep_store=False)
    assert g.decide(Connection("192.0.2.1")).verdict.reason == "store-error"
    blocker.unlink()
    assert g.decide(Connection("192.0.2.1")).verdict.reason == "new"


def test_a_bug_of_ours_is_logged_as_one_and_never_passes():
    class Buggy(BrokenStore):
        def transaction(self):
            raise KeyError("oops")

    g = Greylister(load({"on_error": "pass", "store": "memory://"}, {}), Buggy())
    o = g.decide(Connection("192.0.2.1"))
    assert (o.verdict.action, o.verdict.reason) == (TEMPFAIL, "internal-error")
    assert o.fields()["error"].startswith("internal error KeyError")


def test_shadow_mode_records_as_enforcing_but_lets_everyone_through(store_url):
    clock = Clock()
    g = service(store_url, clock, mode="shadow")
    t = clock.now
    seen = []
    for at in (t, t + 30, t + 61):
        clock.now = at
        o = g.decide(Connection("192.0.2.1"))
        assert o.verdict.action == PASS
        f = o.fields()
        seen.append((f["verdict"], f["shadow"], f["reason"]))
    assert seen == [("pass", "tempfail", "new"), ("pass", "tempfail", "too-soon"),
                    ("pass", "pass", "passed")]
    # the same store: shadow wrote what enforcing would have
    enforcing = Greylister(load({"store": store_url}, {}), g._store, clock=clock)
    clock.now += 1
    assert enforcing.decide(Connection("192.0.2.1")).verdict.reason == "known"


def test_shadow_mode_covers_store_errors_too():
    g = Greylister(load({"on_error": "tempfail", "mode": "shadow", "store": "memory://"}, {}),
                   BrokenStore())
    o = g.decide(Connection("192.0.2.1"))
    assert o.verdict.action == PASS and o.shadow.reason == "store-error"


def test_per_client_settings_beat_the_service_configuration(store_url):
    clock = Clock()
    g = service(store_url, clock)
    slow = Connection("192.0.2.1", settings={"GREYLIST_DELAY": "600"})
    assert reasons(g, clock, [clock.now, clock.now + 61], slow) == [(TEMPFAIL, "new"), (TEMPFAIL, "too-soon")]
    shadow = Connection("192.0.2.2", settings={"GREYLIST_MODE": "shadow"})
    assert g.decide(shadow).shadow.reason == "new"
    with pytest.raises(ConfigError, match="GREYLIST_DELAY"):
        g.decide(Connection("192.0.2.3", settings={"GREYLIST_DELAY": "soon"}))


def test_the_log_line_has_fixed_fields_and_cannot_be_forged():
    g = Greylister(load({"store": "memory://"}, {}), open_store("memory://"), clock=Clock())
    o = g.decide(Connection("192.0.2.1", "", "evil\n@x greylist-wrap: ip=1.2.3.4", "b@example.net"))
    line = log_line("greylist-spp", o.fields())
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert line.startswith(b"greylist-spp: ip=192.0.2.1 from=\"evil\\x0a@x")
    assert b" verdict=tempfail reason=new age=0 retry_in=60 " in line


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["ip", "from", "to", "verdict", "age", "error"]),
                       st.one_of(st.text(max_size=12), st.floats(allow_nan=True), st.integers()), max_size=6))
def test_the_whole_line_check_quotes_exactly_as_value_by_value(fields):
    """Property: the fast check never lets through a line that a value needed quoting in."""
    assert log_line("greylist-policyd", fields) == quoted_line("greylist-policyd", fields)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1"]),
                          st.floats(0, 7200)), max_size=12),
       st.sampled_from(["enforce", "shadow"]))
def test_shadow_and_enforcing_reach_the_same_verdicts(steps, mode):
    """Property: shadow mode's would-be verdicts are enforcing's verdicts, step by step."""
    clocks = Clock(), Clock()
    enforcing = Greylister(load({"store": "memory://"}, {}), open_store("memory://"), clock=clocks[0])
    other = Greylister(load({"store": "memory://", "mode": mode}, {}), open_store("memory://"),
                       clock=clocks[1])
    for ip, gap in steps:
        for c in clocks:
            c.now += gap
        a, b = enforcing.decide(Connection(ip)), other.decide(Connection(ip))
        assert (a.verdict.action, a.verdict.reason) == (b.enforced.action, b.enforced.reason)
        assert mode == "enforce" or b.verdict.action == PASS


def test_decide_does_not_read_the_real_clock(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: (_ for _ in ()).throw(AssertionError("real clock")))
    clock = Clock(5000.0)
    g = Greylister(load({"store": "memory://"}, {}), open_store("memory://"), clock=clock)
    assert g.decide(Connection("192.0.2.1")).verdict.retry_in == 60


@pytest.mark.parametrize("write", ["write_owed", "flush"])
def test_a_store_failing_as_it_writes_held_rows_is_closed_and_a_bug_is_not_hidden(tmp_path, monkeypatch, write):
    """write_owed (a server's loop round is over) and flush (the window's timer): a store
    failure closes the store, as in a decision, and the decisions of its rest follow
    on_error and log the failure (a full disk used to be silent, every retry greylisted
    as new); it is opened again after the rest. Anything else is our bug, raised to the
    loop, which logs it."""
    greylister = Greylister(load({"store": f"sqlite://{tmp_path}/g.db", "key": "ip"}, {}),
                            clock=lambda: 1000.0, commit_window=60, in_rounds=True)
    greylister.decide(Connection("192.0.2.1"))
    store = greylister._store
    assert store.in_rounds and store.pending

    def failing(*_wait):
        raise StoreError("disk full")

    monkeypatch.setattr(store, write, failing)
    store.owed = 8  # the round's decisions left rows of a batch to write
    getattr(greylister, write)()
    assert greylister._store is None
    resting = greylister.decide(Connection("192.0.2.1"))
    assert (resting.verdict.action, resting.verdict.reason) == (PASS, "store-error")
    assert resting.fields()["error"] == "disk full" and resting.fields()["on_error"] == "pass"
    greylister._store_tried_at = 0.0  # the rest is over
    assert greylister.decide(Connection("192.0.2.1")).verdict.action == TEMPFAIL  # reopened, decided
    assert greylister._store.pending
    monkeypatch.setattr(greylister._store, write, lambda *_wait: 1 / 0)
    greylister._store.owed = 8
    with pytest.raises(ZeroDivisionError):
        getattr(greylister, write)()
    greylister.close()


def test_a_server_leaves_a_failing_store_alone_for_a_while_and_answers_at_once(tmp_path, monkeypatch):
    """After a store failure a long-lived server's decisions follow on_error without
    trying the store for a second, then 2, 4, 8, at most 10 while it keeps failing (a
    failure a minute after the last starts at a second again); SIGHUP ends the rest.
    (Every decision used to try: a hung Redis held the server's every client 100 ms a
    decision.) A wrapper, which decides once, always tries."""
    import greylist.service as service

    now = [1000.0]
    monkeypatch.setattr(service.time, "monotonic", lambda: now[0])
    missing = tmp_path / "missing"
    config = load({"store": f"sqlite://{missing}/g.db", "key": "ip"}, {})
    server = Greylister(config, commit_window=0.2)
    opened: list[str] = []
    real_open = server._open
    monkeypatch.setattr(server, "_open", lambda url: opened.append(url) or real_open(url))

    def decide() -> dict:
        outcome = server.decide(Connection("192.0.2.1"))
        assert outcome.verdict.reason == "store-error" and outcome.verdict.action == PASS
        return outcome.extra

    first = decide()
    assert len(opened) == 1 and "store_retry_in" not in first
    resting = decide()
    assert len(opened) == 1 and resting["store_retry_in"] == 1.0 and resting["error"] == first["error"]
    rests = []
    for _ in range(6):  # each retry that fails doubles the rest, up to STORE_RETRY_MAX
        rests.append(decide()["store_retry_in"])
        now[0] += rests[-1]
        decide()
    assert rests == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0] and len(opened) == 7
    missing.mkdir()
    now[0] += 10
    assert server.decide(Connection("192.0.2.1")).verdict.reason == "new" and len(opened) == 8
    server.close()
    shutil.rmtree(missing)
    now[0] += 61
    decide()  # fails again, a minute after the last failure: a second's rest, not ten
    assert decide()["store_retry_in"] == 1.0 and len(opened) == 9
    server.reload()  # SIGHUP: the admin may have mended it
    decide()
    assert len(opened) == 10

    wrapper = Greylister(config, keep_store=False)
    for _ in range(2):
        assert wrapper.decide(Connection("192.0.2.1")).verdict.reason == "store-error"
    assert "store_retry_in" not in wrapper.decide(Connection("192.0.2.1")).extra


def test_decisions_a_failing_store_could_not_write_are_each_counted_once_in_the_failing_line(tmp_path):
    """A server without loop rounds (greylist serve) writes a held batch a few rows a decision,
    so a full disk fails inside a decision; the store is closed, and its close cannot write
    the rows held meanwhile either. The failing decision's line must say how many decisions
    were lost, each counted once: the close's count took the batch's place (1,024 rows
    unsaid), and the rows it could not write were counted twice (as they failed, and as
    the store closed)."""
    import sqlite3

    greylister = Greylister(load({"store": f"sqlite://{tmp_path}/g.db", "key": "ip"}, {}),
                            clock=lambda: 1000.0, commit_window=60)
    greylister.decide(Connection("10.0.0.0"))
    with sqlite3.connect(tmp_path / "g.db", isolation_level=None) as db:
        # the disk is full from the batch's 20th step on (it writes its last rows first), and
        # for the rows held meanwhile
        db.execute("CREATE TRIGGER filled BEFORE INSERT ON greylist WHEN NEW.key GLOB '*10.0.3.1??*' "
                   "OR NEW.key GLOB '*10.0.4.*' BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END")
    decided = 1
    while True:
        outcome = greylister.decide(Connection(f"10.0.{decided >> 8}.{decided & 255}"))
        decided += 1
        if outcome.verdict.reason == "store-error":
            break
        assert decided < 3000
    assert greylister._store is None  # closed, resting
    said = outcome.extra["store_warning"]
    counts = [int(part.split(" held rows not written")[0]) for part in said.split("; ")
              if " held rows not written" in part]
    with sqlite3.connect(tmp_path / "g.db") as db:
        stored = db.execute("SELECT COUNT(*) FROM greylist").fetchone()[0]
    assert stored + sum(counts) == decided, (stored, said)  # every decision, the failing one too


def test_a_bug_met_while_closing_the_store_is_said_not_swallowed(tmp_path, monkeypatch):
    """Closing writes what the store holds: a bug of ours there may lose those decisions,
    so it is said as one (a failing store's close is quiet: it has said what it lost)."""
    greylister = Greylister(load({"store": f"sqlite://{tmp_path}/g.db", "key": "ip"}, {}),
                            clock=lambda: 1000.0, commit_window=60)
    import sqlite3

    greylister.decide(Connection("192.0.2.1"))
    store = greylister._store
    monkeypatch.setattr(store, "flush", lambda *_: 1 / 0)
    said = greylister.close()
    assert any("internal error ZeroDivisionError closing the store" in line for line in said), said
    assert store.checkpointer is None  # its thread stopped and its connection closed all the same
    with pytest.raises(sqlite3.ProgrammingError):
        store.db.execute("SELECT 1")
