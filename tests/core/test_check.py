"""What check() notes beyond the verdict: the pass that makes a client auto-whitelisted."""

from __future__ import annotations

from hypothesis import given, strategies as st

from greylist.core.check import check
from greylist.core.policy import AUTO_WHITELISTED, NEW, PASSED, Policy
from greylist.stores.memory import MemoryStore


def deliveries(policy: Policy, gaps: list[float]) -> list[tuple[str, str, dict]]:
    """One new triplet of one client after another, each retried after the delay: for each,
    the reason of its first try and of its retry, and what the retry noted."""
    store, now, seen = MemoryStore(), 1_800_000_000.0, []
    for n, gap in enumerate(gaps):
        now += gap
        key = f"192.0.2.5|s{n}@example.org|r@example.net"
        first = check(store, key, now, policy, "192.0.2.5")
        now += policy.delay + 1
        notes: dict = {}
        retry = check(store, key, now, policy, "192.0.2.5", notes)
        seen.append((first.reason, retry.reason, notes))
    return seen


def test_the_pass_that_reaches_the_count_is_noted_once():
    policy = Policy(delay=300, auto_whitelist=3)
    seen = deliveries(policy, [0, 3600, 3600, 3600, 3600])
    assert [first for first, _, _ in seen] == [NEW, NEW, NEW, AUTO_WHITELISTED, AUTO_WHITELISTED]
    assert [notes for _, _, notes in seen] == [{}, {}, {"whitelisted_after": 3}, {}, {}]
    assert seen[2][1] == PASSED


@given(st.integers(min_value=1, max_value=6), st.lists(st.sampled_from([10.0, 3599.0, 3601.0, 90000.0]),
                                                       min_size=1, max_size=12))
def test_noted_exactly_when_the_client_becomes_auto_whitelisted(count, gaps):
    """Passes are counted once an hour at most: the note comes with the pass after which
    the client's next new triplet is auto-whitelisted, and with no other."""
    policy = Policy(delay=300, auto_whitelist=count)
    seen = deliveries(policy, [0.0] + gaps)
    for (_, _, notes), (after, _, _) in zip(seen, seen[1:]):
        if notes:
            assert notes == {"whitelisted_after": count} and after == AUTO_WHITELISTED
    noted = [i for i, (_, _, notes) in enumerate(seen) if notes]
    listed = [i for i, (first, _, _) in enumerate(seen) if first == AUTO_WHITELISTED]
    assert len(noted) <= 1 and (not listed or (noted and noted[0] < listed[0]))
