"""A simulated server: traffic from a scenario, decisions from the real core.

Every connection goes through :func:`greylist.greylister.check` with the
store the user chose and the policy under test, at the virtual time of the
event loop; nothing here decides anything itself. A change to the policy or
to a store changes the simulation by itself.

Traffic is drawn so that it is the same for every policy: arrival times,
sender classes, addresses and per-message queue phases come from one seeded
generator at arrival, and the address a provider farm retries from is a
fixed function of the message and the attempt number. So ``--compare``
runs each policy on the very same connections; only the answers differ.
"""

from __future__ import annotations

import bisect
import math
import random
import time
from dataclasses import dataclass

from greylist.expiry import expire
from greylist.greylister import check
from greylist.policy import PASS, Policy
from greylist.stores.base import Store
from simulator.engine import Environment
from simulator.metrics import ClassStats, Hour
from simulator.scenario import Scenario, SenderClass

HOUR = 3600.0
DAY = 86400.0


@dataclass
class RunOptions:
    duration: float = DAY
    seed: int = 7
    drain: bool = True  # follow queued messages to delivery or give-up after the last arrival
    expire_every: float = DAY  # the simulated `greylist expire` cron job
    rate: float | None = None  # override the scenario's first-attempt rate (per second)


def random_ipv4(rng: random.Random) -> str:
    """A random public-looking IPv4 address (no 0/8, 10/8, 127/8 or multicast and above)."""
    while True:
        n = rng.getrandbits(32)
        a = n >> 24
        if 0 < a < 224 and a not in (10, 127):
            return f"{a}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


class Message:
    __slots__ = ("first", "cls", "stats", "ip", "attempt", "phase", "tag", "pool")

    def __init__(self, first, cls, stats, ip, phase, tag, pool):
        self.first = first
        self.cls = cls
        self.stats = stats
        self.ip = ip
        self.attempt = 0
        self.phase = phase
        self.tag = tag
        self.pool = pool


class Simulation:
    def __init__(self, scenario: Scenario, policy: Policy, store: Store, options: RunOptions,
                 progress=None):
        self.progress = progress  # called with the fraction of the window done, once an hour
        self.scenario = scenario
        self.policy = policy
        self.store = store
        self.options = options
        self.env = Environment(scenario.start)
        self.rng = random.Random(options.seed)
        self.stats = {c.name: ClassStats(c.name, c.kind) for c in scenario.senders}
        self.hours: list[Hour] = []
        self.decision_ns: list[int] = []
        self.disk_samples: list[dict] = []
        self.expiry_runs: list[dict] = []
        self.end = scenario.start + options.duration
        self.arrivals_open = True
        rng = self.rng
        # Fixed populations: regular correspondents and provider farms' pools.
        self.regulars = {c.name: [random_ipv4(rng) for _ in range(c.regulars)] for c in scenario.senders}
        self.pools = {}
        for c in scenario.senders:
            if c.pool > 1:
                nets = [random_ipv4(rng).rsplit(".", 1)[0] for _ in range(c.pool_networks)]
                self.pools[c.name] = [f"{nets[i % len(nets)]}.{10 + (i // len(nets)) % 240}"
                                      for i in range(c.pool)]

    # -- arrivals ------------------------------------------------------------
    def _stream(self, kind: str, mean_rate: float, peak_hour: float, amplitude: float) -> None:
        classes = self.scenario.of_kind(kind)
        if mean_rate <= 0 or not classes:
            return
        cumulative, total = [], 0.0
        for c in classes:
            total += c.share
            cumulative.append(total)
        state = {"classes": classes, "cum": cumulative, "max": mean_rate * (1 + amplitude),
                 "mean": mean_rate, "peak": peak_hour * HOUR, "amp": amplitude}
        self._next_arrival(state)

    def _next_arrival(self, state: dict) -> None:
        """Thinning: candidates at the peak rate, kept with probability rate(t)/peak rate."""
        rng = self.rng
        t = self.env.now
        two_pi_over_day = 2 * math.pi / DAY
        start = self.scenario.start
        while True:
            t += rng.expovariate(state["max"])
            if t >= self.end:
                return
            rate = state["mean"] * (1 + state["amp"] * math.cos(two_pi_over_day * (t - start - state["peak"])))
            if rng.random() * state["max"] <= rate:
                break
        self.env.schedule(t, self._arrive, state)

    def _arrive(self, state: dict) -> None:
        rng = self.rng
        r = rng.random() * state["cum"][-1]
        cls: SenderClass = state["classes"][bisect.bisect_right(state["cum"], r)] \
            if r < state["cum"][-1] else state["classes"][-1]
        pool = self.pools.get(cls.name)
        if pool is not None:
            ip = None
        elif cls.regulars and rng.random() < cls.repeat_share:
            ip = rng.choice(self.regulars[cls.name])
        else:
            ip = random_ipv4(rng)
        phase = rng.random() * cls.queue_run if cls.queue_run else 0.0
        msg = Message(self.env.now, cls, self.stats[cls.name], ip, phase, rng.getrandbits(32), pool)
        msg.stats.messages += 1
        self._attempt(msg)
        self._next_arrival(state)

    # -- one connection ------------------------------------------------------
    def _attempt(self, msg: Message) -> None:
        now = self.env.now
        if msg.pool is not None:
            # The farm host for this try: a fixed function of message and attempt.
            pool = msg.pool
            ip = pool[(msg.tag * 2654435761 + msg.attempt * 40503) % len(pool)]
        else:
            ip = msg.ip
        started = time.perf_counter_ns()
        verdict = check(self.store, ip, now, self.policy)
        self.decision_ns.append(time.perf_counter_ns() - started)
        stats = msg.stats
        stats.connections += 1
        hour = self.hours[-1]
        hour.connections += 1
        if verdict.action == PASS:
            stats.delivered += 1
            legit = msg.cls.kind == "legit"
            if msg.attempt:
                stats.delayed += 1
                stats.delays.append(now - msg.first)
                if legit:
                    hour.legit_delayed += 1
            if legit:
                hour.legit_delivered += 1
            else:
                hour.spam_passed += 1
            return
        stats.tempfails += 1
        hour.tempfails += 1
        offsets = msg.cls.offsets
        if msg.attempt < len(offsets):
            at = msg.first + offsets[msg.attempt] + msg.phase
            msg.attempt += 1
            if at <= msg.first + msg.cls.lifetime and (self.options.drain or at < self.end):
                self.env.schedule(at, self._attempt, msg)
                return
            if at <= msg.first + msg.cls.lifetime:
                stats.in_flight += 1
                return
        stats.given_up += 1

    # -- housekeeping --------------------------------------------------------
    def _tick(self) -> None:
        if self.hours:
            self.hours[-1].entries = self.store.size()
        if self.progress is not None:
            self.progress((self.env.now - self.scenario.start) / self.options.duration)
        if self.env.now < self.end:
            self.hours.append(Hour())
            self.env.timeout(HOUR, self._tick)

    def _expire(self) -> None:
        self._sample_disk()
        counts = expire(self.store, self.env.now, self.policy)
        self.expiry_runs.append({"at_hours": round((self.env.now - self.scenario.start) / HOUR, 2),
                                 **counts})
        if self.env.now + self.options.expire_every < self.end:
            self.env.timeout(self.options.expire_every, self._expire)

    def _sample_disk(self) -> None:
        usage = getattr(self.store, "disk_usage", None)
        if usage is not None:
            self.disk_samples.append(usage())

    def run(self) -> "Simulation":
        s = self.scenario
        rate = self.options.rate if self.options.rate is not None else s.rate
        self.env.schedule(s.start, self._tick)
        self._stream("spam", rate * s.spam_share, s.spam_peak_hour, s.spam_amplitude)
        self._stream("legit", rate * (1 - s.spam_share), s.legit_peak_hour, s.legit_amplitude)
        if self.options.expire_every and self.options.expire_every < self.options.duration:
            self.env.schedule(s.start + self.options.expire_every, self._expire)
        started = time.perf_counter()
        self.env.run(self.end)
        self.entries_at_end_of_window = self.store.size()
        self.extra_hours = self.hours
        if self.options.drain:
            drain = Hour()
            self.hours.append(drain)  # connections after the window: retries of queued mail
            self.env.run()
            self.hours.pop()
            self.drain = drain
        else:
            self.drain = Hour()
        self.wall_seconds = time.perf_counter() - started
        self._sample_disk()
        return self
