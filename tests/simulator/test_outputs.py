"""Outputs are checked before a run starts: a bad --plot or --json path costs no run."""

from __future__ import annotations

import time

import pytest

from simulator.cli import main


@pytest.mark.parametrize("args,message", [
    (["--plot", "x.txt"], "give a file ending in"),
    (["--plot", "/nonexistent/x.png"], "does not exist"),
    (["--json", "/nonexistent/x.json"], "does not exist"),
    (["replay", "/dev/null", "--json", "/nonexistent/x.json"], "does not exist"),
    (["capacity", "--plot", "/nonexistent/x.png"], "does not exist"),
])
def test_bad_outputs_are_refused_at_once(args, message, capsys):
    started = time.monotonic()
    assert main(args + ["--duration", "1w"] if args[0].startswith("--") else args) == 2
    err = capsys.readouterr().err
    assert err.startswith("simulate: ") and message in err and "Traceback" not in err
    assert time.monotonic() - started < 5  # refused before a week of traffic was simulated


def test_help_claims_no_environment_variable(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "GREYLIST_" not in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--plot", "/proc/x.png"], ["--json", "/proc/x.json"],
                                  ["replay", "/dev/null", "--json", "/proc/x.json"]])
def test_a_place_where_nothing_can_be_made_is_refused_at_once_even_for_root(args, capsys):
    """/proc passes root's access() check: the run went a week, then ended in a traceback."""
    assert main(args + ["--duration", "1w"] if args[0].startswith("--") else args) == 2
    err = capsys.readouterr().err
    assert ("cannot write in /proc" in err or "not writable" in err) and "Traceback" not in err


def test_an_output_that_fails_at_the_end_is_a_clear_error(tmp_path):
    """Checked before the run, it may still fail after it (a full disk): said, no traceback."""
    from simulator.errors import SimulateError
    from simulator.runs import write_json

    with pytest.raises(SimulateError, match=f"--json {tmp_path}: cannot write it"):
        write_json(str(tmp_path), {"a": 1})  # a directory by now
