"""Keep the README true: every setting documented, its commands real."""

from __future__ import annotations

from pathlib import Path

from greylist.config import SETTINGS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_documented():
    for name, flag, env, *_ in SETTINGS:
        assert f"`{flag}`" in README, flag
        assert f"`{env}`" in README, env


def test_readme_starts_with_two_make_commands():
    block = README.split("```sh", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2 and all(line.startswith("make ") for line in block)
    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    for line in block:
        assert f"\n{line.split()[1]}:" in makefile


def test_contrib_run_scripts_are_valid_shell_and_name_real_commands():
    import subprocess
    from pathlib import Path

    contrib = Path(__file__).resolve().parent.parent / "contrib"
    for script in contrib.glob("*.run"):
        assert subprocess.run(["sh", "-n", str(script)]).returncode == 0, script
    units = {p.name: p.read_text() for p in contrib.glob("*.service")}
    assert "greylist serve" in units["greylist-smtpd.service"]
    assert "greylist-postgrey \\\n $POSTGREY_OPTS" in units["greylist-postgrey.service"]


def test_the_contrib_postgrey_unit_is_debians_with_one_path_changed():
    """What the README promises: the admin swaps one path and keeps the rest of Debian's
    unit (POSTGREY_OPTS and POSTGREY_TEXT from /etc/default/postgrey)."""
    from pathlib import Path

    import pytest

    debian = Path("/lib/systemd/system/postgrey.service")
    if not debian.exists():
        pytest.skip("needs Debian's postgrey package (its unit)")
    ours = (Path(__file__).resolve().parent.parent / "contrib" / "greylist-postgrey.service").read_text()
    lines = [line for line in ours.splitlines() if not line.startswith("#")]
    expected = debian.read_text().replace("/usr/sbin/postgrey", "/opt/greylist/bin/greylist-postgrey")
    added = {"ExecReload=/bin/kill -HUP $MAINPID", "SyslogIdentifier=postgrey", "SyslogFacility=mail"}
    assert [line for line in lines if line not in added] == expected.splitlines()
    assert added <= set(lines)


def test_every_make_target_the_readme_names_is_in_the_makefile():
    import re

    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    named = set(re.findall(r"`make ([a-z][a-z-]*)", README))
    assert {"simulate", "test", "bench", "bench-postgrey"} <= named
    for target in named:
        assert re.search(rf"^{target}:", makefile, re.M), target
