"""In-process decisions per second per store: greylister.check on a realistic mix.

The file store runs in a scratch directory on tmpfs (see simulated_day.py).
Half the calls are for known clients (a pool of 2,000 addresses that pass), half
for new addresses (mostly spam), as in a busy MX's traffic.
"""

from __future__ import annotations

import random
import shutil
import time

from greylist.greylister import check
from greylist.policy import Policy
from greylist.stores import open_store
from simulator.cli import scratch_dir


def rate(store_url: str, calls: int) -> float:
    rng = random.Random(1)
    known = [f"198.51.{i // 250}.{i % 250}" for i in range(2000)]
    policy = Policy(delay=0)
    temp = None
    if store_url == "file://":
        temp = scratch_dir()
        store_url = f"file://{temp}"
    try:
        store = open_store(store_url)
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
    return {
        "memory_per_second": round(rate("memory://", calls)),
        "file_per_second": round(rate("file://", max(calls // 5, 1000))),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(measure(), indent=2))
