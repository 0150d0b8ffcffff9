"""What every ``simulate`` command shares: options, scratch stores, runs per --compare value, output.

Imported by the three command modules (synthetic runs, replay, live); it
imports none of them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from greylist.config import ConfigError, add_setting_options, flags_of, load
from greylist.stores import open_store, parse_url, store_class
from greylist.stores.base import SHARED
from simulator import report as reports
from simulator.errors import SimulateError

POLICY_SETTINGS = ("delay", "retry_window", "max_age", "key", "subnet_v4", "subnet_v6",
                   "auto_whitelist", "whitelist")


def add_common(parser: argparse.ArgumentParser) -> None:
    add_setting_options(parser, POLICY_SETTINGS, environment=False)  # a plan reads no GREYLIST_* variable
    parser.add_argument("--store", default="memory://",
                        help="store to drive: memory:// (default); file:// or sqlite:// for scratch "
                             "space; file:///EMPTY_DIR, sqlite:///NEW.db, or redis://HOST:PORT/DB "
                             "(an empty database)")
    parser.add_argument("--compare", metavar="SETTING=V1,V2,...",
                        help="run each value of one policy setting on the very same traffic, "
                             "e.g. delay=60,300,900")
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON (- for stdout)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quiet", action="store_true", help="no tables, no progress bar")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="tempfail ratio and store size per hour, delay CDF per class (needs matplotlib)")


def scratch_dir() -> str:
    """A fresh directory for a ``file://`` run: on tmpfs (/dev/shm) when there is one.

    The simulator measures the file tree's operations (counted by the store)
    and its size, not the latency of this machine's disk; on a disk mounted
    with online discard, deleting a previous run's 300,000 files can slow the
    next run threefold. Name a directory (file:///var/tmp/sim) to run on a disk,
    or set GREYLIST_SIM_TMPDIR.
    """
    import os

    base = os.environ.get("GREYLIST_SIM_TMPDIR")
    if base is None and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        base = "/dev/shm"
    return tempfile.mkdtemp(prefix="greylist-sim-", dir=base)


class StoreFactory:
    """A fresh, empty store for each run, so that simulated time never meets real entries.

    Where each run's store lives is the store's own answer
    (:meth:`~greylist.stores.base.Store.scratch_url`, :meth:`~greylist.stores.base.Store.in_use`):
    ``file://`` and ``sqlite://`` with no path get scratch space made (and
    removed) here; a named place must be empty; a shared server's store is
    emptied of the run's keys afterwards. A new store needs nothing here.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.where = parse_url(url)
        self.cls = store_class(self.where)
        self.temp_dirs: list[str] = []
        self.urls: dict[int, str] = {}
        why = self.cls.in_use(self.where)
        if why:
            raise SimulateError(f"--store {url}: {why}; the simulator runs on its own clock and must "
                                "not mix with real entries (file:// or sqlite:// without a path give "
                                "scratch space; for Redis name an empty database, e.g. /15)")

    def _make_dir(self) -> str:
        self.temp_dirs.append(scratch_dir())
        return self.temp_dirs[-1]

    def url_for(self, run: int) -> str:
        """The store URL of one run: scratch space made here, or a fresh place beside a named one."""
        if run not in self.urls:
            self.urls[run] = self.cls.scratch_url(self.where, run, self._make_dir)
        return self.urls[run]

    def open(self, run: int):
        return _Scratch(open_store(self.url_for(run), lean=False), wipe=SHARED in self.cls.capabilities)

    def cleanup(self) -> None:
        import shutil

        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


class _Scratch:
    """A store for one run; a shared server's store is emptied of the run's keys afterwards."""

    def __init__(self, store, wipe: bool) -> None:
        self.store = store
        self.wipe = wipe

    def __enter__(self):
        return self.store

    def __exit__(self, *exc: object) -> None:
        try:
            if self.wipe:
                for key, _ in list(self.store.scan()):
                    self.store.delete(key)
        finally:
            self.store.close()


def parse_compare(text: str | None) -> tuple[str, list[str]] | None:
    if not text:
        return None
    name, sep, values = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or name not in POLICY_SETTINGS:
        raise SimulateError(f"--compare {text!r}: use SETTING=V1,V2 with SETTING one of "
                            f"{', '.join(POLICY_SETTINGS)}")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if len(items) < 2:
        raise SimulateError(f"--compare {text!r}: give at least two values")
    return name, items


def policies_for(args: argparse.Namespace) -> list[tuple[dict, object]]:
    """(label, config) for each run: one, or one per --compare value."""
    flags = flags_of(args)
    compare = parse_compare(args.compare)
    runs = []
    for value in (compare[1] if compare else [None]):
        run_flags = dict(flags)
        label = {}
        if compare:
            run_flags[compare[0]] = value
            label = {"compare": f"{compare[0]}={value}"}
        try:
            runs.append((label, load(run_flags, {})))
        except ConfigError as exc:
            raise SimulateError(str(exc)) from None
    return runs


def check_whitelist(config):
    """The compiled client whitelist a run uses, or None."""
    if not config.whitelist:
        return None
    from greylist.whitelist import WhitelistError, load_clients

    try:
        return load_clients(config.whitelist)
    except WhitelistError as exc:
        raise SimulateError(str(exc)) from None


class Progress:
    def __init__(self, enabled: bool, label: str = "") -> None:
        self.enabled = enabled
        self.label = label

    def __call__(self, done: float) -> None:
        if self.enabled:
            bar = int(30 * min(1.0, done))
            sys.stderr.write(f"\r{self.label}[{'#' * bar}{' ' * (30 - bar)}] {100 * done:5.1f}%")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 60 + "\r")


def check_outputs(args: argparse.Namespace) -> None:
    """Every output a run will write can be written: checked before the run, not after it."""
    for option, target in (("--json", getattr(args, "json", None)), ("--plot", getattr(args, "plot", None))):
        if target and target != "-":
            check_writable(option, target)
    if getattr(args, "plot", None):
        from simulator.plot import check_plot_target

        check_plot_target(args.plot)


def check_writable(option: str, target: str) -> None:
    import os

    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):
        raise SimulateError(f"{option} {target}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
        raise SimulateError(f"{option} {target}: not writable")
    if os.path.isdir(target):
        raise SimulateError(f"{option} {target}: is a directory")
    import tempfile

    try:  # root passes access() where nothing can be made (/proc, say): a file tried there
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".simulate-check-"):
            pass
    except OSError as exc:
        raise SimulateError(f"{option} {target}: cannot write in {parent}: {exc.strerror or exc}") from None


def emit(args: argparse.Namespace, results: list[dict], compare) -> None:
    if args.plot:
        from simulator.plot import report_plot

        report_plot(results, args.plot)
    if not args.quiet:
        if compare:
            print(reports.compare_table(compare[0], compare[1], results), end="")
            if results[0]["run"].get("shadow_log"):  # the live log's figures, the same for every run
                from simulator.replay.shadow import table

                print("\n" + table(results[0]["run"]["shadow_log"]), end="")
        else:
            print(reports.tables(results[0]), end="")
    write_json(args.json, results if compare else results[0])


def write_json(target: str | None, data) -> None:
    """``--json OUT``: the report as data, to a file or (``-``) to standard output."""
    if not target:
        return
    text = reports.to_json(data)
    if target == "-":
        sys.stdout.write(text)
        return
    try:
        Path(target).write_text(text)
    except OSError as exc:  # checked before the run; a disk that filled since, say
        raise SimulateError(f"--json {target}: cannot write it: {exc.strerror or exc}") from None


