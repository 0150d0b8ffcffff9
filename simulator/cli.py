"""``simulate``: what greylisting would do to a server's traffic, before deploying it.

    simulate --rate 300k/day --duration 1d --seed 7     # the steady state, after 2 d of warm-up
    simulate --cold                                      # the day greylisting is switched on
    simulate --compare delay=60,300,900
    simulate replay /var/log/qmail/smtpd/current --format tcpserver

Settings come from the flags (the environment's GREYLIST_* variables are not
read here, so a shell that exports them cannot skew a plan).
"""

from __future__ import annotations

import argparse
import sys

from greylist.config import ConfigError, parse_duration
from greylist.stores import StoreError
from simulator import report as reports
from simulator.errors import SimulateError
from simulator.runs import (check_outputs, Progress, StoreFactory, add_common, emit, parse_compare, policies_for,
                            check_whitelist, write_json)
from simulator.scenario import ScenarioError, load as load_scenario, parse_rate
from simulator.simulation import RunOptions, simulate

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
    parser.add_argument("--warmup", default="2d",
                        help="the same traffic before the measured window, not reported, so the "
                             "report shows the steady state (default 2d; whole hours; triplet keys "
                             "settle more slowly: try 7d)")
    parser.add_argument("--cold", action="store_true",
                        help="no warm-up: the day the greylister is switched on, with an empty store")
    parser.add_argument("--sensitivity", action="store_true",
                        help="move each assumption of the scenario to both ends of its range, one at a "
                             "time, and show how the headline figures move (17 runs: add --rate 30k/day "
                             "for a quick look)")
    add_common(parser)
    return parser


def run_synthetic(args: argparse.Namespace) -> int:
    check_outputs(args)
    try:
        duration = parse_duration(args.duration)
        expire_every = parse_duration(args.expire_every)
        warmup = 0.0 if args.cold else parse_duration(args.warmup)
    except ConfigError as exc:
        raise SimulateError(str(exc)) from None
    if warmup % 3600 or warmup > 60 * 86400:
        raise SimulateError("--warmup is whole hours, at most 60d")
    if duration <= 0:
        raise SimulateError("--duration must be more than 0")
    if duration > 366 * 86400:
        raise SimulateError("--duration is limited to a year")
    scenario = load_scenario(args.scenario)
    rate = parse_rate(args.rate) if args.rate else None
    options = RunOptions(duration=duration, seed=args.seed, drain=not args.no_drain,
                         expire_every=expire_every, rate=rate, warmup=warmup)
    expected = (rate or scenario.rate) * (duration + warmup)
    if expected > 50_000_000:
        raise SimulateError(f"that is {expected:,.0f} first-attempt connections; keep a run under "
                            "50 million (shorten --duration or lower --rate)")
    runs = policies_for(args)
    factory = StoreFactory(args.store)
    if args.sensitivity:
        if args.compare:
            raise SimulateError("--sensitivity moves the scenario's assumptions: use it without --compare")
        return run_sensitivity(args, runs[0][1], options, factory, rate)
    results = []
    try:
        for i, (label, config) in enumerate(runs):
            progress = Progress(sys.stderr.isatty() and not args.quiet and expected > 100_000,
                                f"{label.get('compare', '')} ")
            with factory.open(i) as store:
                check_whitelist(config)  # an unreadable whitelist stops the plan before it runs
                server = simulate(scenario, config, store, options, progress=progress)
                progress.close()
                results.append(reports.build(server, run_info(scenario, rate, args.seed, warmup), label))
    finally:
        factory.cleanup()
    compare = parse_compare(args.compare)
    emit(args, results, compare)
    return 0


def run_info(scenario, rate: float | None, seed: int, warmup: float) -> dict:
    """What a synthetic run's report says it ran."""
    return {"scenario": scenario.source.rsplit("/", 1)[-1],
            "rate_per_day": round((rate or scenario.rate) * 86400, 3), "seed": seed,
            "warmup_hours": round(warmup / 3600, 3)}


def run_sensitivity(args: argparse.Namespace, config, options: RunOptions, factory: StoreFactory,
                    rate: float | None) -> int:
    import tomllib

    from simulator import sensitivity
    from simulator.report import build, state_of
    from simulator.scenario import DEFAULT_SCENARIO, from_dict

    path = args.scenario or str(DEFAULT_SCENARIO)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SimulateError(f"cannot read scenario {path}: {exc}") from None
    check_whitelist(config)  # once: every run uses the same configuration
    results = []
    try:
        for i, (name, end, variant) in enumerate(sensitivity.variants(data)):
            scenario = from_dict(variant, path)
            progress = Progress(sys.stderr.isatty() and not args.quiet, f"{name} {end} ")
            with factory.open(i) as store:
                server = simulate(scenario, config, store, options, progress=progress)
                progress.close()
            run = {**run_info(scenario, rate, args.seed, options.warmup), "assumption": name, "moved_to": end}
            results.append((name, end, build(server, run)))
    finally:
        factory.cleanup()
    if not args.quiet:
        print(f"{state_of(results[0][2]['run'])}; the same traffic seed in every run\n")
        print(sensitivity.table(results), end="")
    write_json(args.json, [r for _, _, r in results])
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
