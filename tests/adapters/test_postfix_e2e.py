"""End to end with Debian's Postfix: a private instance on a loopback port asks our
policy server (check_policy_service), swaks is the client.

Postfix starts a second instance only from a configuration directory the
default one lists in alternate_config_directories: the test adds its own
directory there for its run and restores the line afterwards. Needs root
(Postfix's master) and the postfix and swaks packages; .ci/run installs them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from benchmarks.redis_server import free_port
from conftest import base_env
from simulator.commands import command

pytestmark = pytest.mark.skipif(
    not (shutil.which("postfix") and shutil.which("swaks") and shutil.which("postconf")) or os.geteuid() != 0,
    reason="needs Debian's postfix and swaks, as root")

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/spool
data_directory = {dir}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.test
mydomain = test
myorigin = mx.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination = example.net
local_recipient_maps =
local_transport = discard:
default_transport = discard:
relay_transport = discard:
mynetworks = 10.255.255.0/24
smtpd_recipient_restrictions = reject_unauth_destination, check_policy_service inet:127.0.0.1:{policy}, permit
maillog_file = /dev/stdout
smtpd_banner = mx.test ESMTP
biff = no
"""


@pytest.fixture
def postfix():
    directory = Path(tempfile.mkdtemp(prefix="greylist-postfix-", dir="/tmp"))
    os.chmod(directory, 0o755)
    config = directory / "etc"
    config.mkdir()
    smtp, policy = free_port(), free_port()
    (config / "main.cf").write_text(MAIN_CF.format(dir=directory, policy=policy))
    master = Path("/etc/postfix/master.cf").read_text().replace(
        "smtp      inet  n       -       y       -       -       smtpd", f"127.0.0.1:{smtp} inet n - n - - smtpd")
    (config / "master.cf").write_text(master)
    (directory / "data").mkdir()
    shutil.chown(directory / "data", "postfix")
    before = subprocess.run(["postconf", "-h", "alternate_config_directories"], capture_output=True,
                            text=True).stdout.strip()
    listed = ", ".join(filter(None, [before, str(config)]))
    subprocess.run(["postconf", "-e", f"alternate_config_directories = {listed}"], check=True)
    proc = None
    try:
        subprocess.run(["/usr/lib/postfix/sbin/post-install", f"config_directory={config}",
                        "meta_directory=/etc/postfix", "create-missing"], env=dict(os.environ, MAIL_CONFIG=str(config)),
                       check=True, capture_output=True)
        proc = subprocess.Popen(["postfix", "-c", str(config), "start-fg"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(smtp), "--quit-after", "CONNECT",
                               "--timeout", "2"], capture_output=True).returncode == 0:
                break
            time.sleep(0.3)
        yield smtp, policy
    finally:
        if proc is not None:
            subprocess.run(["postfix", "-c", str(config), "stop"], capture_output=True)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if before:
            subprocess.run(["postconf", "-e", f"alternate_config_directories = {before}"], check=False)
        else:
            subprocess.run(["postconf", "-X", "alternate_config_directories"], check=False)
        shutil.rmtree(directory, ignore_errors=True)


def swaks(port: int) -> subprocess.CompletedProcess:
    return subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(port), "--from", "alice@example.org",
                           "--to", "bob@example.net", "--helo", "client.example", "--timeout", "10"],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("front", ["policyd", "postgrey"])
def test_postfix_defers_then_delivers_through_our_policy_server(postfix, front, tmp_path):
    smtp, policy = postfix
    if front == "policyd":
        argv = [*command("greylist"), "policyd", "--listen", f"127.0.0.1:{policy}", "--key", "triplet",
                "--delay", "2", "--store", f"file://{tmp_path}/store"]
    else:  # Debian's POSTGREY_OPTS="--inet=10023", on a free port
        argv = [*command("greylist"), "postgrey", f"--inet=127.0.0.1:{policy}", f"--dbdir={tmp_path}",
                "--delay=2", "--user=root"]
    server = subprocess.Popen(argv, env=base_env(), stderr=subprocess.PIPE, text=True)
    try:
        server.stderr.readline()
        server.stderr.readline()
        first = swaks(smtp)
        assert first.returncode != 0 and "<** 450 4." in first.stdout
        assert "<bob@example.net>: Recipient address rejected" in first.stdout
        if front == "postgrey":  # Postfix sends etrn_domain: postgrey's 4.2.0 for Exchange
            assert "450 4.2.0 <bob@example.net>: Recipient address rejected: Greylisted, see" in first.stdout
        time.sleep(2.5)
        second = swaks(smtp)
        assert second.returncode == 0 and "250 2.0.0 Ok: queued" in second.stdout
    finally:
        server.terminate()
        server.wait(timeout=20)
