"""``greylist expire``, ``stats`` and ``migrate`` on large stores: peak memory and rows a second.

``greylist expire`` runs from cron beside the mail server, and ``greylist
postgrey`` runs it every night itself (postgrey's clean-up): at a site of
300,000 connections a day the table holds a million rows and more. The store
is made here with the store's own schema, a third of its rows stale, and
each command runs as its own process, which says its own peak resident
memory (VmHWM).

Measured before the store's scan read a page of rows at a time (it read the
whole table at once): a million rows took 269 MB in either command; after,
16 and 20 MB.

And ``greylist migrate`` of a postgrey database of as many triplets (made
with Berkeley DB's ``db_load``, where it is installed) into a new SQLite
store, as a site switching from postgrey runs it: 509 MB before db_dump's
output was read as it came, 21 MB after; 26,000 triplets a second before they
were written 1,000 a transaction (and unescaped only where db_dump escaped
something), 91,000 after.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from greylist.stores.sqlite import SCHEMA


def make_store(path: Path, rows: int, now: float) -> None:
    """``rows`` triplets: a third pending past the 2-day retry window, the rest recent."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(SCHEMA)
    db.executemany("INSERT INTO greylist VALUES (?, ?, ?, ?)",
                   ((f"10.{i >> 16 & 255}.{i >> 8 & 255}.0/24|s{i}@example{i % 977}.org|r{i % 5000}@example.net",
                     now - (3 if i % 3 == 0 else 0.5) * 86400, now - (3 if i % 3 == 0 else 0.5) * 86400,
                     0 if i % 3 == 0 else 1 + i % 4) for i in range(rows)))
    db.commit()
    db.close()


#: runs ``greylist ARGS...`` as its entry point does, then says its own peak resident memory.
#: ``wait4``'s ru_maxrss would not do: the kernel counts into it the memory of the process
#: that forked it, up to the exec (this one: 22 MB, more than either command takes)
PEAK = """import sys
from greylist.admin import main
sys.argv = ["greylist", *sys.argv[1:]]
try:
    code = main()
finally:
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    print(f"VmHWM {peak}", file=sys.stderr)
sys.exit(code)
"""


def run(args: list[str]) -> tuple[float, float]:
    """(peak resident MB, seconds) of one ``greylist`` command, which must succeed."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, cwd="/")
    wall = time.perf_counter() - started
    peak = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("VmHWM ")]
    if proc.returncode != 0 or not peak:
        raise RuntimeError(f"greylist {' '.join(args)} failed: {proc.stderr[-500:]}")
    return int(peak[-1]) / 1024, wall


def make_postgrey_db(directory: Path, rows: int, now: float) -> None:
    """postgrey.db as postgrey writes it (``NET/SENDER/RECIPIENT`` -> ``FIRST,LAST``), in
    db_load's text form: a third of the triplets passed (retried 400 s after the first)."""
    def lines():
        yield "VERSION=3\nformat=print\ntype=btree\ndb_pagesize=4096\nHEADER=END\n"
        for i in range(rows):
            first = int(now) - 3600 - i % 86400  # an hour ago or more: no retry lies ahead
            # letters, not digits: a key counts a sender's digits as one "#", as postgrey does
            sender = "".join(chr(97 + i // 26 ** k % 26) for k in range(5))
            yield (f" 10.{i >> 16 & 255}.{i >> 8 & 255}.0/{sender}@example{i % 977}.org/r{i % 5000}@example.net\n"
                   f" {first},{first + (400 if i % 3 == 0 else 0)}\n")
        yield "DATA=END\n"

    proc = subprocess.Popen(["db_load", str(directory / "postgrey.db")], stdin=subprocess.PIPE)
    for text in lines():
        proc.stdin.write(text.encode())
    proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError("db_load failed")


def measure(rows: int = 1_000_000) -> dict:
    directory = Path(tempfile.mkdtemp())
    try:
        path = directory / "greylist.sqlite"
        make_store(path, rows, time.time())
        url = f"sqlite://{path}"
        stats_mb, stats_s = run(["stats", "--store", url])
        expire_mb, expire_s = run(["expire", "--store", url])
        left = sqlite3.connect(path).execute("SELECT COUNT(*) FROM greylist").fetchone()[0]
        migrated = {}
        if shutil.which("db_load") and shutil.which("db_dump"):
            (directory / "postgrey").mkdir()
            make_postgrey_db(directory / "postgrey", rows, time.time())
            mb, seconds = run(["migrate", "--quiet", f"postgrey://{directory}/postgrey",
                               f"sqlite://{directory}/migrated.sqlite"])
            copied = sqlite3.connect(directory / "migrated.sqlite").execute("SELECT COUNT(*) FROM greylist")
            if copied.fetchone()[0] != rows:
                raise RuntimeError(f"greylist migrate did not copy the {rows} triplets")
            migrated = {"migrate_peak_rss_mb": round(mb, 1), "migrate_rows_per_second": round(rows / seconds)}
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if left != rows - (rows + 2) // 3:
        raise RuntimeError(f"greylist expire left {left} of {rows} rows, not the {rows - (rows + 2) // 3} recent ones")
    return {"rows": rows, "expire_peak_rss_mb": round(expire_mb, 1), "expire_rows_per_second": round(rows / expire_s),
            "stats_peak_rss_mb": round(stats_mb, 1), "stats_rows_per_second": round(rows / stats_s), **migrated}


if __name__ == "__main__":
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000), indent=2))
