"""Where our own programs are: the one place that finds an installed command or its source.

``simulate live``, the benchmarks and the tests run the real programs as a
user would: the installed script beside this interpreter (what pip put in the
venv's bin/), else the source tree's script or module.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The stand-in for qmail-smtpd: a minimal accepting SMTP session in plain sh (its
#: start-up, about 1 ms, does not hide ours), writing a report of its pid, argv and
#: environment to $STANDIN_REPORT when set.
STANDIN_SMTPD = ["/bin/sh", str(Path(__file__).resolve().parent / "standin-smtpd.sh")]

_SOURCES = {
    "greylist-wrap": ["bin/greylist-wrap"],
    "greylist-spp": ["bin/greylist-spp"],
    "greylist": ["-m", "greylist.admin"],
    "greylist-postgrey": ["-m", "greylist.adapters.postgrey"],
    "simulate": ["-m", "simulator.cli"],
}


def command(name: str) -> list[str]:
    """The argv prefix that runs one of our programs."""
    installed = Path(sys.executable).parent / name
    if installed.exists():
        return [str(installed)]
    source = _SOURCES[name]
    if source[0] == "-m":
        return [sys.executable, *source]
    return [sys.executable, str(ROOT / source[0])]


def read_standin_report(path: str | Path) -> dict:
    """The stand-in's report: {"pid", "ppid", "argv", "env"}."""
    info: dict = {"argv": [], "env": {}}
    for line in Path(path).read_text().splitlines():
        kind, _, value = line.partition(" ")
        if kind in ("pid", "ppid"):
            info[kind] = int(value)
        elif kind == "arg":
            info["argv"].append(value)
        elif kind == "env":
            name, _, text = value.partition("=")
            info["env"][name] = text
    return info
