"""A tiny discrete-event loop on a virtual clock, shaped like SimPy's Environment.

Time is a float of seconds that only :meth:`Environment.run` advances, by
jumping to the next scheduled event: a simulated week takes as long as its
events take to process, never a real sleep. Events at the same time run in
the order they were scheduled (a sequence number breaks ties), so a run is
deterministic.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable


class Environment:
    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self._queue: list[tuple[float, int, Callable[..., Any], tuple]] = []
        self._seq = 0

    def schedule(self, at: float, action: Callable[..., Any], *args: Any) -> None:
        """Run ``action(*args)`` at virtual time ``at`` (never in the past)."""
        if at < self.now:
            at = self.now
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, action, args))

    def reserve(self, count: int) -> int:
        """The first of ``count`` sequence numbers for events scheduled later, one at a time
        (:meth:`schedule_reserved`), that run among same-time events as if all were
        scheduled now: a replayed log keeps one of its million lines in the queue, not all."""
        first = self._seq + 1
        self._seq += count
        return first

    def schedule_reserved(self, at: float, seq: int, action: Callable[..., Any], *args: Any) -> None:
        """As :meth:`schedule`, with a sequence number from :meth:`reserve`."""
        heapq.heappush(self._queue, (max(at, self.now), seq, action, args))

    def timeout(self, delay: float, action: Callable[..., Any], *args: Any) -> None:
        """Run ``action(*args)`` ``delay`` seconds from now."""
        self.schedule(self.now + delay, action, *args)

    def clock(self) -> float:
        """The virtual time: the clock the greylisting service is given in a simulation."""
        return self.now

    def run(self, until: float | None = None) -> None:
        """Process events in time order up to and including ``until`` (or until none are left)."""
        queue = self._queue
        pop = heapq.heappop
        limit = float("inf") if until is None else until
        while queue and queue[0][0] <= limit:
            at, _seq, action, args = pop(queue)
            self.now = at
            action(*args)
        if until is not None and until > self.now:
            self.now = until

    def __len__(self) -> int:
        return len(self._queue)
