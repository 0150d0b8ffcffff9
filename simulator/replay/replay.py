"""The counterfactual replay: what greylisting would have done to a logged day.

Each logged connection is a client with a message. Our policy decides it at its
logged time (or rescaled to a target rate). A tempfailed client comes back in
one of two ways: if the log shows it connecting again before its next retry
would be due, that logged connection is its retry; otherwise it retries as the
retry model says (a sender class of the scenario, Postfix by default), until
it passes or gives up. ``--retry-model none`` uses only the log's own returns,
for a log of a server that already greylisted.

Clients are told apart by behaviour (:data:`RULE`): one that the log shows
coming back is a correspondent (legitimate), one seen once, or rejected
where the log says so, is counted as spam and retries as the scenario's spam
sources do; so a replay reports legitimate mail delayed and spam stopped
separately, and estimates the share of mail from returning senders.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict

from greylist.stores.base import Store
from simulator.scenario import Scenario, ScenarioError, SenderClass
from simulator.simulation import HOUR, Message, SimulatedServer


def retry_model(scenario: Scenario, name: str) -> SenderClass | None:
    """The sender class whose schedule tempfailed clients follow (None: no synthetic retries)."""
    if name == "none":
        return None
    for sender in scenario.senders:
        if sender.name == name:
            return sender
    names = ", ".join(["none"] + [s.name for s in scenario.senders if s.offsets])
    raise ScenarioError(f"unknown retry model {name!r}: use one of {names}")


def rescale(events: list[tuple], rate: float | None) -> tuple[list[tuple], float]:
    """Events moved so that their mean rate is ``rate`` per second (None: as logged)."""
    if not events:
        return events, 1.0
    span = events[-1][0] - events[0][0]
    if rate is None or span <= 0:
        return events, 1.0
    factor = (len(events) / span) / rate  # >1 stretches time, <1 compresses it
    t0 = events[0][0]
    return [(t0 + (e[0] - t0) * factor, *e[1:]) for e in events], factor


#: seen again this long after its first connection: a client that comes back, not a quick retry
RETURN_GAP = 300.0
LEGIT, SPAM = "returning clients", "one-time or rejected clients"
RULE = (f"clients the log shows again {RETURN_GAP / 60:g} min or more after their first connection count "
        "as legitimate; clients seen only once (or within those minutes), or whose mail the log shows "
        "rejected, count as spam")


def returning(events: list[tuple], rejected: frozenset[str] = frozenset()) -> dict[str, bool]:
    """Each logged address: True when it behaves like a correspondent (comes back), by :data:`RULE`."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for event in events:
        first.setdefault(event[1], event[0])
        last[event[1]] = event[0]
    return {ip: last[ip] - first[ip] >= RETURN_GAP and ip not in rejected for ip in first}


def returning_share(events: list[tuple], rejected: frozenset[str] = frozenset()) -> float | None:
    """Of the connections from legitimate clients (by :data:`RULE`) after the log's first
    quarter, the share from an address seen before (not a retry within :data:`RETURN_GAP`):
    an estimate of the scenario's ``repeat_share`` for this server. None for a log too
    short to tell."""
    if len(events) < 20:
        return None
    span = events[-1][0] - events[0][0]
    if span < 4 * RETURN_GAP:
        return None
    legit = returning(events, rejected)
    after = events[0][0] + span / 4
    seen: dict[str, float] = {}
    counted = repeat = 0
    for event in events:
        t, ip = event[0], event[1]
        earlier = seen.setdefault(ip, t)
        if t >= after and legit[ip]:
            counted += 1
            repeat += t - earlier >= RETURN_GAP
    return round(repeat / counted, 4) if counted else None


class Replay:
    """Logged events: ``(time, ip)``, or ``(time, ip, sender, recipient)`` where the log
    shows the envelope (postgrey's): then the client that comes back is the triplet.

    Clients are classified by :data:`RULE`. A tempfailed legitimate client retries as
    ``model`` (a sender class) unless the log shows it back first; a spam client as one
    of the scenario's spam sources, in their shares (``spam_sources``). With ``model``
    None (a log of a server that greylists already) only the log's own returns count.
    """

    def __init__(self, server: SimulatedServer, events: list[tuple], model: SenderClass | None,
                 spam_sources: list[SenderClass] | None = None, rejected: frozenset[str] = frozenset()) -> None:
        self.server = server
        self.events = events
        self.model = model
        self.spam_sources = [s for s in (spam_sources or []) if s.share > 0]
        self.legit = server.class_stats(LEGIT, "legit")
        self.spam = server.class_stats(SPAM, "spam")
        self.returns = returning(events, rejected)
        #: each client's (or triplet's) logged times still to come, latest first (a list, not
        #: a deque: a deque costs 600 bytes, and most keys of a long log are seen once)
        self.future: dict[tuple, list[float]] = {}
        for event in reversed(events):
            who = event[1:]
            later = self.future.get(who)
            if later is None:
                self.future[who] = [event[0]]
            else:
                later.append(event[0])
        self.waiting: dict[tuple, list[Message]] = defaultdict(list)
        self.first_seq = 0
        server.retry_hook = self._needs_synthetic_retry

    def start(self) -> None:
        """The log's lines are scheduled one at a time, each as the one before runs, with the
        sequence numbers they would have had all scheduled now (the same run, event for event)."""
        if self.events:
            self.first_seq = self.server.env.reserve(len(self.events))
            self.server.env.schedule_reserved(self.events[0][0], self.first_seq, self._next, 0)

    def _next(self, i: int) -> None:
        """The log's line ``i``, with the next one scheduled."""
        events = self.events
        if i + 1 < len(events):
            self.server.env.schedule_reserved(events[i + 1][0], self.first_seq + i + 1, self._next, i + 1)
        self._logged(events[i][1:])

    @staticmethod
    def _who(msg: Message) -> tuple:
        return (msg.ip,) if msg.sender is None else (msg.ip, msg.sender, msg.recipient)

    def _needs_synthetic_retry(self, msg: Message, at: float) -> bool:
        who = self._who(msg)
        upcoming = self.future.get(who)
        if upcoming and upcoming[-1] <= at:
            self.waiting[who].append(msg)  # the log shows it back first: that is the retry
            return False
        return True

    def _logged(self, who: tuple) -> None:
        server = self.server
        now = server.env.now
        upcoming = self.future[who]
        upcoming.pop()
        if not upcoming:
            del self.future[who]  # a long log's keys go as their last line is replayed
        carried = self.waiting.pop(who, [])
        ip = who[0]
        legit = self.returns[ip]
        stats = self.legit if legit else self.spam
        tag = zlib.crc32(f"{ip} {now!r}".encode())
        source = self.model if legit or not self.spam_sources else self._spam_source(tag)
        offsets = source.schedule(tag) if source is not None else []
        msg = Message(now, stats, ip, offsets, source.lifetime if source is not None else 0.0, tag=tag)
        if len(who) == 3:
            msg.sender, msg.recipient = who[1], who[2]
        stats.messages += 1
        stats.connections += 1
        if server.connect(ip, msg.sender, msg.recipient):
            for m in [msg] + carried:
                server.delivered(m, now)
            return
        stats.tempfails += 1
        for m in [msg] + carried:
            if self.model is not None:
                server.retry_later(m)
            elif who in self.future:
                self.waiting[who].append(m)  # only the log's own returns count
            else:
                m.stats.given_up += 1


    def _spam_source(self, tag: int) -> SenderClass:
        """One of the scenario's spam sources, in their shares (a fixed function of the tag)."""
        total = sum(s.share for s in self.spam_sources)
        point = (tag % 10_000) / 10_000 * total
        for source in self.spam_sources:
            point -= source.share
            if point < 0:
                return source
        return self.spam_sources[-1]


def replay(events: list[tuple], config, store: Store, model: SenderClass | None,
           drain: bool = True, expire_every: float = 86400.0, progress=None,
           spam_sources: list[SenderClass] | None = None, rejected: frozenset[str] = frozenset()) -> SimulatedServer:
    """``spam_sources``: how clients counted as spam retry (the scenario's spam senders);
    without them they retry as ``model`` too."""
    start = math.floor(events[0][0] / HOUR) * HOUR if events else 0.0
    end = events[-1][0] + 1.0 if events else start + 1.0
    server = SimulatedServer(config, store, start, end - start, drain, expire_every, progress)
    Replay(server, events, model, spam_sources if model is not None else None, rejected).start()
    return server.run()
