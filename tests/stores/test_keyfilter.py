"""The key filter that spares a holding SQLite store its queries for keys it never had.

It may say "maybe" for a key that is absent (a query follows, as before); it must
never say "absent" for a key the file holds, however it grew and whoever wrote.
"""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from greylist.core.policy import Record
from greylist.stores import open_store
from greylist.stores import sqlite as sqlite_store
from greylist.stores.base import text_key
from greylist.stores.keyfilter import MIN_CAPACITY, KeyFilter

keys = st.one_of(st.text(max_size=40), st.binary(max_size=20))


@given(st.lists(keys, max_size=300), st.lists(keys, max_size=300))
def test_every_key_added_is_found(added, others):
    kf = KeyFilter()
    for key in added:
        kf.add(key)
    assert all(key in kf for key in added)
    assert kf.count == len(added)


def test_it_grows_in_layers_without_losing_a_key_and_rules_out_nearly_every_other():
    kf = KeyFilter()
    added = [f"10.0.{n >> 8 & 255}.{n & 255}|s{n}@example.org|r@example.net" for n in range(3 * MIN_CAPACITY)]
    for key in added:
        kf.add(key)
    assert len(kf.layers) == 2  # 65,536 keys, then a layer for twice as many
    assert all(key in kf for key in added)
    absent = sum(f"absent{n}" in kf for n in range(20000))
    assert absent < 20000 * 0.04  # "maybe" for a few percent of absent keys, not more


def queries(store) -> int:
    return store.ops.get("query", 0)


def test_a_holding_store_asks_the_file_for_no_new_key_once_its_filter_is_built(tmp_path):
    path = tmp_path / "g.db"
    seed = open_store(f"sqlite://{path}")
    for n in range(300):
        seed.put(f"old{n}", Record(1.0, 1.0, 0))
    seed.close()
    store = open_store(f"sqlite://{path}")
    store.hold_commits(60)
    n = 0
    while store.known is None:  # built a few keys a decision
        with store.transaction():
            store.get(f"new{n}")
        n += 1
    assert n == 300 // sqlite_store.BUILD_STEP + 1
    before = queries(store)
    with store.transaction():
        assert store.get("never-seen") is None
        assert store.get("old7") == Record(1.0, 1.0, 0)  # a key it holds: read, as always
    assert queries(store) == before + 1
    store.close()


def test_a_server_that_creates_the_database_keeps_its_filter(tmp_path):
    """Creating the database (WAL mode, the table) moves SQLite's data_version as another
    writer's commit does; taken for one, the new filter was dropped at the next window
    and every lookup was a query for the next second (half a benchmark's requests)."""
    store = open_store(f"sqlite://{tmp_path}/g.db")
    store.hold_commits(60)
    for n in range(3):
        with store.transaction():
            store.get_or_add(f"new{n}", Record(1.0, 1.0, 0))
        store.flush()  # a window ends: the next begins a read snapshot and looks for others
    with store.transaction():
        assert store.get("new0") == Record(1.0, 1.0, 0)  # the window's read snapshot begins
    assert store.known is not None and store.others_wrote == float("-inf")
    before = queries(store)
    with store.transaction():
        assert store.get("never-seen") is None  # ruled out by the filter: no query
        assert store.get("new1") == Record(1.0, 1.0, 0)
    assert queries(store) == before + 1
    store.close()


def test_its_own_writes_are_read_back_once_written(tmp_path):
    store = open_store(f"sqlite://{tmp_path}/g.db")
    store.hold_commits(60)
    for n in range(3):  # the first window creates the table
        with store.transaction():
            store.get(f"k{n}")
            store.put(f"k{n}", Record(float(n), float(n), 0))
        store.flush()
    assert store.known is not None and not store.held
    with store.transaction():
        assert [store.get(f"k{n}") for n in range(3)] == [Record(float(n), float(n), 0) for n in range(3)]
    store.close()


def test_another_writer_is_seen_at_once_though_the_filter_never_had_its_key(tmp_path, monkeypatch):
    """A qmail front end (or greylist expire) on the same file writes: the filter is
    dropped at the next snapshot and rebuilt, and the key it never heard of is read."""
    monkeypatch.setattr(sqlite_store, "QUIET", 0.0)  # built again at once
    path = tmp_path / "g.db"
    mine = open_store(f"sqlite://{path}")
    mine.hold_commits(60)
    mine.quiet = 0.0
    with mine.transaction():
        mine.get("warm-up")  # builds the filter: the table is empty
    assert mine.known is not None
    theirs = open_store(f"sqlite://{path}")
    theirs.put("theirs", Record(5.0, 6.0, 1))
    with mine.transaction():
        assert mine.get("theirs") is None  # the window's snapshot was taken before they wrote
    mine.flush()  # the window ends
    with mine.transaction():
        assert mine.get("theirs") == Record(5.0, 6.0, 1)
    assert mine.building is None and mine.known is not None  # built again, with their key
    theirs.put("later", Record(7.0, 7.0, 0))
    mine.flush()
    with mine.transaction():  # a new snapshot: dropped again, read again
        assert mine.get("later") == Record(7.0, 7.0, 0)
    theirs.close()
    mine.close()


def test_keys_held_when_a_rebuild_begins_are_in_the_new_filter(tmp_path):
    path = tmp_path / "g.db"
    mine = open_store(f"sqlite://{path}")
    mine.hold_commits(60)
    mine.quiet = 0.0
    with mine.transaction():
        mine.put("held", Record(1.0, 1.0, 0))  # held: not in the file yet
    theirs = open_store(f"sqlite://{path}")
    theirs.put("x", Record(2.0, 2.0, 0))  # forces a rebuild at mine's next snapshot
    with mine.transaction():
        mine.get("y")
    assert mine.known is not None and mine.held
    mine.flush()  # now in the file
    with mine.transaction():
        assert mine.get("held") == Record(1.0, 1.0, 0)
    theirs.close()
    mine.close()


operations = st.lists(st.one_of(
    st.tuples(st.just("read"), st.integers(0, 12)),
    st.tuples(st.just("write"), st.integers(0, 12)),
    st.tuples(st.just("theirs"), st.integers(0, 12)),
    st.tuples(st.just("delete"), st.integers(0, 12)),
    st.tuples(st.just("flush"), st.just(0)),
    st.tuples(st.just("round"), st.just(0)),  # a server in rounds writes what its decisions owe
), max_size=60)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations)
@example([("write", 1), ("flush", 0), ("read", 1)])  # its own write, read back from the file
@example([("write", 1), ("write", 2), ("theirs", 3), ("write", 4), ("read", 3)])  # theirs, read in a batch
@pytest.mark.parametrize("in_rounds", [False, True])
def test_a_holding_store_reads_what_its_snapshot_holds_whoever_wrote(tmp_path_factory, monkeypatch, in_rounds, steps):
    """Reads through the filter against the same reads without it: the holding store's
    own writes first, else a query in the same snapshot. Another connection writes and
    deletes at any point, a rebuild included (two keys a decision); in rounds, the
    batch's rows are written when a round ends, not by the decisions."""
    monkeypatch.setattr(sqlite_store, "BUILD_STEP", 2)
    monkeypatch.setattr(sqlite_store, "QUIET", 0.0)  # built again as soon as it is dropped
    monkeypatch.setattr(sqlite_store, "HELD_ROWS", 3)  # batches written a row a decision:
    monkeypatch.setattr(sqlite_store, "DRAIN_STEP", 1)  # reads in the batch's write transaction
    path = tmp_path_factory.mktemp("kf") / "g.db"
    mine = open_store(f"sqlite://{path}")
    mine.hold_commits(60, in_rounds)
    mine.quiet = 0.0
    with mine.transaction():
        mine.get("k0")  # creates the file's table
    mine.flush()
    with mine.transaction():
        mine.get("k0")
    assert mine.known is not None  # the steps start with a filter, as a running server does
    theirs = sqlite3.connect(path, isolation_level=None, timeout=0.5)
    clock = 1.0
    for op, n in steps:
        key = f"k{n}"
        clock += 1.0
        if op == "read":
            with mine.transaction():
                got = mine.get(key)
                held = next((w[key][1] for w in (mine.decision, mine.held, mine.draining) if w and key in w), None)
                if held is not None:
                    expected = held
                else:
                    row = mine.db.execute("SELECT first_seen, last_seen, passes FROM greylist WHERE key = ?",
                                          (text_key(key),)).fetchone()
                    expected = Record(*row) if row else None
            assert got == expected, (op, key)
        elif op == "write":
            with mine.transaction():
                mine.get(key)
                mine.put(key, Record(clock, clock, 0))
        elif op in ("theirs", "delete") and mine.draining is not None:
            mine.flush()  # a batch holds the write lock until written: they wait (the server's timer ends it)
        if op == "theirs":
            theirs.execute("INSERT OR REPLACE INTO greylist VALUES (?, ?, ?, 0)", (key, clock, clock))
        elif op == "delete":
            theirs.execute("DELETE FROM greylist WHERE key = ?", (key,))
        elif op == "flush":
            mine.flush()
        elif op == "round":
            mine.write_owed()
    theirs.close()
    mine.close()


def test_while_others_keep_writing_no_filter_is_built_and_no_decision_pays_for_one(tmp_path):
    """qmail front ends on the same file commit all the time: each commit drops the
    filter, and builds never finished would cost every decision a scan step. After
    one comes back before a build is done, the next waits twice as long."""
    path = tmp_path / "g.db"
    mine = open_store(f"sqlite://{path}")
    mine.hold_commits(60)
    theirs = open_store(f"sqlite://{path}")
    with mine.transaction():
        mine.get("first")  # a first look: no writer seen yet, so a filter is begun
    assert mine.building is not None or mine.known is not None
    for n in range(5):
        theirs.put(f"t{n}", Record(1.0, 1.0, 0))
        mine.flush()
        with mine.transaction():
            assert mine.get(f"t{n}") == Record(1.0, 1.0, 0)
        assert mine.building is None and mine.known is None  # dropped, and not begun again
    assert mine.quiet == sqlite_store.QUIET  # no build was cut short: nothing doubled
    mine.others_wrote -= sqlite_store.QUIET  # a second of quiet
    mine.flush()  # the window ends: its next snapshot looks again
    with mine.transaction():
        mine.get("x")
    assert mine.known is not None  # the table is small: built in one step
    theirs.close()
    mine.close()


def test_a_build_cut_short_by_another_writer_waits_twice_as_long_next_time(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "BUILD_STEP", 2)
    path = tmp_path / "g.db"
    theirs = open_store(f"sqlite://{path}")
    for n in range(10):
        theirs.put(f"t{n}", Record(1.0, 1.0, 0))
    mine = open_store(f"sqlite://{path}")
    mine.hold_commits(60)
    with mine.transaction():
        mine.get("a")  # a first look: building, two keys a decision
    assert mine.building is not None
    theirs.put("cut", Record(1.0, 1.0, 0))
    mine.flush()
    with mine.transaction():
        mine.get("b")
    assert mine.building is None and mine.quiet == 2 * sqlite_store.QUIET
    theirs.close()
    mine.close()


def test_updating_a_key_the_file_holds_does_not_grow_the_filter(tmp_path):
    """A returning client's triplet and tally are written at every pass: counted as new
    keys each time, the filter grew two bytes a write for as long as the server ran."""
    store = open_store(f"sqlite://{tmp_path}/g.db")
    store.hold_commits(60)
    for n in range(3):
        with store.transaction():
            store.get(f"k{n}")
            store.put(f"k{n}", Record(1.0, 1.0, 0))
    store.flush()  # the first window created the table
    with store.transaction():
        store.get("k0")
    assert store.known is not None
    added = store.known.count
    for when in range(2, 50):
        with store.transaction():
            record = store.get("k1")
            store.put("k1", Record(record.first_seen, float(when), record.passes + 1))
        if when % 10 == 0:
            store.flush()
    with store.transaction():
        store.get("new")
        store.put("new", Record(1.0, 1.0, 0))
        store.put("new", Record(1.0, 2.0, 0))
    with store.transaction():
        store.put("new", Record(1.0, 3.0, 0))  # held from the decision before
    assert store.known.count == added + 1
    store.close()
