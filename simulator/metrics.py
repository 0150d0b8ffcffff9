"""What a simulation measures, per sender class and per hour.

Counting is kept to plain integer attributes and list appends, because it runs
once per simulated connection (over half a million times for one default day).
"""

from __future__ import annotations

import math


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def quantiles(sorted_values: list[float], step: int = 5) -> list[float]:
    """The distribution in 21 points (0, 5, ... 100th percentile): enough for a CDF plot."""
    if not sorted_values:
        return []
    return [round(sorted_values[0] if q == 0 else percentile(sorted_values, q), 1)
            for q in range(0, 101, step)]


def delay_figures(sorted_delays: list[float], prefix: str) -> dict:
    """p50, p90, p99, max and the 21-point distribution of delays, rounded for reports."""
    out: dict = {}
    for q in (50, 90, 99):
        value = percentile(sorted_delays, q)
        out[f"{prefix}_p{q}"] = None if value is None else round(value, 1)
    out[f"{prefix}_max"] = round(sorted_delays[-1], 1) if sorted_delays else None
    out[f"{prefix}_quantiles"] = quantiles(sorted_delays)
    return out


class ClassStats:
    """Counters of one sender class."""

    __slots__ = ("name", "kind", "messages", "connections", "tempfails", "delivered",
                 "delayed", "given_up", "in_flight", "delays")

    def __init__(self, name: str, kind: str) -> None:
        self.name = name
        self.kind = kind
        self.messages = 0  # distinct messages (first attempts)
        self.connections = 0  # first attempts and retries
        self.tempfails = 0
        self.delivered = 0  # messages that got through
        self.delayed = 0  # of those, delivered after at least one tempfail
        self.given_up = 0  # legit: bounced (lost); spam: stopped
        self.in_flight = 0  # still queued when the run ended
        self.delays: list[float] = []  # seconds from first attempt to delivery, delayed ones

    def summary(self) -> dict:
        delays = sorted(self.delays)
        legit = self.kind == "legit"
        out = {
            "class": self.name, "kind": self.kind, "messages": self.messages,
            "connections": self.connections, "tempfails": self.tempfails,
            "tempfail_ratio": round(self.tempfails / self.connections, 4) if self.connections else 0.0,
            "delivered": self.delivered, "delayed": self.delayed,
            "delayed_share": round(self.delayed / self.messages, 4) if self.messages else 0.0,
        }
        if legit:
            out["lost"] = self.given_up
        else:
            out["stopped"] = self.given_up
            out["stopped_share"] = round(self.given_up / self.messages, 4) if self.messages else 0.0
        out["in_flight"] = self.in_flight
        out.update(delay_figures(delays, "delay"))
        return out


class Hour:
    __slots__ = ("connections", "tempfails", "legit_delivered", "legit_delayed", "spam_passed",
                 "entries")

    def __init__(self) -> None:
        self.connections = 0
        self.tempfails = 0
        self.legit_delivered = 0
        self.legit_delayed = 0
        self.spam_passed = 0
        self.entries = 0
