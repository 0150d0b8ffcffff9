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
