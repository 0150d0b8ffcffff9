"""greylist-spp as qmail-spp runs it: a subprocess per RCPT, answers on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import base_env, parse_log
from simulator.commands import command

ROOT = Path(__file__).resolve().parents[2]


def spp_command() -> list[str]:
    return command("greylist-spp")


class Spp:
    def __init__(self, store: str, **env: str) -> None:
        self.env = base_env(**{"GREYLIST_STORE": store, "GREYLIST_KEY": "triplet", "GREYLIST_DELAY": "0",
                               **env})

    def rcpt(self, to: str, sender: str = "<alice@example.org>", ip: str = "192.0.2.9", **env: str):
        e = dict(self.env, TCPREMOTEIP=ip, SMTPMAILFROM=sender, SMTPRCPTTO=to, **env)
        result = subprocess.run(spp_command(), env=e, capture_output=True, timeout=20)
        assert result.returncode == 0
        logs = [dict(line) for line in parse_log(result.stderr.replace(b"greylist-spp:", b"greylist-wrap:"))]
        return result.stdout.decode(), logs[0] if logs else {}


@pytest.fixture
def spp(tmp_path) -> Spp:
    return Spp(f"file://{tmp_path}/store")


def test_triplet_is_greylisted_then_passes(spp):
    out, log = spp.rcpt("<bob@example.net>")
    assert out == "E451 you are greylisted try again\n"
    assert log["reason"] == "new" and log["key"] == "192.0.2.9|alice@example.org|bob@example.net"
    out, log = spp.rcpt("<bob@example.net>")
    assert out == "" and log["reason"] == "passed"
    out, log = spp.rcpt("<carol@example.net>")  # another recipient is another triplet
    assert out.startswith("E451") and log["reason"] == "new"


def test_retry_with_new_batv_and_srs_tags_matches_its_first_attempt(spp):
    spp.rcpt("<bob@example.net>", sender="<prvs=1234abcdef=News@Example.org>")
    out, log = spp.rcpt("<bob@example.net>", sender="<prvs=9876fedcba=news@example.org>")
    assert out == "" and log["reason"] == "passed"
    spp.rcpt("<bob@example.net>", sender="<SRS0=ab12=TT=orig.example=u@fwd.example>")
    out, log = spp.rcpt("<bob@example.net>", sender="<SRS0=cd34=UU=orig.example=u@fwd.example>")
    assert log["reason"] == "passed"


def test_auto_whitelist_after_n_passed_deliveries(spp):
    spp.rcpt("<user0@example.net>")
    assert spp.rcpt("<user0@example.net>")[1]["reason"] == "passed"  # counted (postgrey: once an hour)
    assert spp.rcpt("<user0@example.net>")[1]["reason"] == "known"   # a known triplet: not counted
    out, log = spp.rcpt("<someone-new@example.net>", GREYLIST_AUTO_WHITELIST="1")
    assert out == "" and log["reason"] == "auto-whitelisted"
    out, log = spp.rcpt("<someone-else@example.net>", GREYLIST_AUTO_WHITELIST="0")
    assert out.startswith("E451")


def test_subnet_triplets_and_enhanced_codes(spp):
    out, _ = spp.rcpt("<b@example.net>", ip="198.51.100.1", GREYLIST_KEY="triplet-subnet",
                      GREYLIST_ENHANCED="1", GREYLIST_DELAY="300")
    assert out == "E451 4.7.1 you are greylisted try again in 300 s\n"
    _, log = spp.rcpt("<b@example.net>", ip="198.51.100.77", GREYLIST_KEY="triplet-subnet")
    assert log["reason"] == "passed" and log["key"].startswith("198.51.100.0/24|")


def test_whitelists_relayclient_and_misplacement(spp, tmp_path):
    rcpts = tmp_path / "rcpts"
    rcpts.write_text("postmaster@\n")
    out, log = spp.rcpt("<Postmaster@example.net>", GREYLIST_WHITELIST_RECIPIENTS=str(rcpts))
    assert out == "" and log["reason"] == "whitelisted-recipient"
    clients = tmp_path / "clients"
    clients.write_text("192.0.2.0/24\n")
    assert spp.rcpt("<x@example.net>", GREYLIST_WHITELIST=str(clients))[1]["reason"] == "whitelisted"
    assert spp.rcpt("<x@example.net>", RELAYCLIENT="")[1]["reason"] == "relayclient"
    env = dict(spp.env, TCPREMOTEIP="192.0.2.9")
    result = subprocess.run(spp_command(), env=env, capture_output=True, timeout=20)
    assert result.stdout == b"" and b"[rcpt] section" in result.stderr


def test_bad_input_and_store_failure(tmp_path):
    out, log = Spp(f"file://{tmp_path}/s").rcpt("<x@y>", ip="not-an-ip")
    assert out.startswith("E451") and "not an IP" in log["error"]
    out, log = Spp(f"file://{tmp_path}/s", GREYLIST_DELAY="never").rcpt("<x@y>")
    assert out.startswith("E451") and "GREYLIST_DELAY" in log["error"]
    blocker = tmp_path / "file"
    blocker.write_text("")
    out, log = Spp(f"file://{blocker}").rcpt("<x@y>")
    assert out == "" and log["reason"] == "store-error"  # fail open
    out, log = Spp(f"file://{blocker}", GREYLIST_ON_ERROR="tempfail").rcpt("<x@y>")
    assert out.startswith("E451")


def test_plugin_imports_nothing_heavy(tmp_path):
    code = ("import sys\nfrom greylist.adapters.spp import main\nmain([])\n"
            "mods = sorted(sys.modules)\nimport json\nsys.stderr.write(json.dumps(mods))\n")
    env = dict(Spp(f"file://{tmp_path}/s").env, TCPREMOTEIP="192.0.2.1", SMTPMAILFROM="a@b", SMTPRCPTTO="c@d")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=20)
    modules = set(json.loads(result.stderr.decode().splitlines()[-1]))
    heavy = {"argparse", "logging", "re", "dataclasses", "typing", "socket", "enum", "sqlite3", "redis",
             "greylist.stores.keyfilter", "greylist.stores.checkpointer"}
    assert "greylist.adapters.spp" in modules and not heavy & modules, heavy & modules


def test_shadow_mode_prints_nothing_and_logs_the_would_be_verdict(tmp_path):
    shadow = Spp(f"file://{tmp_path}/store", GREYLIST_DELAY="60", GREYLIST_MODE="shadow")
    out, log = shadow.rcpt("<bob@example.net>")
    assert out == "" and (log["verdict"], log["shadow"], log["reason"]) == ("pass", "tempfail", "new")
