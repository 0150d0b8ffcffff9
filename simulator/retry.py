"""How real senders retry after a 4xx, as offsets from the first attempt.

Each model returns the times (seconds after the first, failed, attempt) at
which a sender tries again, up to its queue lifetime; after the last one it
gives up and the message bounces. The numbers come from the MTAs' sources and
documentation, cited beside each number in the scenario file
(simulator/scenarios/default.toml).

Schedules are computed once per sender class: one, or (:func:`build_all`) a
spread of them where retries wait for queue runs at a phase of their own
(Postfix's deferred-queue scans, Exim's queue runner, Sendmail's queue
interval, which differs by system) or where a bot population retries at
times drawn from ranges; each message follows one. The older per-message
``queue_run`` wait, added to every retry, is still read.
"""

from __future__ import annotations

import math

DAY = 86400.0


def on_runs(step, lifetime: float, interval: float = 0.0, phase: float = 0.0) -> list[float]:
    """Retries of a queue that tries deferred mail only at its runs.

    ``step(age)``: how long the retry rule makes a message wait after a failure
    at ``age``; the retry then happens at the first queue run (every
    ``interval`` seconds, the first at ``phase``) at or after that time, and
    the next wait is computed from that real age. ``interval`` 0: no runs, the
    retry comes exactly when the rule allows.
    """
    offsets, t = [], 0.0
    while True:
        at = t + step(t)
        if interval > 0:
            at = phase + math.ceil((at - phase) / interval) * interval
            while at <= t:  # a run strictly after the failure
                at += interval
        if at > lifetime or len(offsets) > 100_000:
            return offsets
        offsets.append(at)
        t = at


def postfix(lifetime: float = 5 * DAY, minimal_backoff: float = 300.0, maximal_backoff: float = 4000.0,
            queue_run_delay: float = 0.0, phase: float = 0.0) -> list[float]:
    """next = time of the failure + (the message's age then, clamped to [minimal, maximal
    backoff]) (qmgr_active.c); the deferred queue is scanned every queue_run_delay, so
    each retry waits for a scan and the next backoff doubles that real age."""
    return on_runs(lambda age: min(max(age, minimal_backoff), maximal_backoff), lifetime,
                   queue_run_delay, phase)


def qmail(lifetime: float = 7 * DAY, chanskip: float = 20.0) -> list[float]:
    """Remote tries at birth + (chanskip * k)^2 seconds (qmail-send.c)."""
    offsets, k = [], 1
    while (chanskip * k) ** 2 <= lifetime:
        offsets.append((chanskip * k) ** 2)
        k += 1
    return offsets


class EximRules:
    """Exim retry rules (configure.default), F,<until>,<every> and G,<until>,<first>,<factor>.

    As Exim does, the rule in force is the first whose cut-off the message's age
    has not reached; under a G rule each wait is the last one times the factor.
    """

    def __init__(self, rules: str = "F,2h,15m; G,16h,1h,1.5; F,4d,6h") -> None:
        from greylist.config import parse_duration

        self.parsed = []
        for rule in rules.split(";"):
            parts = [p.strip() for p in rule.split(",")]
            kind = parts[0].upper()
            if kind not in ("F", "G") or len(parts) != (3 if kind == "F" else 4):
                raise ValueError(f"exim retry rule {rule.strip()!r}: use F,until,every or G,until,first,factor")
            self.parsed.append((kind, parse_duration(parts[1]), parse_duration(parts[2]),
                                float(parts[3]) if kind == "G" else 1.0))
        self.cutoff = self.parsed[-1][1]
        self.previous = None
        self.last = 0.0

    def __call__(self, age: float) -> float:
        current = next((r for r in self.parsed if age < r[1]), None)
        if current is None:
            return math.inf  # past the last cut-off: the message bounces
        kind, _until, first, factor = current
        self.last = first if (kind == "F" or current is not self.previous) else self.last * factor
        self.previous = current
        return self.last


def exim(rules: str = "F,2h,15m; G,16h,1h,1.5; F,4d,6h", lifetime: float | None = None,
         queue_interval: float = 0.0, phase: float = 0.0) -> list[float]:
    """Exim's retries: the rules give the earliest time, a queue runner (every
    ``queue_interval``: Debian's QUEUEINTERVAL is 30m) makes the try; the message
    bounces once its age passes the last cut-off (4 days by default)."""
    stepper = EximRules(rules)
    final = min(stepper.cutoff, lifetime) if lifetime is not None else stepper.cutoff
    return on_runs(stepper, final, queue_interval, phase)


def every(interval: float, lifetime: float, first: float | None = None) -> list[float]:
    """A fixed queue-run interval (Sendmail's QUEUE=1h), optionally after a first gap."""
    start = interval if first is None else first
    if interval <= 0:
        raise ValueError("retry interval must be > 0")
    n = int(math.floor((lifetime - start) / interval)) + 1 if lifetime >= start else 0
    return [start + i * interval for i in range(n)]


def listed(offsets: list[float], then: float | None, lifetime: float) -> list[float]:
    """Observed tries (e.g. Gmail's), then every ``then`` seconds until the lifetime."""
    out = sorted(o for o in offsets if o <= lifetime)
    if then:
        t = out[-1] if out else 0.0
        while t + then <= lifetime:
            t += then
            out.append(t)
    return out


def fixed(interval: float, retries: int) -> list[float]:
    """A spam bot that retries ``retries`` times, ``interval`` seconds apart."""
    return [interval * (k + 1) for k in range(retries)]


def random_schedule(rng, first: tuple[float, float], spacing: tuple[float, float],
                    retries: tuple[int, int], lifetime: float) -> list[float]:
    """A retrying bot: its first retry and the gaps after it log-uniform in their ranges
    (no distribution is published, only orders of magnitude), a number of retries in range."""
    def draw(bounds: tuple[float, float]) -> float:
        lo, hi = bounds
        return lo if hi <= lo else math.exp(rng.uniform(math.log(lo), math.log(hi)))

    n = rng.randint(retries[0], retries[1])
    out, t = [], 0.0
    for k in range(n):
        t += draw(first if k == 0 else spacing)
        if t > lifetime:
            break
        out.append(t)
    return out


#: schedules drawn per sender class where retries spread (queue-run phases, bots)
SPREAD = 48


def _weighted(spec: dict, items: list, what: str) -> list[tuple[object, int]]:
    """Each item with its number of schedules out of ``SPREAD``, by the spec's ``weights``
    (equal when there are none)."""
    weights = spec.get("weights")
    weights = weights if isinstance(weights, list) else [1.0] * len(items)
    if len(weights) != len(items) or any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0
                                         for w in weights) or not sum(weights):
        raise ValueError(f"retry model {spec.get('model')!r}: weights must be one non-negative number per {what}")
    total = sum(weights)
    return [(item, round(SPREAD * w / total)) for item, w in zip(items, weights)]


def build_all(spec: dict, lifetime: float, name: str = "") -> list[list[float]]:
    """Every schedule a message of the class may follow (one, or ``SPREAD`` when the
    retries spread over queue-run phases or a bot population); a message takes one."""
    from greylist.config import parse_duration

    model = spec.get("model")
    interval = spec.get("queue_interval")
    if model == "mix":  # several behaviours, where the sources leave open which applies
        models = spec.get("models")
        if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
            raise ValueError("retry model 'mix' needs models = [{ model = ... }, ...]")
        out = []
        for i, (sub, copies) in enumerate(_weighted(spec, models, "model")):
            schedules = build_all(sub, lifetime, f"{name}/{i}")
            out += [schedules[k % len(schedules)] for k in range(copies)]
        return out or [[]]
    if model == "queue":  # Sendmail: every queue run retries, at intervals that differ by system
        intervals = spec.get("intervals")
        if not isinstance(intervals, list) or not intervals:
            raise ValueError("retry model 'queue' needs intervals = [\"10m\", ...]")
        out = []
        for text, copies in _weighted(spec, intervals, "interval"):
            q = parse_duration(str(text))
            if q <= 0:
                raise ValueError("retry model 'queue': intervals must be > 0")
            out += [on_runs(lambda age: 0.0, lifetime, q, q * (k + 0.5) / copies) for k in range(copies)]
        return out or [[]]
    if model == "random":
        import random
        import zlib

        def pair(key: str) -> tuple[float, float]:
            value = spec.get(key)
            if not isinstance(value, list) or len(value) != 2:
                raise ValueError(f"retry model 'random' needs {key} = [\"low\", \"high\"]")
            lo, hi = (parse_duration(str(v)) for v in value)
            if not 0 < lo <= hi:
                raise ValueError(f"retry model 'random': {key} must be 0 < low <= high")
            return lo, hi

        counts = spec.get("retries", [1, 1])
        counts = counts if isinstance(counts, list) else [counts, counts]
        if len(counts) != 2 or not all(isinstance(c, int) and c >= 0 for c in counts) or counts[0] > counts[1]:
            raise ValueError("retry model 'random': retries must be [low, high] whole numbers")
        first = pair("first")
        spacing = pair("spacing") if counts[1] > 1 else first
        rng = random.Random(zlib.crc32(name.encode()))  # the same population at every run
        return [random_schedule(rng, first, spacing, (counts[0], counts[1]), lifetime) for _ in range(SPREAD)]
    if interval is not None and model in ("postfix", "exim"):
        q = parse_duration(str(interval))
        if q <= 0:
            raise ValueError("queue_interval must be > 0")
        return [build(spec, lifetime, q * (k + 0.5) / SPREAD) for k in range(SPREAD)]
    return [build(spec, lifetime)]


def build(spec: dict, lifetime: float, phase: float = 0.0) -> list[float]:
    """A schedule from a scenario's ``retry = {model = ..., ...}`` table (``phase``: of the
    queue runs, for the models that have them)."""
    from greylist.config import parse_duration

    def dur(name: str, default: float | None = None) -> float:
        value = spec.get(name, default)
        if value is None:
            raise ValueError(f"retry model {spec.get('model')!r} needs {name}")
        return parse_duration(str(value))

    model = spec.get("model")
    queue = dur("queue_interval", 0)
    if model == "postfix":
        return postfix(lifetime, dur("minimal_backoff", 300), dur("maximal_backoff", 4000), queue, phase)
    if model == "qmail":
        return qmail(lifetime, float(spec.get("chanskip", 20)))
    if model == "exim":
        return exim(spec.get("rules", "F,2h,15m; G,16h,1h,1.5; F,4d,6h"), lifetime, queue, phase)
    if model == "every":
        first = spec.get("first")
        return every(dur("interval"), lifetime, None if first is None else parse_duration(str(first)))
    if model == "list":
        then = spec.get("then")
        return listed([parse_duration(str(o)) for o in spec.get("offsets", [])],
                      None if then is None else parse_duration(str(then)), lifetime)
    if model == "fixed":
        return fixed(dur("interval"), int(spec.get("retries", 0)))
    if model == "none":
        return []
    if model in ("queue", "random", "mix"):
        return build_all(spec, lifetime)[0]
    raise ValueError(f"unknown retry model {model!r} (postfix, qmail, exim, queue, every, list, fixed, "
                     "random, mix, none)")
