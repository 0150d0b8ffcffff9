from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given, strategies as st

from greylist.core.keys import BadAddress, parse_ip


@given(st.ip_addresses())
def test_every_real_address_parses_to_its_canonical_form(addr):
    if addr.version == 6 and addr.ipv4_mapped is not None:
        assert parse_ip(str(addr)) == str(addr.ipv4_mapped)
    else:
        assert parse_ip(str(addr)) == str(addr)
        assert parse_ip(addr.exploded) == str(addr)


@given(st.text(max_size=60))
def test_hostile_text_is_rejected_or_is_a_real_address(text):
    try:
        canonical = parse_ip(text)
    except BadAddress:
        return
    assert str(ipaddress.ip_address(text)) in (canonical, f"::ffff:{canonical}") or \
        ipaddress.ip_address(text).ipv4_mapped is not None


@pytest.mark.parametrize("text", ["", "../../etc/passwd", "1.2.3", "1.2.3.4 ", "01.2.3.4",
                                  "1.2.3.4\x00", "fe80::1%eth0", "256.0.0.1", "1.2.3.4/24", "\udcff"])
def test_malformed_addresses(text):
    with pytest.raises(BadAddress):
        parse_ip(text)


def test_ipv4_mapped_is_the_ipv4_client():
    assert parse_ip("::ffff:66.94.237.12") == "66.94.237.12"
    assert parse_ip("2001:0DB8:0000:0000:0000:0000:0000:0001") == "2001:db8::1"


def test_both_batv_forms_keep_the_user_whatever_the_tag():
    from greylist.core.keys import normalize_sender

    standard = [normalize_sender(f"prvs=0{t}cafe=news@example.org") for t in ("123abcde", "987fedcb")]
    reversed_ = [normalize_sender(f"prvs=news=0{t}cafe@example.org") for t in ("123abcde", "987fedcb")]
    assert standard == reversed_ == ["news@example.org"] * 2


@given(st.text(alphabet=st.sampled_from("ab.-+=#0123456789\0\u0663\u00e9"), max_size=30))
def test_each_run_of_digits_becomes_one_hash_however_the_address_is_written(local):
    import re

    from greylist.core.keys import _digits_as_hash

    # the regular expression as postgrey's s/\d+/#/g (Python's \d: these digits and U+0663)
    expected = "".join("#" if run[0].isdigit() else run for run in re.findall(r"\d+|\D+", local))
    assert _digits_as_hash(local) == expected


@pytest.mark.parametrize("bad", ["", None, "1.2.3", "::g", "x" * 46])
def test_a_bad_address_is_refused_first_and_after_a_good_one(bad):
    """packed_ip remembers the last address it packed: never one it refused, nor its start."""
    import subprocess
    import sys

    code = ("from greylist.core.keys import BadAddress, packed_ip\n"
            "for _ in range(2):\n"
            "    try:\n"
            f"        print(packed_ip({bad!r}))\n"
            "    except BadAddress:\n"
            "        print('refused')\n"
            "    print(packed_ip('192.0.2.1').hex())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["refused", "c0000201"] * 2


@given(st.text(alphabet="0123456789.", min_size=7, max_size=16))
def test_an_ipv4_text_the_c_library_takes_is_its_canonical_form(text):
    """parse_ip and network_of give an accepted IPv4 text back as it came (no inet_ntop):
    this holds the platform's inet_pton to taking four decimal numbers, no leading zeros."""
    import socket

    try:
        packed = socket.inet_pton(socket.AF_INET, text)
    except OSError:
        return
    from greylist.core.keys import network_of

    assert socket.inet_ntop(socket.AF_INET, packed) == text
    assert parse_ip(text) == text
    assert network_of(text) == str(ipaddress.ip_network(f"{text}/24", strict=False))


@given(st.ip_addresses(), st.sampled_from([8, 16, 20, 24, 32]), st.sampled_from([32, 48, 64, 128]))
@example(ipaddress.ip_address("::ffff:66.94.237.12"), 24, 64)  # the IPv4 client (random IPv6 is never one)
def test_network_of_is_the_address_network(addr, v4_bits, v6_bits):
    from greylist.core.keys import network_of

    client = addr.ipv4_mapped if addr.version == 6 and addr.ipv4_mapped is not None else addr
    bits = v4_bits if client.version == 4 else v6_bits
    expected = str(ipaddress.ip_network(f"{client}/{bits}", strict=False))
    assert network_of(str(addr), v4_bits, v6_bits) == expected
    assert network_of(addr.exploded, v4_bits, v6_bits) == expected
