"""Whitelists: networks by bisection, names, patterns, recipients, the compiled cache."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

import greylist
from greylist.whitelist import ClientWhitelist, RecipientWhitelist, WhitelistError, load_clients

SAMPLE = Path(greylist.__file__).parent / "data" / "whitelist_clients.sample"


def test_networks_names_and_patterns():
    wl = ClientWhitelist.parse("""
        # comment
        192.0.2.0/24
        198.51.100.7      # one host
        2001:db8::/32
        google.com
        /^mx\\d+\\.example\\.org$/
    """)
    assert wl.matches("192.0.2.200") and wl.matches("198.51.100.7") and wl.matches("2001:db8:ffff::1")
    assert not wl.matches("192.0.3.1") and not wl.matches("198.51.100.8") and not wl.matches("2001:db9::1")
    assert wl.matches("203.0.113.1", "mail-ej1-f41.google.com") and wl.matches("203.0.113.1", "GOOGLE.COM.")
    assert not wl.matches("203.0.113.1", "notgoogle.com")
    assert wl.matches("203.0.113.1", "mx12.example.org") and not wl.matches("203.0.113.1", "mx.example.org")
    assert not wl.matches("not an ip", "google.com")


@given(st.lists(st.tuples(st.ip_addresses(v=4), st.integers(8, 32)), max_size=30), st.ip_addresses(v=4))
def test_bisection_agrees_with_ipaddress(nets, probe):
    networks = [ipaddress.ip_network(f"{a}/{b}", strict=False) for a, b in nets]
    wl = ClientWhitelist.parse("\n".join(str(n) for n in networks))
    assert wl.matches(str(probe)) == any(probe in n for n in networks)


@pytest.mark.parametrize("line", ["10.0.0.0/33", "bad name!", "/unclosed(/", "1.2.3.4/x", "/(a)\\1/",
                                  "/^(?=x)/"])
def test_a_bad_line_is_skipped_with_a_warning_naming_it_and_the_rest_counts(line):
    wl = ClientWhitelist.parse(f"10.0.0.0/8\n{line}\n192.0.2.0/24\n", "wl")
    assert len(wl.warnings) == 1 and wl.warnings[0].startswith("wl:2: ")
    assert wl.matches("10.1.2.3") and wl.matches("192.0.2.9")


@pytest.mark.parametrize("line,inside,outside", [
    ("66.94.237.", "66.94.237.200", "66.94.238.1"),
    ("195.235.39", "195.235.39.7", "195.235.40.7"),
    ("10.", "10.200.1.1", "11.0.0.1"),
    ("172.16", "172.16.99.1", "172.17.0.1"),
])
def test_partial_addresses_are_networks_as_postgrey_and_tcprules_read_them(line, inside, outside):
    wl = ClientWhitelist.parse(line + "\n")
    assert not wl.warnings and wl.matches(inside) and not wl.matches(outside)


def test_patterns_take_linear_time_whatever_the_name():
    """/^(a+)+$/ against 28 a's and '!' took 6 s with a backtracking engine."""
    import time

    wl = ClientWhitelist.parse("/^(a+)+$/\n")
    started = time.perf_counter()
    for n in (28, 200, 252):
        assert not wl.matches("192.0.2.1", "a" * n + "!")
    assert wl.matches("192.0.2.1", "a" * 253)
    assert not wl.matches("192.0.2.1", "a" * 100_000)  # not a DNS name
    assert time.perf_counter() - started < 5  # generous: a backtracking engine never finishes


def test_only_regular_files_of_bounded_size_are_read(tmp_path):
    with pytest.raises(WhitelistError, match="not a regular file"):
        load_clients("/dev/zero")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(WhitelistError, match="not a regular file"):
        load_clients(str(fifo))
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(17 * 1024 * 1024)
    with pytest.raises(WhitelistError, match="more than"):
        load_clients(str(big))


def test_several_files_all_count_and_the_cache_is_never_written_through_a_link(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("192.0.2.0/24\n")
    b.write_text("198.51.100.0/24\nexample.org\n")
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    for pid in range(os.getpid() - 20, os.getpid() + 20):
        os.symlink(victim, tmp_path / f"a.cache.{pid}.tmp")
    wl = load_clients(f"{a}:{b}")
    assert wl.matches("192.0.2.1") and wl.matches("198.51.100.1") and wl.matches_name("mx.example.org")
    assert victim.read_text() == "keep\n" and (tmp_path / "a.cache").is_file()


def test_compiled_cache_is_used_and_refreshed(tmp_path):
    path = tmp_path / "wl"
    path.write_text("192.0.2.0/24\n")
    assert load_clients(str(path)).matches("192.0.2.1")
    cache = Path(str(path) + ".cache")
    assert cache.exists()
    stamp = cache.stat().st_mtime_ns
    assert load_clients(str(path)).matches("192.0.2.1")
    assert cache.stat().st_mtime_ns == stamp  # read, not rewritten
    path.write_text("198.51.100.0/24\n# changed\n")
    wl = load_clients(str(path))
    assert wl.matches("198.51.100.1") and not wl.matches("192.0.2.1")
    cache.write_bytes(b"garbage")
    assert load_clients(str(path)).matches("198.51.100.1")


def test_unwritable_directory_just_skips_the_cache(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    (d / "wl").write_text("192.0.2.0/24\n")
    os.chmod(d, 0o500)
    try:
        assert load_clients(str(d / "wl")).matches("192.0.2.9")
    finally:
        os.chmod(d, 0o700)


def test_shipped_sample_parses():
    wl = load_clients(str(SAMPLE)) if os.access(SAMPLE.parent, os.W_OK) else \
        ClientWhitelist.parse(SAMPLE.read_text(), str(SAMPLE))
    assert wl.matches("209.85.220.41") and wl.matches("40.107.1.1") and wl.matches("2a00:1450:4864::1")
    assert wl.matches("198.51.100.1", "a48-30.smtp-out.amazonses.com")


def test_recipients():
    wl = RecipientWhitelist("postmaster@\nabuse@example.com\n@example.net\nexample.org\n")
    assert wl.matches("<Postmaster@anything.example>") and wl.matches("abuse@example.com")
    assert wl.matches("x@example.net") and wl.matches("y@example.org")
    assert not wl.matches("abuse@example.org.evil") and not wl.matches("bob@example.com")


def test_recipients_as_postgrey_matches_them():
    """+extensions, subdomains and /regex/ lines (postgrey's read_recipients_whitelists);
    a line that can match nothing is named in a warning, the rest still counts."""
    wl = RecipientWhitelist("postmaster@\nabuse@example.com\nexample.org\n/^list-[a-z]+@lists\\.example$/\n"
                            "two words\n/(a)\\1/\n", "rcpts")
    assert [w.split(":")[1] for w in wl.warnings] == ["5", "6"]
    assert wl.matches("postmaster+reports@a.example") and wl.matches("abuse+x+y@example.com")
    assert not wl.matches("postmaster+@a.example") and not wl.matches("postmasterx@a.example")
    assert wl.matches("y@sub.example.org") and not wl.matches("y@notexample.org")
    assert wl.matches("LIST-news@lists.example") and not wl.matches("list-news@lists.example.evil")
    merged = RecipientWhitelist("").merge(wl)
    assert merged.matches("list-a@lists.example") and merged.warnings == wl.warnings
