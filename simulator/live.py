"""``simulate live``: the real wrapper, one process per connection, at a target rate.

The virtual-clock simulator says what greylisting does to traffic; this says
what it costs the machine. Connections arrive open-loop (Poisson) at the
offered rate; each one runs the installed ``greylist-wrap`` exactly as
tcpserver would (its own process, the UCSPI variables set, stdin and stdout
real pipes), with a small ``/bin/sh`` stand-in for qmail-smtpd behind it,
while a scripted SMTP client on our side sends HELO, MAIL, RCPT and QUIT. As
with tcpserver's ``-c``, a connection that arrives while ``concurrency``
sessions are running is refused and counted.

Client addresses come from the same scenario as the simulator; the store is
first warmed with the scenario's regular correspondents and provider farms as
known clients (as after some days of operation), so it sees a real mix of new
and known clients. Everything is bounded: the run stops after ``duration``,
each session is killed after ``session_timeout``, nothing leaves the machine.
"""

from __future__ import annotations

import os
import random
import selectors
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from greylist.core.policy import Record
from greylist.stores import open_store
from simulator.metrics import percentile
from simulator.scenario import Scenario
from simulator.commands import STANDIN_SMTPD, command
from simulator.simulation import Population

CLIENT_SCRIPT = b"HELO live.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nQUIT\r\n"
MAX_RATE = 2000.0
MAX_DURATION = 600.0
MAX_CONNECTIONS = 100_000  # processes one run may start


def wrapper_command() -> list[str]:
    return command("greylist-wrap")


@dataclass
class LiveOptions:
    rate: float  # offered connections per second
    duration: float  # seconds of arrivals
    store: str
    concurrency: int = 40
    seed: int = 7
    delay: float = 60.0
    session_timeout: float = 10.0
    warm: bool = True


@dataclass
class Session:
    proc: subprocess.Popen
    ip: str
    started: float
    first_reply: float | None = None
    output: bytes = b""


@dataclass
class LiveResult:
    offered: int = 0
    refused: int = 0
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    first_reply_ms: list[float] = field(default_factory=list)
    session_ms: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    maxrss_kb: list[int] = field(default_factory=list)
    replies: dict[str, int] = field(default_factory=dict)  # first reply: standin (passed) / greylisted
    peak_concurrency: int = 0
    wall_seconds: float = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def summary(self, options: LiveOptions) -> dict:
        fr, ss = sorted(self.first_reply_ms), sorted(self.session_ms)
        cpu = sum(self.cpu_seconds)

        def pct(values, q):
            v = percentile(values, q)
            return None if v is None else round(v, 2)

        return {
            "store": options.store, "offered_rate": round(options.rate, 3),
            "duration_seconds": options.duration, "concurrency_limit": options.concurrency,
            "offered": self.offered, "refused": self.refused, "completed": self.completed,
            "achieved_rate": round(self.completed / self.wall_seconds, 3) if self.wall_seconds else 0.0,
            "errors": sum(self.errors.values()), "error_kinds": dict(sorted(self.errors.items())),
            "passed": self.replies.get("passed", 0), "greylisted": self.replies.get("greylisted", 0),
            "first_reply_ms_p50": pct(fr, 50), "first_reply_ms_p90": pct(fr, 90),
            "first_reply_ms_p99": pct(fr, 99), "first_reply_ms_max": pct(fr, 100),
            "session_ms_p50": pct(ss, 50), "session_ms_p99": pct(ss, 99),
            "cpu_ms_per_connection": round(1000 * cpu / len(self.cpu_seconds), 3) if self.cpu_seconds else None,
            "cpu_cores_busy": round(cpu / self.wall_seconds, 3) if self.wall_seconds else None,
            "peak_concurrency": self.peak_concurrency,
            "peak_memory_kb": max(self.maxrss_kb) if self.maxrss_kb else None,
            "wall_seconds": round(self.wall_seconds, 3),
        }


def warm_store(url: str, population: Population, now: float) -> int:
    """Make the regulars and farm pools known clients, as after days of operation."""
    with open_store(url, lean=False) as store:
        known = population.known()
        for ip in known:
            store.put(ip, Record(now - 86400, now - 3600, 3), 30 * 86400)
    return len(known)


def client_addresses(scenario: Scenario, population: Population, rng: random.Random):
    """Endless first-try addresses with the scenario's mix of classes."""
    weights = []
    for c in scenario.senders:
        kind_share = scenario.spam_share if c.kind == "spam" else 1 - scenario.spam_share
        weights.append(kind_share * c.share)
    while True:
        cls = rng.choices(scenario.senders, weights)[0]
        ip = population.address(cls)
        yield ip if ip is not None else rng.choice(population.pools[cls.name])


def run_live(options: LiveOptions, scenario: Scenario) -> LiveResult:
    if not 0 < options.rate <= MAX_RATE:
        raise ValueError(f"rate must be in (0, {MAX_RATE:g}] connections per second")
    if not 0 < options.duration <= MAX_DURATION:
        raise ValueError(f"duration must be in (0, {MAX_DURATION:g}] seconds")
    if options.rate * options.duration > MAX_CONNECTIONS:
        raise ValueError(f"rate x duration asks for {options.rate * options.duration:,.0f} connections; "
                         f"a live run starts at most {MAX_CONNECTIONS:,} processes")
    rng = random.Random(options.seed)
    population = Population(scenario, rng)
    if options.warm:
        warm_store(options.store, population, time.time())
    addresses = client_addresses(scenario, population, rng)
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(options.rate)
        if t >= options.duration:
            break
        arrivals.append(t)
    argv = wrapper_command() + STANDIN_SMTPD
    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PROTO": "TCP",
                "TCPLOCALIP": "127.0.0.1", "TCPLOCALPORT": "25", "TCPLOCALHOST": "live.test",
                "GREYLIST_STORE": options.store, "GREYLIST_DELAY": str(options.delay),
                "GREYLIST_HOSTNAME": "live.test"}
    result = LiveResult()
    selector = selectors.DefaultSelector()
    active: dict[int, Session] = {}
    log = tempfile.TemporaryFile()
    start = time.monotonic()
    next_index = 0
    try:
        while next_index < len(arrivals) or active:
            now = time.monotonic() - start
            while next_index < len(arrivals) and arrivals[next_index] <= now:
                next_index += 1
                result.offered += 1
                if len(active) >= options.concurrency:
                    result.refused += 1
                    continue
                ip = next(addresses)
                env = dict(base_env, TCPREMOTEIP=ip, TCPREMOTEPORT=str(rng.randrange(1024, 65536)))
                began = time.monotonic()
                try:
                    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=log, env=env, close_fds=True)
                except OSError:
                    result.error("spawn failed")
                    continue
                try:
                    proc.stdin.write(CLIENT_SCRIPT)
                    proc.stdin.close()
                except OSError:
                    pass
                os.set_blocking(proc.stdout.fileno(), False)
                session = Session(proc, ip, began)
                active[proc.stdout.fileno()] = session
                selector.register(proc.stdout, selectors.EVENT_READ, session)
                result.peak_concurrency = max(result.peak_concurrency, len(active))
            wait = 0.05
            if next_index < len(arrivals):
                wait = max(0.0, min(wait, arrivals[next_index] - (time.monotonic() - start)))
            for key, _ in selector.select(wait if active else None if next_index >= len(arrivals) else wait):
                _read(key.data, selector, active, result)
            _reap_timeouts(active, selector, result, options.session_timeout)
    finally:
        for session in list(active.values()):
            session.proc.kill()
            _finish(session, selector, active, result, "killed at the end")
        result.wall_seconds = time.monotonic() - start
        selector.close()
        log.close()
    return result


def _read(session: Session, selector, active, result: LiveResult) -> None:
    fd = session.proc.stdout.fileno()
    try:
        data = os.read(fd, 65536)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    if data:
        if session.first_reply is None and b"\n" in session.output + data:
            session.first_reply = time.monotonic()
        session.output += data
        return
    _finish(session, selector, active, result, None)


def _finish(session: Session, selector, active, result: LiveResult, error: str | None) -> None:
    fd = session.proc.stdout.fileno()
    selector.unregister(session.proc.stdout)
    del active[fd]
    session.proc.stdout.close()
    ended = time.monotonic()
    try:
        _, status, usage = os.wait4(session.proc.pid, 0)
        session.proc.returncode = os.waitstatus_to_exitcode(status)
        result.cpu_seconds.append(usage.ru_utime + usage.ru_stime)
        result.maxrss_kb.append(usage.ru_maxrss)
    except ChildProcessError:
        pass
    result.completed += 1
    first_line = session.output.split(b"\r\n", 1)[0]
    if session.first_reply is not None:
        result.first_reply_ms.append((session.first_reply - session.started) * 1000)
    result.session_ms.append((ended - session.started) * 1000)
    if error is None:
        if first_line.startswith(b"220 standin"):
            kind = "passed"
        elif first_line.startswith(b"220 live.test cqgreylist"):
            kind = "greylisted"
        elif first_line.startswith(b"421"):
            error = "421 reply"
        else:
            error = "no greeting" if not first_line else "unexpected greeting"
    if error is None and session.proc.returncode not in (0, None):
        error = f"exit status {session.proc.returncode}"
    if error is not None:
        result.error(error)
    else:
        result.replies[kind] = result.replies.get(kind, 0) + 1


def _reap_timeouts(active, selector, result: LiveResult, timeout: float) -> None:
    now = time.monotonic()
    for session in [s for s in active.values() if now - s.started > timeout]:
        session.proc.kill()
        _finish(session, selector, active, result, "session timeout")


def capacity(store: str, scenario: Scenario, p99_bound_ms: float, step_seconds: float = 10.0,
             start_rate: float = 10.0, factor: float = 1.5, max_rate: float = 400.0,
             concurrency: int = 40, seed: int = 7, progress=None) -> dict:
    """Ramp the offered rate until p99 first reply passes the bound, or errors or refusals appear."""
    steps, best = [], None
    rate = start_rate
    while rate <= max_rate:
        options = LiveOptions(rate=rate, duration=step_seconds, store=store, concurrency=concurrency,
                              seed=seed, warm=not steps)
        summary = run_live(options, scenario).summary(options)
        ok = (summary["errors"] == 0 and summary["refused"] == 0
              and summary["first_reply_ms_p99"] is not None and summary["first_reply_ms_p99"] <= p99_bound_ms)
        summary["sustained"] = ok
        steps.append(summary)
        if progress is not None:
            progress(summary)
        if not ok:
            break
        best = summary
        rate *= factor
    return {"store": store, "p99_bound_ms": p99_bound_ms, "steps": steps,
            "max_rate_per_second": best["offered_rate"] if best else 0.0,
            "max_rate_per_day": round(best["offered_rate"] * 86400) if best else 0,
            "at_that_rate": best}
