"""Live capacity per store: real wrapper processes at rising offered rates.

The highest offered rate at which the p99 time to the first reply stays under
100 ms with no errors and no refusals (``simulate capacity``), for the file
tree, SQLite and Redis. Target (issue 4): at least 50 connections per second
with the file store on the 2-core machine (300k/day averages 3.5/s).
"""

from __future__ import annotations

import shutil
import tempfile


def measure(step_seconds: float = 5.0, start_rate: float = 20.0, max_rate: float = 400.0,
            factor: float = 1.5) -> dict:
    from benchmarks.redis_server import RedisServer
    from simulator.live import capacity
    from simulator.scenario import load

    scenario = load()
    temp = tempfile.mkdtemp(prefix="greylist-live-")
    stores = {"file": f"file://{temp}/tree", "sqlite": f"sqlite://{temp}/greylist.db"}
    server = None
    try:
        try:
            server = RedisServer()
            stores["redis"] = server.url
        except FileNotFoundError:
            pass
        out = {}
        for name, url in stores.items():
            r = capacity(url, scenario, 100.0, step_seconds=step_seconds, start_rate=start_rate,
                         max_rate=max_rate, factor=factor)
            out[f"{name}_max_rate_per_second"] = r["max_rate_per_second"]
            at = r["at_that_rate"] or {}
            out[f"{name}_p99_first_reply_ms"] = at.get("first_reply_ms_p99")
            out[f"{name}_cpu_ms_per_connection"] = at.get("cpu_ms_per_connection")
        return out
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(temp, ignore_errors=True)
