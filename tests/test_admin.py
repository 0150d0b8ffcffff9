"""greylist expire / show / stats against a real file tree."""

from __future__ import annotations

import json
import os
import time

from greylist.admin import main
from greylist.core.policy import Record
from greylist.stores.filetree import FileStore


def fill(base) -> FileStore:
    store = FileStore(str(base))
    now = time.time()
    store.add("192.0.2.1", Record(now - 10, now - 10, 0))             # pending, fresh
    store.add("192.0.2.2", Record(now - 3 * 86400, now - 3 * 86400, 0))  # pending, past window
    store.put("2001:db8::5", Record(now - 90 * 86400, now - 86400, 12))  # known, active
    store.put("198.51.100.3", Record(now - 90 * 86400, now - 40 * 86400, 2))  # known, silent
    return store


def test_expire_dry_run_then_for_real(tmp_path, capsys):
    store = fill(tmp_path)
    url = f"file://{tmp_path}"
    assert main(["expire", "--store", url, "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["expired_pending"], report["expired_known"], report["removed"]) == (1, 1, 0)
    assert len(list(store.scan())) == 4
    assert main(["expire", "--store", url]) == 0
    out = capsys.readouterr().out
    assert "removed 2" in out
    assert sorted(k for k, _ in store.scan()) == ["192.0.2.1", "2001:db8::5"]


def test_expire_max_age_flag_and_stale_temp_files(tmp_path, capsys):
    store = fill(tmp_path)
    tmp = tmp_path / "192" / ".192.0.2.1.4242.tmp"
    tmp.write_text("x")
    os.utime(tmp, (time.time() - 7200,) * 2)
    assert main(["expire", "--store", f"file://{tmp_path}", "--max-age", "1h", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["expired_known"] == 2 and report["temp_files_removed"] == 1
    assert not tmp.exists()


def test_expire_removes_only_our_temp_files_and_only_in_the_stores_directories(tmp_path, capsys):
    """A store URL one directory too high (file:///var for file:///var/greylist, in a cron
    line) must not cost anyone a file: expire took any .*.tmp at any depth below it."""
    base = tmp_path / "var"
    store_dir = base / "greylist"
    store = FileStore(str(store_dir))
    store.put("192.0.2.1", Record(time.time(), time.time(), 0))
    ours = [store_dir / "192" / ".192.0.2.1.4242.0123456789ab.tmp",  # a killed writer's
            store_dir / "192" / ".192.0.2.1.4243.tmp"]  # as older versions named them
    theirs = [base / ".cache.tmp", base / "app" / "state" / ".session.1.tmp", base / "192" / ".notes.tmp",
              store_dir / "192" / ".notes.tmp", store_dir / "spool" / ".192.0.2.1.4244.tmp"]
    for path in ours + theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
        os.utime(path, (time.time() - 7200,) * 2)
    assert main(["expire", "--store", f"file://{base}", "--json"]) == 0  # one too high
    assert json.loads(capsys.readouterr().out)["temp_files_removed"] == 0
    assert all(path.exists() for path in ours + theirs)
    assert main(["expire", "--store", f"file://{store_dir}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["temp_files_removed"] == 2
    assert not any(path.exists() for path in ours) and all(path.exists() for path in theirs)


def test_show(tmp_path, capsys):
    fill(tmp_path)
    assert main(["show", "192.0.2.1", "--store", f"file://{tmp_path}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["state"] == "pending" and info["next_connection"] == "tempfail"
    assert info["reason"] == "too-soon" and 45 <= info["retry_in_seconds"] <= 50
    assert info["path"] == f"{tmp_path}/192/192.0.2.1"
    assert main(["show", "203.0.113.9", "--store", f"file://{tmp_path}"]) == 1
    assert "unknown" in capsys.readouterr().out
    assert main(["show", "not-an-ip", "--store", f"file://{tmp_path}"]) == 2
    assert "not an IP address" in capsys.readouterr().err


def test_stats(tmp_path, capsys):
    fill(tmp_path)
    assert main(["stats", "--store", f"file://{tmp_path}", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["entries"], stats["pending"], stats["known"], stats["expired"]) == (4, 2, 2, 2)
    assert stats["age_histogram"]["< 1 min"]["pending"] == 1
    assert stats["age_histogram"][">= 35 d"]["known"] == 2
    assert stats["disk"]["files"] == 4
    assert main(["stats", "--store", f"file://{tmp_path}"]) == 0
    assert "age since first seen" in capsys.readouterr().out


def test_bad_store_url_is_a_clear_error(capsys):
    assert main(["stats", "--store", "nosuch://x"]) == 2
    assert "unknown store URL" in capsys.readouterr().err


def test_migrate_a_cqgreylist_tree_into_sqlite_and_redis(tmp_path, capsys, redis_url):
    from greylist.stores import open_store

    fill(tmp_path / "tree")
    src = f"file://{tmp_path}/tree"
    for dst in (f"sqlite://{tmp_path}/g.db", redis_url):
        assert main(["migrate", src, dst, "--json"]) == 0
        first = json.loads(capsys.readouterr().out)
        # the two expired entries stay behind; the two live ones are copied
        assert (first["read"], first["copied"], first["skipped_expired"]) == (4, 2, 2)
        assert main(["migrate", src, dst, "--json"]) == 0
        again = json.loads(capsys.readouterr().out)
        assert (again["copied"], again["updated"], again["skipped_same_or_newer"]) == (0, 0, 2)
        with open_store(dst) as store:
            assert sorted(k for k, _ in store.scan()) == ["192.0.2.1", "2001:db8::5"]
            assert store.get("2001:db8::5").passes == 12
    assert main(["migrate", src, "nosuch://x"]) == 2
    assert "unknown store URL" in capsys.readouterr().err


def test_migrate_updates_older_entries_and_dry_run_writes_nothing(tmp_path, capsys):
    from greylist.stores import open_store

    now = time.time()
    a, b = f"sqlite://{tmp_path}/a.db", f"sqlite://{tmp_path}/b.db"
    with open_store(a) as src, open_store(b) as dst:
        src.put("192.0.2.1", Record(now - 100, now - 10, 3))
        dst.put("192.0.2.1", Record(now - 100, now - 50, 2))
    assert main(["migrate", a, b, "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["updated"] == 1
    with open_store(b) as dst:
        assert dst.get("192.0.2.1").passes == 2
    assert main(["migrate", a, b]) == 0
    assert "updated (source more recent)" in capsys.readouterr().out
    with open_store(b) as dst:
        assert dst.get("192.0.2.1").passes == 3


def test_show_in_subnet_mode_finds_the_network_entry(tmp_path, capsys):
    store = FileStore(str(tmp_path))
    store.add("192.0.2.0/24", Record(time.time() - 30, time.time() - 30, 0))
    assert main(["show", "192.0.2.200", "--store", f"file://{tmp_path}", "--key", "subnet", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["client"] == "192.0.2.0/24" and info["reason"] == "too-soon"


def test_garbage_sqlite_rows_are_skipped_counted_and_reported(tmp_path, capsys):
    import sqlite3

    from greylist.stores import open_store

    url = f"sqlite://{tmp_path}/g.db"
    with open_store(url) as store:
        store.put("192.0.2.1", Record(time.time() - 10, time.time() - 10, 0))
    db = sqlite3.connect(tmp_path / "g.db")
    db.execute("INSERT INTO greylist VALUES ('192.0.2.9', 'garbage', x'00ff', 'x')")
    db.execute("INSERT INTO greylist VALUES ('192.0.2.8', 1.0, 'x', 2.5)")
    db.commit()
    db.close()
    for command in (["expire"], ["stats"], ["migrate", url, f"sqlite://{tmp_path}/copy.db"]):
        args = command + (["--store", url] if command[0] != "migrate" else [])
        assert main(args) == 0, command
        out = capsys.readouterr().out
        assert "2" in out and ("unreadable" in out or "not records" in out), (command, out)


def test_a_corrupt_database_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    path = tmp_path / "g.db"
    path.write_bytes(b"SQLite format 3\0" + b"\xff" * 4000)
    assert main(["stats", "--store", f"sqlite://{path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("greylist stats: ") and "Traceback" not in err


def test_a_typed_flag_beats_an_exported_variable(tmp_path, capsys, monkeypatch):
    fill(tmp_path / "typed")
    (tmp_path / "exported").mkdir()
    monkeypatch.setenv("GREYLIST_STORE", f"file://{tmp_path}/exported")
    assert main(["stats", "--json", "--store", f"file://{tmp_path}/typed"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 4


def test_read_only_commands_never_create_a_store_and_a_missing_one_is_an_error(tmp_path, capsys):
    for command in (["stats"], ["show", "192.0.2.1"], ["expire"]):
        for url in (f"file://{tmp_path}/nonexistent", f"sqlite://{tmp_path}/nonexistent.db"):
            assert main(command + ["--store", url]) == 2, (command, url)
            assert "no store at" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_expire_names_a_clients_escape_sequence_as_escapes_never_as_themselves(tmp_path, capsys):
    """A triplet's sender is the client's (qmail takes any byte in MAIL FROM, and
    greylist-spp keys on it): expire -v printed it as it was, an escape sequence for the
    admin's terminal (here: set its title, clear its screen)."""
    from greylist.stores import open_store

    store = open_store(f"sqlite://{tmp_path}/g.sqlite")
    evil = "10.0.0.0/24|x\x1b]0;pwned\x07\x1b[2J\x9b31m@example.org|r@example.net"
    store.put(evil, Record(1.0, 1.0, 0))
    store.put("10.0.1.0/24|caf\u00e9@example.org|r@example.net", Record(1.0, 1.0, 0))
    store.close()
    assert main(["expire", "-v", "--dry-run", "--store", f"sqlite://{tmp_path}/g.sqlite"]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\x9b")
    assert "x\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m@example.org" in out
    assert "caf\u00e9@example.org" in out  # printable text stays as it is
