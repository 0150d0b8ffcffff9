"""One connection against one store: read, decide, write, settle races.

This is the only place that turns a :func:`~greylist.policy.decide` result
into store operations. The wrapper, the other front ends and the simulator
all call :func:`check`, so a change to the policy or the write protocol
changes all of them at once.

Most connections at a busy MX come from addresses never seen before, so the
store is first asked to create the entry a new client would get, and to hand
back the existing one instead if there is one (:meth:`Store.get_or_add`): on
Redis that is one round trip (``SET NX GET``) for every new client.
"""

from __future__ import annotations

from greylist.policy import WRITE_CREATE, WRITE_UPDATE, Policy, Verdict, decide, expires_at
from greylist.stores.base import Store


def check(store: Store, key: str, now: float, policy: Policy) -> Verdict:
    """Decide for ``key`` at ``now`` and record the outcome. Raises StoreError."""
    with store.transaction():
        fresh = decide(None, now, policy)  # what a client we have never seen gets
        if fresh.write == WRITE_CREATE:
            existing = store.get_or_add(key, fresh.record, expires_at(fresh.record, policy) - now)
            if existing is None:
                return fresh.verdict  # we created it (one of several simultaneous connections did)
        else:
            existing = store.get(key)
        decision = decide(existing, now, policy)
        if decision.write == WRITE_UPDATE:
            store.put(key, decision.record, expires_at(decision.record, policy) - now)
        return decision.verdict
