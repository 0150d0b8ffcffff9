"""SQLite with commits held (long-lived servers): many decisions, one commit, nothing lost on close."""

from __future__ import annotations

import sqlite3
import time

import pytest

from greylist.config import load
from greylist.core.check import check
from greylist.core.policy import PASS, Record
from greylist.service import Connection, Greylister
from greylist.stores import open_store
from greylist.stores.base import StoreError


def holding(path, options: str = "", in_rounds: bool = False):
    """The store as a long-lived server keeps it: its writes held (for a minute here)."""
    store = open_store(f"sqlite://{path}{options}")
    store.hold_commits(60, in_rounds)
    return store


def committed(path) -> set[str]:
    """What another process (greylist show, say) sees."""
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT key FROM greylist")}


def test_held_decisions_are_committed_together_within_the_window(tmp_path):
    path = tmp_path / "g.db"
    store = open_store(f"sqlite://{path}")
    store.hold_commits(0.3)
    policy = load({"delay": "60"}, {}).policy
    check(store, "a", 1000.0, policy)
    assert store.pending
    check(store, "b", 1000.0, policy)
    assert committed(path) == set()  # one transaction, still open
    time.sleep(0.35)
    check(store, "c", 1000.0, policy)  # the window has passed: this decision writes all three
    assert committed(path) == {"a", "b", "c"}  # (a batch this small in one go)
    store.close()


def test_flush_and_close_commit_what_was_held(tmp_path):
    path = tmp_path / "g.db"
    store = holding(path)
    policy = load({}, {}).policy
    check(store, "a", 1000.0, policy)
    store.flush()
    assert committed(path) == {"a"} and not store.pending
    check(store, "b", 1000.0, policy)
    store.close()  # the wrapper's lean close too
    assert committed(path) == {"a", "b"}


def test_a_new_key_inside_the_transaction_is_one_insert_and_an_old_one_is_found(tmp_path):
    store = holding(tmp_path / "g.db")
    with store.transaction():
        assert store.get_or_add("k", Record(1.0, 1.0, 0)) is None
        assert store.get_or_add("k", Record(5.0, 5.0, 0)) == Record(1.0, 1.0, 0)
    store.close()


def test_a_failing_decision_rolls_back_and_the_next_one_starts_afresh(tmp_path):
    path = tmp_path / "g.db"
    store = holding(path)
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.put("x", Record(1.0, 1.0, 0))
            raise RuntimeError("a bug")
    assert not store.pending
    check(store, "y", 1000.0, load({}, {}).policy)
    store.flush()
    assert committed(path) == {"y"}
    store.close()


def test_other_writers_are_never_locked_out_while_writes_are_held(tmp_path):
    """The qmail front ends on the same file and greylist expire must get in while a busy
    policy server holds its writes: no lock is kept between flushes (it was, for the
    whole window, and a server busy without pause kept it for good: expire failed with
    "database is locked" and every wrapper on the file waited 2 s, then failed)."""
    path = tmp_path / "g.db"
    config = load({"store": f"sqlite://{path}", "key": "ip"}, {})
    greylister = Greylister(config, clock=lambda: 1000.0, commit_window=60)
    greylister.decide(Connection("192.0.2.1"))
    assert greylister.pending and committed(path) == set()
    other = open_store(f"sqlite://{path}?timeout=0.1")
    check(other, "z", 1000.0, config.policy)  # at once
    assert committed(path) == {"z"}
    greylister.flush()
    assert not greylister.pending and committed(path) == {"192.0.2.1", "z"}
    other.close()
    greylister.close()


def test_a_held_write_never_overwrites_what_another_writer_wrote_since_it_was_read(tmp_path):
    """Each held write is conditional on what its key held when read: a client another
    front end let through meanwhile stays let through, one it created stays created."""
    path = tmp_path / "g.db"
    policy = load({"delay": "60"}, {}).policy
    mine = holding(path)
    theirs = open_store(f"sqlite://{path}")
    check(theirs, "known", 1000.0, policy)
    check(theirs, "known", 1100.0, policy)        # passed after waiting: passes == 1
    check(mine, "known", 1200.0, policy)          # known: held update to passes == 2
    check(mine, "fresh", 1200.0, policy)          # new: held create
    check(theirs, "known", 1250.0, policy)        # they were first: passes == 2, last 1250
    check(theirs, "fresh", 1210.0, policy)        # they created it too, first seen 1210
    mine.flush()
    assert theirs.get("known") == Record(1000.0, 1250.0, 2)
    assert theirs.get("fresh") == Record(1210.0, 1210.0, 0)
    assert mine.ops.get("superseded") == 2
    check(mine, "known", 1300.0, policy)          # read afresh, and written
    mine.flush()
    assert theirs.get("known") == Record(1000.0, 1300.0, 3)
    mine.close()
    theirs.close()


def test_a_held_update_of_a_key_expire_deleted_meanwhile_is_written(tmp_path):
    """The nightly clean-up deletes a stale entry while the server holds the client's new
    first sighting on it: that sighting is written (as a conditional UPDATE it found no
    row, and the client's retry was greylisted once more)."""
    path = tmp_path / "g.db"
    policy = load({"delay": "60", "retry_window": "3600"}, {}).policy
    theirs = open_store(f"sqlite://{path}")
    check(theirs, "stale", 1000.0, policy)        # pending, and past its retry window by 9000
    mine = holding(path)
    assert check(mine, "stale", 10000.0, policy).reason == "new"  # held: first seen again at 10000
    assert theirs.delete("stale", expected=Record(1000.0, 1000.0, 0))  # greylist expire
    mine.flush()
    assert theirs.get("stale") == Record(10000.0, 10000.0, 0) and not mine.ops.get("superseded")
    mine.close()
    theirs.close()


def test_a_flush_that_fails_leaves_no_transaction_open_and_keeps_its_rows(tmp_path):
    """The service closes a store that failed; the handle must not keep a lock (the store
    opened next would wait on it for ever). A flush that waited for the write lock in
    vain (an admin command, a server stopping) keeps its rows held for the next try."""
    path = tmp_path / "g.db"
    store = holding(path, "?timeout=0.1")
    check(store, "a", 1000.0, load({}, {}).policy)
    blocker = sqlite3.connect(path, timeout=0.1, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError, match="locked"):
        store.flush()
    blocker.execute("ROLLBACK")
    blocker.close()
    assert not store.db.in_transaction and store.pending and list(store.held) == ["a"]
    check(store, "b", 1000.0, load({}, {}).policy)
    store.close()
    assert committed(path) == {"a", "b"}


def test_a_write_lock_held_elsewhere_keeps_the_rows_held_and_never_waits_for_it(tmp_path, monkeypatch):
    """Another connection's write lock (a qmail wrapper, an admin's sqlite3 shell) is never
    waited for by a holding server: its rows stay held and are read back, and are written
    once the lock is free. It used to wait the busy timeout (every client with it) and
    then lose the window's rows, so every retry was greylisted as new while the lock
    stayed. Here the busy timeout is an hour: waiting for it would hang the test."""
    from greylist.stores import sqlite as module

    monkeypatch.setattr(module, "LOCK_RETRY", 0.0)
    path = tmp_path / "g.db"
    store = holding(path, "?timeout=60")
    policy = load({"delay": "60"}, {}).policy
    check(store, "a", 1000.0, policy)
    blocker = sqlite3.connect(path, timeout=5, isolation_level=None)  # past a checkpoint's moment
    blocker.execute("BEGIN IMMEDIATE")
    store.flush(wait=False)
    assert store.pending and committed(path) == set()
    assert "holds the database's write lock" in "; ".join(store.warnings)
    store.warnings.clear()
    assert check(store, "a", 1070.0, policy).reason == "passed"  # its held first sighting, read back
    store.flush(wait=False)
    blocker.execute("ROLLBACK")
    blocker.close()
    assert committed(path) == set() and store.pending
    store.flush(wait=False)
    assert not store.pending and committed(path) == {"a"}
    assert "held rows written" in "; ".join(store.warnings)
    assert store.get("a") == Record(1000.0, 1070.0, 1)
    store.close()


@pytest.mark.parametrize("theirs", ["directory", "file", "directory, the file empty"])
def test_a_database_it_may_read_but_not_write_is_a_store_failure_when_it_is_opened(theirs):
    """A file root made (greylist migrate run as root, its chown forgotten) that the server's
    user may read but not write: SQLite opens it read-only without a word, and each held
    decision failed only at the flush, after its client was told to come back, so every
    retry was new again. A holding store now writes once as it is opened (rolled back).
    Where the user owns the file but not its directory, it says what to mend too; and an
    empty file (greylist migrate from an empty store) is said at once, where setting it
    up was retried for 10 s, at every connection of the qmail front ends, as "locked"."""
    import os
    import pwd
    import shutil
    import tempfile
    from pathlib import Path

    if os.geteuid() != 0:
        pytest.skip("needs root, to make a file another user may only read")
    nobody = pwd.getpwnam("nobody")
    directory = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own are root's alone (0700)
    os.chmod(directory, 0o755)
    path = directory / "g.db"
    if theirs == "file" or theirs == "directory":
        made = holding(path)  # by root, with an entry
        check(made, "b", 1000.0, load({}, {}).policy)
        made.close()
    else:
        path.touch()
    shutil.chown(path if theirs == "file" else directory, nobody.pw_uid)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - reported through the pipe
        said = "nothing"
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            store = open_store(f"sqlite://{path}")
            started = time.monotonic()
            try:
                said = f"read {store.get('a')}"  # reading works, where there is a table
            finally:
                if time.monotonic() - started > 2:
                    said = "waited"
            store.hold_commits(60)
            said = "opened"
        except StoreError as exc:
            said += f": {exc}"
        except BaseException as exc:  # noqa: BLE001 - told to the test
            said = f"the child failed: {exc!r}"
        finally:
            os.write(write, said.encode())
            os._exit(0)
    os.close(write)
    said = os.read(read, 4096).decode()
    os.waitpid(child, 0)
    os.close(read)
    if theirs == "directory":  # read, and found unwritable before a decision was held
        assert said.startswith("read None: "), said
    elif theirs != "file":
        assert said.startswith("nothing: "), said  # neither read nor opened, at once
    assert "attempt to write a readonly database" in said and "runs as nobody" in said and "chown nobody" in said
    shutil.chown(path, 0)
    holding(path).close()  # its owner still opens it
    shutil.rmtree(directory)


def test_a_write_lock_held_elsewhere_when_it_is_opened_is_no_failure(tmp_path):
    """The write it tries as it is opened never waits for another connection's write lock
    (an admin's sqlite3 shell in a transaction as the server starts), nor fails for it."""
    path = tmp_path / "g.db"
    holding(path).close()
    blocker = sqlite3.connect(path, timeout=0, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    store = holding(path)  # a busy timeout of 2 s: waiting would show
    assert time.monotonic() - started < 1.5
    blocker.execute("ROLLBACK")
    blocker.close()
    policy = load({"delay": "60"}, {}).policy
    check(store, "a", 1000.0, policy)
    store.close()
    assert committed(path) == {"a"}


def test_rows_held_past_the_bound_while_the_lock_stays_taken_are_dropped_oldest_first(tmp_path, monkeypatch):
    """Memory stays bounded however long another connection keeps the write lock: past
    MAX_HELD rows the oldest go (those clients are greylisted once more), said once, and
    how many in all when the lock is free again."""
    from greylist.stores import sqlite as module

    monkeypatch.setattr(module, "LOCK_RETRY", 0.0)
    monkeypatch.setattr(module, "MAX_HELD", 3)
    path = tmp_path / "g.db"
    store = holding(path, "?timeout=60")
    policy = load({}, {}).policy
    check(store, "z", 1000.0, policy)
    store.flush()
    blocker = sqlite3.connect(path, timeout=5, isolation_level=None)  # past a checkpoint's moment
    blocker.execute("BEGIN IMMEDIATE")
    for key in "abcde":
        check(store, key, 1000.0, policy)
    store.flush(wait=False)
    assert list(store.held) == ["c", "d", "e"] and store.ops["dropped"] == 2
    assert "2 held rows dropped" in "; ".join(store.warnings)
    store.warnings.clear()
    check(store, "f", 1000.0, policy)
    store.flush(wait=False)
    assert list(store.held) == ["d", "e", "f"] and store.ops["dropped"] == 3 and not store.warnings
    blocker.execute("ROLLBACK")
    blocker.close()
    store.flush(wait=False)
    assert committed(path) == {"z", "d", "e", "f"}
    assert "3 held rows written, 3 dropped" in "; ".join(store.warnings)
    store.close()


def test_a_busy_server_flushes_by_size_before_its_window_ends(tmp_path):
    """At HELD_ROWS the batch is written a few rows a decision (a thousand at once held
    every client for milliseconds); meanwhile every key reads as written."""
    from greylist.stores.sqlite import DRAIN_STEP, HELD_ROWS

    path = tmp_path / "g.db"
    store = holding(path)
    policy = load({}, {}).policy
    for n in range(HELD_ROWS):
        check(store, f"k{n}", 1000.0, policy)
    assert committed(path) == set()  # being written, a few rows a decision: nothing committed yet
    n = HELD_ROWS
    while len(committed(path)) < HELD_ROWS:  # DRAIN_STEP rows a decision, then the commit
        check(store, f"k{n}", 1000.0, policy)
        n += 1
        assert n < HELD_ROWS + HELD_ROWS // DRAIN_STEP + 2
        assert check(store, f"k{n - 1}", 1001.0, policy).reason == "too-soon"  # its own writes, read back
    assert store.pending  # the decisions since are held for the next window
    store.flush()
    assert len(committed(path)) == n
    store.close()


def test_a_backlog_left_by_another_writers_lock_is_caught_up_with_at_two_rows_a_decision(tmp_path, monkeypatch):
    """A decision makes at most two rows (a triplet's first pass and its client's
    auto-whitelist tally); DRAIN_STEP writes more than that of the batch, so rows held
    while another connection had the write lock are caught up with under any load. At
    two rows written a decision, a backlog never shrank while every decision made two,
    and held rows past MAX_HELD are dropped."""
    from greylist.stores import sqlite as module

    monkeypatch.setattr(module, "LOCK_RETRY", 0.0)
    path = tmp_path / "g.db"
    store = holding(path)
    policy = load({"delay": "60"}, {}).policy
    passing = 2 * module.HELD_ROWS
    for n in range(passing):  # triplets seen once, committed: each will pass, with its tally
        check(store, f"t{n}", 1000.0, policy, f"10.0.{n >> 8}.{n & 255}")
    store.flush()
    blocker = sqlite3.connect(path, timeout=5, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # an admin's sqlite3 shell, say
    for n in range(2 * module.HELD_ROWS):  # new triplets meanwhile: held, the lock taken
        check(store, f"new{n}", 1000.0, policy, "192.0.2.1")
    blocker.execute("ROLLBACK")
    blocker.close()
    backlog = len(store.held) + len(store.todo)
    assert backlog == 2 * module.HELD_ROWS and store.draining is None
    for n in range(passing):  # every decision now makes two rows
        before = len(store.held) + len(store.todo)
        assert check(store, f"t{n}", 1100.0, policy, f"10.0.{n >> 8}.{n & 255}").reason == "passed"
        assert len(store.held) + len(store.todo) <= before + 2
    left = len(store.held) + len(store.todo)
    assert left < backlog // 2  # shrinking (at two rows written a decision it stayed level)
    assert store.lock_dropped == 0
    store.flush()
    triplets = {key for key in committed(path) if not key.startswith("awl|")}
    assert triplets == {f"t{n}" for n in range(passing)} | {f"new{n}" for n in range(2 * module.HELD_ROWS)}
    assert store.get(f"t{passing - 1}").passes == 1  # nothing lost: the last pass, written
    store.close()


def test_a_server_in_rounds_has_the_rows_its_decisions_owe_written_at_the_round_end(tmp_path):
    """On the server's own event loop, a decision only counts the DRAIN_STEP rows it
    owes; write_owed (the end of the loop round) writes them together, after the
    round's answers, and commits the batch after its last row."""
    from greylist.stores.sqlite import DRAIN_STEP, HELD_ROWS, ROUND_ROWS

    path = tmp_path / "g.db"
    store = holding(path, in_rounds=True)
    policy = load({}, {}).policy
    for n in range(HELD_ROWS):  # the last one begins writing the batch
        check(store, f"k{n}", 1000.0, policy)
    assert store.draining is not None and len(store.todo) == HELD_ROWS  # begun, nothing written
    for n in range(HELD_ROWS, HELD_ROWS + 3):
        check(store, f"k{n}", 1000.0, policy)
    assert store.owed == 4 * DRAIN_STEP and len(store.todo) == HELD_ROWS  # the decisions wrote nothing
    store.write_owed()  # one round's end: the four decisions' rows together, ROUND_ROWS at least
    assert store.owed == 0 and len(store.todo) == HELD_ROWS - max(4 * DRAIN_STEP, ROUND_ROWS)
    busy = ROUND_ROWS // DRAIN_STEP + 1  # a busy round: it owes more than ROUND_ROWS, and writes that
    for n in range(HELD_ROWS + 3, HELD_ROWS + 3 + busy):
        check(store, f"k{n}", 1000.0, policy)
    store.write_owed()
    assert busy * DRAIN_STEP > ROUND_ROWS
    assert len(store.todo) == HELD_ROWS - max(4 * DRAIN_STEP, ROUND_ROWS) - busy * DRAIN_STEP
    assert committed(path) == set()  # one transaction: committed after its last row
    n = HELD_ROWS + 3 + busy
    while store.draining is not None:
        check(store, f"k{n}", 1000.0, policy)
        assert check(store, f"k{n}", 1001.0, policy).reason == "too-soon"  # its own writes, read back
        n += 1
        store.write_owed()
    assert len(committed(path)) == HELD_ROWS
    store.flush()
    assert len(committed(path)) == n and store.owed == 0
    store.close()


class HandTimers:
    """A loop's call_later whose timers a test runs by hand."""

    def __init__(self) -> None:
        self.due: list = []

    def call_later(self, _delay: float, callback):
        self.due.append(callback)
        return callback

    def run(self) -> None:
        due, self.due = self.due, []
        for callback in due:
            callback()


def test_a_busy_server_writes_its_window_a_few_rows_a_decision_and_its_timer_only_the_rest(tmp_path, monkeypatch):
    """The window's timer wrote everything held at once: a millisecond or more with every
    client waiting, five times a second. While decisions keep coming they write it, a few
    rows each, and the timer only looks again; once they pause it writes the rest."""
    import greylist.service as service
    import greylist.stores.sqlite as sqlite_store
    from greylist.service import FLUSH_BUSY
    from greylist.stores.sqlite import DRAIN_STEP

    now = [5000.0]  # the server's and the store's monotonic clock, moved by hand: a loaded
    monkeypatch.setattr(service.time, "monotonic", lambda: now[0])  # machine's pause between
    monkeypatch.setattr(sqlite_store, "monotonic", lambda: now[0])  # two lines is no pause here
    path = tmp_path / "g.db"
    config = load({"store": f"sqlite://{path}", "key": "ip"}, {})
    greylister = Greylister(config, clock=lambda: 1000.0, commit_window=0.05)
    timers = HandTimers()
    for n in range(5 * DRAIN_STEP):
        greylister.decide(Connection(f"192.0.2.{n}"))
        greylister.flush_in_time(timers)
    now[0] += 0.06  # the window has passed: the next decision begins writing the batch
    greylister.decide(Connection("198.51.100.1"))
    greylister.flush_in_time(timers)
    timers.run()  # a decision a moment ago: the timer leaves the batch to the decisions
    assert committed(path) == set() and timers.due
    now[0] += 2 * FLUSH_BUSY  # the decisions pause: the timer writes the rest
    timers.run()
    assert len(committed(path)) == 5 * DRAIN_STEP + 1 and not greylister.pending
    greylister.close()


def _wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_holding_server_checkpoints_on_a_thread_of_its_own(tmp_path, monkeypatch):
    """SQLite's own checkpoint (a thousand page writes and two fsyncs, 7 ms and more) ran
    in the committing connection with every client waiting; a holding store turns it
    off there and a thread copies the log into the database file (once a second)."""
    from greylist.stores import checkpointer

    monkeypatch.setattr(checkpointer, "EVERY", 0.05)
    path = tmp_path / "g.db"
    store = holding(path)
    assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    policy = load({}, {}).policy
    for n in range(2000):
        check(store, f"k{n}", 1000.0, policy)
    store.flush()

    def checkpointed() -> bool:  # the database file without its log holds them all
        return len(_in_file_alone(path, tmp_path) or ()) == 2000

    # generous: a loaded 2-core CI machine once missed 10 s; a failure says what the thread did.
    # The thread counts a checkpoint after SQLite has written it: the file can be complete a
    # moment before the count moves (a loaded CI run once read 0 in between), so both are awaited
    assert _wait_for(lambda: checkpointed() and store.checkpointer.checkpoints >= 1, 30.0), (
        f"not checkpointed: thread {store.checkpointer and vars(store.checkpointer)}")
    checkpointer = store.checkpointer
    store.close()
    assert checkpointer.stopped and store.checkpointer is None


def _in_file_alone(path, tmp_path) -> set[str] | None:
    """The keys the database file holds without its log (what the checkpoints copied)."""
    import shutil

    alone = tmp_path / "alone"
    alone.mkdir(exist_ok=True)
    shutil.copy(path, alone / "g.db")
    try:
        return committed(alone / "g.db")
    except sqlite3.DatabaseError:  # copied halfway through a page write, or no table yet
        return None


def test_a_server_that_creates_its_database_checkpoints_it(tmp_path, monkeypatch):
    """A server on a new database sets it up at its first decision. The checkpoint thread,
    looking before that, met an empty file, took it for a rollback-mode database and never
    looked again: every checkpoint was a no-op and the -wal file grew for as long as the
    server ran (a fresh greylist postgrey with no request in its first second: 780 MB in
    7 minutes at 2,700 decisions a second, the database file one page)."""
    from greylist.stores import checkpointer

    monkeypatch.setattr(checkpointer, "EVERY", 0.05)
    path = tmp_path / "g.db"
    store = holding(path)
    assert _wait_for(lambda: store.checkpointer.checkpoints >= 1)  # it has looked: no table yet
    policy = load({}, {}).policy
    for n in range(500):
        check(store, f"k{n}", 1000.0, policy)
    store.flush()
    assert _wait_for(lambda: len(_in_file_alone(path, tmp_path) or ()) == 500, 30.0), (
        f"not checkpointed: thread {vars(store.checkpointer)}")
    store.close()


def _held_back_by_a_reader(path):
    """A holding store with one row, and another connection's read snapshot kept open (an
    sqlite3 shell left in a transaction): the checkpoints cannot copy past it."""
    store = holding(path)
    policy = load({}, {}).policy
    check(store, "first", 1000.0, policy)
    store.flush()
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM greylist").fetchone()
    return store, policy, reader


def test_a_store_closed_before_its_first_checkpoint_is_checkpointed(tmp_path, monkeypatch):
    """A server reloaded (SIGHUP) more often than it checkpoints closed each store before
    its thread had copied anything: the -wal file grew for as long as it went on (225 MB
    in a minute of greylist serve reloaded twice a second). The thread copies once more
    when its store closes."""
    from greylist.stores import checkpointer

    monkeypatch.setattr(checkpointer, "EVERY", 3600.0)
    path = tmp_path / "g.db"
    store = holding(path)
    thread = store.checkpointer
    policy = load({}, {}).policy
    for n in range(300):
        check(store, f"k{n}", 1000.0, policy)
    store.close()
    assert _wait_for(lambda: len(_in_file_alone(path, tmp_path) or ()) == 300, 30.0), vars(thread)
    assert thread.checkpoints == 1


def _wal_salt(path) -> bytes:
    """The log's salt: SQLite changes it each time the log starts again from its beginning."""
    with open(f"{path}-wal", "rb") as f:
        return f.read(24)[16:24]


def test_a_checkpoint_lets_the_log_start_again_though_the_server_wrote_meanwhile(tmp_path, monkeypatch):
    """A checkpoint that ran while the server wrote a batch copied only what was committed
    when it began; the log started again only after one that happened to end with nothing
    new, so under load the -wal file grew (and kept its size). The thread's checkpoint now
    takes the write lock (SQLite's FULL), waiting for the batch being written, and ends
    complete: the server's next write starts the log from its beginning."""
    from greylist.stores import checkpointer

    monkeypatch.setattr(checkpointer, "EVERY", 3600.0)  # a checkpoint when this test says
    path = tmp_path / "g.db"
    store = holding(path)
    policy = load({}, {}).policy

    def batch(first: int, rows: int = 300) -> None:
        for n in range(first, first + rows):
            check(store, f"k{n}", 1000.0, policy)

    batch(0)
    store.flush()
    batch(1000)  # the next batch: being written, not committed yet
    store._start_drain(wait=True)
    store._drain(100)
    thread = store.checkpointer
    done = thread.checkpoints
    thread.wake.release()  # a checkpoint now, while the batch is being written
    assert _wait_for(lambda: thread.copying)
    time.sleep(0.02)
    store._drain(len(store.todo))  # the rest, and the commit
    assert store.draining is None
    assert _wait_for(lambda: thread.checkpoints > done)
    salt, size = _wal_salt(path), (tmp_path / "g.db-wal").stat().st_size
    batch(2000)
    store.flush()
    assert _wal_salt(path) != salt, "the log did not start again"
    assert (tmp_path / "g.db-wal").stat().st_size == size  # its frames written over the old ones
    assert len(committed(path)) == 900
    store.close()


def test_the_servers_own_checkpoint_is_not_taken_for_another_writer(tmp_path):
    """While the checkpoint has the write lock the rows wait a moment, with no word of
    another connection holding the lock (there is none) and no rows dropped."""
    from greylist.stores import sqlite as module

    path = tmp_path / "g.db"
    store = holding(path)
    policy = load({}, {}).policy
    check(store, "a", 1000.0, policy)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the lock, as the checkpoint holds it
    store.checkpointer.copying = True
    before = time.monotonic()
    store.flush(wait=False)
    assert store.pending and not store.warnings
    assert store.retry_lock_at <= before + module.CHECKPOINT_RETRY + 0.05
    store.checkpointer.copying = False
    store.checkpointer.ended = float("-inf")  # long ago: now it is another writer's lock
    store.retry_lock_at = 0.0
    store.flush(wait=False)
    assert store.pending and "another connection holds the database's write lock" in store.warnings[0]
    other.execute("ROLLBACK")
    other.close()
    store.warnings.clear()
    store.retry_lock_at = 0.0
    store.flush(wait=False)
    assert not store.pending and committed(path) == {"a"}
    store.close()


def test_rows_held_while_the_servers_own_checkpoint_has_the_lock_stay_bounded(tmp_path, monkeypatch):
    """However long the checkpoint keeps the lock, the held rows stay within MAX_HELD."""
    from greylist.stores import sqlite as module

    monkeypatch.setattr(module, "MAX_HELD", 5)
    path = tmp_path / "g.db"
    store = holding(path)
    policy = load({}, {}).policy
    for n in range(8):
        check(store, f"k{n}", 1000.0, policy)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    store.checkpointer.copying = True
    store.flush(wait=False)
    assert len(store.held) == 5 and "3 held rows dropped" in store.warnings[-1]
    store.checkpointer.copying = False
    other.execute("ROLLBACK")
    other.close()
    store.retry_lock_at = 0.0
    store.flush(wait=False)
    assert committed(path) == {f"k{n}" for n in range(3, 8)}
    store.close()


def test_a_large_log_is_copied_without_the_lock_first(monkeypatch):
    """The checkpoint's FULL copy holds the write lock for as long as it copies: on a log of
    gigabytes (left by an earlier run whose checkpoints copied nothing, or by a long
    expire) that was the whole copy, with every decision held meanwhile. A log found large
    (or not yet looked at) is copied without the lock first; the lock then covers what was
    committed meanwhile. A closing store's last copy never takes it."""
    from greylist.stores import checkpointer

    monkeypatch.setattr(checkpointer, "EVERY", 3600.0)
    ran: list[str] = []
    log = [50_000]  # the log's pages, as each checkpoint reports them

    class Database:
        def execute(self, sql: str):
            ran.append(sql.split("(")[-1].rstrip(")") if "checkpoint" in sql else "read")
            row = (1,) if "schema" in sql else (0, log[0], log[0])
            return type("Cursor", (), {"fetchone": lambda self: row})()

        def close(self) -> None:
            ran.append("close")

    thread = checkpointer.Checkpointer(Database, sqlite3.Error)

    def checkpoint(pages: int) -> list[str]:
        log[0] = pages
        done, ran[:] = thread.checkpoints, []
        thread.wake.release()
        assert _wait_for(lambda: thread.checkpoints > done)
        return ran[:]

    assert checkpoint(50_000) == ["read", "PASSIVE", "FULL"]  # the first: its size unknown
    assert checkpoint(300) == ["read", "PASSIVE", "FULL"]  # the last one found 50,000 pages
    assert checkpoint(300) == ["read", "FULL"]  # a small log: the lock at once
    assert checkpoint(checkpointer.LARGE_LOG + 1) == ["read", "FULL"]
    assert checkpoint(300) == ["read", "PASSIVE", "FULL"]
    ran.clear()
    thread.stop()
    assert ran == ["read", "PASSIVE", "close"]


def test_the_wal_file_is_cut_back_when_its_log_starts_again(tmp_path, monkeypatch):
    """An old read snapshot (an sqlite3 shell left open) or a long burst makes the log
    large; SQLite reuses the file and it kept that size for good. A holding server's is
    cut back to WAL_SIZE_LIMIT when its log starts again."""
    from greylist.stores import checkpointer
    from greylist.stores import sqlite as module

    monkeypatch.setattr(checkpointer, "EVERY", 3600.0)
    monkeypatch.setattr(module, "WAL_SIZE_LIMIT", 64 * 1024)
    path = tmp_path / "g.db"
    store, policy, reader = _held_back_by_a_reader(path)
    for n in range(3000):
        check(store, f"k{n}", 1000.0, policy)
        if n % 100 == 99:
            store.flush()  # a commit each: pages written again and again
    wal = tmp_path / "g.db-wal"
    assert wal.stat().st_size > 4 * 64 * 1024
    reader.execute("COMMIT")
    reader.close()
    done = store.checkpointer.checkpoints
    store.checkpointer.wake.release()
    assert _wait_for(lambda: store.checkpointer.checkpoints > done)
    check(store, "last", 1000.0, policy)
    store.flush()
    assert wal.stat().st_size <= 64 * 1024
    assert len(committed(path)) == 3002
    store.close()


def test_a_log_the_checkpoints_cannot_copy_is_said_once(tmp_path, monkeypatch):
    """Another connection's old read transaction (an sqlite3 shell left open) holds back
    every checkpoint: the -wal file grows until it ends, and the log says so, once."""
    from greylist.stores import checkpointer
    from greylist.stores import sqlite as module

    monkeypatch.setattr(checkpointer, "EVERY", 0.02)
    monkeypatch.setattr(module, "WAL_BEHIND", 10)
    path = tmp_path / "g.db"
    store, policy, reader = _held_back_by_a_reader(path)
    n = 0
    while not any("write-ahead log" in w for w in store.warnings):
        for _ in range(200):
            check(store, f"k{n}", 1000.0, policy)
            n += 1
        store.flush()
        assert n < 200_000, f"never said: {vars(store.checkpointer)}"
        time.sleep(0.03)
    said = [w for w in store.warnings if "write-ahead log" in w]
    assert len(said) == 1 and "old read transaction" in said[0]
    store.warnings.clear()
    check(store, "more", 1000.0, policy)
    time.sleep(0.1)
    store.flush()
    assert not store.warnings  # said once
    reader.execute("COMMIT")
    reader.close()
    store.close()


def test_when_the_checkpoint_thread_ends_the_server_checkpoints_again_and_says_so(tmp_path, monkeypatch):
    """A log nobody copies would grow without end."""
    from greylist.stores.sqlite import SqliteStore

    def cannot(self):
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(SqliteStore, "_connect_checkpointer", cannot)
    store = holding(tmp_path / "g.db")
    assert _wait_for(lambda: store.checkpointer.failure is not None)
    check(store, "a", 1000.0, load({}, {}).policy)
    store.flush()
    assert store.checkpointer is None
    assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    assert "checkpoint thread ended (OperationalError: unable to open database file)" in store.warnings[0]
    store.close()


def test_a_closed_server_store_lets_go_of_its_connection_at_once(tmp_path):
    """A server closes its store and opens another at every SIGHUP. The old connection (its
    page cache, three descriptors) went only with a full garbage collection, the store
    referring to itself through its transaction: greylist serve reloaded twice a second
    grew from 26 to 65 MB in 100 s, its descriptors with it. Closed at once, it stays at 26 MB."""
    import gc
    import os

    path = tmp_path / "g.db"
    policy = load({}, {}).policy

    def descriptors() -> int:
        held = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                held += os.readlink(f"/proc/self/fd/{fd}").startswith(str(path))
            except OSError:
                pass  # the directory's own descriptor, closed by now
        return held

    gc.disable()  # no collection comes to the rescue
    try:
        for n in range(5):
            store = holding(path)
            check(store, f"k{n}", 1000.0, policy)
            store.close()
            del store
        assert descriptors() == 0
    finally:
        gc.enable()
    assert len(committed(path)) == 5


def test_rows_a_closing_store_hands_over_are_held_by_the_next_and_written_once_the_lock_is_free(tmp_path):
    """A reload: the rows another connection's write lock keeps out of the file go to the
    store opened again (the oldest first, a decision made there since is the newer), are
    read back there, and are written once the lock is free."""
    path = tmp_path / "g.db"
    policy = load({}, {}).policy
    first = holding(path)
    check(first, "a", 1000.0, policy)
    first.flush()
    blocker = sqlite3.connect(path, timeout=5, isolation_level=None)  # past a checkpoint's moment
    blocker.execute("BEGIN IMMEDIATE")
    try:
        check(first, "b", 1000.0, policy)
        check(first, "c", 1000.0, policy)
        carried = first.hand_over()
        assert list(carried) == ["b", "c"] and not first.pending
        first.close()  # nothing held: it waits for no lock
        second = holding(path)
        check(second, "c", 1100.0, policy)  # decided here before the rows arrive: the newer
        second.take_over(carried)
        assert list(second.held) == ["b", "c"] and second.pending
        assert second.held["c"][1].last_seen == 1100.0
        assert check(second, "b", 1400.0, policy).action == PASS  # read back: waited, it passes
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    second.flush()
    assert committed(path) == {"a", "b", "c"}
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT last_seen FROM greylist WHERE key = 'c'").fetchone()[0] == 1100.0
    second.close()


def test_scan_reads_a_page_at_a_time_every_row_once_in_key_order(tmp_path, monkeypatch):
    """A million rows read whole took 269 MB in greylist expire; a page at a time, 16 MB.
    Garbage rows are skipped and counted wherever they fall; expire may delete as it goes."""
    import greylist.stores.sqlite as sqlite_store
    from greylist.core.expiry import expire
    from greylist.core.policy import Policy

    monkeypatch.setattr(sqlite_store, "SCAN_PAGE", 3)
    path = tmp_path / "g.sqlite"
    store = open_store(f"sqlite://{path}")
    now = time.time()
    keys = [f"10.0.{i}.0/24|s@x|r@y" for i in range(10)]
    for i, key in enumerate(keys):
        store.put(key, Record(now - (i % 2) * 10 * 86400, now - (i % 2) * 10 * 86400, 0))
    store.close()
    raw = sqlite3.connect(path)
    raw.execute("INSERT INTO greylist VALUES ('10.0.3.5|garbage', 'x', 'y', 'z')")  # inside a page
    raw.execute("INSERT INTO greylist VALUES (x'ff00', 1.0, 1.0, 0)")  # a blob key sorts after text
    raw.commit()
    raw.close()

    store = open_store(f"sqlite://{path}")
    queries = store.ops.get("query", 0)
    seen = [key for key, _record in store.scan()]
    assert seen == sorted(keys)
    assert store.ops["unreadable"] == 2
    assert store.ops["query"] - queries == 5  # 12 rows, 3 a page: four full pages and an empty one
    counts = expire(store, now, Policy(retry_window=2 * 86400))  # deleting between pages
    assert counts["scanned"] == 10 and counts["removed"] == 5
    assert [key for key, _ in store.scan()] == sorted(keys)[::2]
    store.close()


def test_a_database_path_that_is_a_link_is_refused_and_nothing_is_made_where_it_points(tmp_path):
    """root's greylist migrate into /var/lib/postgrey, which the postgrey user may write: a
    link planted there as greylist.sqlite made root's SQLite create (or change) the file it
    named. The file is made by us (O_EXCL, O_NOFOLLOW), never opened through a link."""
    import os

    target = tmp_path / "elsewhere" / "made-by-root"
    target.parent.mkdir()
    link = tmp_path / "greylist.sqlite"
    link.symlink_to(target)
    with pytest.raises(StoreError, match="is a symbolic link"):
        open_store(f"sqlite://{link}")
    assert not target.exists() and os.listdir(target.parent) == []
    with pytest.raises(StoreError, match="not a regular file"):
        open_store(f"sqlite://{tmp_path}")
    made = tmp_path / "new.sqlite"
    store = open_store(f"sqlite://{made}")  # a new database: made here, then set up by SQLite
    store.put("k", Record(1.0, 1.0, 0))
    store.close()
    assert made.stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_database_replaced_while_it_is_opened_is_refused(tmp_path, monkeypatch):
    import greylist.stores.sqlite as sqlite_store

    path = tmp_path / "greylist.sqlite"
    real_own_file = sqlite_store._own_file

    def and_then_replaced(p):
        identity = real_own_file(p)
        other = tmp_path / "other"  # another file in its place, between the check and SQLite's open
        other.write_bytes(b"")
        other.replace(path)
        return identity

    monkeypatch.setattr(sqlite_store, "_own_file", and_then_replaced)
    with pytest.raises(StoreError, match="replaced while it was being opened"):
        open_store(f"sqlite://{path}")


def test_a_new_database_another_process_makes_at_the_same_moment_is_opened(tmp_path, monkeypatch):
    """Two wrappers meeting a new database: the one whose O_EXCL loses opens the other's file."""
    import os

    path = tmp_path / "greylist.sqlite"
    real_open = os.open

    def the_other_first(name, flags, *args):
        if flags & os.O_EXCL and not path.exists():
            real_open(name, os.O_WRONLY | os.O_CREAT, 0o644)  # the other wrapper, just before us
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", the_other_first)
    store = open_store(f"sqlite://{path}")
    monkeypatch.undo()
    store.put("k", Record(1.0, 1.0, 0))
    assert store.get("k") == Record(1.0, 1.0, 0)
    store.close()


def test_another_programs_database_is_said_and_left_as_it_is(tmp_path, capsys):
    """A path mistyped in a cron line or a run script: a database holding tables, none of
    them ours. It was set up as ours (WAL mode, our table) by a server and by greylist
    stats alike; the program whose file it is may not read a WAL database. An empty file
    is still a new store."""
    import hashlib

    from greylist.admin import main
    from greylist.core.policy import Policy

    path = tmp_path / "app.db"
    theirs = sqlite3.connect(path)
    theirs.executescript("CREATE TABLE accounts (name TEXT); CREATE INDEX by_name ON accounts (name);"
                         "INSERT INTO accounts VALUES ('alice');")
    theirs.close()
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    store = open_store(f"sqlite://{path}")
    with pytest.raises(StoreError, match="is not a greylist database .it holds accounts, by_name."):
        check(store, "192.0.2.1", 1000.0, Policy())
    store.close()
    for command in (["stats"], ["expire"], ["show", "192.0.2.1"]):
        assert main([*command, "--store", f"sqlite://{path}"]) != 0
        assert "is not a greylist database" in capsys.readouterr().err
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]  # no -wal, no -shm
    empty = tmp_path / "new.db"
    empty.touch()
    store = open_store(f"sqlite://{empty}")
    assert check(store, "192.0.2.1", 1000.0, Policy()).reason == "new"
    store.close()
