"""The greylisting decision, in plain words (as postgrey explains its own).

A client we have never seen is told to come back later ("new"), and we note
when we first saw it. A real mail server queues the message and retries; if it
comes back after ``delay`` seconds, but before ``retry_window`` has run out, it
passes ("passed") and from then on it is a known client ("known") for as long
as it keeps sending at least once per ``max_age``. A client that comes back too
early is told again to wait ("too-soon"); one that comes back after the retry
window, or a known client silent for longer than ``max_age``, starts over as
new. Most spam sources never retry, so they never get through.

A stored record is data we did not necessarily write: another MX sharing the
store may run a fast clock, a clock may have been stepped back, a file may
have been touched into the future, a value may be ``inf`` or ``nan``. No
stored value may delay a client longer than ``delay`` plus
:data:`CLOCK_SKEW`: a record dated up to CLOCK_SKEW ahead of now counts as
written now (an MX whose clock is a little fast); one dated further ahead,
or holding a value that is not a finite number of seconds or a non-negative
count, is treated as corrupt: the client starts over as new, and the record
is overwritten. ``greylist expire`` removes such records.

:func:`decide` is pure: it reads no clock and does no I/O. It takes the stored
record and the time, and returns the verdict and the record to write. Every
front end and the simulator call exactly this function.
"""

from __future__ import annotations

from greylist.core.values import Value

PASS = "pass"
TEMPFAIL = "tempfail"

NEW = "new"
TOO_SOON = "too-soon"
PASSED = "passed"
KNOWN = "known"
WHITELISTED = "whitelisted"
AUTO_WHITELISTED = "auto-whitelisted"

#: How far ahead of our clock a stored time may lie and still count (seconds).
CLOCK_SKEW = 300.0

#: What the caller must write back to the store after a decision.
WRITE_NONE = 0
WRITE_CREATE = 1  # no record existed: create it only if still absent (race-safe)
WRITE_UPDATE = 2  # overwrite the existing record


class Policy(Value):
    """Timing of the policy, in seconds.

    delay: how long a new client must wait before a retry passes (cqgreylist: 60).
    retry_window: how long a first-seen entry waits for its retry before it
        counts as new again (postgrey: 2 days).
    max_age: how long a client that passed stays known after its last pass.
    auto_whitelist: with triplet keys, after this many deliveries that passed
        after waiting a client address skips greylisting for every triplet until
        it has been unseen for max_age (postgrey: 5; 0 turns it off). As
        postgrey counts: per client address (not per network), only a triplet's
        first pass after its wait (not every delivery of a known triplet), and at
        most once an hour, so one busy hour of one sender is not a reputation.
        With ip or subnet keys a known client already skips greylisting, so it
        changes nothing there.
    """

    __slots__ = ("delay", "retry_window", "max_age", "auto_whitelist")

    def __init__(
        self, delay: float = 60.0, retry_window: float = 2 * 86400.0, max_age: float = 35 * 86400.0,
        auto_whitelist: int = 5,
    ) -> None:
        self.delay = delay
        self.retry_window = retry_window
        self.max_age = max_age
        self.auto_whitelist = auto_whitelist
        for name in self.__slots__:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value != value or value < 0:
                raise ValueError(f"policy {name} must be a number of seconds >= 0, not {value!r}")
        if isinstance(self.auto_whitelist, bool) or not isinstance(self.auto_whitelist, int):
            raise ValueError(f"auto_whitelist must be a whole number of passes, not {self.auto_whitelist!r}")
        if self.retry_window < self.delay:
            raise ValueError(
                f"retry window ({self.retry_window:g} s) is shorter than the delay "
                f"({self.delay:g} s): no client could ever pass"
            )


class Record(Value):
    """What a store keeps per key.

    first_seen: when the current greylisting episode began (the first tempfail).
    last_seen: the last time the client was let through (or first_seen while pending).
    passes: how many times it was let through; 0 means still pending.
    """

    __slots__ = ("first_seen", "last_seen", "passes")

    def __init__(self, first_seen: float, last_seen: float, passes: int = 0) -> None:
        self.first_seen = first_seen
        self.last_seen = last_seen
        self.passes = passes

    @property
    def pending(self) -> bool:
        return self.passes == 0


class Verdict(Value):
    """The answer for one connection, as data.

    action: PASS or TEMPFAIL. reason: the policy's NEW, TOO_SOON, PASSED, KNOWN or
    AUTO_WHITELISTED, or the service's (greylist.service): whitelisted,
    whitelisted-recipient, relayclient, store-error, internal-error.
    age: seconds since the entry was first seen (0 for a new one).
    retry_in: for a tempfail, seconds until a retry would pass.
    """

    __slots__ = ("action", "reason", "age", "retry_in")

    def __init__(self, action: str, reason: str, age: float = 0.0, retry_in: float = 0.0) -> None:
        self.action = action
        self.reason = reason
        self.age = age
        self.retry_in = retry_in

    @property
    def passed(self) -> bool:
        return self.action == PASS


class Decision(Value):
    """A verdict and what to write so that the store reflects it."""

    __slots__ = ("verdict", "record", "write")

    def __init__(self, verdict: Verdict, record: Record, write: int) -> None:
        self.verdict = verdict
        self.record = record
        self.write = write


def decide(record: Record | None, now: float, policy: Policy) -> Decision:
    """Decide one connection from its stored record at time ``now``."""
    if record is not None and not sane(record, now):
        # corrupt or from the future: the client starts over, and the record is overwritten
        return Decision(Verdict(TEMPFAIL, NEW, 0.0, policy.delay), Record(now, now, 0), WRITE_UPDATE)
    if record is not None:
        if record.passes:
            if now - record.last_seen <= policy.max_age:
                return Decision(
                    Verdict(PASS, KNOWN, now - record.first_seen),
                    Record(record.first_seen, now, record.passes + 1),
                    WRITE_UPDATE,
                )
        else:
            waited = now - record.first_seen
            if waited < policy.delay:
                return Decision(
                    Verdict(TEMPFAIL, TOO_SOON, max(waited, 0.0), policy.delay - waited),
                    record,
                    WRITE_NONE,
                )
            if waited <= policy.retry_window:
                return Decision(
                    Verdict(PASS, PASSED, waited),
                    Record(record.first_seen, now, 1),
                    WRITE_UPDATE,
                )
        # Stale: a pending entry whose retry window ran out, or a known client
        # silent for longer than max_age. It starts over as new.
        return Decision(
            Verdict(TEMPFAIL, NEW, 0.0, policy.delay), Record(now, now, 0), WRITE_UPDATE
        )
    return Decision(Verdict(TEMPFAIL, NEW, 0.0, policy.delay), Record(now, now, 0), WRITE_CREATE)


def sane(record: Record, now: float) -> bool:
    """True when the record holds finite times no further ahead than CLOCK_SKEW and a
    non-negative count (NaN fails every comparison, so it is never sane)."""
    limit = now + CLOCK_SKEW
    first, last, passes = record.first_seen, record.last_seen, record.passes
    return (-1e12 < first <= limit and -1e12 < last <= limit
            and type(passes) is int and 0 <= passes < 1 << 62)


#: The auto-whitelist counts a client at most once in this many seconds (postgrey's hour).
AWL_INTERVAL = 3600.0


def decide_auto_whitelist(client: Record | None, now: float, policy: Policy) -> Decision | None:
    """A pass for a client with ``auto_whitelist`` counted passes seen within max_age, else None.

    Its tally is refreshed (written) at most once an hour, as postgrey does.
    """
    if (client is None or not policy.auto_whitelist or not sane(client, now)
            or client.passes < policy.auto_whitelist or now - client.last_seen > policy.max_age):
        return None
    verdict = Verdict(PASS, AUTO_WHITELISTED, max(now - client.first_seen, 0.0))
    if now < client.last_seen + AWL_INTERVAL:
        return Decision(verdict, client, WRITE_NONE)
    return Decision(verdict, Record(client.first_seen, now, client.passes + 1), WRITE_UPDATE)


def count_pass(client: Record | None, now: float, policy: Policy) -> Record | None:
    """The client's tally after a triplet passed after waiting: one more, at most once an
    hour (restarting if it went quiet); None when there is nothing to write."""
    if client is None or not sane(client, now) or now - client.last_seen > policy.max_age:
        return Record(now, now, 1)
    if now < client.last_seen + AWL_INTERVAL:
        return None
    return Record(client.first_seen, now, client.passes + 1)


def whitelisted() -> Verdict:
    """The verdict for a client that skips greylisting without touching the store."""
    return Verdict(PASS, WHITELISTED)


def expires_at(record: Record, policy: Policy) -> float:
    """When the record goes stale (and :func:`decide` would start over): a store's TTL."""
    if record.passes:
        return record.last_seen + policy.max_age
    return record.first_seen + policy.retry_window


def is_expired(record: Record, now: float, policy: Policy) -> bool:
    """True when :func:`decide` would treat the record as new: safe to delete."""
    if not sane(record, now):
        return True
    if record.passes:
        return now - record.last_seen > policy.max_age
    return now - record.first_seen > policy.retry_window
