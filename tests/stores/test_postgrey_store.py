"""postgrey's database read through db_dump: a line at a time, never the whole output at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

import greylist.stores.postgrey as postgrey_store
from greylist.stores.base import StoreError
from greylist.stores.postgrey import dump_lines, dump_pairs


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie is gone too: it was waited for, or it is no longer ours to wait for
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"


def test_lines_come_as_they_are_written_and_a_reader_that_stops_stops_the_program(tmp_path):
    """The first lines are there while the program still runs (a million entries held whole
    took 509 MB in greylist migrate); a reader that stops early leaves no program behind."""
    pid_file = tmp_path / "pid"
    lines = dump_lines(["sh", "-c", f"echo $$ > {pid_file}; echo one; echo two; exec sleep 60"], "test")
    started = time.monotonic()
    assert next(lines) == "one" and next(lines) == "two"
    assert time.monotonic() - started < 30  # not after the sleep
    pid = int(pid_file.read_text())
    assert not _gone(pid)
    lines.close()
    assert _gone(pid)


def test_a_failure_after_some_lines_says_db_dumps_words_and_a_flood_on_stderr_never_blocks():
    got = []
    with pytest.raises(StoreError, match="cannot read test: it broke"):
        for line in dump_lines(["sh", "-c", "echo a; echo b; echo it broke >&2; exit 3"], "test"):
            got.append(line)
    assert got == ["a", "b"]
    flood = "head -c 300000 /dev/zero | tr '\\0' x >&2; echo done"  # far more than a pipe holds
    assert list(dump_lines(["sh", "-c", flood], "test")) == ["done"]


def test_a_db_dump_that_writes_nothing_is_given_up_on(monkeypatch):
    monkeypatch.setattr(postgrey_store, "DUMP_TIMEOUT", 0.3)
    with pytest.raises(StoreError, match="wrote nothing for 0 s"):
        list(dump_lines(["sleep", "30"], "test"))


@pytest.mark.skipif(not (shutil.which("db_load") and shutil.which("db_dump")),
                    reason="needs Berkeley DB's db_load and db_dump (apt-get install db-util)")
def test_pairs_of_a_database_made_by_db_load_as_postgrey_writes_them(tmp_path):
    """Keys and values in order, escapes undone, across many reads of db_dump's output."""
    entries = [(f"10.0.{i % 250}.0/s{i}@example.org/r{i}@example.net".encode(),
                f"{1_700_000_000 + i},1700000400".encode()) for i in range(5000)]
    entries.append(("192.0.2.0/caf\u00e9@example.org/x\\y@example.net".encode(), b"1700000000,1700000000"))

    def printable(data: bytes) -> str:
        return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else ("\\\\" if b == 0x5C else f"\\{b:02x}")
                       for b in data)

    text = "VERSION=3\nformat=print\ntype=btree\nHEADER=END\n" + "".join(
        f" {printable(k)}\n {printable(v)}\n" for k, v in entries) + "DATA=END\n"
    subprocess.run(["db_load", str(tmp_path / "postgrey.db")], input=text.encode(), check=True)
    assert list(dump_pairs(str(tmp_path / "postgrey.db"))) == sorted(entries)
