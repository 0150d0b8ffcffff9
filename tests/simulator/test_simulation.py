"""The simulator on the real core: properties, closed forms, determinism, a golden report."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

import greylist.service
import simulator.simulation
from greylist.config import Config
from greylist.stores.filetree import FileStore
from greylist.stores.memory import MemoryStore
from simulator import report
from simulator.scenario import ScenarioError, from_dict, load, parse_rate
from simulator.simulation import RunOptions, simulate

DATA = Path(__file__).parent / "data"
H = 3600.0


def scenario(spam_share: float, senders: list[dict], rate: str = "20000/day", flat: bool = False):
    traffic = {"rate": rate, "spam_share": spam_share}
    if flat:  # no daily curve: any window has the mix of the whole day
        traffic.update(legit_amplitude=0, spam_amplitude=0)
    return from_dict({"traffic": traffic, "sender": senders}, "test")


def run(sc, policy=None, duration=6 * H, seed=1, store=None):
    server = simulate(sc, policy or Config(), store or MemoryStore(),
                      RunOptions(duration=duration, seed=seed))
    return report.build(server, {"scenario": sc.source, "seed": seed, "rate_per_day": sc.rate * 86400})


def test_simulator_uses_the_production_service():
    assert simulator.simulation.Greylister is greylist.service.Greylister


WELL_BEHAVED = [
    {"name": "postfix", "kind": "legit", "share": 0.3, "retry": {"model": "postfix"}, "queue_run": "300s", "lifetime": "5d"},
    {"name": "exim", "kind": "legit", "share": 0.2, "retry": {"model": "exim"}, "lifetime": "4d"},
    {"name": "qmail", "kind": "legit", "share": 0.2, "retry": {"model": "qmail"}, "lifetime": "7d"},
    {"name": "sendmail", "kind": "legit", "share": 0.15, "retry": {"model": "every", "interval": "1h", "first": "0s"}, "queue_run": "1h", "lifetime": "5d"},
    {"name": "exchange", "kind": "legit", "share": 0.15, "retry": {"model": "list", "offsets": ["5m", "10m"], "then": "15m"}, "lifetime": "2d"},
]


@pytest.mark.parametrize("delay", [60, 900])
def test_well_behaved_mtas_lose_nothing_and_wait_at_most_delay_plus_one_retry_gap(delay):
    sc = scenario(0.0, WELL_BEHAVED)
    result = run(sc, Config(delay=delay))
    assert result["overall"]["legit_lost"] == 0
    for cls in result["classes"]:
        sender = next(s for s in sc.senders if s.name == cls["class"])
        assert cls["delivered"] == cls["messages"] > 0
        gaps = [b - a for a, b in zip([0.0] + sender.offsets, sender.offsets)]
        bound = delay + max(gaps) + sender.queue_run
        assert cls["delay_max"] <= bound, (cls["class"], cls["delay_max"], bound)


def test_fire_and_forget_bots_are_all_stopped():
    result = run(scenario(1.0, [{"name": "bot", "kind": "spam", "share": 1.0, "retry": {"model": "none"}}]))
    o = result["overall"]
    assert o["spam_messages"] > 1000
    assert o["spam_stopped"] == o["spam_messages"] and o["tempfail_ratio"] == 1.0


def test_tempfail_ratio_matches_the_closed_form():
    """Unique fire-and-forget bots (share s) and unique senders that pass on their
    first retry: each bot makes 1 tempfailed connection, each sender 1 tempfailed
    and 1 passing, so the tempfail ratio is 1 / (2 - s)."""
    s = 0.8
    sc = scenario(s, [
        {"name": "bot", "kind": "spam", "share": 1.0, "retry": {"model": "none"}},
        {"name": "mta", "kind": "legit", "share": 1.0, "retry": {"model": "list", "offsets": ["5m"]}, "lifetime": "1d"},
    ], rate="40000/day", flat=True)
    result = run(sc, Config(delay=60), duration=12 * H)
    o = result["overall"]
    n = o["first_attempts"]
    observed_s = o["spam_messages"] / n
    assert abs(observed_s - s) < 4 * math.sqrt(s * (1 - s) / n)  # the sampling of the mix
    expected = 1 / (2 - s)
    sigma = math.sqrt(s * (1 - s) / n) / (2 - s) ** 2  # delta method
    assert abs(o["tempfail_ratio"] - expected) < 4 * sigma + 1e-3
    assert o["legit_delay_max"] == 300.0 and o["legit_lost"] == 0


def test_bots_retrying_inside_the_delay_are_stopped_and_after_it_pass():
    bots = lambda interval: scenario(1.0, [{"name": "b", "kind": "spam", "share": 1.0,  # noqa: E731
                                            "retry": {"model": "fixed", "interval": interval, "retries": 3}}])
    assert run(bots("15s"), Config(delay=60))["overall"]["spam_stopped_share"] == 1.0
    assert run(bots("30s"), Config(delay=60))["overall"]["spam_stopped_share"] == 0.0


def test_provider_pool_is_delayed_again_per_ip():
    farm = [{"name": "farm", "kind": "legit", "share": 1.0, "pool": 64, "pool_networks": 1,
             "retry": {"model": "list", "offsets": ["1m", "5m", "10m"], "then": "30m"}, "lifetime": "1d"}]
    result = run(scenario(0.0, farm, rate="2000/day"), Config(delay=300))
    cls = result["classes"][0]
    assert cls["delivered"] == cls["messages"] and cls["delay_max"] > 300


def test_same_seed_same_report_byte_for_byte_except_timing():
    sc = load(DATA / "small.toml")
    a, b = run(sc, seed=11), run(sc, seed=11)
    a.pop("timing"), b.pop("timing")
    assert report.to_json(a) == report.to_json(b)
    c = run(sc, seed=12)
    c.pop("timing")
    assert report.to_json(a) != report.to_json(c)


def test_every_policy_sees_the_same_traffic():
    sc = load(DATA / "small.toml")
    a, b = run(sc, Config(delay=60)), run(sc, Config(delay=900))
    assert a["overall"]["first_attempts"] == b["overall"]["first_attempts"]
    assert [c["messages"] for c in a["classes"]] == [c["messages"] for c in b["classes"]]


def test_golden_report_of_a_small_seeded_run():
    sc = load(DATA / "small.toml")
    result = run(sc, Config(delay=60), duration=12 * H, seed=3)
    result.pop("timing")
    result["run"]["scenario"] = "small.toml"
    golden = DATA / "golden_small.json"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(report.to_json(result))
    assert report.to_json(result) == golden.read_text()


def test_file_store_gives_the_same_answers_and_counts_its_operations(tmp_path):
    sc = load(DATA / "small.toml")
    mem = run(sc, duration=4 * H)
    files = run(sc, duration=4 * H, store=FileStore(str(tmp_path)))
    assert mem["overall"] == files["overall"]
    ops = files["store"]["ops_per_connection"]
    assert ops["stat"] == 1.0 and ops["create"] > 0 and ops["utime"] > 0
    assert files["store"]["files_end"] == files["store"]["entries_end"]
    assert files["store"]["bytes_peak"] > 0


def test_expiry_runs_during_long_simulations():
    sc = load(DATA / "small.toml")
    server = simulate(sc, Config(delay=60, retry_window=H, max_age=2 * H), MemoryStore(),
                      RunOptions(duration=2 * 86400, seed=1, expire_every=6 * H))
    assert len(server.expiry_runs) == 7
    assert sum(r["removed"] for r in server.expiry_runs) > 0


@pytest.mark.parametrize("text,per_second", [("300k/day", 300000 / 86400), ("3.5/s", 3.5),
                                             ("12000/h", 12000 / 3600), ("20/min", 20 / 60)])
def test_rates(text, per_second):
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["300k", "fast", "-5/s", "0/s", "1/fortnight", "nan/s"])
def test_bad_rates(text):
    with pytest.raises(ScenarioError):
        parse_rate(text)


@pytest.mark.parametrize("data,match", [
    ({"sender": [{"name": "a", "kind": "legit", "share": 0.5, "retry": {"model": "postfix"}}]}, "add up to 0.5"),
    ({"sender": [{"name": "a", "kind": "ham", "share": 1}]}, "kind must be"),
    ({"traffic": {"spam_share": 2}}, "spam_share"),
    ({"sender": [{"name": "a", "kind": "legit", "share": 1, "retry": {"model": "warp"}}]}, "unknown retry model"),
    ({"traffic": {"spam_share": 0.5}, "sender": [{"name": "a", "kind": "legit", "share": 1, "retry": {"model": "postfix"}}]}, "no spam sender"),
])
def test_scenario_errors_say_where(data, match):
    with pytest.raises(ScenarioError, match=match):
        from_dict(data, "x.toml")


def test_default_scenario_loads_and_cites_sources():
    sc = load()
    assert sc.rate == pytest.approx(300000 / 86400)
    text = (Path(simulator.simulation.__file__).parent / "scenarios" / "default.toml").read_text()
    for source in ("MAAWG", "qmgr_active.c", "configure.default", "qmail-send.c", "Levine", "Pagani"):
        assert source in text


def run_keyed(sc, key: str, auto_whitelist: int = 5, whitelist: str = "", duration=12 * H):
    server = simulate(sc, Config(delay=300.0, auto_whitelist=auto_whitelist, key=key, whitelist=whitelist),
                      MemoryStore(), RunOptions(duration=duration, seed=5))
    return report.build(server, {"scenario": "t", "seed": 5, "rate_per_day": 0})


def test_key_modes_trade_farm_delays_against_precision():
    sc = load(DATA / "small.toml")
    by_key = {k: run_keyed(sc, k) for k in ("ip", "subnet", "triplet", "triplet-subnet")}
    first = {k: r["overall"]["first_attempts"] for k, r in by_key.items()}
    assert len(set(first.values())) == 1  # the very same traffic
    farm = {k: next(c for c in r["classes"] if c["class"] == "farm") for k, r in by_key.items()}
    # a farm retrying from other hosts of its /24s: subnet keys pass it at its first retry
    assert farm["subnet"]["delay_max"] < farm["ip"]["delay_max"]
    assert farm["subnet"]["delay_max"] <= 300 + 300  # delay, then its next try
    # triplets greylist every new sender/recipient pair: more mail waits, the store grows
    assert by_key["triplet"]["overall"]["legit_delayed"] > by_key["ip"]["overall"]["legit_delayed"]
    assert by_key["triplet"]["store"]["entries_peak"] > by_key["ip"]["store"]["entries_peak"]
    assert all(r["overall"]["legit_lost"] == 0 for r in by_key.values())


def test_auto_whitelist_cuts_triplet_delays():
    sc = load(DATA / "small.toml")
    on, off = run_keyed(sc, "triplet", 2, duration=24 * H), run_keyed(sc, "triplet", 0, duration=24 * H)
    assert on["overall"]["legit_delayed"] < off["overall"]["legit_delayed"]


def test_whitelisted_networks_skip_the_store(tmp_path):
    from simulator.simulation import Population
    import random

    sc = load(DATA / "small.toml")
    pools = Population(sc, random.Random(5)).pools["farm"]  # the farm's networks, as a run draws them
    nets = sorted({ip.rsplit(".", 1)[0] + ".0/24" for ip in pools})
    (tmp_path / "clients").write_text("\n".join(nets))
    result = run_keyed(sc, "ip", whitelist=str(tmp_path / "clients"))
    farm = next(c for c in result["classes"] if c["class"] == "farm")
    assert result["overall"]["whitelisted_connections"] >= farm["connections"] > 0
    assert farm["delayed"] == 0
