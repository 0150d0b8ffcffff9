"""postgrey's nightly clean-up, for ``greylist postgrey``: stale entries removed without a cron job.

postgrey removes stale entries itself, once a day between 02:00 and 07:00
local time (checked hourly, at least 23 hours apart, the first night after it
starts). A site that swaps it for ``greylist postgrey`` has no cron job for
``greylist expire`` and must not find its database growing for ever. So the
server runs ``greylist expire`` (the cron job's own code, safe beside a busy
server: an entry is deleted only if it still holds what the scan read) as a
child process in that window: its own store connection and its own
interpreter, so no request waits for the scan (a thread would share the
interpreter's lock with every request). Stores that expire entries
themselves (Redis's TTLs) or live in the server's memory need none of this.
"""

from __future__ import annotations

import json
import sys
import time

#: postgrey looks once an hour, cleans between 02:00 and 07:00, at least 23 h apart
CHECK_EVERY = 3600.0
MIN_GAP = 82800.0
FIRST_HOUR, LAST_HOUR = 2, 6
POLL = 1.0  # seconds between looks at a running child


def needs_expiry(store_url: str) -> bool:
    """Stores whose stale entries stay until someone removes them."""
    return store_url.split("://", 1)[0] in ("sqlite", "file")


class NightlyExpiry:
    """Runs ``greylist expire`` on the server's store in postgrey's window, and logs what it did.

    ``log(fields)`` is the server's log; ``clock`` and ``hour`` are injected (a test's night
    need not wait for 02:00)."""

    def __init__(self, loop, config, log, clock=time.time,
                 hour=lambda t: time.localtime(t).tm_hour, check_every: float = CHECK_EVERY) -> None:
        self.loop = loop
        self.config = config
        self.log = log
        self.clock = clock
        self.hour = hour
        self.check_every = check_every
        self.last = 0.0  # as postgrey: the first night after the start
        self.child = None
        self.timer = None

    def start(self) -> None:
        self.timer = self.loop.call_later(self.check_every, self.check)

    def check(self) -> None:
        self.timer = self.loop.call_later(self.check_every, self.check)
        now = self.clock()
        if self.child is None and FIRST_HOUR <= self.hour(now) <= LAST_HOUR and now - self.last >= MIN_GAP:
            self.last = now
            self.spawn()

    def spawn(self) -> None:
        import subprocess

        policy = self.config.policy
        argv = [sys.executable, "-m", "greylist.admin", "expire", "--store", self.config.store,
                "--retry-window", f"{policy.retry_window:.0f}", "--max-age", f"{policy.max_age:.0f}", "--json"]
        try:
            self.child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, close_fds=True)
        except OSError as exc:
            self.log({"expire": "failed", "error": f"cannot start greylist expire: {exc.strerror}"})
            return
        self.log({"expire": "started", "store": self.config.store, "pid": self.child.pid})
        self.loop.call_later(POLL, self.poll)

    def poll(self) -> None:
        child = self.child
        if child is None:
            return
        if child.poll() is None:
            self.loop.call_later(POLL, self.poll)
            return
        self.child = None
        out, err = child.stdout.read(), child.stderr.read()
        child.stdout.close()
        child.stderr.close()
        try:
            counts = json.loads(out)
        except ValueError:
            counts = None
        if child.returncode != 0 or not isinstance(counts, dict):
            why = err.decode("utf-8", "replace").strip().splitlines()
            self.log({"expire": "failed", "exit": child.returncode, "error": (why or ["no output"])[-1][:300]})
            return
        self.log({"expire": "done", **{k: v for k, v in counts.items() if type(v) is int}})

    def close(self) -> None:
        """A server stopping stops a clean-up under way (each removal is its own transaction:
        nothing is left half done); the next night does the rest."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        child, self.child = self.child, None
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=5)
            except Exception:  # noqa: BLE001 - TimeoutExpired: it goes with the server's group
                child.kill()
        if child is not None:
            child.stdout.close()
            child.stderr.close()
