"""The benchmark comparison: ratios against the baseline, gross regressions only."""

from __future__ import annotations

import shutil

from benchmarks.run import compare


def test_only_a_gross_regression_fails():
    base = {"wrapper_startup": {"pass_vs_bare": 1.2}, "decisions": {"memory_per_second": 1000}}
    ok_rows, ok = compare({"wrapper_startup": {"pass_vs_bare": 2.3},
                           "decisions": {"memory_per_second": 600}}, base, 2.0)
    assert ok and all("ok" in r[-1] for r in ok_rows)
    rows, ok = compare({"wrapper_startup": {"pass_vs_bare": 2.5}}, base, 2.0)
    assert not ok and "REGRESSION" in rows[0][-1]
    rows, ok = compare({"decisions": {"memory_per_second": 400}}, base, 2.0)
    assert not ok


def test_live_capacity_is_reported_but_not_gated_in_quick_runs():
    base = {"live_capacity": {"file_max_rate_per_second": 100}}
    rows, ok = compare({"live_capacity": {"file_max_rate_per_second": 0}}, base, 2.0, quick=True)
    assert ok and "not gated" in rows[0][-1]
    _, ok = compare({"live_capacity": {"file_max_rate_per_second": 0}}, base, 2.0, quick=False)
    assert not ok


def test_new_figures_are_listed_without_failing():
    rows, ok = compare({"decisions": {"redis_vs_round_trip": 0.5}}, {}, 2.0)
    assert ok and rows[0][-1] == "new figure"


def test_a_policy_request_is_timed_to_the_kernels_arrival_of_its_answer_not_to_its_reading():
    """benchmarks/policy_servers.py: an answer the one-threaded client reads late (busy
    with others) is timed when the kernel had it; the time as read is returned too."""
    import socket
    import threading
    import time

    from benchmarks.policy_servers import STAMP_SPACE, SO_TIMESTAMPNS, arrival, drive

    # the stamp itself: an answer read 50 ms after it came is stamped when it came
    with socket.create_server(("127.0.0.1", 0)) as listening:
        b = socket.create_connection(listening.getsockname())
        a, _ = listening.accept()
    b.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)  # TCP, as the benchmark's
    # the kernel starts stamping a moment later (a deferred switch, on while any socket asks)
    deadline = time.monotonic() + 5
    while True:
        a.send(b"x")
        _data, ancillary, _flags, _address = b.recvmsg(4096, STAMP_SPACE)
        if arrival(ancillary) is not None or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    a.send(b"action=DUNNO\n\n")
    time.sleep(0.05)
    data, ancillary, _flags, _address = b.recvmsg(4096, STAMP_SPACE)
    came = arrival(ancillary)
    assert data == b"action=DUNNO\n\n" and came is not None and time.time() - came >= 0.04
    a.close()  # b stays open, and the kernel stamping, for the driver below

    # the driver: a server that holds each answer 20 ms
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            for _ in range(3):
                buffer = b""
                while not buffer.endswith(b"\n\n"):
                    buffer += conn.recv(4096)
                time.sleep(0.02)
                conn.send(b"action=DUNNO\n\n")

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    _wall, latencies, seen = drive(port, 1, 3, True, 0)
    server.join(5)
    listener.close()
    b.close()
    assert len(latencies) == len(seen) == 3
    assert all(0.02 <= kernel < read for kernel, read in zip(latencies, seen))  # read after it came


def test_a_servers_cpu_is_read_to_well_under_a_tick():
    """The scheduler's count of a process's CPU time, as the process's own clock reads it:
    within a millisecond over 65 ms of work, where 10 ms ticks are off by up to one."""
    import os
    import time

    from benchmarks.policy_servers import cpu

    for _ in range(3):
        before, own = cpu(os.getpid()), time.process_time()
        end = own + 0.065  # not a whole number of ticks
        while time.process_time() < end:
            pass
        used, own = cpu(os.getpid()) - before, time.process_time() - own
        if abs(used - own) < 0.001:
            return
    raise AssertionError(f"cpu() read {used:.4f} s where the process's clock read {own:.4f} s")


def test_an_instruction_count_is_gated_closer_than_the_noisy_figures():
    baseline = {"instructions": {"per_decision": 100_000}, "decisions": {"memory_per_second": 1000}}
    slower = {"instructions": {"per_decision": 130_000}, "decisions": {"memory_per_second": 700}}
    rows, ok = compare(slower, baseline, tolerance=2.0)
    assert not ok  # 1.3x more instructions: a regression, where 1.4x fewer decisions/s is noise
    verdicts = {row[0]: row[-1] for row in rows}
    assert "REGRESSION (> 1.25x)" in verdicts["instructions.per_decision"]
    assert verdicts["decisions.memory_per_second"].endswith(": ok")
    _, ok = compare({"instructions": {"per_decision": 120_000}}, baseline, tolerance=2.0)
    assert ok


def test_the_instruction_harness_decides_both_requests():
    """The process callgrind counts (without valgrind here): it decides and answers."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for args in (["40", "benchmark"], ["40", "postfix"], ["20", "benchmark", "3", "1"], ["20", "benchmark", "3", "0"]):
        done = subprocess.run([sys.executable, str(root / "benchmarks" / "instructions.py"), "--harness", *args],
                              cwd=root, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr


def test_alternating_requests_between_servers_measures_each_at_the_same_moments():
    """benchmarks/alternate.py: each server's CPU a request, and its ratio to the first's
    turn by turn. Against Debian's postgrey, ours must read far cheaper; a second copy of
    the same server is told apart by name."""
    import os
    from pathlib import Path

    import pytest

    from benchmarks.alternate import main, measure

    if not Path("/usr/sbin/postgrey").exists() or os.geteuid() != 0:
        pytest.skip("needs Debian's postgrey, run as root")
    result = measure(["postgrey", "worktree", "worktree"], turns=2, requests=150)
    assert result["postgrey"]["ratio"] == 1.0 and result["postgrey"]["cpu_us"] > 100
    for name in ("worktree#1", "worktree#2"):
        assert 0 < result[name]["cpu_us"] and result[name]["ratio"] < 0.8  # postgrey: some 4x ours
        low, high = result[name]["ratio_range"]
        assert low <= result[name]["ratio"] <= high
    for bad in (["worktree"], ["worktree", "--output=/tmp/x"], ["--turns", "0", "worktree", "HEAD"]):
        with pytest.raises(SystemExit):  # one server; an option for git; no turn at all
            main(bad)


def test_a_python_of_its_own_is_a_server_beside_the_others():
    """benchmarks/alternate.py and policy_servers.py: ``python:PATH`` (``system_python``)
    runs greylist postgrey as installed for another interpreter, to compare builds of
    Python (Debian's took 11-23% less CPU a request than pyenv's); an interpreter
    without greylist is refused with how to make one, before any server starts."""
    import os
    import platform
    import sys
    from pathlib import Path

    import pytest

    from benchmarks.alternate import measure
    from benchmarks.policy_servers import installed_in
    from benchmarks.policy_servers import measure as side_by_side

    assert installed_in(sys.executable) == sys.executable  # the test venv has it installed
    relative = os.path.relpath(sys.executable)
    assert installed_in(relative) == os.path.abspath(relative)  # make's .venv-system/bin/python
    for bad in ("/bin/false", "/nonexistent/python"):
        with pytest.raises(ValueError, match="pip install"):
            installed_in(bad)
    with pytest.raises(ValueError, match="greylist installed"):
        measure(["worktree", "python:/bin/false"], turns=1, requests=1)
    result = measure(["worktree", f"python:{sys.executable}"], turns=2, requests=100)
    assert result["worktree"]["ratio"] == 1.0 and result[f"python:{sys.executable}"]["cpu_us"] > 0
    if not Path("/usr/sbin/postgrey").exists() or os.geteuid() != 0:
        pytest.skip("the side-by-side run needs Debian's postgrey, run as root")
    out = side_by_side(requests=100, idle=5, settings=((1, True),), same_cpu=False, system_python=sys.executable)
    shared = "libpython" in Path(f"/proc/{os.getpid()}/maps").read_text()
    assert out["system_interpreter"].startswith(f"Python {platform.python_version()} ")
    assert out["system_interpreter"].endswith("libpython shared" if shared else "libpython linked in")
    assert out["system_persistent_1_cpu_us"] > 0 and out["cpu_ratio_system_persistent_1"] < 0.8
    assert out["system_rss_idle_connections_mb"] > 0 and "cpu_ratio_persistent_1" in out


def test_the_postgrey_issues_targets_are_checked_setting_by_setting():
    """benchmarks/policy_servers.py says which of the issue's targets a run missed: a fifth
    of postgrey's CPU persistent, half with a connection per request, never fewer requests
    a second, p99 under 5 ms at 50 clients, RSS at or below postgrey's."""
    from benchmarks.policy_servers import shortfalls

    def results(**changes):
        out = {}
        for kind, prefix in (("ours", ""), ("system", "system_")):
            for key in ("persistent_1", "persistent_50", "new_50", "persistent_1_same_cpu"):
                out.update({f"{kind}_{key}_cpu_us": 40.0, f"{kind}_{key}_driver_cpu_us": 900.0,
                            f"{kind}_{key}_p99_ms": 4.9, f"cpu_ratio_{prefix}{key}": 0.2,
                            f"speed_ratio_{prefix}{key}": 5.0})
            out.update({f"{kind}_rss_idle_mb": 17.0, f"{kind}_rss_after_mb": 21.0})
        out.update({"postgrey_rss_idle_mb": 23.0, "postgrey_rss_after_mb": 21.0, "postgrey_persistent_1_p99_ms": 9})
        out.update(changes)
        return out

    assert shortfalls(results()) == [] and shortfalls(results(), "system") == []
    # the one-CPU row is no setting of the issue's; the driver's CPU is no server's
    assert shortfalls(results(cpu_ratio_persistent_1_same_cpu=0.9, ours_persistent_1_same_cpu_p99_ms=50)) == []
    for change, words in ((dict(cpu_ratio_persistent_1=0.201), "CPU persistent_1 0.201x"),
                          (dict(cpu_ratio_new_50=0.51), "CPU new_50 0.51x"),
                          (dict(cpu_ratio_new_50=None), "CPU new_50 None"),
                          (dict(speed_ratio_persistent_50=0.99), "requests/s persistent_50 0.99x"),
                          (dict(ours_new_50_p99_ms=5.0), "p99 new_50 5.0 ms"),
                          (dict(ours_rss_after_mb=21.1), "rss_after_mb 21.1 MB")):
        missed = shortfalls(results(**change))
        assert len(missed) == 1 and missed[0].startswith(words), (change, missed)
        assert shortfalls(results(**change), "system") == []  # each server's own figures
    assert shortfalls(results(cpu_ratio_new_50=0.5, ours_persistent_1_p99_ms=30)) == []  # 5 ms: at 50 only
    assert shortfalls(results(system_new_50_p99_ms=6.0), "system") == ["p99 new_50 6.0 ms (target: under 5)"]


def test_the_admin_commands_memory_is_the_commands_own():
    """Each command says its own peak (VmHWM): wait4's figure would count the memory of
    the benchmark's process, which forked it. The expire must leave the recent rows."""
    from benchmarks.admin_commands import measure

    ballast = bytearray(96 << 20)  # this process: 96 MB more, every page touched
    ballast[::4096] = b"x" * len(ballast[::4096])
    out = measure(3000)
    del ballast
    assert out["rows"] == 3000
    for figure in ("expire_peak_rss_mb", "stats_peak_rss_mb", "migrate_peak_rss_mb"):
        if figure in out:  # migrate: where db_load is there to make a postgrey database
            assert 3 < out[figure] < 90
    assert "migrate_peak_rss_mb" in out or not shutil.which("db_load")
    assert out["expire_rows_per_second"] > 0 and out["stats_rows_per_second"] > 0
