"""The small event loop: timers fire in order, cancelled ones let go of what they hold."""

from __future__ import annotations

import gc
import socket
import weakref

from greylist.adapters.eventloop import Loop


class Session:
    def tick(self) -> None:
        pass


def test_timers_fire_in_order_and_a_reader_is_called():
    loop = Loop()
    fired = []
    loop.call_later(0.02, lambda: fired.append("second"))
    loop.call_later(0.01, lambda: fired.append("first"))
    a, b = socket.socketpair()
    loop.add_reader(a.fileno(), lambda: (fired.append(a.recv(10)), loop.stop()))
    loop.call_later(0.03, lambda: b.send(b"x"))
    loop.run_forever()
    assert fired == ["first", "second", b"x"]
    loop.remove_reader(a.fileno())
    loop.close()
    a.close()
    b.close()


def test_cancelled_timers_release_their_sessions_and_leave_the_heap():
    """A connection per request cancels an idle timer each time: neither the sessions
    nor the heap may grow with the number of connections served."""
    loop = Loop()
    refs = []
    for _ in range(5000):
        session = Session()
        refs.append(weakref.ref(session))
        loop.call_later(300, session.tick).cancel()
        del session
    gc.collect()
    assert all(ref() is None for ref in refs)
    loop.call_later(0, loop.stop)
    loop.run_forever()
    assert len(loop.timers) < 300
    loop.close()


def test_a_failing_callback_is_reported_and_the_loop_goes_on():
    """A bug met by one client's callback must not stop a server that holds thousands:
    with on_error set the loop reports it and carries on; without, it propagates."""
    loop = Loop()
    seen, fired = [], []

    def broken():
        raise ZeroDivisionError("a bug")

    loop.on_error = lambda exc, callback: seen.append((type(exc), callback))
    a, b = socket.socketpair()
    loop.add_reader(a.fileno(), broken)
    b.send(b"x")
    loop.call_later(0.01, broken)
    loop.call_later(0.03, lambda: (fired.append(1), loop.stop()))
    loop.run_forever()
    assert fired == [1] and (ZeroDivisionError, broken) in seen and len(seen) >= 2
    loop.remove_reader(a.fileno())
    loop.on_error = None
    loop.call_later(0, broken)
    try:
        loop.run_forever()
    except ZeroDivisionError:
        pass
    else:
        raise AssertionError("without on_error the exception must propagate")
    loop.close()
    a.close()
    b.close()


def test_work_left_to_the_round_end_is_done_once_a_round_before_the_loop_waits():
    """A server's decisions leave their store rows to the end of the loop round: the
    hook runs once per round, after the round's readers and timers, and a bug in it is
    reported as a callback's is."""
    loop = Loop()
    order, seen = [], []
    a, b = socket.socketpair()
    loop.add_reader(a.fileno(), lambda: order.append(("read", a.recv(10))))

    def round_end():
        order.append("end")
        if len(order) == 1:
            raise ZeroDivisionError("a bug")

    loop.at_round_end.append(round_end)
    loop.on_error = lambda exc, callback: seen.append(type(exc))
    b.send(b"x")
    loop.call_later(0.05, loop.stop)
    loop.run_forever()
    assert order[:3] == ["end", ("read", b"x"), "end"] and seen == [ZeroDivisionError]
    assert order.count(("read", b"x")) == 1 and order.count("end") <= 4  # not a busy loop
    loop.remove_reader(a.fileno())
    loop.close()
    a.close()
    b.close()


def test_a_reader_forgotten_as_its_socket_closes_leaves_nothing_watched():
    """forget_reader (a session closing its own socket) saves epoll_ctl: closing the
    descriptor takes it out of epoll. The number, reused by the next connection, is
    watched again with its new reader; nothing is reported for the closed one."""
    loop = Loop()
    a, b = socket.socketpair()
    fd = a.fileno()
    loop.add_reader(fd, lambda: seen.append("old"))
    loop.forget_reader(fd)
    a.close()
    c, d = socket.socketpair()
    assert c.fileno() == fd  # the lowest free number: the closed one's
    seen: list[str] = []
    loop.add_reader(fd, lambda: (seen.append(c.recv(10)), loop.stop()))  # no "already watched"
    b.close()  # the old socket's peer goes: nothing to report for a closed descriptor
    d.send(b"new")
    loop.run_forever()
    assert seen == [b"new"]
    loop.close()
    for sock in (c, d):
        sock.close()


def test_without_epoll_a_forgotten_reader_is_unregistered(monkeypatch):
    """poll(2) keeps a closed descriptor and reports it (POLLNVAL) at every wait: a loop
    that only forgot it would spin. Where there is no epoll, forget_reader unregisters."""
    import select

    monkeypatch.delattr(select, "epoll")
    loop = Loop()
    assert not loop.forgets_closed
    a, b = socket.socketpair()
    fd = a.fileno()
    loop.add_reader(fd, lambda: None)
    loop.forget_reader(fd)
    a.close()
    assert [event for event in loop.poller.poll(0) if event[0] == fd] == []
    loop.close()
    b.close()
