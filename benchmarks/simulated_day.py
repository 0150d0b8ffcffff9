"""Wall time of one simulated day of the default scenario (300k first attempts/day).

Printed as simulated connections per wall second, for the memory store and for
the file store in a scratch directory on tmpfs, as ``simulate --store file://``
runs it (this machine's disk is mounted with online discard, which makes its
file creation time swing threefold between runs). Targets (issue 3): a day in under
5 s with memory://, under 30 s with file://, on the 2-core dev machine.
"""

from __future__ import annotations

import shutil
import time

from greylist.config import Config
from greylist.stores import open_store
from simulator.runs import scratch_dir
from simulator.scenario import load
from simulator.simulation import RunOptions, simulate


def one(store_url: str, hours: float) -> dict:
    temp = None
    if store_url == "file://":
        temp = scratch_dir()
        store_url = f"file://{temp}"
    try:
        store = open_store(store_url)
        started = time.perf_counter()
        server = simulate(load(), Config(), store, RunOptions(duration=hours * 3600, seed=7))
        wall = time.perf_counter() - started
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    connections = sum(s.connections for s in server.stats.values())
    return {"connections": connections, "wall_seconds": round(wall, 3),
            "connections_per_second": round(connections / wall),
            "day_seconds": round(wall * 24 / hours, 2)}


def measure(hours: float = 24.0, file_hours: float | None = None) -> dict:
    mem = one("memory://", hours)
    fil = one("file://", file_hours or hours)
    return {
        "memory_connections_per_second": mem["connections_per_second"],
        "memory_day_seconds": mem["day_seconds"],
        "file_connections_per_second": fil["connections_per_second"],
        "file_day_seconds": fil["day_seconds"],
        "simulated_hours": hours,
    }


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(measure(float(sys.argv[1]) if len(sys.argv) > 1 else 24.0), indent=2))
