"""Removing stale entries: the one loop behind ``greylist expire`` and the simulator's cron."""

from __future__ import annotations

from greylist.core.policy import Policy, is_expired
from greylist.stores.base import Store


def expire(store: Store, now: float, policy: Policy, dry_run: bool = False,
           on_removed=None) -> dict[str, int]:
    """Delete what :func:`~greylist.core.policy.decide` would treat as new anyway.

    Safe beside running wrappers: an entry is deleted only if it still holds
    the record the scan read, so one that a connection renewed meanwhile stays.
    """
    counts = {"scanned": 0, "expired_pending": 0, "expired_known": 0, "removed": 0,
              "changed_meanwhile": 0}
    for key, record in store.scan():
        counts["scanned"] += 1
        if not is_expired(record, now, policy):
            continue
        counts["expired_pending" if record.pending else "expired_known"] += 1
        if dry_run:
            if on_removed is not None:
                on_removed(key, record, False)
            continue
        if store.delete(key, expected=record):
            counts["removed"] += 1
            if on_removed is not None:
                on_removed(key, record, True)
        else:
            counts["changed_meanwhile"] += 1
    return counts
