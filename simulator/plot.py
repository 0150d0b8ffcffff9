"""``--plot FILE.png``: the reports as pictures (matplotlib, an optional extra).

simulate and replay: tempfail ratio and store size per hour, and the
delivery-delay distribution (CDF) per sender class; with --compare, one line
per compared value. capacity: time to the first reply against the offered rate.
"""

from __future__ import annotations

from simulator.errors import SimulateError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SimulateError("--plot needs matplotlib: pip install 'greylist[plot]' "
                            "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: File types matplotlib writes without extra software.
PLOT_TYPES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def check_plot_target(path: str) -> None:
    """Refuse, before any work, a plot that could not be written at the end."""
    if not path.lower().endswith(PLOT_TYPES):
        raise SimulateError(f"--plot {path}: give a file ending in {', '.join(PLOT_TYPES)}")
    _pyplot()


def report_plot(reports: list[dict], path: str) -> None:
    plt = _pyplot()
    fig, (ax_ratio, ax_cdf) = plt.subplots(1, 2, figsize=(13, 4.8))
    ax_store = ax_ratio.twinx()
    for report in reports:
        label = report["run"].get("compare", "")
        hours = [h["hour"] for h in report["timeline"]]
        ax_ratio.plot(hours, [100 * h["tempfail_ratio"] for h in report["timeline"]],
                      label=f"tempfailed % {label}".strip())
        ax_store.plot(hours, [h["entries"] for h in report["timeline"]], linestyle="--",
                      label=f"store entries {label}".strip())
    ax_ratio.set_xlabel("hour of the simulated window")
    ax_ratio.set_ylabel("tempfailed connections (%)")
    ax_ratio.set_ylim(0, 100)
    ax_store.set_ylabel("store entries (dashed)")
    lines = ax_ratio.get_legend_handles_labels()
    more = ax_store.get_legend_handles_labels()
    ax_ratio.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize=8)
    ax_ratio.set_title("Tempfail ratio and store size per hour")

    if len(reports) == 1:
        curves = [(c["class"], c["delay_quantiles"]) for c in reports[0]["classes"]
                  if c["kind"] == "legit" and c["delay_quantiles"]]
    else:
        curves = [(r["run"].get("compare", ""), r["overall"]["legit_delay_quantiles"])
                  for r in reports if r["overall"]["legit_delay_quantiles"]]
    for name, quantiles in curves:
        ax_cdf.step([q / 60 for q in quantiles], [5 * i for i in range(len(quantiles))],
                    where="post", label=name)
    ax_cdf.set_xscale("symlog", linthresh=1)
    ax_cdf.set_xlabel("delivery delay of delayed legitimate mail (minutes)")
    ax_cdf.set_ylabel("share of delayed messages (%)")
    ax_cdf.set_ylim(0, 100)
    ax_cdf.grid(True, alpha=0.3)
    if curves:
        ax_cdf.legend(fontsize=8)
    ax_cdf.set_title("Delivery-delay CDF")
    _save(plt, fig, path)


def capacity_plot(results: list[dict], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for r in results:
        rates = [s["offered_rate"] for s in r["steps"]]
        (line,) = ax.plot(rates, [s["first_reply_ms_p99"] for s in r["steps"]], marker="o",
                          label=f"p99 {r['store']}")
        ax.plot(rates, [s["first_reply_ms_p50"] for s in r["steps"]], marker=".", linestyle="--",
                color=line.get_color(), label=f"p50 {r['store']}")
    if results:
        ax.axhline(results[0]["p99_bound_ms"], color="grey", linestyle=":", label="p99 bound")
    ax.set_xlabel("offered rate (connections per second)")
    ax.set_ylabel("time to the first reply (ms)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("First-reply latency against offered rate")
    _save(plt, fig, path)


def _save(plt, fig, path: str) -> None:
    """The picture written, or a clear error (the run's tables are out already)."""
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise SimulateError(f"--plot {path}: cannot write it: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
