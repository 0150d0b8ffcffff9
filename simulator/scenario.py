"""Scenario files (TOML): the traffic a simulated server receives.

The default scenario, ``simulator/scenarios/default.toml``, documents every
number with its source. A scenario names the total rate, the spam share, the
daily curve, and the sender classes with their retry schedules, queue
lifetimes, address pools and shares of regular correspondents.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from greylist.config import ConfigError, parse_duration
from simulator import retry

DEFAULT_SCENARIO = Path(__file__).resolve().parent / "scenarios" / "default.toml"
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "hour": 3600.0,
               "d": 86400.0, "day": 86400.0}


class ScenarioError(ValueError):
    """A scenario file or option has a value we cannot use; the message says where."""


def parse_rate(text: str) -> float:
    """Connections per second from ``300k/day``, ``3.5/s``, ``12000/h``, ``20/min``."""
    raw = str(text).strip().lower().replace(" ", "").replace("_", "").replace(",", "")
    number, sep, unit = raw.partition("/")
    if not sep or unit not in _RATE_UNITS:
        raise ScenarioError(f"not a rate: {text!r} (use e.g. 300k/day, 3.5/s, 12000/h)")
    scale = 1.0
    if number[-1:] in ("k", "m"):
        scale = 1e3 if number[-1] == "k" else 1e6
        number = number[:-1]
    try:
        value = float(number) * scale / _RATE_UNITS[unit]
    except ValueError:
        raise ScenarioError(f"not a rate: {text!r} (use e.g. 300k/day, 3.5/s, 12000/h)") from None
    if not math.isfinite(value) or value <= 0:
        raise ScenarioError(f"rate must be a positive finite number, not {text!r}")
    return value


def duration(text: object, where: str) -> float:
    try:
        return parse_duration(str(text))
    except ConfigError as exc:
        raise ScenarioError(f"{where}: {exc}") from None


@dataclass
class SenderClass:
    """One kind of sender: how often it appears and how it retries."""

    name: str
    kind: str  # "legit" or "spam"
    share: float  # of its kind's connections
    offsets: list[float]  # retry times after the first attempt (the first of the schedules)
    queue_run: float = 0.0  # per-message random wait added to every retry
    lifetime: float = 5 * 86400.0
    repeat_share: float = 0.0  # of messages, from a regular correspondent
    regulars: int = 0
    pool: int = 1  # addresses a message may (re)try from; >1 = a provider farm
    pool_networks: int = 1  # /24 networks the pool spans
    host_domain: str = ""  # a farm's hosts are named mail-N.<host_domain> (verified names), or nameless
    schedules: list[list[float]] = field(default_factory=list)  # a message follows one (see retry.build_all)
    stick: float = 0.0  # a farm: the chance a retry comes from the address of the try before

    def __post_init__(self) -> None:
        if not self.schedules:
            self.schedules = [self.offsets]

    def schedule(self, tag: int) -> list[float]:
        """The schedule of the message with this tag (a fixed function: every policy
        compared sees the same retries)."""
        schedules = self.schedules
        return schedules[(tag >> 7) % len(schedules)] if len(schedules) > 1 else schedules[0]

    @property
    def legit(self) -> bool:
        return self.kind == "legit"


@dataclass
class Scenario:
    rate: float  # first-attempt connections per second
    spam_share: float
    legit_peak_hour: float
    legit_amplitude: float
    spam_peak_hour: float
    spam_amplitude: float
    start: float  # unix time of simulated t=0
    senders: list[SenderClass] = field(default_factory=list)
    source: str = ""

    def of_kind(self, kind: str) -> list[SenderClass]:
        return [s for s in self.senders if s.kind == kind]


def load(path: str | Path | None = None) -> Scenario:
    """Read and check a scenario file (the default one when path is None)."""
    path = Path(path) if path else DEFAULT_SCENARIO
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"scenario {path} is not valid TOML: {exc}") from None
    return from_dict(data, str(path))


def _number(table: dict, key: str, where: str, default: float | None = None,
            lo: float = 0.0, hi: float = math.inf) -> float:
    value = table.get(key, default)
    if value is None:
        raise ScenarioError(f"{where}: {key} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ScenarioError(f"{where}: {key} must be a number in [{lo:g}, {hi:g}], not {value!r}")
    return float(value)


def _host_domain(value: object, where: str) -> str:
    text = str(value).strip().lower().strip(".")
    if not all(c.isalnum() or c in ".-" for c in text) or len(text) > 200:
        raise ScenarioError(f"{where}: host_domain must be a domain name such as google.com, not {value!r}")
    return text


def from_dict(data: dict, source: str = "") -> Scenario:
    traffic = data.get("traffic", {})
    where = f"{source} [traffic]"
    try:
        start = datetime.fromisoformat(str(traffic.get("start", "2026-01-05T00:00:00+00:00"))
                                       .replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ScenarioError(f"{where}: start must be an ISO date such as 2026-01-05T00:00:00Z") from None
    scenario = Scenario(
        rate=parse_rate(traffic.get("rate", "300k/day")),
        spam_share=_number(traffic, "spam_share", where, 0.85, 0, 1),
        legit_peak_hour=_number(traffic, "legit_peak_hour", where, 14, 0, 24),
        legit_amplitude=_number(traffic, "legit_amplitude", where, 0.6, 0, 1),
        spam_peak_hour=_number(traffic, "spam_peak_hour", where, 14, 0, 24),
        spam_amplitude=_number(traffic, "spam_amplitude", where, 0.1, 0, 1),
        start=start,
        source=source,
    )
    names = set()
    for i, table in enumerate(data.get("sender", [])):
        name = str(table.get("name", f"sender{i + 1}"))
        where = f"{source} [[sender]] {name}"
        if name in names:
            raise ScenarioError(f"{where}: the name is used twice")
        names.add(name)
        kind = table.get("kind")
        if kind not in ("legit", "spam"):
            raise ScenarioError(f"{where}: kind must be 'legit' or 'spam', not {kind!r}")
        lifetime = duration(table.get("lifetime", "5d"), where)
        spec = table.get("retry", {"model": "none"})
        if not isinstance(spec, dict):
            raise ScenarioError(f"{where}: retry must be a table such as {{ model = \"postfix\" }}")
        try:
            schedules = retry.build_all(spec, lifetime, name)
        except (ValueError, ConfigError) as exc:
            raise ScenarioError(f"{where}: {exc}") from None
        scenario.senders.append(SenderClass(
            name=name, kind=kind, share=_number(table, "share", where, None, 0, 1),
            offsets=schedules[0], schedules=schedules, queue_run=duration(table.get("queue_run", 0), where),
            stick=_number(table, "stick", where, 0, 0, 1),
            lifetime=lifetime, repeat_share=_number(table, "repeat_share", where, 0, 0, 1),
            regulars=int(_number(table, "regulars", where, 0, 0, 1e7)),
            pool=int(_number(table, "pool", where, 1, 1, 65536)),
            pool_networks=int(_number(table, "pool_networks", where, 1, 1, 256)),
            host_domain=_host_domain(table.get("host_domain", ""), where),
        ))
    for kind in ("legit", "spam"):
        classes = scenario.of_kind(kind)
        total = sum(s.share for s in classes)
        wanted = scenario.spam_share if kind == "spam" else 1 - scenario.spam_share
        if wanted > 0 and not classes:
            raise ScenarioError(f"{source}: spam_share asks for {kind} traffic but no {kind} sender is defined")
        if classes and abs(total - 1.0) > 1e-6:
            raise ScenarioError(f"{source}: the shares of the {kind} senders add up to {total:g}, not 1")
    return scenario
