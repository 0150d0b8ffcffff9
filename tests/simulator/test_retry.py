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


def test_postfix_backoff_doubles_the_real_age_with_scan_waits():
    """A scan every 300 s: the first retry comes 300-600 s after the failure, and each
    next backoff is the real age at the failure (qmgr_active.c), not 300 * 2^k."""
    offsets = retry.postfix(queue_run_delay=300, phase=100)
    assert offsets[:4] == [400, 1000, 2200, 4600]  # 300 -> scan at 400; 400+400=800 -> 1000; ...
    assert all(b - a <= 4000 + 300 for a, b in zip(offsets, offsets[1:]))


def test_exim_first_retry_is_a_spread_over_the_queue_interval():
    schedules = retry.build_all({"model": "exim", "queue_interval": "30m"}, 4 * D)
    firsts = sorted(s[0] for s in schedules)
    assert 15 * MIN <= firsts[0] < 16 * MIN and 44 * MIN < firsts[-1] <= 45 * MIN
    assert len(set(firsts)) == len(schedules)  # every phase of the queue runner
    assert all(b - a >= 15 * MIN for s in schedules for a, b in zip(s, s[1:]))  # never before the rule allows
    assert all(s[-1] <= 4 * D for s in schedules)


def test_sendmail_retries_at_each_run_of_its_systems_interval():
    schedules = retry.build_all({"model": "queue", "intervals": ["10m", "30m", "1h"], "weights": [1, 1, 1]},
                                5 * D)
    gaps = {round(b - a) for s in schedules for a, b in zip(s, s[1:])}
    assert gaps == {600, 1800, 3600}
    assert max(s[0] for s in schedules) <= H


def test_a_mix_takes_each_behaviour_by_its_weight():
    schedules = retry.build_all({"model": "mix", "weights": [3, 1], "models": [
        {"model": "every", "interval": "15m"}, {"model": "every", "interval": "1m"}]}, 2 * D)
    firsts = [s[0] for s in schedules]
    assert firsts.count(15 * MIN) == 36 and firsts.count(MIN) == 12


def test_bot_populations_are_drawn_once_and_stay_in_their_ranges():
    spec = {"model": "random", "first": ["1m", "30m"], "spacing": ["1m", "30m"], "retries": [1, 3]}
    a, b = retry.build_all(spec, D, "bot"), retry.build_all(spec, D, "bot")
    assert a == b  # the same population at every run
    assert all(1 <= len(s) <= 3 and MIN <= s[0] <= 30 * MIN for s in a)
    assert len({s[0] for s in a}) > 40  # a spread, not a point


def test_default_scenario_schedules_match_the_sources():
    s = {c.name: c for c in load().senders}
    assert s["postfix"].lifetime == 5 * D and len(s["postfix"].schedules) == retry.SPREAD
    assert all(300 <= sch[0] <= 600 for sch in s["postfix"].schedules)
    assert sorted(sch[0] for sch in s["exim"].schedules)[0] >= 15 * MIN and s["exim"].lifetime == 4 * D
    assert max(sch[0] for sch in s["exim"].schedules) <= 45 * MIN
    assert s["qmail"].offsets == retry.qmail() and s["qmail"].lifetime == 7 * D
    firsts = {sch[0] for sch in s["exchange"].schedules}
    assert firsts == {5 * MIN, 15 * MIN, MIN} and s["exchange"].lifetime == 2 * D
    assert s["gmail"].offsets[:8] == [m * MIN for m in (6, 29, 57, 99, 162, 230, 309, 435)]
    assert s["gmail"].stick == 0.25
    assert s["office365"].lifetime == D and s["office365"].pool > 1
    assert s["bot-never-retries"].offsets == []
    assert all(sch[-1] < 60 for sch in s["bot-fast-retry"].schedules)  # Levine: too soon for 1 min


@pytest.mark.parametrize("spec,match", [
    ({"model": "warp"}, "unknown retry model"),
    ({"model": "every"}, "needs interval"),
    ({"model": "exim", "rules": "X,1h,1m"}, "F,until"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        retry.build(spec, 5 * D)


def test_every_sender_of_the_default_scenario_says_where_its_numbers_come_from():
    """Each sender block carries comments: a source (a document, a file, a measurement) or
    ASSUMPTION, as docs/fidelity.md and simulate --sensitivity rely on."""
    from simulator.scenario import DEFAULT_SCENARIO

    blocks = DEFAULT_SCENARIO.read_text().split("[[sender]]")[1:]
    assert len(blocks) == len(load().senders)
    for block in blocks:
        comments = " ".join(line for line in block.splitlines() if line.lstrip().startswith("#"))
        name = block.split('name = "', 1)[1].split('"', 1)[0]
        assert comments, name
        assert "ASSUMPTION" in comments or any(mark in comments for mark in (".c", "docs", "et al", "Levine",
                                                                              "configure", "(")), name
