"""A simulated server: traffic in, decisions from the real core, measurements out.

Every connection goes through the production service
(:class:`greylist.service.Greylister`: whitelists, key, store, failures, shadow
mode) with the store the user chose and the settings under test, at the
virtual time of the event loop; nothing here decides anything itself. A
change to the policy, the service or a store changes the simulation by itself.

:class:`SimulatedServer` is what the traffic talks to (clock, store, policy,
counters, the hourly timeline, the expire cron job). The traffic is either
synthetic (:class:`SyntheticTraffic`, from a scenario) or replayed from logs
(:mod:`simulator.replay`). Both follow each message through its retries with
:class:`Message` and :meth:`SimulatedServer.attempt`.

Synthetic traffic is drawn so that it is the same for every policy: arrival
times, sender classes, addresses and per-message queue phases come from one
seeded generator at arrival, and the address a provider farm retries from is
a fixed function of the message and the attempt number. So ``--compare`` runs
each policy on the very same connections; only the answers differ.
"""

from __future__ import annotations

import bisect
import math
import random
import time
from dataclasses import dataclass

from greylist.core.expiry import expire
from greylist.core.policy import PASS
from greylist.service import Connection, Greylister
from greylist.stores.base import DISK_USAGE, Store
from simulator.engine import Environment
from simulator.metrics import ClassStats, Hour
from simulator.scenario import Scenario, SenderClass

HOUR = 3600.0
DAY = 86400.0


@dataclass
class RunOptions:
    duration: float = DAY
    seed: int = 7
    drain: bool = True  # follow queued messages to delivery or give-up after the window
    expire_every: float = DAY  # the simulated `greylist expire` cron job
    rate: float | None = None  # override the scenario's first-attempt rate (per second)
    warmup: float = 0.0  # seconds (whole hours) of the same traffic before the window, not reported


def random_ipv4(rng: random.Random) -> str:
    """A random public-looking IPv4 address (no 0/8, 10/8, 127/8 or multicast and above)."""
    while True:
        n = rng.getrandbits(32)
        a = n >> 24
        if 0 < a < 224 and a not in (10, 127):
            return f"{a}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


class Message:
    """One message being delivered: its first attempt, retries so far, where it comes from.

    offsets: retry times after the first attempt; lifetime: when the sender gives up;
    pool: a provider farm's addresses (the try's address is picked from it by tag);
    waiting: for replay, the next logged connection of this client takes over.
    """

    __slots__ = ("first", "stats", "kind", "ip", "attempt", "phase", "tag", "pool", "hosts",
                 "offsets", "lifetime", "sender", "recipient", "stick")

    def __init__(self, first: float, stats: ClassStats, ip: str | None, offsets: list[float],
                 lifetime: float, phase: float = 0.0, tag: int = 0, pool: list[str] | None = None,
                 hosts: dict[str, str] | None = None):
        self.first = first
        self.stats = stats
        self.kind = stats.kind
        self.ip = ip
        self.attempt = 0
        self.phase = phase
        self.tag = tag
        self.pool = pool
        self.hosts = hosts
        self.offsets = offsets
        self.lifetime = lifetime
        self.sender: str | None = None
        self.recipient: str | None = None
        self.stick = 0.0  # a farm: the chance a retry keeps the address of the try before


class SimulatedServer:
    """The clock, the store and the settings under test, and everything measured.

    ``config``: a :class:`greylist.config.Config`, as production reads it.
    """

    def __init__(self, config, store: Store, start: float, duration: float,
                 drain: bool = True, expire_every: float = DAY, progress=None, warmup: float = 0.0) -> None:
        self.config = config
        self.policy = config.policy
        self.keying = config.keying
        self.envelope = self.keying.needs_envelope
        self.whitelisted = 0
        self.store = store
        # The warm-up runs the same traffic before the window, so the window starts in the
        # steady state (regular correspondents known, the store at its size); what
        # happens in it is counted apart and dropped when the window opens.
        if warmup % HOUR:
            raise ValueError("the warm-up is a whole number of hours")
        self.warmup = warmup
        self.env = Environment(start - warmup)
        self.service = Greylister(config, store, clock=self.env.clock)
        self.start = start
        self.duration = duration
        self.end = start + duration
        self.drain = drain
        self.expire_every = expire_every
        self.progress = progress  # called with the fraction of the window done, once an hour
        self.hours: list[Hour] = [Hour()]  # the first hour of the window
        self.decision_ns: list[int] = []
        self.disk_samples: list[dict] = []
        self.expiry_runs: list[dict] = []
        self.stats: dict[str, ClassStats] = {}
        self.warm_stats: dict[str, ClassStats] = {}  # messages first tried during the warm-up
        self.decided = 0  # every connection decided, warm-up included (the speed of the run)
        self.retry_hook = None  # replay: decides whether a synthetic retry is needed

    def class_stats(self, name: str, kind: str) -> ClassStats:
        if name not in self.stats:
            self.stats[name] = ClassStats(name, kind)
            self.warm_stats[name] = ClassStats(name, kind)
        return self.stats[name]

    def stats_for(self, name: str) -> ClassStats:
        """Where a message arriving now is counted: the window's figures, or the warm-up's."""
        return self.stats[name] if self.env.now >= self.start else self.warm_stats[name]

    def _open_window(self) -> None:
        """The warm-up is over: what is measured starts now."""
        self.hours = [Hour()]
        self.decision_ns = []
        self.whitelisted = 0
        self.store.ops.clear()
        self.expiry_runs = []
        self.disk_samples = []

    # -- one connection ------------------------------------------------------
    def connect(self, ip: str, sender: str | None = None, recipient: str | None = None,
                host: str = "") -> bool:
        """One SMTP connection from ``ip`` now (with its envelope for triplet keys); True when it passes."""
        outcome = self.service.decide(Connection(ip, host, sender, recipient, host_verified=True))
        self.decided += 1
        hour = self.hours[-1]
        hour.connections += 1
        if outcome.key is None:  # whitelisted: the store was not asked
            self.whitelisted += 1
        else:
            self.decision_ns.append(int(outcome.decision_ms * 1e6))
        if outcome.verdict.action == PASS:
            return True
        hour.tempfails += 1
        return False

    def attempt(self, msg: Message) -> None:
        """A try of ``msg``: deliver it, or schedule its next retry, or give up."""
        now = self.env.now
        if msg.pool is not None:
            # The farm host for this try: a fixed function of message and attempt. A retry
            # keeps the last try's host with chance ``stick`` (Pagani et al. saw Gmail use
            # 7 addresses in 9 tries, hotmail.com one), drawn from the same hash.
            attempt = msg.attempt
            while attempt and ((msg.tag * 2246822519 + attempt * 3266489917) & 0xFFFF) < msg.stick * 0x10000:
                attempt -= 1
            ip = msg.pool[(msg.tag * 2654435761 + attempt * 40503) % len(msg.pool)]
        else:
            ip = msg.ip
        stats = msg.stats
        stats.connections += 1
        host = msg.hosts[ip] if msg.hosts is not None else ""
        if self.connect(ip, msg.sender, msg.recipient, host):
            self.delivered(msg, now)
            return
        stats.tempfails += 1
        self.retry_later(msg)

    def delivered(self, msg: Message, now: float) -> None:
        stats = msg.stats
        hour = self.hours[-1]
        stats.delivered += 1
        if now > msg.first:
            stats.delayed += 1
            stats.delays.append(now - msg.first)
            if msg.kind == "legit":
                hour.legit_delayed += 1
        if msg.kind == "legit":
            hour.legit_delivered += 1
        else:
            hour.spam_passed += 1

    def retry_later(self, msg: Message) -> None:
        offsets = msg.offsets
        if msg.attempt < len(offsets):
            at = msg.first + offsets[msg.attempt] + msg.phase
            msg.attempt += 1
            if at <= msg.first + msg.lifetime:
                if self.retry_hook is not None and not self.retry_hook(msg, at):
                    return  # replay: the client's next logged connection carries it
                if self.drain or at < self.end:
                    self.env.schedule(at, self.attempt, msg)
                else:
                    msg.stats.in_flight += 1
                return
        msg.stats.given_up += 1

    # -- housekeeping --------------------------------------------------------
    def _tick(self) -> None:
        """On the hour: close the hour's line of the timeline, open the next (the first
        tick of the window drops what the warm-up counted)."""
        if self.warmup and abs(self.env.now - self.start) < 1e-6:
            self._open_window()
            self.env.timeout(HOUR, self._tick)
            return
        self.hours[-1].entries = self.store.size()
        if self.progress is not None:
            self.progress((self.env.now - self.start + self.warmup) / (self.duration + self.warmup))
        if self.env.now < self.end:
            self.hours.append(Hour())
            self.env.timeout(HOUR, self._tick)

    def _expire(self) -> None:
        self._sample_disk()
        counts = expire(self.store, self.env.now, self.policy)
        self.expiry_runs.append({"at_hours": round((self.env.now - self.start) / HOUR, 2), **counts})
        if self.env.now + self.expire_every < self.end:
            self.env.timeout(self.expire_every, self._expire)

    def _sample_disk(self) -> None:
        if DISK_USAGE in self.store.capabilities:
            self.disk_samples.append(self.store.disk_usage())

    def run(self) -> "SimulatedServer":
        """Process the window, then (with drain) the retries of mail still queued."""
        self.env.schedule(self.start - self.warmup + HOUR, self._tick)
        if self.expire_every and self.expire_every < self.duration + self.warmup:
            self.env.schedule(self.start - self.warmup + self.expire_every, self._expire)
        started = time.perf_counter()
        self.env.run(self.end)
        self.entries_at_end_of_window = self.store.size()
        self.hours[-1].entries = self.entries_at_end_of_window
        self.drain_hour = Hour()
        if self.drain:
            self.hours.append(self.drain_hour)  # counts the retries after the window
            self.env.run()
            self.hours.pop()
        self.wall_seconds = time.perf_counter() - started
        self._sample_disk()
        return self


class Population:
    """The addresses of a scenario's senders: regular correspondents, provider
    farms' pools, and a fresh address for everybody else. Shared by the
    synthetic simulation and ``simulate live``, so both draw the same mix."""

    def __init__(self, scenario: Scenario, rng: random.Random) -> None:
        self.rng = rng
        self.regulars = {c.name: [random_ipv4(rng) for _ in range(c.regulars)] for c in scenario.senders}
        self.pools: dict[str, list[str]] = {}
        self.hosts: dict[str, dict[str, str]] = {}  # a named farm's host names by address
        for c in scenario.senders:
            if c.pool > 1:
                nets = [random_ipv4(rng).rsplit(".", 1)[0] for _ in range(c.pool_networks)]
                self.pools[c.name] = [f"{nets[i % len(nets)]}.{10 + (i // len(nets)) % 240}"
                                      for i in range(c.pool)]
                if c.host_domain:
                    self.hosts[c.name] = {ip: f"mail-{i}.{c.host_domain}"
                                          for i, ip in enumerate(self.pools[c.name])}

    def address(self, cls: SenderClass) -> str | None:
        """The first try's address; None for a farm, which picks one per try."""
        rng = self.rng
        if cls.name in self.pools:
            return None
        if cls.regulars and rng.random() < cls.repeat_share:
            return rng.choice(self.regulars[cls.name])
        return random_ipv4(rng)

    def known(self) -> list[str]:
        """Addresses a server that has run for a while knows: regulars and farm pools."""
        out = [ip for ips in self.regulars.values() for ip in ips]
        return out + [ip for ips in self.pools.values() for ip in ips]


class SyntheticTraffic:
    """Arrivals from a scenario: two Poisson streams (legit, spam) with daily curves."""

    def __init__(self, server: SimulatedServer, scenario: Scenario, seed: int,
                 rate: float | None = None) -> None:
        self.server = server
        self.scenario = scenario
        self.rate = scenario.rate if rate is None else rate
        self.rng = random.Random(seed)
        for c in scenario.senders:
            server.class_stats(c.name, c.kind)
        self.population = Population(scenario, self.rng)

    def start(self) -> None:
        s = self.scenario
        self._stream("spam", self.rate * s.spam_share, s.spam_peak_hour, s.spam_amplitude)
        self._stream("legit", self.rate * (1 - s.spam_share), s.legit_peak_hour, s.legit_amplitude)

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
        """Thinning: candidates at the peak rate, kept with probability rate(t) / peak rate."""
        rng = self.rng
        server = self.server
        t = server.env.now
        omega = 2 * math.pi / DAY
        origin = server.start + state["peak"]
        while True:
            t += rng.expovariate(state["max"])
            if t >= server.end:
                return
            rate = state["mean"] * (1 + state["amp"] * math.cos(omega * (t - origin)))
            if rng.random() * state["max"] <= rate:
                break
        server.env.schedule(t, self._arrive, state)

    def _arrive(self, state: dict) -> None:
        rng = self.rng
        cum = state["cum"]
        index = min(bisect.bisect_right(cum, rng.random() * cum[-1]), len(cum) - 1)
        cls: SenderClass = state["classes"][index]
        pool = self.population.pools.get(cls.name)
        ip = self.population.address(cls)
        phase = rng.random() * cls.queue_run if cls.queue_run else 0.0
        server = self.server
        stats = server.stats_for(cls.name)
        tag = rng.getrandbits(32)
        msg = Message(server.env.now, stats, ip, cls.schedule(tag), cls.lifetime, phase,
                      tag, pool, self.population.hosts.get(cls.name))
        if pool is not None:
            msg.stick = cls.stick
        if server.envelope:
            msg.sender, msg.recipient = envelope(cls, ip, msg.tag)
        stats.messages += 1
        server.attempt(msg)
        self._next_arrival(state)


LOCAL_USERS = 500  # mailboxes of the simulated domain


def envelope(cls: SenderClass, ip: str | None, tag: int) -> tuple[str, str]:
    """Sender and recipient of a message, a fixed function of its sender and tag (no
    random draws, so triplet runs see the very same traffic as ip runs).

    A host (a regular correspondent or a new one) sends as one of three users of
    its own domain; a farm's messages come from its many users; spam uses a new
    sender every time. Recipients are the local domain's mailboxes.
    """
    recipient = f"user{(tag >> 12) % LOCAL_USERS}@local.example"
    if cls.kind == "spam":
        return f"{tag:08x}@s{tag % 997}.example", recipient
    if ip is None:
        return f"u{tag % 20000}@{cls.name}.example", recipient
    return f"user{tag % 3}@h{ip.replace('.', '-')}.example", recipient


def simulate(scenario: Scenario, config, store: Store, options: RunOptions,
             progress=None) -> SimulatedServer:
    """One synthetic run, start to end, with ``config`` (a greylist Config) as production reads it."""
    server = SimulatedServer(config, store, scenario.start, options.duration, options.drain,
                             options.expire_every, progress, options.warmup)
    SyntheticTraffic(server, scenario, options.seed, options.rate).start()
    return server.run()
