"""The benchmark comparison: ratios against the baseline, gross regressions only."""

from __future__ import annotations

from benchmarks.run import compare


def test_only_a_gross_regression_fails():
    base = {"wrapper_startup": {"pass_vs_bare": 1.2}, "decisions": {"memory_per_second": 1000}}
    ok_rows, ok = compare({"wrapper_startup": {"pass_vs_bare": 2.3},
                           "decisions": {"memory_per_second": 600}}, base, 2.0)
    assert ok and all("ok" in r[-1] for r in ok_rows)
    rows, ok = compare({"wrapper_startup": {"pass_vs_bare": 2.5}}, base, 2.0)
    assert not ok and "REGRESSION" in rows[0][-1]
    rows, ok = compare({"decisions": {"memory_per_second": 400}}, base, 2.0)
    assert not ok


def test_live_capacity_is_reported_but_not_gated_in_quick_runs():
    base = {"live_capacity": {"file_max_rate_per_second": 100}}
    rows, ok = compare({"live_capacity": {"file_max_rate_per_second": 0}}, base, 2.0, quick=True)
    assert ok and "not gated" in rows[0][-1]
    _, ok = compare({"live_capacity": {"file_max_rate_per_second": 0}}, base, 2.0, quick=False)
    assert not ok


def test_new_figures_are_listed_without_failing():
    rows, ok = compare({"decisions": {"redis_per_second": 5}}, {}, 2.0)
    assert ok and rows[0][-1] == "new figure"
