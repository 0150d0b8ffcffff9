"""Hostile stored state: any record, on every store, delays a client at most delay + skew.

Records come from places we do not control (another MX's clock, `touch -d`, a
hand-edited database, `inf`, `nan`, 1e308, negative counts): whatever is
stored, a client that retries after the delay (plus the clock-skew tolerance)
passes, retry_in is finite and bounded, and expire removes what is not sane.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from greylist.core.check import check
from greylist.core.policy import CLOCK_SKEW, PASS, WRITE_NONE, Policy, Record, decide, is_expired
from greylist.stores import open_store

NOW = 1_800_000_000.0
times = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                  st.floats(NOW - 1e8, NOW + 1e8), st.just(NOW + CLOCK_SKEW), st.just(NOW + CLOCK_SKEW + 1))
counts = st.one_of(st.integers(-5, 10), st.integers(-(1 << 70), 1 << 70))
records = st.builds(Record, times, times, counts)
# a retry window shorter than delay + skew would leave no time to pass in: not a sane setting
policies = st.builds(lambda d, w: Policy(delay=d, retry_window=d + w),
                     st.floats(0, 86400), st.floats(CLOCK_SKEW + 1, 7 * 86400))


@settings(max_examples=2000)
@given(records, policies)
def test_any_record_delays_a_retrying_client_at_most_delay_plus_skew(record, policy):
    first = decide(record, NOW, policy)
    if first.verdict.action == PASS:
        return
    retry_in = first.verdict.retry_in
    assert math.isfinite(retry_in) and 0 <= retry_in <= policy.delay + CLOCK_SKEW
    stored = record if first.write == WRITE_NONE else first.record
    later = NOW + policy.delay + CLOCK_SKEW + 1e-3
    assert decide(stored, later, policy).verdict.action == PASS


@settings(max_examples=500)
@given(records)
def test_expire_removes_every_record_that_is_not_sane(record):
    from greylist.core.policy import sane

    if not sane(record, NOW):
        assert is_expired(record, NOW, Policy())


@pytest.fixture(params=["memory", "file", "sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "redis":
        return request.getfixturevalue("redis_url")
    return {"memory": "memory://", "file": f"file://{tmp_path}/s", "sqlite": f"sqlite://{tmp_path}/g.db"}[
        request.param]


@pytest.mark.parametrize("first,last,passes", [
    (NOW + 30 * 86400, NOW + 30 * 86400, 0),   # touch -d '+30 days'
    (math.inf, math.inf, 0), (1e308, 1e308, 0), (NOW, NOW + 86400, 3),
    (-math.inf, NOW, 0), (NOW, NOW, -4),
])
def test_stored_future_or_absurd_records_on_every_store(store_url, first, last, passes):
    policy = Policy(delay=60)
    with open_store(store_url) as store:
        try:
            store.put("192.0.2.1", Record(first, last, passes))
        except Exception:  # noqa: BLE001 - a store may refuse to store it at all: fine
            pytest.skip("the store does not hold such a record")
        verdict = check(store, "192.0.2.1", NOW, policy)
        assert verdict.action == PASS or verdict.retry_in <= policy.delay + CLOCK_SKEW
        assert check(store, "192.0.2.1", NOW + policy.delay + CLOCK_SKEW + 1, policy).action == PASS


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=300), st.integers(1, 5000))
def test_keys_with_undecodable_bytes_or_any_length_work_on_every_store(store_url, raw, length):
    """SMTPMAILFROM=$'spam\\xff@x' arrives as a surrogate-escaped str: never an exception."""
    sender = raw.decode("utf-8", "surrogateescape") * (length // len(raw) + 1)
    from greylist.core.keys import Keying

    key = Keying("triplet").key_for("192.0.2.9", sender[:length], "bob@example.net")
    policy = Policy(delay=60)
    with open_store(store_url) as store:
        first = check(store, key, NOW, policy)
        again = check(store, key, NOW + 61, policy)
    assert (first.reason, again.reason) in (("new", "passed"), ("too-soon", "passed"), ("passed", "known"),
                                            ("known", "known"))
