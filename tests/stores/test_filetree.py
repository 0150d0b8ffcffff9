"""The file tree: cqgreylist's layout read as is, IPv6 apart, races, failures."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from greylist.core.check import check
from greylist.core.policy import Policy, Record
from greylist.stores import StoreError
from greylist.stores.filetree import FileStore


def make_cqgreylist_entry(base: Path, ip: str, age: float) -> Path:
    """What cqgreylist 0.2 leaves behind: BASE/<first octet>/<ip>, empty, mtime = first seen."""
    d = base / ip.split(".")[0]
    d.mkdir(mode=0o700, exist_ok=True)
    f = d / ip
    f.touch()
    t = time.time() - age
    os.utime(f, (t, t))
    return f


def test_reads_an_existing_cqgreylist_tree_as_is(tmp_path):
    make_cqgreylist_entry(tmp_path, "66.94.237.12", age=3600)
    make_cqgreylist_entry(tmp_path, "66.94.237.13", age=10)
    store = FileStore(str(tmp_path))
    now = time.time()
    policy = Policy(delay=60)
    record = store.get("66.94.237.12")
    assert record.passes == 0 and abs(record.first_seen - (now - 3600)) < 2
    # A client cqgreylist had already seen passes at once, and is remembered as known.
    assert check(store, "66.94.237.12", now, policy).reason == "passed"
    assert check(store, "66.94.237.13", now, policy).reason == "too-soon"
    after = store.get("66.94.237.12")
    assert after.passes == 1 and abs(after.first_seen - (now - 3600)) < 2
    assert abs(os.stat(tmp_path / "66" / "66.94.237.12").st_mtime - now) < 2


def test_layout_and_modes(tmp_path):
    store = FileStore(str(tmp_path))
    store.add("66.94.237.12", Record(1000.0, 1000.0, 0))
    store.add("2001:db8::1", Record(1000.0, 1000.0, 0))
    v4 = tmp_path / "66" / "66.94.237.12"
    v6 = tmp_path / "v6" / "2001-0db8" / "2001-0db8-0000-0000-0000-0000-0000-0001"
    assert v4.read_bytes() == b"" and v4.stat().st_mtime == 1000.0
    assert v6.exists()
    assert (v4.parent.stat().st_mode & 0o777) == 0o700
    assert not any(c in v6.name for c in ":%/\\ ")


def test_mapped_ipv4_and_ipv4_share_one_entry(tmp_path):
    store = FileStore(str(tmp_path))
    store.add("::ffff:192.0.2.1", Record(1.0, 1.0, 0))
    assert store.get("192.0.2.1") == Record(1.0, 1.0, 0)


def test_keys_are_never_used_raw_in_paths(tmp_path):
    store = FileStore(str(tmp_path))
    for bad in ("../../etc/passwd", "1.2.3.4/../../x", "", "v6"):
        with pytest.raises(StoreError):
            store.get(bad)
        with pytest.raises(StoreError):
            store.add(bad, Record(1.0, 1.0, 0))


def test_scan_skips_foreign_and_temp_files(tmp_path):
    store = FileStore(str(tmp_path))
    store.put("192.0.2.1", Record(1.0, 2.0, 1))
    (tmp_path / "192" / ".192.0.2.1.999.tmp").write_text("x")
    (tmp_path / "192" / "README").write_text("x")
    (tmp_path / "lost+found").mkdir()
    assert [k for k, _ in store.scan()] == ["192.0.2.1"]


def test_garbage_content_is_read_as_a_cqgreylist_entry(tmp_path):
    store = FileStore(str(tmp_path))
    (tmp_path / "192").mkdir()
    f = tmp_path / "192" / "192.0.2.1"
    f.write_bytes(b"\xff\x00garbage")
    os.utime(f, (500.0, 500.0))
    assert store.get("192.0.2.1") == Record(500.0, 500.0, 0)


def test_unwritable_store_raises_store_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    store = FileStore(str(blocker))
    with pytest.raises(StoreError, match="cannot"):
        store.add("192.0.2.1", Record(1.0, 1.0, 0))


def _write_with_no_disk_space(base: str) -> str:
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))\n"
        "from greylist.stores.filetree import FileStore\n"
        "from greylist.stores import StoreError\n"
        "from greylist.core.policy import Record\n"
        f"s = FileStore({base!r})\n"
        "try:\n    s.put('192.0.2.1', Record(1.0, 2.0, 1))\nexcept StoreError as e:\n    print(e)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}).stdout


def test_full_disk_is_a_store_error_and_keeps_the_old_record(tmp_path):
    store = FileStore(str(tmp_path))
    store.add("192.0.2.1", Record(1.0, 1.0, 0))
    out = _write_with_no_disk_space(str(tmp_path))
    assert "cannot write" in out
    assert store.get("192.0.2.1") == Record(1.0, 1.0, 0)
    assert [p.name for p in (tmp_path / "192").iterdir()] == ["192.0.2.1"]  # no temp left


def test_counts_its_operations(tmp_path):
    store = FileStore(str(tmp_path))
    check(store, "192.0.2.1", 1000.0, Policy())
    assert store.ops == {"stat": 1, "create": 2, "mkdir": 1, "utime": 1}
    check(store, "192.0.2.1", 2000.0, Policy())
    assert store.ops["rename"] == 1 and store.ops["write"] == 1


def test_a_planted_symlink_is_never_written_through(tmp_path):
    """Temp files and entries are created O_EXCL|O_NOFOLLOW under unpredictable names; an
    entry that is a symlink is replaced by a rename, which never follows it."""
    import os

    from greylist.core.check import check
    from greylist.core.policy import Policy
    from greylist.service import Connection, Greylister
    from greylist.config import load

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    store_dir = tmp_path / "store"
    (store_dir / "192").mkdir(parents=True)
    for pid in range(os.getpid() - 50, os.getpid() + 50):  # the old predictable temp names
        os.symlink(victim, store_dir / "192" / f".192.0.2.1.{pid}.tmp")
    os.symlink(victim, store_dir / "192" / "192.0.2.1")  # the entry itself
    os.mkfifo(store_dir / "192" / "192.0.2.2")
    store = FileStore(str(store_dir))
    policy = Policy(delay=0)
    assert check(store, "192.0.2.1", 1000.0, policy).reason == "new"
    assert check(store, "192.0.2.1", 1001.0, policy).reason == "passed"
    assert victim.read_text() == "precious\n"
    entry = store_dir / "192" / "192.0.2.1"
    assert entry.is_file() and not entry.is_symlink()
    g = Greylister(load({"store": f"file://{store_dir}"}, {}), store, clock=lambda: 2000.0)
    outcome = g.decide(Connection("192.0.2.2"))  # a FIFO: never opened, replaced
    assert outcome.verdict.reason == "new" and "not a regular file" in outcome.fields()["store_warning"]
    assert (store_dir / "192" / "192.0.2.2").is_file()


def test_expire_knows_every_temporary_file_put_makes():
    """expire removes a killed writer's temporary files by their names: the names put() makes,
    for an address, a network, an IPv6 address and a triplet, are all of them."""
    from greylist.stores.filetree import _temp_file, _temp_name

    store = FileStore("/nonexistent")
    for key in ("192.0.2.1", "192.0.2.0/24", "2001:db8::5", "192.0.2.0/24|a@b.example|c@d.example"):
        directory, path = store.path_of(key)
        assert _temp_name(_temp_file(path[len(directory) + 1:])), key
