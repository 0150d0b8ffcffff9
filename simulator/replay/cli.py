"""``simulate replay LOGFILE``: the counterfactual replay of a logged server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simulator import report as reports
from simulator.errors import SimulateError
from simulator.replay.formats import FORMATS, LogError, merge, open_log, parse, time_zone
from simulator.replay.replay import RULE, replay, rescale, retry_model, returning_share
from simulator.replay.shadow import summarize
from simulator.scenario import load as load_scenario, parse_rate


def build_parser() -> argparse.ArgumentParser:
    from simulator.runs import add_common

    parser = argparse.ArgumentParser(
        prog="simulate replay",
        description="Replay a logged server's connections through the greylisting core: "
                    "what would greylisting have done to this traffic?")
    parser.add_argument("logfiles", nargs="+", metavar="LOGFILE",
                        help="the log, with its rotated files in any order if you like (/var/log/mail.log*: "
                             "gzip, bzip2 and xz files are read as they are); - for standard input")
    parser.add_argument("--format", default="auto", choices=("auto",) + FORMATS)
    parser.add_argument("--tz", default="local",
                        help="time zone of stamps without one (tai64nlocal, syslog): local (default, as "
                             "tai64nlocal and syslog write them), UTC, or a name such as Europe/Berlin")
    parser.add_argument("--year", type=int,
                        help="year of each file's first yearless syslog stamp (Postfix, postgrey; default: "
                             "the latest that puts it in the past)")
    parser.add_argument("--rate", help="rescale the log's timing to this mean rate (300k/day, 3.5/s)")
    parser.add_argument("--retry-model", default=None,
                        help="how a tempfailed client retries when the log does not show it coming "
                             "back: a sender class of the scenario (postfix, exim, qmail, sendmail, "
                             "exchange, office365, gmail, bulk) or none. Default: postfix; none for "
                             "a log that already holds the retries (our own enforcing log, postgrey's, "
                             "a Postfix log with greylisting rejections in it)")
    parser.add_argument("--scenario", help="scenario file whose sender classes are the retry models")
    parser.add_argument("--no-drain", action="store_true")
    parser.add_argument("--show-bad", type=int, default=10, metavar="N",
                        help="list the first N unreadable lines (default 10)")
    add_common(parser)
    return parser


def read_logs(paths: list[str], fmt: str, year: int | None, tz, show_bad: int = 10):
    """The logs as one (see merge), each read as it is (compressed or not). What could not be
    read is said on stderr, file by file: lines skipped, a file that ends early. The first
    file's format (detected, with auto) is the others' too: rotated files of one log."""
    logs = []
    for path in paths:
        where = f"{path}: " if len(paths) > 1 else ""
        try:
            if path == "-":
                log = parse(sys.stdin, fmt, year, tz)
            else:
                with open_log(path) as f:
                    log = parse(f, fmt, year, tz)
        except OSError as exc:
            raise SimulateError(f"cannot read {path}: {exc.strerror or exc}") from None
        except LogError as exc:
            raise SimulateError(f"{path}: {exc}") from None
        if log.format:
            fmt = log.format
        if log.bad:
            shown = "; ".join(f"line {n}: {why}" for n, why in log.bad[:show_bad])
            more = f" (and {len(log.bad) - show_bad} more)" if len(log.bad) > show_bad else ""
            print(f"simulate replay: {where}skipped {len(log.bad)} unreadable lines of {log.lines}: {shown}{more}",
                  file=sys.stderr)
        if log.cut:
            print(f"simulate replay: {path}: {log.cut}; replayed its lines up to there", file=sys.stderr)
        logs.append(log)
    return merge(logs)


def run_replay(argv: list[str]) -> int:
    from simulator.runs import check_outputs, StoreFactory, emit, parse_compare, policies_for, check_whitelist

    args = build_parser().parse_args(argv)
    check_outputs(args)
    try:
        tz = time_zone(args.tz)
    except LogError as exc:
        raise SimulateError(str(exc)) from None
    log = read_logs(args.logfiles, args.format, args.year, tz, args.show_bad)
    named = ", ".join(args.logfiles)
    if not log.events:
        raise SimulateError(f"{named}: no connections found in {log.lines} lines "
                            f"({log.format or 'empty'}{' format' if log.format else ''})")
    scenario = load_scenario(args.scenario)
    if args.retry_model is None:
        # Our own enforcing log holds the real retries; a shadow log holds none (every
        # client got through at once), so its tempfailed clients retry like Postfix.
        # postgrey's log is of a server that greylists too: its retries are in it.
        # So is a Postfix log with greylisting rejections in it (postgrey or policyd in front).
        args.retry_model = "none" if (log.format == "wrapper" and not log.shadow) or \
            log.format == "postgrey" or log.greylisted else "postfix"
    model = retry_model(scenario, args.retry_model)
    events, factor = rescale(log.events, parse_rate(args.rate) if args.rate else None)
    span = max(events[-1][0] - events[0][0], 1.0)
    shadow_summary = summarize(log.shadow) if log.shadow else None
    factory = StoreFactory(args.store)
    results = []
    try:
        for i, (label, config) in enumerate(policies_for(args)):
            if config.keying.needs_envelope and len(events[0]) < 4:
                raise SimulateError("logs of connections carry no envelope: replay with --key ip or subnet "
                                    "(postgrey's log and our policy servers' logs carry it)")
            with factory.open(i) as store:
                check_whitelist(config)  # an unreadable whitelist stops the replay before it runs
                server = replay(events, config, store, model, drain=not args.no_drain,
                                spam_sources=scenario.of_kind("spam"), rejected=frozenset(log.rejected))
                run = {"log": ", ".join(Path(p).name for p in args.logfiles), "format": log.format,
                       "lines": log.lines,
                       "bad_lines": len(log.bad), "ignored_lines": log.ignored,
                       "logged_connections": len(events), "time_scale": round(factor, 6),
                       "rate_per_day": round(len(events) / span * 86400, 3),
                       "retry_model": args.retry_model, "classified_by": RULE,
                       "rejected_clients": len(log.rejected), "returning_share": returning_share(events, frozenset(log.rejected)),
                       "greylisting_rejections": log.greylisted}
                if log.shadow:
                    run["shadow_log"] = shadow_summary
                results.append(reports.build(server, run, label))
    finally:
        factory.cleanup()
    emit(args, results, parse_compare(args.compare))
    return 0
