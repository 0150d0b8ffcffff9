"""What a shadow-mode log says enforcing would have done, live.

In shadow mode (``--mode shadow``) every client was let through, and each log
line carries the verdict enforcing would have given at that moment
(``shadow=tempfail reason=new``). Those live verdicts are the production
service's own, on the real traffic; the replay beside them predicts the same
with the simulator (synthetic retries for clients that, let through, never had
to retry). The two side by side check the simulator against the live traffic.

Clients enforcing would have tempfailed as new fall in three groups:
- came back: the log shows them passing later (``reason=passed``): they retried
  within the window on their own, so enforcing would have delayed, not lost, them;
- came back too soon or too late only: every later connection was again
  too soon, or after the retry window;
- not seen again: one visit; under enforcing, their mail depends on their
  retrying (a real MTA does, most spam does not).
"""

from __future__ import annotations

from collections import Counter


def summarize(shadow: list[tuple[float, str, str, str]], top: int = 10) -> dict:
    """Figures of the live shadow verdicts: tempfail share, reasons, the three groups of clients."""
    reasons = Counter(reason for _t, _ip, _action, reason in shadow)
    tempfails = sum(1 for _t, _ip, action, _r in shadow if action == "tempfail")
    per_client: dict[str, list[str]] = {}
    for _t, ip, _action, reason in shadow:
        per_client.setdefault(ip, []).append(reason)
    tempfailed = came_back = only_retried_badly = not_seen = 0
    lonely: list[str] = []
    for ip, seen in per_client.items():
        if "new" not in seen:
            continue
        tempfailed += 1
        after = seen[seen.index("new") + 1:]
        if "passed" in after:
            came_back += 1
        elif after:
            only_retried_badly += 1
        else:
            not_seen += 1
            if len(lonely) < top:
                lonely.append(ip)
    return {
        "connections": len(shadow),
        "would_tempfail": tempfails,
        "would_tempfail_ratio": round(tempfails / len(shadow), 6) if shadow else 0.0,
        "reasons": dict(sorted(reasons.items())),
        "clients": len(per_client),
        "clients_would_tempfail": tempfailed,
        "clients_came_back_and_passed": came_back,
        "clients_came_back_too_soon_or_late": only_retried_badly,
        "clients_not_seen_again": not_seen,
        "not_seen_again_sample": lonely,
    }


def table(summary: dict) -> str:
    """The live shadow figures, for the replay's report."""
    from tabulate import tabulate

    def share(n: int, of: int) -> str:
        return f"{n:,} ({100 * n / of:.1f}%)" if of else f"{n:,}"

    rows = [
        ["connections logged in shadow mode", f"{summary['connections']:,}"],
        ["  enforcing would have tempfailed", share(summary["would_tempfail"], summary["connections"])],
        ["  by reason", ", ".join(f"{r} {n:,}" for r, n in summary["reasons"].items())],
        ["clients", f"{summary['clients']:,}"],
        ["  tempfailed as new", f"{summary['clients_would_tempfail']:,}"],
        ["    came back and passed (delayed, not lost)",
         share(summary["clients_came_back_and_passed"], summary["clients_would_tempfail"])],
        ["    came back only too soon or too late",
         share(summary["clients_came_back_too_soon_or_late"], summary["clients_would_tempfail"])],
        ["    not seen again (delivered only if they retry)",
         share(summary["clients_not_seen_again"], summary["clients_would_tempfail"])],
    ]
    if summary["not_seen_again_sample"]:
        rows.append(["    e.g.", ", ".join(summary["not_seen_again_sample"][:5])])
    return tabulate(rows, headers=["live shadow decisions", ""], tablefmt="simple") + "\n"
