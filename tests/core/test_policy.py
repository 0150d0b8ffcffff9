"""Properties of the pure decision (hypothesis), and that it reads no clock."""

from __future__ import annotations

import datetime

from freezegun import freeze_time
from hypothesis import given, strategies as st

from greylist.core.policy import (KNOWN, NEW, PASS, PASSED, TEMPFAIL, TOO_SOON, WRITE_CREATE,
                             WRITE_NONE, WRITE_UPDATE, Policy, Record, decide, is_expired)

times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
gaps = st.floats(min_value=0, max_value=90 * 86400, allow_nan=False)


@st.composite
def policies(draw):
    delay = draw(st.floats(min_value=0, max_value=86400))
    window = draw(st.floats(min_value=delay, max_value=10 * 86400))
    max_age = draw(st.floats(min_value=0, max_value=60 * 86400))
    return Policy(delay, window, max_age)


records = st.builds(Record, times, times, st.integers(min_value=0, max_value=10**6))


@given(policies(), times, st.lists(gaps, min_size=1, max_size=30))
def test_never_passes_before_the_delay(policy, start, offsets):
    """Whatever the retry pattern, nothing passes before first_seen + delay."""
    record = None
    for now in sorted(start + o for o in offsets):
        decision = decide(record, now, policy)
        if decision.verdict.action == PASS and decision.verdict.reason == PASSED:
            assert now - decision.record.first_seen >= policy.delay
        if decision.write != WRITE_NONE:
            record = decision.record


@given(policies(), times, st.data())
def test_retry_after_delay_within_window_always_passes(policy, first, data):
    retry = data.draw(st.floats(min_value=first + policy.delay, max_value=first + policy.retry_window))
    record = decide(None, first, policy).record
    verdict = decide(record, retry, policy).verdict
    # float rounding in first + delay may put retry a hair outside; that is another case
    if policy.delay <= retry - first <= policy.retry_window:
        assert verdict.action == PASS and verdict.reason == PASSED


@given(policies(), times)
def test_a_new_client_is_tempfailed_and_recorded(policy, now):
    decision = decide(None, now, policy)
    assert decision.verdict.action == TEMPFAIL and decision.verdict.reason == NEW
    assert decision.write == WRITE_CREATE
    assert decision.record == Record(now, now, 0)


@given(policies(), records, times)
def test_verdict_depends_only_on_record_and_time(policy, record, now):
    first = decide(record, now, policy)
    with freeze_time(datetime.datetime(2001, 1, 1)):
        second = decide(record, now, policy)
    with freeze_time(datetime.datetime(2099, 12, 31)):
        third = decide(record, now, policy)
    assert first == second == third


@given(policies(), records, times)
def test_expired_means_decided_as_new(policy, record, now):
    """greylist expire deletes exactly what decide would treat as new anyway."""
    decision = decide(record, now, policy)
    if is_expired(record, now, policy):
        assert decision.verdict.reason == NEW
    else:
        assert decision.verdict.reason in (TOO_SOON, PASSED, KNOWN) or now < record.first_seen


@given(policies(), times, st.integers(min_value=1, max_value=1000), gaps)
def test_known_client_stays_known_while_it_keeps_sending(policy, first, passes, gap):
    record = Record(first, first, passes)
    now = first + gap
    decision = decide(record, now, policy)
    if now - first <= policy.max_age:
        assert decision.verdict.reason == KNOWN
        assert decision.record == Record(first, now, passes + 1)
        assert decision.write == WRITE_UPDATE
    else:
        assert decision.verdict.reason == NEW


def test_regular_sender_is_not_regreylisted_by_age():
    """cqgreylist's flaw: an entry older than a day was removed and re-greylisted."""
    policy = Policy(delay=60, retry_window=86400, max_age=2 * 86400)
    record = decide(None, 0, policy).record
    now = 120.0
    for _ in range(30):  # one message a day for a month
        decision = decide(record, now, policy)
        assert decision.verdict.action == PASS
        record = decision.record
        now += 86400


def test_too_soon_reports_the_wait_left():
    policy = Policy(delay=300)
    verdict = decide(Record(1000.0, 1000.0, 0), 1100.0, policy).verdict
    assert (verdict.action, verdict.reason, verdict.retry_in) == (TEMPFAIL, TOO_SOON, 200.0)


def test_bad_policies_are_refused_with_a_reason():
    import pytest

    with pytest.raises(ValueError, match="delay"):
        Policy(delay=-1)
    with pytest.raises(ValueError, match="retry window"):
        Policy(delay=600, retry_window=60)


def test_auto_whitelist_counts_as_postgrey_first_passes_once_an_hour_per_address():
    from greylist.core.check import check
    from greylist.core.keys import Keying
    from greylist.stores.memory import MemoryStore

    policy = Policy(delay=60, auto_whitelist=2)
    store, keying, t = MemoryStore(), Keying("triplet-subnet"), 1_000_000.0

    def deliver(ip: str, rcpt: str, at: float) -> str:
        key = keying.key_for(keying.client(ip), "a@example.org", rcpt)
        return check(store, key, at, policy, ip).reason

    # two triplets pass after waiting within one hour: one count
    assert [deliver("192.0.2.1", "b@x", t), deliver("192.0.2.1", "b@x", t + 61)] == ["new", "passed"]
    assert [deliver("192.0.2.1", "c@x", t + 100), deliver("192.0.2.1", "c@x", t + 200)] == ["new", "passed"]
    assert [deliver("192.0.2.1", "b@x", t + 300 + i) for i in range(5)] == ["known"] * 5  # not counted
    assert deliver("192.0.2.1", "d@x", t + 400) == "new"
    # another host of the same /24 has its own tally: a network is not a reputation
    assert [deliver("192.0.2.2", "e@x", t + 500), deliver("192.0.2.2", "e@x", t + 600)] == ["new", "passed"]
    # an hour later, the first address's second pass after waiting counts: whitelisted
    assert [deliver("192.0.2.1", "f@x", t + 3700), deliver("192.0.2.1", "f@x", t + 3800)] == ["new", "passed"]
    assert deliver("192.0.2.1", "g@x", t + 3900) == "auto-whitelisted"
    assert deliver("192.0.2.2", "g@x", t + 3900) == "new"
