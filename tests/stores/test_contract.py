"""One contract, every store URL: the behaviour the greylister relies on."""

from __future__ import annotations

import pytest

from greylist.core.check import check
from greylist.core.policy import Policy, Record
from greylist.stores import StoreError, open_store


@pytest.fixture(params=["memory", "file", "sqlite", "redis", "redis+unix", "redis-py"])
def store(request, tmp_path):
    lean = True
    if request.param.startswith("redis"):
        server = request.getfixturevalue("redis_server")
        url = request.getfixturevalue("redis_url")
        if request.param == "redis+unix":
            url = server.unix_url
        lean = request.param != "redis-py"
    else:
        url = {"memory": "memory://", "file": f"file://{tmp_path}/store",
               "sqlite": f"sqlite://{tmp_path}/greylist.db"}[request.param]
    with open_store(url, lean=lean) as s:
        if request.param == "redis-py":
            assert type(s.conn).__name__ == "RedisPyConnection"
        yield s


def test_get_of_unknown_key_is_none(store):
    assert store.get("192.0.2.1") is None


def test_add_only_if_absent(store):
    assert store.add("192.0.2.1", Record(1000.0, 1000.0, 0)) is True
    assert store.add("192.0.2.1", Record(2000.0, 2000.0, 0)) is False
    assert store.get("192.0.2.1") == Record(1000.0, 1000.0, 0)


def test_put_overwrites_and_round_trips(store):
    store.put("2001:db8::7", Record(1000.0, 5000.5, 3))
    assert store.get("2001:db8::7") == Record(1000.0, 5000.5, 3)
    store.put("2001:db8::7", Record(6000.0, 6000.0, 0))
    assert store.get("2001:db8::7") == Record(6000.0, 6000.0, 0)


def test_delete_with_expected_record(store):
    store.put("192.0.2.9", Record(10.0, 20.0, 1))
    assert store.delete("192.0.2.9", expected=Record(10.0, 30.0, 1)) is False
    assert store.delete("192.0.2.9", expected=Record(10.0, 20.0, 1)) is True
    assert store.get("192.0.2.9") is None
    assert store.delete("192.0.2.9") is False


def test_scan_lists_every_entry(store):
    keys = {"192.0.2.1", "198.51.100.7", "2001:db8::1", "::1", "192.0.2.0/24", "2001:db8::/64",
            "192.0.2.1|alice@example.org|bob@example.net", "awl|192.0.2.0/24",
            "2001:db8::1|<>|Postmaster@example.net"}
    for i, key in enumerate(sorted(keys)):
        store.put(key, Record(100.0 + i, 200.0 + i, i))
    assert {k for k, _ in store.scan()} == keys


def test_the_greylister_cycle(store):
    policy = Policy(delay=60)
    assert check(store, "192.0.2.5", 1000.0, policy).reason == "new"
    assert check(store, "192.0.2.5", 1030.0, policy).reason == "too-soon"
    assert check(store, "192.0.2.5", 1061.0, policy).reason == "passed"
    assert check(store, "192.0.2.5", 5000.0, policy).reason == "known"
    assert store.get("192.0.2.5") == Record(1000.0, 5000.0, 2)


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(StoreError, match="unknown store URL"):
        open_store("postgres://db/greylist")
    with pytest.raises(StoreError, match="unknown store URL"):
        open_store("/var/qmail/cqgreylist")


def test_size_counts_entries(store):
    assert store.size() == 0
    for i in range(5):
        store.add(f"192.0.2.{i}", Record(1.0, 1.0, 0))
    store.put("2001:db8::1", Record(1.0, 2.0, 1))
    assert store.size() == 6
    store.delete("192.0.2.0")
    assert store.size() == 5
