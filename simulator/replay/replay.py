"""The counterfactual replay: what greylisting would have done to a logged day.

Each logged connection is a client with a message. Our policy decides it at its
logged time (or rescaled to a target rate). A tempfailed client comes back in
one of two ways: if the log shows it connecting again before its next retry
would be due, that logged connection is its retry; otherwise it retries as the
retry model says (a sender class of the scenario, Postfix by default), until
it passes or gives up. ``--retry-model none`` uses only the log's own returns,
for a log of a server that already greylisted.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque

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


class Replay:
    """Logged events: ``(time, ip)``, or ``(time, ip, sender, recipient)`` where the log
    shows the envelope (postgrey's): then the client that comes back is the triplet."""

    def __init__(self, server: SimulatedServer, events: list[tuple], model: SenderClass | None) -> None:
        self.server = server
        self.events = events
        self.model = model
        self.stats = server.class_stats("logged clients", "legit")
        self.future: dict[tuple, deque[float]] = defaultdict(deque)
        for event in events:
            self.future[event[1:]].append(event[0])
        self.waiting: dict[tuple, list[Message]] = defaultdict(list)
        server.retry_hook = self._needs_synthetic_retry

    def start(self) -> None:
        env = self.server.env
        for event in self.events:
            env.schedule(event[0], self._logged, event[1:])

    @staticmethod
    def _who(msg: Message) -> tuple:
        return (msg.ip,) if msg.sender is None else (msg.ip, msg.sender, msg.recipient)

    def _needs_synthetic_retry(self, msg: Message, at: float) -> bool:
        who = self._who(msg)
        upcoming = self.future.get(who)
        if upcoming and upcoming[0] <= at:
            self.waiting[who].append(msg)  # the log shows it back first: that is the retry
            return False
        return True

    def _logged(self, who: tuple) -> None:
        server = self.server
        now = server.env.now
        self.future[who].popleft()
        carried = self.waiting.pop(who, [])
        offsets = self.model.offsets if self.model else []
        lifetime = self.model.lifetime if self.model else 0.0
        ip = who[0]
        msg = Message(now, self.stats, ip, offsets, lifetime)
        if len(who) == 3:
            msg.sender, msg.recipient = who[1], who[2]
        self.stats.messages += 1
        self.stats.connections += 1
        if server.connect(ip, msg.sender, msg.recipient):
            for m in [msg] + carried:
                server.delivered(m, now)
            return
        self.stats.tempfails += 1
        for m in [msg] + carried:
            if self.model is not None:
                server.retry_later(m)
            elif self.future[who]:
                self.waiting[who].append(m)  # only the log's own returns count
            else:
                m.stats.given_up += 1


def replay(events: list[tuple], config, store: Store, model: SenderClass | None,
           drain: bool = True, expire_every: float = 86400.0, progress=None) -> SimulatedServer:
    start = math.floor(events[0][0] / HOUR) * HOUR if events else 0.0
    end = events[-1][0] + 1.0 if events else start + 1.0
    server = SimulatedServer(config, store, start, end - start, drain, expire_every, progress)
    Replay(server, events, model).start()
    return server.run()
