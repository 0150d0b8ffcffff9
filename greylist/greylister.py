"""One connection against one store: read, decide, write, settle races.

This is the only place that turns a :func:`~greylist.policy.decide` result
into store operations. The wrapper, the other front ends and the simulator
all call :func:`check`, so a change to the policy or the write protocol
changes all of them at once.
"""

from __future__ import annotations

from greylist.policy import (WRITE_CREATE, WRITE_UPDATE, Decision, Policy, Verdict, decide,
                             expires_at)
from greylist.stores.base import Store


def check(store: Store, key: str, now: float, policy: Policy) -> Verdict:
    """Decide for ``key`` at ``now`` and record the outcome. Raises StoreError."""
    with store.transaction():
        decision = decide(store.get(key), now, policy)
        write = decision.write
        if write == WRITE_CREATE:
            return _create(store, key, decision, now, policy)
        if write == WRITE_UPDATE:
            store.put(key, decision.record, expires_at(decision.record, policy) - now)
        return decision.verdict


def _create(store: Store, key: str, decision: Decision, now: float, policy: Policy) -> Verdict:
    """Create a new client's entry, or settle the race with a simultaneous connection."""
    if not store.add(key, decision.record, expires_at(decision.record, policy) - now):
        # Another connection from the same new client created the entry
        # between our read and our create. Decide again on what it wrote
        # (a "too soon" tempfail), so both answer coherently with one entry.
        existing = store.get(key)
        if existing is None:
            # The entry vanished (expired) or holds something that is not a
            # record: ours replaces it, or the client would wait forever.
            store.put(key, decision.record, expires_at(decision.record, policy) - now)
            return decision.verdict
        decision = decide(existing, now, policy)
        if decision.write == WRITE_UPDATE:
            store.put(key, decision.record, expires_at(decision.record, policy) - now)
    return decision.verdict
