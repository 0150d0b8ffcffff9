"""The simulator and a production front end give the same verdicts for the same connections."""

from __future__ import annotations

import time

from conftest import Wrapper, parse_log
from greylist.config import Config
from greylist.service import Connection
from greylist.stores.filetree import FileStore
from simulator.simulation import SimulatedServer

# (seconds after the start, client, its verified host name)
SEQUENCE = [
    (0.0, "192.0.2.1", ""),
    (0.2, "192.0.2.1", ""),            # too soon
    (0.3, "192.0.2.2", "mail-7.google.com"),  # whitelisted by name
    (0.4, "198.51.100.9", ""),         # whitelisted by network
    (0.5, "192.0.2.3", ""),
    (1.6, "192.0.2.1", ""),            # passed after the delay
    (1.7, "192.0.2.1", ""),            # known
    (1.8, "192.0.2.3", ""),            # passed
]


def test_simulator_and_wrapper_give_the_same_verdict_sequence(tmp_path):
    listed = tmp_path / "clients"
    listed.write_text("198.51.100.0/24\ngoogle.com\n")
    wrapper = Wrapper(f"file://{tmp_path}/live", tmp_path)
    start = time.time()
    live = []
    for at, ip, host in SEQUENCE:
        time.sleep(max(0.0, start + at - time.time()))
        result = wrapper.run(ip, GREYLIST_DELAY="1", GREYLIST_WHITELIST=str(listed), TCPREMOTEHOST=host,
                            GREYLIST_HOSTNAME_VERIFIED="1")
        log = parse_log(result.stderr)[0]
        live.append((log["verdict"], log["reason"]))

    config = Config(delay=1.0, whitelist=str(listed), store=f"file://{tmp_path}/sim")
    server = SimulatedServer(config, FileStore(str(tmp_path / "sim")), start=1e9, duration=10.0)
    simulated = []
    for at, ip, host in SEQUENCE:
        server.env.now = 1e9 + at
        outcome = server.service.decide(Connection(ip, host, host_verified=True))
        simulated.append((outcome.verdict.action, outcome.verdict.reason))
    assert live == simulated
    assert [r for _, r in live] == ["new", "too-soon", "whitelisted", "whitelisted", "new",
                                    "passed", "known", "passed"]
