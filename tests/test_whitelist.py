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


@pytest.mark.parametrize("line", ["10.0.0.0/33", "bad name!", "/unclosed(/", "1.2.3.4/x"])
def test_bad_lines_name_the_line(line):
    with pytest.raises(WhitelistError, match=":2:"):
        ClientWhitelist.parse(f"10.0.0.0/8\n{line}\n", "wl")


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
