"""What one SMTP connection costs the wrapper, against a bare interpreter start.

Runs, interleaved so that machine noise hits all of them alike:
- bare:           ``python -I -c pass`` with the venv's interpreter;
- pass (STORE):   greylist-wrap for a known client, exec'ing /bin/true, per store;
- tempfail:       greylist-wrap (file store) for a new client, dialogue to QUIT;
- whitelist:      greylist-wrap with the shipped sample whitelist (compiled and
                  cached) for a whitelisted client, exec'ing /bin/true.
The figures that matter are ratios: the file store's pass path to bare (target
1.5x), the SQLite and Redis pass paths to the file store's (target 1.3x), and
the whitelisted path to the file store's pass path (a lookup in a compiled
list should cost less than a store read).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simulator.commands import command

ROOT = Path(__file__).resolve().parent.parent


def wrapper() -> list[str]:
    return command("greylist-wrap")


def timed(cmd: list[str], env: dict[str, str], stdin: bytes) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, env=env, input=stdin, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def measure(runs: int = 200, redis: bool = True) -> dict:
    from benchmarks.redis_server import RedisServer

    server = None
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"file": f"file://{tmp}/tree", "sqlite": f"sqlite://{tmp}/greylist.db"}
        if redis:
            try:
                server = RedisServer()
                stores["redis"] = server.url
            except FileNotFoundError:
                pass
        base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GREYLIST_HOSTNAME": "bench.test",
                "TCPREMOTEIP": "192.0.2.1"}
        wrap = wrapper() + ["/bin/true"]
        for url in stores.values():  # make 192.0.2.1 a known client in every store
            env = {**base, "GREYLIST_STORE": url, "GREYLIST_DELAY": "0"}
            subprocess.run(wrap, env=env, input=b"QUIT\r\n", capture_output=True)
            subprocess.run(wrap, env=env, capture_output=True)
        sample = ROOT / "greylist" / "data" / "whitelist_clients.sample"
        whitelist = f"{tmp}/whitelist"
        Path(whitelist).write_text(sample.read_text())
        wl_env = {**base, "GREYLIST_STORE": stores["file"], "GREYLIST_WHITELIST": whitelist,
                  "TCPREMOTEIP": "209.85.220.41"}
        subprocess.run(wrap, env=wl_env, capture_output=True)  # compiles and caches the list
        times: dict[str, list[float]] = {"bare": [], "tempfail": [], "whitelist": [],
                                         **{k: [] for k in stores}}
        try:
            for i in range(runs):
                times["bare"].append(timed([sys.executable, "-I", "-c", "pass"], base, b""))
                for name, url in stores.items():
                    times[name].append(timed(wrap, {**base, "GREYLIST_STORE": url}, b""))
                new_ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
                times["tempfail"].append(timed(
                    wrap, {**base, "GREYLIST_STORE": stores["file"], "TCPREMOTEIP": new_ip}, b"QUIT\r\n"))
                times["whitelist"].append(timed(wrap, wl_env, b""))
        finally:
            if server is not None:
                server.close()
    ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
    out = {"runs": runs, "bare_start_ms": round(ms["bare"], 3)}
    for name in stores:
        out[f"pass_{name}_ms"] = round(ms[name], 3)
    out["tempfail_file_ms"] = round(ms["tempfail"], 3)
    out["whitelisted_ms"] = round(ms["whitelist"], 3)
    out["whitelisted_vs_pass"] = round(ms["whitelist"] / ms["file"], 3)
    out["pass_vs_bare"] = round(ms["file"] / ms["bare"], 3)
    out["tempfail_vs_bare"] = round(ms["tempfail"] / ms["bare"], 3)
    for name in stores:
        if name != "file":
            out[f"pass_{name}_vs_file"] = round(ms[name] / ms["file"], 3)
    return out


if __name__ == "__main__":
    import json

    sys.path.insert(0, str(ROOT))
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 200), indent=2))
