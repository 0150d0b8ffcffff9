"""A simulation's results as data (JSON) and as tables for people.

Everything in the report is a function of scenario, seed and policy, so the
same inputs give byte-identical JSON, except the ``timing`` section: decision
times and wall time are measured on the machine and differ run to run.
"""

from __future__ import annotations

import json

from simulator.metrics import delay_figures, percentile
from simulator.simulation import HOUR, SimulatedServer

#: The file tree's operations in a readable order; other stores' (query, command) follow.
OPS = ("stat", "read", "mkdir", "create", "write", "rename", "utime", "unlink")


def build(sim: SimulatedServer, run: dict, label: dict | None = None) -> dict:
    """The report of a finished run; ``run`` describes the input (scenario or log)."""
    classes = [s.summary() for s in sim.stats.values()]
    legit = [s for s in sim.stats.values() if s.kind == "legit"]
    spam = [s for s in sim.stats.values() if s.kind == "spam"]
    connections = sum(s.connections for s in sim.stats.values())
    messages = sum(s.messages for s in sim.stats.values())
    tempfails = sum(s.tempfails for s in sim.stats.values())
    legit_delays = sorted(d for s in legit for d in s.delays)
    legit_messages = sum(s.messages for s in legit)
    legit_delayed = sum(s.delayed for s in legit)
    spam_messages = sum(s.messages for s in spam)
    spam_stopped = sum(s.given_up for s in spam)

    overall = {
        "first_attempts": messages,
        "connections": connections,
        "retries": connections - messages,
        "tempfails": tempfails,
        "tempfail_ratio": round(tempfails / connections, 4) if connections else 0.0,
        "legit_messages": legit_messages,
        "legit_delayed": legit_delayed,
        "legit_delayed_share": round(legit_delayed / legit_messages, 4) if legit_messages else 0.0,
        "legit_lost": sum(s.given_up for s in legit),
        "legit_in_flight": sum(s.in_flight for s in legit),
        **delay_figures(legit_delays, "legit_delay"),
        "spam_messages": spam_messages,
        "spam_stopped": spam_stopped,
        "spam_stopped_share": round(spam_stopped / spam_messages, 4) if spam_messages else 0.0,
        "whitelisted_connections": sim.whitelisted,
    }
    ops = {op: sim.store.ops[op] for op in OPS if op in sim.store.ops}
    ops.update({op: n for op, n in sorted(sim.store.ops.items()) if op not in ops})
    store = {
        "kind": sim.store.url.split("://", 1)[0],
        "entries_end_of_window": sim.entries_at_end_of_window,
        "entries_peak": max([h.entries for h in sim.hours] + [sim.entries_at_end_of_window]),
        "entries_end": sim.store.size(),
        "ops": ops,
        "ops_per_connection": {op: round(n / connections, 3) for op, n in ops.items()} if connections else {},
    }
    if sim.disk_samples:
        for key in ("files", "directories", "bytes"):
            store[f"{key}_peak"] = max(d[key] for d in sim.disk_samples)
            store[f"{key}_end"] = sim.disk_samples[-1][key]
    timeline = [{"hour": i, "connections": h.connections, "tempfails": h.tempfails,
                 "tempfail_ratio": round(h.tempfails / h.connections, 4) if h.connections else 0.0,
                 "legit_delivered": h.legit_delivered, "legit_delayed": h.legit_delayed,
                 "spam_passed": h.spam_passed, "entries": h.entries}
                for i, h in enumerate(sim.hours)]
    ns = sorted(sim.decision_ns)
    timing = {
        "decision_us_p50": round(percentile(ns, 50) / 1000, 2) if ns else None,
        "decision_us_p99": round(percentile(ns, 99) / 1000, 2) if ns else None,
        "wall_seconds": round(sim.wall_seconds, 3),
        "connections_per_wall_second": round(sim.decided / sim.wall_seconds) if sim.wall_seconds else None,
    }
    policy = sim.policy
    return {
        "run": {
            **run,
            "duration_hours": round(sim.duration / HOUR, 3),
            "drain": sim.drain,
            "policy": {"delay": policy.delay, "retry_window": policy.retry_window,
                       "max_age": policy.max_age, "key": sim.keying.mode,
                       "auto_whitelist": policy.auto_whitelist},
            **(label or {}),
        },
        "overall": overall,
        "drain_connections": sim.drain_hour.connections,
        "classes": classes,
        "store": store,
        "expiry_runs": sim.expiry_runs,
        "timeline": timeline,
        "timing": timing,
    }


def state_of(run: dict) -> str:
    """Which view a synthetic run shows: the steady state or the day greylisting starts."""
    warm = run.get("warmup_hours", 0)
    if warm:
        size = f"{warm / 24:g} d" if warm % 24 == 0 else f"{warm:g} h"
        return f"steady state (after a {size} warm-up of the same traffic, not counted)"
    return "cold start (an empty store: the day greylisting is switched on)"


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False) + "\n"


def _fmt_delay(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def tables(report: dict) -> str:
    from tabulate import tabulate

    run, o, st, t = report["run"], report["overall"], report["store"], report["timing"]
    pol = run["policy"]
    if "log" in run:
        source = (f"replay of {run['log']} ({run['format']}: {run['logged_connections']:,} connections "
                  f"from {run['lines']:,} lines, {run['bad_lines']:,} unreadable), "
                  f"{run['rate_per_day']:,.0f} connections/day over {run['duration_hours']:g} h; "
                  f"tempfailed clients retry like {run['retry_model']} unless the log shows them back"
                  + ("" if run["retry_model"] == "none" else
                     " (spam ones like the scenario's spam sources)") + "")
        if run.get("greylisting_rejections"):
            source += (f" (the log shows the server greylisting already, {run['greylisting_rejections']:,} "
                       "4xx greylisting replies: its retries are the log's own)")
        if run.get("classified_by"):
            source += f".\n{run['classified_by'][0].upper()}{run['classified_by'][1:]}"
            if run.get("rejected_clients"):
                source += f" ({run['rejected_clients']:,} clients rejected in the log)"
        if run.get("returning_share") is not None:
            source += (f".\nReturning senders: {run['returning_share']:.1%} of the legitimate clients' "
                       "connections come from an address seen before (the scenario's repeat_share assumes 60%)")
    else:
        source = (f"scenario {run['scenario']}: {run['rate_per_day']:,.0f} first-attempt connections/day "
                  f"for {run['duration_hours']:g} h, seed {run['seed']}; {state_of(run)}")
    out = [
        f"{source}; policy delay {pol['delay']:g} s, retry window "
        f"{_fmt_delay(pol['retry_window'])}, max age {pol['max_age'] / 86400:g} d; store {st['kind']}://",
        "",
        tabulate([
            ["connections (first attempts + retries)", f"{o['connections']:,}"],
            ["  first attempts / retries", f"{o['first_attempts']:,} / {o['retries']:,}"],
            ["tempfailed", f"{o['tempfails']:,} ({_pct(o['tempfail_ratio'])})"],
            ["legitimate messages", f"{o['legit_messages']:,}"],
            ["  delayed", f"{o['legit_delayed']:,} ({_pct(o['legit_delayed_share'])})"],
            ["  delay of delayed mail p50 / p90 / p99 / max",
             " / ".join(_fmt_delay(o[k]) for k in ("legit_delay_p50", "legit_delay_p90",
                                                     "legit_delay_p99", "legit_delay_max"))],
            ["  lost (sender gave up)", f"{o['legit_lost']:,}"],
            ["spam messages", f"{o['spam_messages']:,}"],
            ["  stopped", f"{o['spam_stopped']:,} ({_pct(o['spam_stopped_share'])})"],
        ], tablefmt="simple", headers=["overall", ""]),
        "",
    ]
    rows = []
    for c in report["classes"]:
        rows.append([c["class"], c["kind"], f"{c['messages']:,}", f"{c['connections']:,}",
                     _pct(c["tempfail_ratio"]), _pct(c["delayed_share"]),
                     c.get("lost", "") if c["kind"] == "legit" else _pct(c["stopped_share"]),
                     _fmt_delay(c["delay_p50"]), _fmt_delay(c["delay_p90"]),
                     _fmt_delay(c["delay_p99"]), _fmt_delay(c["delay_max"])])
    out.append(tabulate(rows, headers=["sender class", "kind", "messages", "connections", "tempfailed",
                                       "delayed", "lost/stopped", "p50", "p90", "p99", "max"],
                        tablefmt="simple", stralign="right"))
    out.append("")
    store_rows = [["entries at end of window / peak", f"{st['entries_end_of_window']:,} / {st['entries_peak']:,}"]]
    if "files_end" in st:
        store_rows += [["files / directories (peak)", f"{st['files_peak']:,} / {st['directories_peak']:,}"],
                       ["bytes on disk (peak)", f"{st['bytes_peak']:,}"]]
    if st["ops_per_connection"]:
        store_rows.append(["store operations per connection",
                           ", ".join(f"{op} {n:g}" for op, n in st["ops_per_connection"].items())])
    store_rows += [["decision time p50 / p99", f"{t['decision_us_p50']} / {t['decision_us_p99']} µs"],
                   ["wall time (warm-up included)" if report["run"].get("warmup_hours") else "wall time",
                    f"{t['wall_seconds']:.2f} s ({t['connections_per_wall_second']:,} connections/s)"]]
    out.append(tabulate(store_rows, headers=["store and speed", ""], tablefmt="simple"))
    out.append("")
    if run.get("shadow_log"):
        from simulator.replay.shadow import table

        out.append(table(run["shadow_log"]))
    timeline = report["timeline"]
    if timeline:
        step = 1 if len(timeline) <= 48 else 24
        rows = []
        for i in range(0, len(timeline), step):
            chunk = timeline[i:i + step]
            conns = sum(h["connections"] for h in chunk)
            temps = sum(h["tempfails"] for h in chunk)
            rows.append([f"{i}" if step == 1 else f"day {i // 24 + 1}", f"{conns:,}",
                         _pct(temps / conns) if conns else "-",
                         sum(h["legit_delivered"] for h in chunk), sum(h["legit_delayed"] for h in chunk),
                         sum(h["spam_passed"] for h in chunk), f"{chunk[-1]['entries']:,}"])
        out.append(tabulate(rows, headers=["hour" if step == 1 else "", "connections", "tempfailed",
                                           "legit delivered", "of which delayed", "spam passed",
                                           "store entries"], tablefmt="simple", stralign="right"))
    return "\n".join(out) + "\n"


COMPARE_ROWS = [
    ("connections", ("overall", "connections"), "{:,}"),
    ("tempfailed", ("overall", "tempfail_ratio"), "pct"),
    ("legit delayed", ("overall", "legit_delayed_share"), "pct"),
    ("legit delay p50", ("overall", "legit_delay_p50"), "delay"),
    ("legit delay p90", ("overall", "legit_delay_p90"), "delay"),
    ("legit delay p99", ("overall", "legit_delay_p99"), "delay"),
    ("legit delay max", ("overall", "legit_delay_max"), "delay"),
    ("legit lost", ("overall", "legit_lost"), "{:,}"),
    ("spam stopped", ("overall", "spam_stopped_share"), "pct"),
    ("store entries (peak)", ("store", "entries_peak"), "{:,}"),
    ("decision p99 (µs)", ("timing", "decision_us_p99"), "{}"),
]


def compare_table(setting: str, values: list[str], reports: list[dict]) -> str:
    from tabulate import tabulate

    rows = []
    for label, (section, key), fmt in COMPARE_ROWS:
        row = [label]
        for r in reports:
            v = r[section][key]
            if fmt == "pct":
                row.append(_pct(v))
            elif fmt == "delay":
                row.append(_fmt_delay(v))
            else:
                row.append("-" if v is None else fmt.format(v))
        rows.append(row)
    head = ""
    if "scenario" in reports[0]["run"]:
        head = f"{state_of(reports[0]['run'])}\n\n"
    return head + tabulate(rows, headers=[""] + [f"{setting}={v}" for v in values],
                           tablefmt="simple", stralign="right") + "\n"
