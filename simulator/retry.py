"""How real senders retry after a 4xx, as offsets from the first attempt.

Each model returns the times (seconds after the first, failed, attempt) at
which a sender tries again, up to its queue lifetime; after the last one it
gives up and the message bounces. The numbers come from the MTAs' sources and
documentation, cited beside each number in the scenario file
(simulator/scenarios/default.toml).

A schedule is computed once per sender class; a per-message ``phase`` (a
random wait for the next queue run) is added to every retry by the workload.
"""

from __future__ import annotations

import math

DAY = 86400.0


def postfix(lifetime: float = 5 * DAY, minimal_backoff: float = 300.0,
            maximal_backoff: float = 4000.0) -> list[float]:
    """next = now + (message age clamped to [minimal, maximal backoff]) (qmgr_active.c)."""
    offsets, t = [], 0.0
    while True:
        t += min(max(t, minimal_backoff), maximal_backoff)
        if t > lifetime:
            return offsets
        offsets.append(t)


def qmail(lifetime: float = 7 * DAY, chanskip: float = 20.0) -> list[float]:
    """Remote tries at birth + (chanskip * k)^2 seconds (qmail-send.c)."""
    offsets, k = [], 1
    while (chanskip * k) ** 2 <= lifetime:
        offsets.append((chanskip * k) ** 2)
        k += 1
    return offsets


def exim(rules: str = "F,2h,15m; G,16h,1h,1.5; F,4d,6h", lifetime: float | None = None) -> list[float]:
    """Exim retry rules (configure.default), F,<until>,<every> and G,<until>,<first>,<factor>.

    As Exim does, the rule in force is the first whose cut-off the message's
    age has not reached; the message bounces once its age passes the last
    cut-off (4 days by default).
    """
    from greylist.config import parse_duration

    parsed = []
    for rule in rules.split(";"):
        parts = [p.strip() for p in rule.split(",")]
        kind = parts[0].upper()
        if kind not in ("F", "G") or len(parts) != (3 if kind == "F" else 4):
            raise ValueError(f"exim retry rule {rule.strip()!r}: use F,until,every or G,until,first,factor")
        parsed.append((kind, parse_duration(parts[1]), parse_duration(parts[2]),
                       float(parts[3]) if kind == "G" else 1.0))
    final = min(parsed[-1][1], lifetime) if lifetime is not None else parsed[-1][1]
    offsets: list[float] = []
    t, previous, step = 0.0, None, 0.0
    while True:
        current = next((r for r in parsed if t < r[1]), None)
        if current is None:
            return offsets
        kind, _until, first, factor = current
        step = first if (kind == "F" or current is not previous) else step * factor
        previous = current
        t += step
        if t > final:
            return offsets
        offsets.append(t)


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


def build(spec: dict, lifetime: float) -> list[float]:
    """A schedule from a scenario's ``retry = {model = ..., ...}`` table."""
    from greylist.config import parse_duration

    def dur(name: str, default: float | None = None) -> float:
        value = spec.get(name, default)
        if value is None:
            raise ValueError(f"retry model {spec.get('model')!r} needs {name}")
        return parse_duration(str(value))

    model = spec.get("model")
    if model == "postfix":
        return postfix(lifetime, dur("minimal_backoff", 300), dur("maximal_backoff", 4000))
    if model == "qmail":
        return qmail(lifetime, float(spec.get("chanskip", 20)))
    if model == "exim":
        return exim(spec.get("rules", "F,2h,15m; G,16h,1h,1.5; F,4d,6h"), lifetime)
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
    raise ValueError(f"unknown retry model {model!r} (postfix, qmail, exim, every, list, fixed, none)")
