"""The Redis store on a real three-node Redis Cluster: MOVED replies are followed."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from greylist.core.check import check
from greylist.core.policy import Policy
from greylist.stores import open_store

pytestmark = pytest.mark.skipif(not (shutil.which("redis-server") and shutil.which("redis-cli")),
                                reason="needs redis-server and redis-cli")


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    import random

    for _ in range(200):
        port = random.randrange(20000, 50000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def cluster():
    workdir = tempfile.mkdtemp(prefix="greylist-cluster-")
    ports = [cluster_port() for _ in range(3)]
    procs = []
    try:
        for port in ports:
            d = f"{workdir}/{port}"
            subprocess.run(["mkdir", "-p", d], check=True)
            procs.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", f"{d}/nodes.conf", "--save", "", "--appendonly", "no",
                 "--dir", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in ports:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        subprocess.run(["redis-cli", "--cluster", "create"] + [f"127.0.0.1:{p}" for p in ports]
                       + ["--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 20
        while b"cluster_state:ok" not in subprocess.run(
                ["redis-cli", "-p", str(ports[0]), "cluster", "info"], capture_output=True).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not come up")
            time.sleep(0.1)
        yield ports
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def test_decisions_on_a_cluster_follow_moved(cluster):
    store = open_store(f"redis://127.0.0.1:{cluster[0]}/0?timeout=2")
    policy = Policy(delay=60)
    ips = [f"198.51.100.{i}" for i in range(60)]  # their keys hash to slots on all three nodes
    assert {check(store, ip, 1000.0, policy).reason for ip in ips} == {"new"}
    assert {check(store, ip, 1100.0, policy).reason for ip in ips} == {"passed"}
    owners = set()
    for ip in ips:
        out = subprocess.run(["redis-cli", "-c", "-p", str(cluster[1]), "GET", f"greylist:{ip}"],
                             capture_output=True, text=True).stdout
        assert out.split()[2] == "1"  # FIRST LAST PASSES: passed once
        slot = subprocess.run(["redis-cli", "-p", str(cluster[0]), "CLUSTER", "KEYSLOT", f"greylist:{ip}"],
                              capture_output=True, text=True).stdout.strip()
        owners.add(int(slot) * 3 // 16384)
    assert len(owners) == 3
