"""Each MTA's retry schedule against its documented values (traffic-facts.md)."""

from __future__ import annotations

import pytest

from simulator import retry
from simulator.scenario import load

MIN = 60.0
H = 3600.0
D = 86400.0


def test_postfix_5_10_20_40_80_min_then_every_4000_s_for_5_days():
    offsets = retry.postfix()
    assert offsets[:5] == [5 * MIN, 10 * MIN, 20 * MIN, 40 * MIN, 80 * MIN]
    gaps = {b - a for a, b in zip(offsets[4:], offsets[5:])}
    assert gaps == {4000.0}
    assert offsets[-1] <= 5 * D < offsets[-1] + 4000


def test_exim_default_rules():
    offsets = retry.exim()
    assert offsets[:8] == [15 * MIN * k for k in range(1, 9)]  # F,2h,15m
    assert offsets[8:13] == [3 * H, 4.5 * H, 6.75 * H, 10.125 * H, 15.1875 * H]  # G,16h,1h,1.5
    assert offsets[13] == pytest.approx(15.1875 * H + 7.59375 * H)  # the G rule still in force at 15.2 h
    assert all(b - a == 6 * H for a, b in zip(offsets[14:], offsets[15:]))  # F,4d,6h
    assert offsets[-1] <= 4 * D


def test_qmail_squares_of_20k():
    offsets = retry.qmail()
    assert offsets[:6] == [400, 1600, 3600, 6400, 10000, 14400]
    assert offsets[-1] <= 604800 < (20 * (len(offsets) + 1)) ** 2


def test_sendmail_every_queue_run():
    assert retry.every(H, 5 * D, first=0.0)[:3] == [0.0, H, 2 * H]
    assert len(retry.every(H, 5 * D, first=0.0)) == 121


def test_fixed_bot_and_lists():
    assert retry.fixed(15, 3) == [15, 30, 45]
    assert retry.listed([300, 600], then=900, lifetime=2400) == [300, 600, 1500, 2400]


def test_default_scenario_schedules_match_the_sources():
    s = {c.name: c for c in load().senders}
    assert s["postfix"].offsets == retry.postfix() and s["postfix"].lifetime == 5 * D
    assert s["exim"].offsets == retry.exim() and s["exim"].lifetime == 4 * D
    assert s["qmail"].offsets == retry.qmail() and s["qmail"].lifetime == 7 * D
    assert s["exchange"].offsets[:7] == [5 * MIN * k for k in range(1, 7)] + [45 * MIN]
    assert s["exchange"].lifetime == 2 * D
    assert s["gmail"].offsets[:8] == [m * MIN for m in (6, 29, 57, 99, 162, 230, 309, 435)]
    assert s["office365"].lifetime == D and s["office365"].pool > 1
    assert s["bot-fire-and-forget"].offsets == []


@pytest.mark.parametrize("spec,match", [
    ({"model": "warp"}, "unknown retry model"),
    ({"model": "every"}, "needs interval"),
    ({"model": "exim", "rules": "X,1h,1m"}, "F,until"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        retry.build(spec, 5 * D)
