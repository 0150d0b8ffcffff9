"""``simulate``: what greylisting would do to a server's traffic, before deploying it.

    simulate --rate 300k/day --duration 1d --seed 7
    simulate --compare delay=60,300,900
    simulate replay /var/log/qmail/smtpd/current --format tcpserver

Settings come from the flags (the environment's GREYLIST_* variables are not
read here, so a shell that exports them cannot skew a plan).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from greylist.config import SETTINGS, ConfigError, add_setting_options, flags_of, load, parse_duration
from greylist.stores import StoreError, open_store
from simulator import report as reports
from simulator.errors import SimulateError
from simulator.scenario import ScenarioError, load as load_scenario, parse_rate
from simulator.simulation import RunOptions, simulate

POLICY_SETTINGS = ("delay", "retry_window", "max_age", "key", "subnet_v4", "subnet_v6",
                   "auto_whitelist", "whitelist")


def add_common(parser: argparse.ArgumentParser) -> None:
    add_setting_options(parser, POLICY_SETTINGS)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simulate", description="Simulate greylisting on a day (or more) of synthetic traffic.",
        epilog="Also: simulate replay LOGFILE (logged traffic), simulate live (real wrapper "
               "processes at a rate), simulate capacity (the highest rate this machine sustains); "
               "each with --help.")
    parser.add_argument("--rate", help="first-attempt connections: 300k/day, 3.5/s, 12000/h "
                                       "(default: the scenario's)")
    parser.add_argument("--duration", default="1d", help="simulated time: 1d, 12h, 1w (default 1d)")
    parser.add_argument("--scenario", help="scenario TOML file (default: simulator/scenarios/default.toml)")
    parser.add_argument("--no-drain", action="store_true",
                        help="stop at the end of the window instead of following queued mail to the end")
    parser.add_argument("--expire-every", default="1d",
                        help="how often the simulated 'greylist expire' cron runs (default 1d)")
    add_common(parser)
    return parser


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

    ``file://`` and ``sqlite://`` with no path make (and remove) scratch space;
    a named directory or database must be empty. A Redis database must hold no
    greylist keys; the simulation's keys are removed after each run.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.temp_dirs: list[str] = []
        scheme, _, path = url.partition("://")
        path = path.partition("?")[0]
        if scheme == "file" and path:
            p = Path(path)
            if p.exists() and any(p.iterdir()):
                raise SimulateError(f"--store {url}: the directory is not empty; the simulator runs "
                                    "on its own clock and must not mix with real entries (use file:// "
                                    "for a temporary directory)")
        if scheme == "sqlite" and path and Path(path).exists() and Path(path).stat().st_size:
            raise SimulateError(f"--store {url}: the database exists; name a new file, or use sqlite:// "
                                "for a temporary one")
        if scheme.startswith("redis"):
            with open_store(url) as store:
                if store.size():
                    raise SimulateError(f"--store {url}: the database already holds greylist entries; "
                                        "simulate on an empty Redis database (e.g. /15)")

    def url_for(self, run: int) -> str:
        """The store URL of one run: scratch space made here, or a fresh place beside a named one."""
        scheme, _, rest = self.url.partition("://")
        path, _, query = rest.partition("?")
        if scheme in ("file", "sqlite") and not path:
            self.temp_dirs.append(scratch_dir())
            return f"file://{self.temp_dirs[-1]}" if scheme == "file" else \
                f"sqlite://{self.temp_dirs[-1]}/greylist.db" + (f"?{query}" if query else "")
        if scheme == "file" and run > 0:
            return f"{self.url.rstrip('/')}/run{run}"
        if scheme == "sqlite" and run > 0:
            return f"sqlite://{path}.run{run}" + (f"?{query}" if query else "")
        return self.url

    def open(self, run: int):
        return _Scratch(open_store(self.url_for(run), lean=False), wipe=self.url.startswith("redis"))

    def cleanup(self) -> None:
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


def whitelist_of(config):
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


def emit(args: argparse.Namespace, results: list[dict], compare) -> None:
    if args.plot:
        from simulator.plot import report_plot

        report_plot(results, args.plot)
    if not args.quiet:
        if compare:
            print(reports.compare_table(compare[0], compare[1], results), end="")
        else:
            print(reports.tables(results[0]), end="")
    if args.json:
        text = reports.to_json(results if compare else results[0])
        if args.json == "-":
            sys.stdout.write(text)
        else:
            Path(args.json).write_text(text)


def run_synthetic(args: argparse.Namespace) -> int:
    try:
        duration = parse_duration(args.duration)
        expire_every = parse_duration(args.expire_every)
    except ConfigError as exc:
        raise SimulateError(str(exc)) from None
    if duration <= 0:
        raise SimulateError("--duration must be more than 0")
    if duration > 366 * 86400:
        raise SimulateError("--duration is limited to a year")
    scenario = load_scenario(args.scenario)
    rate = parse_rate(args.rate) if args.rate else None
    options = RunOptions(duration=duration, seed=args.seed, drain=not args.no_drain,
                         expire_every=expire_every, rate=rate)
    expected = (rate or scenario.rate) * duration
    if expected > 50_000_000:
        raise SimulateError(f"that is {expected:,.0f} first-attempt connections; keep a run under "
                            "50 million (shorten --duration or lower --rate)")
    runs = policies_for(args)
    factory = StoreFactory(args.store)
    results = []
    try:
        for i, (label, config) in enumerate(runs):
            progress = Progress(sys.stderr.isatty() and not args.quiet and expected > 100_000,
                                f"{label.get('compare', '')} ")
            with factory.open(i) as store:
                server = simulate(scenario, config.policy, store, options, progress=progress,
                                  keying=config.keying, whitelist=whitelist_of(config))
                progress.close()
                run = {"scenario": scenario.source.rsplit("/", 1)[-1],
                       "rate_per_day": round((rate or scenario.rate) * 86400, 3), "seed": args.seed}
                results.append(reports.build(server, run, label))
    finally:
        factory.cleanup()
    compare = parse_compare(args.compare)
    emit(args, results, compare)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "replay":
            from simulator.replay.cli import run_replay

            return run_replay(argv[1:])
        if argv and argv[0] == "live":
            from simulator.live_cli import run_live_command

            return run_live_command(argv[1:])
        if argv and argv[0] == "capacity":
            from simulator.live_cli import run_capacity_command

            return run_capacity_command(argv[1:])
        args = build_parser().parse_args(argv)
        return run_synthetic(args)
    except (SimulateError, ScenarioError, StoreError, ConfigError) as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("simulate: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
