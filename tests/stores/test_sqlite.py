"""SQLite with commits held (long-lived servers): many decisions, one commit, nothing lost on close."""

from __future__ import annotations

import sqlite3
import time

import pytest

from greylist.config import load
from greylist.core.check import check
from greylist.core.policy import Record
from greylist.service import Connection, Greylister
from greylist.stores import open_store
from greylist.stores.base import StoreError


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
    check(store, "c", 1000.0, policy)  # the window has passed: this decision commits all three
    assert not store.pending
    assert committed(path) == {"a", "b", "c"}
    store.close()


def test_flush_and_close_commit_what_was_held(tmp_path):
    path = tmp_path / "g.db"
    store = open_store(f"sqlite://{path}")
    store.hold_commits(60)
    policy = load({}, {}).policy
    check(store, "a", 1000.0, policy)
    store.flush()
    assert committed(path) == {"a"} and not store.pending
    check(store, "b", 1000.0, policy)
    store.close()  # the wrapper's lean close too
    assert committed(path) == {"a", "b"}


def test_a_new_key_inside_the_transaction_is_one_insert_and_an_old_one_is_found(tmp_path):
    store = open_store(f"sqlite://{tmp_path}/g.db")
    store.hold_commits(60)
    with store.transaction():
        assert store.get_or_add("k", Record(1.0, 1.0, 0)) is None
        assert store.get_or_add("k", Record(5.0, 5.0, 0)) == Record(1.0, 1.0, 0)
    store.close()


def test_a_failing_decision_rolls_back_and_the_next_one_starts_afresh(tmp_path):
    path = tmp_path / "g.db"
    store = open_store(f"sqlite://{path}")
    store.hold_commits(60)
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.put("x", Record(1.0, 1.0, 0))
            raise RuntimeError("a bug")
    assert not store.pending
    check(store, "y", 1000.0, load({}, {}).policy)
    store.flush()
    assert committed(path) == {"y"}
    store.close()


def test_the_greylister_flushes_and_another_writer_gets_in_afterwards(tmp_path):
    path = tmp_path / "g.db"
    config = load({"store": f"sqlite://{path}", "key": "ip"}, {})
    greylister = Greylister(config, clock=lambda: 1000.0, commit_window=60)
    greylister.decide(Connection("192.0.2.1"))
    assert greylister.pending
    other = open_store(f"sqlite://{path}?timeout=0.1")
    with pytest.raises(StoreError):  # the write lock is held for the window
        check(other, "z", 1000.0, config.policy)
    greylister.flush()
    assert not greylister.pending and committed(path) == {"192.0.2.1"}
    check(other, "z", 1000.0, config.policy)
    other.close()
    greylister.close()


def test_a_commit_that_fails_leaves_no_lock_behind_once_closed(tmp_path):
    """The service closes a store that failed; the handle must not keep the write lock
    (the store opened next would wait on it for ever)."""
    path = tmp_path / "g.db"
    store = open_store(f"sqlite://{path}")
    store.hold_commits(60)
    check(store, "a", 1000.0, load({}, {}).policy)
    store.pending = False  # as after a COMMIT that raised: SQLite's transaction is still open
    assert store.db.in_transaction
    store.close()
    assert not store.db.in_transaction
    other = open_store(f"sqlite://{path}?timeout=0.1")
    check(other, "b", 1000.0, load({}, {}).policy)  # gets the write lock at once
    other.close()
