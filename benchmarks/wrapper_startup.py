"""What one SMTP connection costs the wrapper, against a bare interpreter start.

Runs, interleaved so that machine noise hits all three alike:
- bare:     ``python -I -c pass`` with the venv's interpreter;
- pass:     greylist-wrap for a known client, exec'ing /bin/true;
- tempfail: greylist-wrap for a new client, answering the dialogue to QUIT.
The figure that matters is the ratio to bare (target: pass <= 1.5x).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wrapper() -> list[str]:
    installed = Path(sys.executable).parent / "greylist-wrap"
    if installed.exists():
        return [str(installed)]
    return [sys.executable, str(ROOT / "bin" / "greylist-wrap")]


def timed(cmd: list[str], env: dict[str, str], stdin: bytes) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, env=env, input=stdin, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def measure(runs: int = 200) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "GREYLIST_STORE": f"file://{tmp}", "GREYLIST_HOSTNAME": "bench.test",
               "TCPREMOTEIP": "192.0.2.1"}
        wrap = wrapper() + ["/bin/true"]
        subprocess.run(wrap, env={**env, "GREYLIST_DELAY": "0"}, input=b"QUIT\r\n",
                       capture_output=True)  # the known client's first tempfail
        subprocess.run(wrap, env={**env, "GREYLIST_DELAY": "0"}, capture_output=True)
        bare, passing, tempfail = [], [], []
        for i in range(runs):
            bare.append(timed([sys.executable, "-I", "-c", "pass"], env, b""))
            passing.append(timed(wrap, env, b""))
            new_ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
            tempfail.append(timed(wrap, {**env, "TCPREMOTEIP": new_ip}, b"QUIT\r\n"))
    bare_ms = statistics.median(bare) * 1000
    pass_ms = statistics.median(passing) * 1000
    temp_ms = statistics.median(tempfail) * 1000
    return {
        "runs": runs,
        "bare_start_ms": round(bare_ms, 3),
        "wrapper_pass_ms": round(pass_ms, 3),
        "wrapper_tempfail_ms": round(temp_ms, 3),
        "pass_vs_bare": round(pass_ms / bare_ms, 3),
        "tempfail_vs_bare": round(temp_ms / bare_ms, 3),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 200), indent=2))
