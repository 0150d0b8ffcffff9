"""One connection against one store: read, decide, write, settle races.

This is the only place that turns a :func:`~greylist.core.policy.decide` result
into store operations. The wrapper, the other front ends and the simulator
all call :func:`check`, so a change to the policy or the write protocol
changes all of them at once.

Most connections at a busy MX come from addresses never seen before, so the
store is first asked to create the entry a new client would get, and to hand
back the existing one instead if there is one (:meth:`Store.get_or_add`): on
Redis that is one round trip (``SET NX GET``) for every new client.
"""

from __future__ import annotations

from greylist.core.policy import (PASSED, WRITE_CREATE, WRITE_UPDATE, Policy, Verdict, count_pass,
                             decide, decide_auto_whitelist, expires_at)
from greylist.stores.base import Store

#: Store key prefix of a client's tally of passed deliveries (triplet keys only).
AWL_PREFIX = "awl|"


def check(store: Store, key: str, now: float, policy: Policy, client: str | None = None,
          notes: dict | None = None) -> Verdict:
    """Decide for ``key`` at ``now`` and record the outcome. Raises StoreError.

    ``client``: with triplet keys, the client address whose passes after waiting
    count towards the auto-whitelist. ``notes``: where to say what changed beyond the
    verdict: ``whitelisted_after`` (the count) when this pass made the client
    auto-whitelisted, an event postgrey logs (``whitelisted: NAME[ADDRESS]``) and an
    admin watches for.
    """
    if client is None or not policy.auto_whitelist:
        with store.transaction():
            return _check(store, key, now, policy)
    awl_key = AWL_PREFIX + client
    with store.transaction():
        tally = store.get(awl_key)
        auto = decide_auto_whitelist(tally, now, policy)
        if auto is not None:
            if auto.write == WRITE_UPDATE:
                store.put(awl_key, auto.record, expires_at(auto.record, policy) - now)
            return auto.verdict
        verdict = _check(store, key, now, policy)
        if verdict.reason == PASSED:  # a triplet's first pass after its wait
            tally = count_pass(tally, now, policy)
            if tally is not None:
                store.put(awl_key, tally, expires_at(tally, policy) - now)
                if tally.passes == policy.auto_whitelist and notes is not None:  # counted once an hour
                    notes["whitelisted_after"] = tally.passes
        return verdict


def _check(store: Store, key: str, now: float, policy: Policy) -> Verdict:
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
