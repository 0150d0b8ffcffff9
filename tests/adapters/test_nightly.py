"""greylist postgrey's nightly clean-up: greylist expire as a child, in postgrey's window."""

from __future__ import annotations

import time

from greylist.adapters.eventloop import Loop
from greylist.adapters.nightly import MIN_GAP, NightlyExpiry, needs_expiry
from greylist.config import load
from greylist.core.policy import Record
from greylist.stores import open_store


def run_until(loop: Loop, done, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds

    def look() -> None:
        if done() or time.monotonic() > deadline:
            loop.stop()
        else:
            loop.call_later(0.02, look)

    loop.call_later(0, look)
    loop.run_forever()


def test_stale_entries_are_removed_by_a_child_in_postgreys_window_once_a_night(tmp_path):
    url = f"sqlite://{tmp_path}/g.db"
    now = time.time()
    store = open_store(url)
    store.put("stale-pending", Record(now - 3 * 86400, now - 3 * 86400, 0))  # past the 2-day retry window
    store.put("stale-known", Record(now - 90 * 86400, now - 40 * 86400, 3))  # silent over 35 days
    store.put("fresh", Record(now - 60, now - 60, 0))
    store.close()
    config = load({"store": url, "retry_window": "2d", "max_age": "35d"}, {})
    loop, lines = Loop(), []
    clock = [now]
    nightly = NightlyExpiry(loop, config, lines.append, clock=lambda: clock[0], hour=lambda t: 3,
                            check_every=0.05)
    nightly.start()
    try:
        run_until(loop, lambda: any(line.get("expire") == "done" for line in lines))
        assert [line["expire"] for line in lines] == ["started", "done"], lines
        assert lines[1]["scanned"] == 3 and lines[1]["removed"] == 2, lines
        store = open_store(url)
        assert [key for key, _ in store.scan()] == ["fresh"]
        store.close()
        run_until(loop, lambda: False, seconds=0.3)  # checks go on: not again within 23 hours
        assert len(lines) == 2
        clock[0] += MIN_GAP
        run_until(loop, lambda: len(lines) == 4)
        assert [line["expire"] for line in lines] == ["started", "done"] * 2
    finally:
        nightly.close()
        loop.close()


def test_outside_the_night_nothing_runs_and_a_failure_is_logged(tmp_path):
    loop, lines = Loop(), []
    config = load({"store": f"sqlite://{tmp_path}/missing/g.db"}, {})
    day = NightlyExpiry(loop, config, lines.append, hour=lambda t: 12, check_every=0.02)
    day.start()
    run_until(loop, lambda: False, seconds=0.3)
    day.close()
    assert lines == []
    night = NightlyExpiry(loop, config, lines.append, hour=lambda t: 2, check_every=0.02)
    night.start()
    try:
        run_until(loop, lambda: any(line.get("expire") == "failed" for line in lines))
        failed = lines[-1]
        assert failed["expire"] == "failed" and failed["exit"] != 0 and "no store" in failed["error"], lines
    finally:
        night.close()
        loop.close()


def test_only_stores_that_keep_stale_entries_are_cleaned():
    assert needs_expiry("sqlite:///var/lib/postgrey/greylist.sqlite") and needs_expiry("file:///var/x")
    assert not needs_expiry("redis://127.0.0.1:6379/0") and not needs_expiry("memory://")


def test_greylist_postgrey_cleans_its_sqlite_store_nightly_and_policyd_when_asked(tmp_path, monkeypatch):
    from greylist import admin
    from greylist.adapters import policyd, postgrey
    from greylist.adapters.policyd import PolicyServer, make_listener

    seen = {}

    def capture(listen, config, *positional, **options):
        seen.update(options)
        return 0

    monkeypatch.setattr(policyd, "serve", capture)  # both commands import it when they run
    assert postgrey.main(["--inet=127.0.0.1:0", f"--dbdir={tmp_path}"]) == 0
    assert seen["nightly_expiry"] is True
    for argv, expected in ((["policyd"], False), (["policyd", "--expire-nightly"], True)):
        seen.clear()
        assert admin.main([*argv, "--store", f"sqlite://{tmp_path}/g.db"]) == 0
        assert seen["nightly_expiry"] is expected  # greylist policyd: cron, unless asked
    for url, expected in ((f"sqlite://{tmp_path}/g.db", True), ("memory://", False)):
        listener, where = make_listener("127.0.0.1:0")
        server = PolicyServer(listener, load({"store": url}, {}), where, nightly_expiry=True)
        assert (server.nightly is not None) is expected
        server.loop.close()
        listener.close()
