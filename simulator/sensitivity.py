"""``simulate --sensitivity``: how far the headline figures move with each assumption.

The scenario marks what is measured and what is assumed. Each assumption
here is moved to the low and the high end of its plausible range, one at a
time, on the very same traffic seed; the table shows the headline figures
at each end beside the scenario's own. A figure that barely moves can be
trusted whatever the truth of that assumption; one that swings says which
number to measure on your own server (``simulate replay`` reads real logs).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable


def _senders(data: dict, kind: str | None = None, names: tuple[str, ...] = ()) -> list[dict]:
    return [s for s in data.get("sender", []) if (kind is None or s.get("kind") == kind)
            and (not names or s.get("name") in names)]


def _set_all(key: str, value, kind: str | None = None, names: tuple[str, ...] = ()) -> Callable[[dict], None]:
    def apply(data: dict) -> None:
        for sender in _senders(data, kind, names):
            if key in sender or names:
                sender[key] = value
    return apply


def _scale_pools(factor: float) -> Callable[[dict], None]:
    def apply(data: dict) -> None:
        for sender in data.get("sender", []):
            if sender.get("pool", 1) > 1:
                sender["pool"] = max(2, int(sender["pool"] * factor))
    return apply


def _retry(name: str, **fields) -> Callable[[dict], None]:
    def apply(data: dict) -> None:
        for sender in _senders(data, names=(name,)):
            if isinstance(sender.get("retry"), dict):
                sender["retry"].update(fields)
    return apply


def _returning_split(minutes: float, hours: float) -> Callable[[dict], None]:
    def apply(data: dict) -> None:
        for sender in _senders(data, names=("bot-minutes",)):
            sender["share"] = minutes
        for sender in _senders(data, names=("bot-hours",)):
            sender["share"] = hours
    return apply


def _traffic(key: str, value) -> Callable[[dict], None]:
    def apply(data: dict) -> None:
        data.setdefault("traffic", {})[key] = value
    return apply


def _both(*changes: Callable[[dict], None]) -> Callable[[dict], None]:
    def apply(data: dict) -> None:
        for change in changes:
            change(data)
    return apply


@dataclass
class Assumption:
    name: str
    low: str
    high: str
    to_low: Callable[[dict], None]
    to_high: Callable[[dict], None]


#: the default scenario's unmeasured numbers and their plausible ranges
ASSUMPTIONS = [
    Assumption("share of mail from known correspondents", "0.4", "0.8",
               _set_all("repeat_share", 0.4, "legit"), _set_all("repeat_share", 0.8, "legit")),
    Assumption("when bots that return come back", "sooner", "later",
               _both(_retry("bot-minutes", first=["30s", "5m"], spacing=["30s", "5m"]),
                     _retry("bot-hours", first=["10m", "1h"], spacing=["10m", "1h"])),
               _both(_retry("bot-minutes", first=["5m", "2h"], spacing=["5m", "2h"]),
                     _retry("bot-hours", first=["2h", "12h"], spacing=["2h", "12h"]))),
    Assumption("returning bots: minutes vs hours", "all minutes", "half hours",
               _returning_split(0.22, 0.0), _returning_split(0.11, 0.11)),
    Assumption("Exchange's retry after a RCPT 4xx", "5 min x 6", "15 min",
               _retry("exchange", weights=[1, 0, 0]), _retry("exchange", weights=[0, 1, 0])),
    Assumption("provider pool sizes", "/4", "x4", _scale_pools(0.25), _scale_pools(4.0)),
    Assumption("farm retries from the same address", "never", "always",
               _set_all("stick", 0.0, names=("office365", "gmail")),
               _set_all("stick", 1.0, names=("office365", "gmail"))),
    Assumption("Sendmail's queue interval", "10 min", "1 h",
               _retry("sendmail", intervals=["10m"], weights=[1]), _retry("sendmail", intervals=["1h"], weights=[1])),
    Assumption("spam share of connections", "0.80", "0.95",
               _traffic("spam_share", 0.80), _traffic("spam_share", 0.95)),
]

FIGURES = [("legit delayed", "legit_delayed_share", "pct"), ("legit delay p90", "legit_delay_p90", "delay"),
           ("spam stopped", "spam_stopped_share", "pct"), ("tempfailed", "tempfail_ratio", "pct")]


def variants(data: dict) -> list[tuple[str, str, dict]]:
    """(assumption, end, scenario data) for the scenario itself and each end of each assumption."""
    out = [("the scenario as written", "", data)]
    for a in ASSUMPTIONS:
        for end, change in ((a.low, a.to_low), (a.high, a.to_high)):
            changed = copy.deepcopy(data)
            change(changed)
            out.append((a.name, end, changed))
    return out


def table(results: list[tuple[str, str, dict]]) -> str:
    """One row per run: the assumption, its end, and each headline figure (with the move)."""
    from tabulate import tabulate

    from simulator.report import _fmt_delay, _pct

    base = results[0][2]["overall"]
    rows = []
    for name, end, report in results:
        o = report["overall"]
        row = [name, end]
        for _label, key, kind in FIGURES:
            value = o[key]
            text = _pct(value) if kind == "pct" else _fmt_delay(value)
            if end and value is not None and base[key] is not None:
                move = value - base[key]
                text += f" ({100 * move:+.1f})" if kind == "pct" else f" ({move / 60:+.1f} min)"
            row.append(text)
        rows.append(row)
    return tabulate(rows, headers=["assumption", "moved to"] + [f[0] for f in FIGURES],
                    tablefmt="simple") + "\n"
