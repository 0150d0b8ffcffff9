"""Hostile environments for the wrapper and the plugin, as real subprocesses.

Whatever tcpserver, tcprules or qmail-spp hand us (garbage addresses, absurd
settings, non-UTF-8 envelopes, line feeds in a sender), the client gets a
valid SMTP reply or its mail goes on, nothing is written outside the store,
every run ends within its bounds, and every run logs exactly one line.
"""

from __future__ import annotations

import os
import re
import subprocess

from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import base_env
from simulator.commands import STANDIN_SMTPD, command

REPLY = re.compile(rb"^[2345]\d\d[ -][\x20-\x7e]*\r\n")
env_text = st.one_of(st.text(max_size=40), st.sampled_from(
    ["", "0", "-1", "1e10", "inf", "nan", "9" * 40, "1.2.3.4", "::1", "::ffff:1.2.3.4", "300.1.1.1",
     "1h", "yes", "tempfail", "triplet", "\n", "a\nb", "/etc/passwd", "/dev/zero", "shadow"]))
settings_vars = st.dictionaries(st.sampled_from(
    ["GREYLIST_DELAY", "GREYLIST_TIMEOUT", "GREYLIST_SESSION_LIMIT", "GREYLIST_ENHANCED", "GREYLIST_KEY",
     "GREYLIST_ON_ERROR", "GREYLIST_MODE", "GREYLIST_WHITELIST", "GREYLIST_SUBNET_V4", "GREYLIST_MESSAGE",
     "GREYLIST_RETRY_WINDOW", "GREYLIST_MAX_AGE", "TCPREMOTEIP", "TCPREMOTEHOST", "RELAYCLIENT"]),
    env_text, max_size=5)


def files_under(path) -> set[str]:
    return {os.path.join(root, name) for root, dirs, names in os.walk(path) for name in names + dirs}


def clean(env: dict[str, str]) -> dict[str, str]:
    return {k: v.replace("\0", "") for k, v in env.items()}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(settings_vars)
def test_the_wrapper_always_answers_or_hands_over_and_logs_one_line(tmp_path, variables):
    store = tmp_path / "store"
    before = files_under(tmp_path)
    env = base_env(GREYLIST_STORE=f"file://{store}", TCPREMOTEIP="192.0.2.7", GREYLIST_TIMEOUT="2",
                   GREYLIST_SESSION_LIMIT="3")
    env.update(clean(variables))
    result = subprocess.run(command("greylist-wrap") + STANDIN_SMTPD, env=env, input=b"HELO x\r\nQUIT\r\n",
                            capture_output=True, timeout=30)
    assert REPLY.match(result.stdout), result.stdout[:200]
    lines = [line for line in result.stderr.splitlines() if line.startswith(b"greylist-wrap:")]
    assert len(lines) == 1, result.stderr
    assert b"Traceback" not in result.stderr
    written = files_under(tmp_path) - before
    assert all(p.startswith(str(store)) or p.endswith(".cache") for p in written), written


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=80), st.binary(max_size=80), settings_vars)
def test_the_plugin_always_answers_in_its_syntax_or_lets_the_recipient_go_on(tmp_path, sender, rcpt, variables):
    env = base_env(GREYLIST_STORE=f"file://{tmp_path}/store", GREYLIST_KEY="triplet", TCPREMOTEIP="192.0.2.7")
    env.update(clean(variables))
    env_b = {k.encode(): v.encode("utf-8", "surrogateescape") for k, v in env.items()}
    env_b[b"SMTPMAILFROM"] = sender.replace(b"\0", b"")
    env_b[b"SMTPRCPTTO"] = rcpt.replace(b"\0", b"") or b"x@y"
    result = subprocess.run(command("greylist-spp"), env=env_b, capture_output=True, timeout=30)
    assert result.returncode == 0 and b"Traceback" not in result.stderr
    assert result.stdout == b"" or re.match(rb"^E4\d\d [\x20-\x7e]*\n$", result.stdout), result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith(b"greylist-spp:")]
    assert len(lines) == 1, result.stderr
