"""In-process decisions per second per store: greylister.check on a realistic mix.

The file and SQLite stores run in scratch space on tmpfs (see simulated_day.py);
Redis is a real redis-server on loopback, through the wrapper's lean client
and through redis-py.
Half the calls are for known clients (a pool of 2,000 addresses that pass), half
for new addresses (mostly spam), as in a busy MX's traffic.
"""

from __future__ import annotations

import random
import shutil
import time

from greylist.core.check import check
from greylist.core.policy import Policy
from greylist.stores import open_store
from simulator.runs import scratch_dir


def rate(store_url: str, calls: int, lean: bool = True) -> float:
    rng = random.Random(1)
    known = [f"198.51.{i // 250}.{i % 250}" for i in range(2000)]
    policy = Policy(delay=0)
    temp = None
    if store_url in ("file://", "sqlite://"):
        temp = scratch_dir()
        store_url = f"file://{temp}" if store_url == "file://" else f"sqlite://{temp}/greylist.db"
    try:
        store = open_store(store_url, lean=lean)
        now = 1_800_000_000.0
        for ip in known:
            check(store, ip, now, policy)
        keys = [known[rng.randrange(2000)] if i % 2 else
                f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
                for i in range(calls)]
        started = time.perf_counter()
        for i, ip in enumerate(keys):
            check(store, ip, now + 1 + i * 0.001, policy)
        elapsed = time.perf_counter() - started
        store.close()
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    return calls / elapsed


def measure(calls: int = 50_000) -> dict:
    """Decisions per second per store; targets: 20k/s with SQLite, 10k/s with Redis."""
    from benchmarks.redis_server import RedisServer

    out = {
        "memory_per_second": round(rate("memory://", calls)),
        "file_per_second": round(rate("file://", max(calls // 5, 1000))),
        "sqlite_per_second": round(rate("sqlite://", max(calls // 5, 1000))),
    }
    try:
        server = RedisServer()
    except FileNotFoundError:
        return out
    try:
        # round trips just before and just after: the decisions' rate against them is what
        # CI compares (alone, the rate read 3,000-11,700 a second for the same code in one day)
        trips = max(calls // 10, 500)
        before = server.round_trips_per_second(trips)
        out["redis_per_second"] = round(rate(server.url, max(calls // 5, 1000)))
        after = server.round_trips_per_second(trips)
        out["redis_round_trips_per_second"] = round((before + after) / 2)
        out["redis_vs_round_trip"] = round(out["redis_per_second"] / out["redis_round_trips_per_second"], 3)
        server.flush()
        out["redis_py_per_second"] = round(rate(server.url, max(calls // 5, 1000), lean=False))
    finally:
        server.close()
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(measure(), indent=2))
