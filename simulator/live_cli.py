"""``simulate live`` and ``simulate capacity``: what the wrapper costs this machine."""

from __future__ import annotations

import argparse
import sys

from greylist.config import ConfigError, parse_duration
from simulator.errors import SimulateError
from simulator.runs import check_outputs, write_json
from simulator.live import MAX_DURATION, MAX_RATE, LiveOptions, capacity, run_live
from simulator.scenario import load as load_scenario, parse_rate


def _scratch_store(url: str):
    """The store factory and the URL the wrappers get (file:// and sqlite:// without a
    path: scratch space, removed by the factory's cleanup)."""
    from simulator.runs import StoreFactory

    factory = StoreFactory(url)
    return factory, factory.url_for(0)


def _duration(text: str, name: str) -> float:
    try:
        value = parse_duration(text)
    except ConfigError as exc:
        raise SimulateError(f"{name}: {exc}") from None
    if not 0 < value <= MAX_DURATION:
        raise SimulateError(f"{name} must be more than 0 and at most {MAX_DURATION:g} s")
    return value


def live_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simulate live", description=(
        "Run the installed greylist-wrap once per connection at an offered rate, as tcpserver "
        "would, and measure what it costs."))
    p.add_argument("--rate", default="20/s", help="offered connections: 20/s, 1200/min (default 20/s)")
    p.add_argument("--duration", default="30s", help="how long arrivals go on (default 30s, at most 10 min)")
    p.add_argument("--store", default="file://", help="store URL; file:// or sqlite:// for scratch space")
    p.add_argument("--concurrency", type=int, default=40, help="like tcpserver -c (default 40)")
    p.add_argument("--delay", default="60", help="greylisting delay for the wrappers (default 60)")
    p.add_argument("--scenario", help="scenario whose senders give the client addresses")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON (- for stdout)")
    return p


def capacity_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simulate capacity", description=(
        "Ramp the offered rate of real wrapper connections to find the highest this machine "
        "sustains with the p99 time to the first reply under a bound and no errors."))
    p.add_argument("--store", action="append", help="store URL; repeat to compare (default file://)")
    p.add_argument("--p99", default="100ms", help="bound on the p99 time to the first reply (default 100ms)")
    p.add_argument("--step", default="10s", help="seconds per rate step (default 10s)")
    p.add_argument("--start", default="10/s", help="first offered rate (default 10/s)")
    p.add_argument("--max", default="400/s", help="highest rate to try (default 400/s)")
    p.add_argument("--factor", type=float, default=1.5, help="rate multiplier per step (default 1.5)")
    p.add_argument("--concurrency", type=int, default=40)
    p.add_argument("--scenario")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--plot", metavar="FILE.png", help="first-reply latency against offered rate")
    p.add_argument("--json", metavar="OUT")
    return p


def _rate(text: str) -> float:
    rate = parse_rate(text)
    if rate > MAX_RATE:
        raise SimulateError(f"rate {text} is over the limit of {MAX_RATE:g}/s")
    return rate


def live_table(s: dict) -> str:
    from tabulate import tabulate

    rows = [
        ["store", s["store"]],
        ["offered / achieved rate", f"{s['offered_rate']:g}/s / {s['achieved_rate']:g}/s"],
        ["connections offered / refused (over -c) / completed",
         f"{s['offered']} / {s['refused']} / {s['completed']}"],
        ["passed to smtpd / greylisted", f"{s['passed']} / {s['greylisted']}"],
        ["errors", f"{s['errors']} {s['error_kinds'] if s['errors'] else ''}".strip()],
        ["first reply p50 / p90 / p99 / max",
         " / ".join(f"{s[k]} ms" for k in ("first_reply_ms_p50", "first_reply_ms_p90",
                                            "first_reply_ms_p99", "first_reply_ms_max"))],
        ["session p50 / p99", f"{s['session_ms_p50']} / {s['session_ms_p99']} ms"],
        ["CPU per connection", f"{s['cpu_ms_per_connection']} ms"],
        ["CPU cores busy", s["cpu_cores_busy"]],
        ["peak concurrent sessions", f"{s['peak_concurrency']} (limit {s['concurrency_limit']})"],
        ["peak memory of one session", f"{s['peak_memory_kb']} KiB"],
    ]
    return tabulate(rows, tablefmt="simple", headers=["live", ""])


def run_live_command(argv: list[str]) -> int:
    args = live_parser().parse_args(argv)
    check_outputs(args)
    try:
        rate, delay = _rate(args.rate), parse_duration(args.delay)
    except ConfigError as exc:
        raise SimulateError(str(exc)) from None
    duration = _duration(args.duration, "--duration")
    factory, store = _scratch_store(args.store)
    try:
        options = LiveOptions(rate=rate, duration=duration, store=store, seed=args.seed,
                              concurrency=max(1, args.concurrency), delay=delay)
        result = run_live(options, load_scenario(args.scenario))
    except ValueError as exc:
        raise SimulateError(str(exc)) from None
    finally:
        factory.cleanup()
    summary = result.summary(options)
    summary["store"] = args.store
    print(live_table(summary))
    write_json(args.json, summary)
    return 0


def run_capacity_command(argv: list[str]) -> int:
    args = capacity_parser().parse_args(argv)
    check_outputs(args)
    try:
        bound = parse_duration(args.p99.removesuffix("ms")) / 1000 if args.p99.endswith("ms") \
            else parse_duration(args.p99)
    except ConfigError as exc:
        raise SimulateError(f"--p99: {exc}") from None
    step = _duration(args.step, "--step")
    scenario = load_scenario(args.scenario)
    results = []
    for url in args.store or ["file://"]:
        factory, store = _scratch_store(url)
        try:

            def progress(s: dict) -> None:
                print(f"  {url}: {s['offered_rate']:g}/s -> p99 first reply {s['first_reply_ms_p99']} ms, "
                      f"errors {s['errors']}, refused {s['refused']}", file=sys.stderr, flush=True)

            r = capacity(store, scenario, bound * 1000, step_seconds=step, start_rate=_rate(args.start),
                         factor=max(1.05, args.factor), max_rate=_rate(args.max),
                         concurrency=max(1, args.concurrency), seed=args.seed, progress=progress)
        finally:
            factory.cleanup()
        r["store"] = url
        for s in r["steps"]:
            s["store"] = url
        results.append(r)
    print(capacity_table(results))
    write_json(args.json, results)
    if args.plot:
        from simulator.plot import capacity_plot

        capacity_plot(results, args.plot)
    return 0


def capacity_table(results: list[dict]) -> str:
    from tabulate import tabulate

    head = [""] + [r["store"] for r in results]
    rows = [
        ["highest sustained rate", *[f"{r['max_rate_per_second']:g}/s" for r in results]],
        ["  per day", *[f"{r['max_rate_per_day']:,}" for r in results]],
        ["  p99 bound on first reply", *[f"{r['p99_bound_ms']:g} ms" for r in results]],
    ]
    for label, key, unit in (("first reply p50 there", "first_reply_ms_p50", " ms"),
                             ("first reply p99 there", "first_reply_ms_p99", " ms"),
                             ("CPU per connection", "cpu_ms_per_connection", " ms"),
                             ("CPU cores busy", "cpu_cores_busy", ""),
                             ("peak concurrent sessions", "peak_concurrency", "")):
        rows.append([label, *[f"{r['at_that_rate'][key]}{unit}" if r["at_that_rate"] else "-"
                              for r in results]])
    out = tabulate(rows, headers=head, tablefmt="simple", stralign="right")
    steps = []
    for r in results:
        for s in r["steps"]:
            steps.append([r["store"], f"{s['offered_rate']:g}/s", f"{s['achieved_rate']:g}/s",
                          s["first_reply_ms_p50"], s["first_reply_ms_p99"], s["errors"], s["refused"],
                          s["cpu_cores_busy"], "yes" if s["sustained"] else "no"])
    out += "\n\n" + tabulate(steps, headers=["store", "offered", "achieved", "p50 ms", "p99 ms",
                                              "errors", "refused", "cores", "sustained"],
                             tablefmt="simple", stralign="right")
    return out
