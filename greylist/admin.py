"""``greylist``: the admin commands (expire, show, stats, migrate) and the Postfix policy server.

These start once per admin action, not per SMTP connection, so they may use
argparse, json and tabulate freely.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from itertools import islice

from greylist.config import SETTINGS, ConfigError, add_setting_options, flags_of, load
from greylist.core.expiry import expire
from greylist.core.keys import BadAddress
from greylist.core.policy import Policy, Record, decide, expires_at, is_expired
from greylist.service import shown
from greylist.stores import StoreError, open_store
from greylist.stores.base import DISK_USAGE, PATHS, TEMP_FILES

#: Upper bounds (seconds) and labels of the age histogram in ``greylist stats``.
AGE_BUCKETS = (
    (60, "< 1 min"), (300, "1-5 min"), (3600, "5-60 min"), (86400, "1-24 h"),
    (7 * 86400, "1-7 d"), (35 * 86400, "7-35 d"), (float("inf"), ">= 35 d"),
)
TEMP_FILE_GRACE = 3600.0  # a wrapper's temp file older than this was left by a killed process


def config_from(args: argparse.Namespace):
    """Settings for a command a person types: a flag typed on the command line beats an
    exported GREYLIST_* variable (the wrapper and the plugin do the opposite: there the
    variable is tcprules' per-client setting)."""
    flags = flags_of(args)
    typed = {env for name, _flag, env, *_ in SETTINGS if name in flags}
    return load(flags, {k: v for k, v in os.environ.items() if k not in typed})


def open_existing(url: str):
    """A store an admin command reads: an error if it is not there (a cron typo must not
    pass silently, and a read must not create a store owned by the wrong user)."""
    from greylist.stores import parse_url, store_class

    where = parse_url(url)
    why = store_class(where).missing(where)
    if why:
        raise StoreError(f"no store at {url}: {why}")
    return open_store(where, lean=False)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def human(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def cmd_expire(args: argparse.Namespace) -> int:
    config = config_from(args)
    policy: Policy = config.policy
    now = time.time()

    def say(key: str, record, removed: bool) -> None:
        if args.verbose:
            what = "removed" if removed else "would remove"
            print(f"{what} {shown(key)} (last seen {iso(record.last_seen)})")

    with open_existing(config.store) as store:
        counts = expire(store, now, policy, dry_run=args.dry_run, on_removed=say)
        counts["temp_files_removed"] = 0
        counts["unreadable"] = store.ops.get("unreadable", 0)
        if TEMP_FILES in store.capabilities and not args.dry_run:
            for path in list(store.stale_temp_files(now - TEMP_FILE_GRACE)):
                try:
                    os.unlink(path)
                    counts["temp_files_removed"] += 1
                except OSError:
                    pass
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, **counts}, indent=2))
    else:
        verb = "would remove" if args.dry_run else "removed"
        done = counts["expired_pending"] + counts["expired_known"] if args.dry_run else counts["removed"]
        print(f"{config.store}: scanned {counts['scanned']} entries, {verb} {done} "
              f"({counts['expired_pending']} pending past the {human(policy.retry_window)} retry window, "
              f"{counts['expired_known']} known clients silent for over {human(policy.max_age)})")
        if counts["changed_meanwhile"]:
            print(f"kept {counts['changed_meanwhile']} that a connection renewed during the scan")
        if counts["temp_files_removed"]:
            print(f"removed {counts['temp_files_removed']} stale temporary files")
        if counts["unreadable"]:
            print(f"skipped {counts['unreadable']} entries that are not records (garbage rows or files)")
    return nothing_read(counts["scanned"], counts["unreadable"])


def nothing_read(read: int, unreadable: int) -> int:
    """Exit status: bad entries are skipped and reported; only a store of nothing but bad
    entries is a failure (a cron job notices that)."""
    if unreadable and not read:
        print(f"greylist: none of the {unreadable} entries could be read", file=sys.stderr)
        return 1
    return 0


def describe(key: str, record: Record | None, now: float, policy: Policy) -> dict:
    verdict = decide(record, now, policy).verdict
    info: dict = {"client": key, "state": "unknown" if record is None else
                  ("pending" if record.pending else "known")}
    if record is not None:
        info.update(first_seen=iso(record.first_seen), last_seen=iso(record.last_seen),
                    passes=record.passes, age_seconds=round(now - record.first_seen, 3))
    info["next_connection"] = verdict.action
    info["reason"] = verdict.reason
    if verdict.action == "tempfail":
        info["retry_in_seconds"] = round(verdict.retry_in, 3)
    return info


def cmd_show(args: argparse.Namespace) -> int:
    config = config_from(args)
    try:
        key = config.keying.client(args.ip)  # the address, or its network in the subnet modes
    except BadAddress as exc:
        print(f"greylist show: {exc}", file=sys.stderr)
        return 2
    with open_existing(config.store) as store:
        record = store.get(key)
        info = describe(key, record, time.time(), config.policy)
        if PATHS in store.capabilities:
            info["path"] = store.path_of(key)[1]
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        from tabulate import tabulate

        print(tabulate(list(info.items()), tablefmt="plain"))
    return 0 if record is not None else 1


def bucket_of(age: float) -> str:
    for bound, label in AGE_BUCKETS:
        if age < bound:
            return label
    return AGE_BUCKETS[-1][1]


def gather_stats(store, now: float, policy: Policy) -> dict:
    """Entries, pending vs known, expired, and age histograms (since first seen)."""
    hist = {label: {"pending": 0, "known": 0} for _, label in AGE_BUCKETS}
    totals = {"entries": 0, "pending": 0, "known": 0, "expired": 0}
    for _key, record in store.scan():
        state = "pending" if record.pending else "known"
        totals["entries"] += 1
        totals[state] += 1
        totals["expired"] += is_expired(record, now, policy)
        hist[bucket_of(now - record.first_seen)][state] += 1
    stats: dict = {"store": store.url, **totals, "unreadable": store.ops.get("unreadable", 0),
                   "age_histogram": hist}
    if DISK_USAGE in store.capabilities:
        stats["disk"] = store.disk_usage()
    return stats


def cmd_stats(args: argparse.Namespace) -> int:
    config = config_from(args)
    with open_existing(config.store) as store:
        stats = gather_stats(store, time.time(), config.policy)
    if args.json:
        print(json.dumps(stats, indent=2))
        return nothing_read(stats["entries"], stats["unreadable"])
    from tabulate import tabulate

    summary = [["store", stats["store"]], ["entries", stats["entries"]],
               ["pending (waiting for a retry)", stats["pending"]],
               ["known (passed at least once)", stats["known"]],
               ["expired (greylist expire would remove)", stats["expired"]],
               ["unreadable (skipped: not records)", stats["unreadable"]]]
    if "disk" in stats:
        summary += [["files", stats["disk"]["files"]], ["directories", stats["disk"]["directories"]],
                    ["bytes on disk", stats["disk"]["bytes"]]]
    print(tabulate(summary, tablefmt="simple"))
    print()
    rows = [[label, c["pending"], c["known"], c["pending"] + c["known"]]
            for label, c in stats["age_histogram"].items()]
    print(tabulate(rows, headers=["age since first seen", "pending", "known", "total"],
                   tablefmt="simple"))
    return nothing_read(stats["entries"], stats["unreadable"])


def cmd_migrate(args: argparse.Namespace) -> int:
    """Copy entries between two stores; run it twice and the second run copies nothing."""
    config = config_from(args)
    policy: Policy = config.policy
    now = time.time()
    counts = {"read": 0, "copied": 0, "updated": 0, "skipped_same_or_newer": 0, "skipped_expired": 0}
    show_progress = sys.stderr.isatty() and not args.quiet
    with open_existing(args.src) as src, open_store(args.dst, lean=False) as dst:
        entries = src.scan()
        while True:
            # MIGRATE_BATCH entries a transaction (a database store's commit each, not one
            # an entry: a million of postgrey's triplets took 38 s, then 20 s); the write
            # lock is held a few milliseconds at a time, so a server on the same file goes on
            batch = list(islice(entries, MIGRATE_BATCH))
            if not batch:
                break
            with dst.transaction() if not args.dry_run else nullcontext():  # a dry run writes nothing
                for key, record in batch:
                    counts["read"] += 1
                    if is_expired(record, now, policy):
                        counts["skipped_expired"] += 1
                    else:
                        counts[migrate_one(dst, key, record, now, policy, args.dry_run)] += 1
            if show_progress:
                print(f"\rmigrated {counts['read']:,} entries ...", end="", file=sys.stderr, flush=True)
        if show_progress:
            print("\r" + " " * 40 + "\r", end="", file=sys.stderr)
        counts["unreadable"] = src.ops.get("unreadable", 0)
        for warning in src.warnings:
            print(f"greylist migrate: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps({"src": args.src, "dst": args.dst, "dry_run": args.dry_run, **counts}, indent=2))
    else:
        from tabulate import tabulate

        verb = "would copy" if args.dry_run else "copied"
        print(f"{args.src} -> {args.dst}" + (" (dry run)" if args.dry_run else ""))
        print(tabulate([["entries read", counts["read"]], [f"{verb} (new in destination)", counts["copied"]],
                        ["updated (source more recent)", counts["updated"]],
                        ["skipped (destination same or more recent)", counts["skipped_same_or_newer"]],
                        ["skipped (expired)", counts["skipped_expired"]],
                        ["skipped (unreadable in the source)", counts["unreadable"]]], tablefmt="simple"))
    return nothing_read(counts["read"], counts["unreadable"])


#: entries ``greylist migrate`` writes a transaction
MIGRATE_BATCH = 1000


def migrate_one(dst, key: str, record: Record, now: float, policy: Policy, dry_run: bool) -> str:
    """Copy one entry unless the destination already knows the client as well or better."""
    ttl = expires_at(record, policy) - now
    existing = dst.get(key)
    if existing is None:
        if not dry_run:
            dst.add(key, record, ttl)
        return "copied"
    # Stores keep times to the millisecond at least: compare at that precision.
    if existing.last_seen >= record.last_seen - 0.001 and existing.passes >= record.passes:
        return "skipped_same_or_newer"
    if not dry_run:
        dst.put(key, record, ttl)
    return "updated"


def cmd_policyd(args: argparse.Namespace) -> int:
    from greylist.adapters.policyd import serve

    config = config_from(args)
    try:
        return serve(args.listen, config, args.max_connections, nightly_expiry=args.expire_nightly)
    except (OSError, ValueError) as exc:
        print(f"greylist policyd: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="greylist", description="Greylist store administration and servers.",
        epilog="Also: greylist serve [tcpserver's options] host port program ... (tcpserver and the "
               "greylisting dialogue in one process; greylist serve --help), and greylist postgrey "
               "[postgrey's options] (greylist policyd with postgrey's command line).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("expire", help="remove stale entries (replaces the cron find)")
    add_setting_options(p, ("store", "retry_window", "max_age"))
    p.add_argument("--dry-run", action="store_true", help="count, remove nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="name each entry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_expire)

    p = sub.add_parser("show", help="one client's entry and what its next connection gets")
    p.add_argument("ip")
    add_setting_options(p, ("store", "delay", "retry_window", "max_age", "key", "subnet_v4", "subnet_v6"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("migrate", help="copy entries between stores (a cqgreylist tree into Redis, say)")
    p.add_argument("src", help="source store URL, e.g. file:///var/qmail/cqgreylist, or "
                               "postgrey:///var/lib/postgrey (postgrey's Berkeley DB files, read once)")
    p.add_argument("dst", help="destination store URL, e.g. redis://10.0.0.5:6379/0")
    add_setting_options(p, ("retry_window", "max_age"))
    p.add_argument("--dry-run", action="store_true", help="count, write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("policyd", help="a Postfix policy server (check_policy_service)")
    p.add_argument("--listen", default="127.0.0.1:10023",
                   help="HOST:PORT, *:PORT (every address, IPv6 and IPv4) or unix:/path (default 127.0.0.1:10023)")
    p.add_argument("--max-connections", type=int, default=4000,
                   help="Postfix connections at once (default 4000, kept below the descriptor limit); "
                        "at the bound the connection idle the longest is closed")
    p.add_argument("--expire-nightly", action="store_true",
                   help="remove stale entries itself, as postgrey does (greylist expire as a child, "
                        "once a night between 02:00 and 07:00): no cron job needed")
    add_setting_options(p, tuple(name for name, *_ in SETTINGS))
    p.set_defaults(func=cmd_policyd)

    p = sub.add_parser("stats", help="entries, pending vs known, age histogram")
    add_setting_options(p, ("store", "delay", "retry_window", "max_age"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["serve"], ["policyd"]):  # a server: a reload while it starts waits (postgrey's main too)
        from greylist.adapters import reloads

        reloads.hold()
    if argv[:1] == ["serve"]:  # tcpserver's getopt-style command line, not argparse's
        from greylist.adapters.serve import main as serve

        return serve(argv[1:])
    if argv[:1] == ["postgrey"]:  # postgrey's command line
        from greylist.adapters.postgrey import main as postgrey

        return postgrey(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, StoreError) as exc:
        print(f"greylist {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
