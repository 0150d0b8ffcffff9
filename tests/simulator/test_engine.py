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


def test_reserved_events_scheduled_one_at_a_time_run_as_if_all_were_scheduled_at_once():
    """A replayed log keeps one of its lines in the queue at a time; at a tie with an event
    scheduled meanwhile (a retry at the same second as a logged line), the logged line still
    runs first, as when every line was scheduled at the start."""
    times = [10.0, 20.0, 20.0, 30.0]

    def run(lazily: bool) -> list:
        env = Environment()
        ran = []

        def logged(i: int) -> None:
            ran.append(("log", i, env.now))
            if lazily and i + 1 < len(times):
                env.schedule_reserved(times[i + 1], first + i + 1, logged, i + 1)
            if i == 0:
                env.schedule(20.0, lambda: ran.append(("retry", env.now)))

        if lazily:
            first = env.reserve(len(times))
            env.schedule_reserved(times[0], first, logged, 0)
        else:
            for i, t in enumerate(times):
                env.schedule(t, logged, i)
        env.run()
        return ran

    assert run(lazily=True) == run(lazily=False)
    assert run(lazily=True)[1:4] == [("log", 1, 20.0), ("log", 2, 20.0), ("retry", 20.0)]
