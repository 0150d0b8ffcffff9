"""simulate live / capacity with the real installed wrapper, and the plots."""

from __future__ import annotations

import json
import sys

import pytest

from simulator.cli import main
from simulator.errors import SimulateError
from simulator.live import LiveOptions, capacity, run_live
from simulator.scenario import load


def test_live_run_measures_real_wrapper_processes(tmp_path):
    options = LiveOptions(rate=25, duration=2.0, store=f"file://{tmp_path}/tree", delay=60)
    result = run_live(options, load())
    s = result.summary(options)
    assert s["offered"] > 20 and s["refused"] == 0 and s["completed"] == s["offered"]
    assert s["errors"] == 0, s["error_kinds"]
    assert s["passed"] > 0 and s["greylisted"] > 0  # known regulars pass, new clients are greylisted
    assert s["passed"] + s["greylisted"] == s["completed"]
    assert 0 < s["first_reply_ms_p50"] <= s["first_reply_ms_p99"] <= s["first_reply_ms_max"]
    assert s["cpu_ms_per_connection"] > 1 and s["peak_memory_kb"] > 1000
    assert len(list((tmp_path / "tree").rglob("*.*.*.*"))) >= s["greylisted"] // 2


def test_concurrency_limit_refuses_like_tcpserver(tmp_path):
    options = LiveOptions(rate=200, duration=0.5, store=f"file://{tmp_path}", concurrency=1)
    s = run_live(options, load()).summary(options)
    assert s["refused"] > 0 and s["peak_concurrency"] == 1
    assert s["completed"] + s["refused"] == s["offered"]


def test_live_bounds():
    with pytest.raises(ValueError, match="rate"):
        run_live(LiveOptions(rate=1e6, duration=1, store="memory://"), load())
    with pytest.raises(ValueError, match="duration"):
        run_live(LiveOptions(rate=1, duration=3600, store="memory://"), load())
    with pytest.raises(ValueError, match="at most 100,000 processes"):
        run_live(LiveOptions(rate=1000, duration=600, store="memory://"), load())


def test_capacity_ramp_stops_at_the_first_failing_step(tmp_path):
    r = capacity(f"file://{tmp_path}", load(), p99_bound_ms=0.001, step_seconds=1.0, start_rate=10)
    assert len(r["steps"]) == 1 and r["max_rate_per_second"] == 0.0 and not r["steps"][0]["sustained"]
    r = capacity(f"file://{tmp_path}", load(), p99_bound_ms=5000, step_seconds=1.0, start_rate=10,
                 max_rate=20, factor=2)
    assert [s["offered_rate"] for s in r["steps"]] == [10, 20]
    assert r["max_rate_per_second"] == 20 and r["max_rate_per_day"] == 20 * 86400


def test_commands_print_tables_and_plots(tmp_path, capsys):
    assert main(["live", "--rate", "20/s", "--duration", "1s", "--json", str(tmp_path / "l.json")]) == 0
    assert "first reply p50" in capsys.readouterr().out
    assert json.loads((tmp_path / "l.json").read_text())["completed"] > 0
    png = tmp_path / "cap.png"
    assert main(["capacity", "--step", "1s", "--start", "10/s", "--max", "15/s", "--p99", "5s",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "highest sustained rate" in out and "per day" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sim_png = tmp_path / "sim.png"
    assert main(["--duration", "6h", "--quiet", "--plot", str(sim_png)]) == 0
    assert sim_png.read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_is_a_clear_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["--duration", "1h", "--quiet", "--plot", str(tmp_path / "x.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["live", "--rate", "1000000/s"], "over the limit"),
    (["live", "--duration", "2h"], "at most 600"),
    (["capacity", "--p99", "soon"], "--p99"),
])
def test_live_errors(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_simulate_error_class_is_shared():
    from simulator.replay import cli as replay_cli
    assert replay_cli.SimulateError is SimulateError
