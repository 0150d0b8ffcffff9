from __future__ import annotations

from hypothesis import given, strategies as st

from simulator.engine import Environment


def test_events_run_in_time_order_and_set_the_clock():
    env = Environment(start=100.0)
    seen = []
    env.schedule(130.0, lambda: seen.append(("b", env.now)))
    env.schedule(110.0, lambda: seen.append(("a", env.now)))
    env.timeout(50.0, lambda: seen.append(("c", env.now)))
    env.run()
    assert seen == [("a", 110.0), ("b", 130.0), ("c", 150.0)]


def test_ties_keep_scheduling_order_and_until_stops():
    env = Environment()
    seen = []
    for name in "xyz":
        env.schedule(5.0, seen.append, name)
    env.schedule(20.0, seen.append, "late")
    env.run(until=10.0)
    assert seen == ["x", "y", "z"] and env.now == 10.0 and len(env) == 1
    env.run()
    assert seen[-1] == "late" and env.now == 20.0


def test_events_can_schedule_events_and_never_go_back_in_time():
    env = Environment()
    seen = []

    def tick(n):
        seen.append(env.now)
        if n:
            env.schedule(env.now - 5, tick, n - 1)  # in the past: runs now instead
    env.schedule(1.0, tick, 3)
    env.run()
    assert seen == [1.0, 1.0, 1.0, 1.0]


@given(st.lists(st.floats(min_value=0, max_value=1e6), max_size=50))
def test_any_schedule_is_processed_sorted(times):
    env = Environment()
    seen = []
    for t in times:
        env.schedule(t, lambda: seen.append(env.now))
    env.run()
    assert seen == sorted(times)
