"""A holding SQLite server's WAL, copied into the database file on a thread of its own.

SQLite copies the write-ahead log into the database (a checkpoint) in the
connection that commits past 1,000 pages: about a thousand page writes and two
fsyncs, 7 ms and more, while a policy server's every client waits. A long-lived
server turns that off on its own connection and has this thread checkpoint
once a second, on a second connection: SQLite releases the interpreter's lock
while it works, so the event loop answers on meanwhile. Measured with 50
persistent clients (medians of 5 to 7 turns): p99 5.7 -> 4.3 ms. Once a second
rather than after each batch: a page that every batch changes is copied once,
and the thread takes the interpreter's lock less often (after each batch, p99
was 5.0 ms and the server's CPU a request 3 us more).

Each checkpoint is SQLite's FULL one: the log is copied with the write lock
taken, so the copy ends complete, and the server's next write starts the log
again from its beginning. A PASSIVE checkpoint runs beside the writes: what a
batch commits while it copies is left behind, and the log starts again only
when a checkpoint happens to end with nothing new after it, so the -wal file
grew with the load (50 persistent clients, 20,000 decisions a second: 52-67 MB
against 15 MB now; with a writer that never pauses, without end), and a file
keeps its largest size. The lock is waited for a moment (the server may be
writing a batch); failing that, SQLite copies what it can without it, and the
next checkpoint tries again. The server holds its rows while the checkpoint
has the lock (a few milliseconds), as it does for any other writer, and reads
them back.

Only ``_thread`` and the C module: the wrapper imports this module too, and a
server's imports must all be done before it drops privileges.
"""

from __future__ import annotations

import _thread
from time import monotonic

#: seconds between checkpoints (SQLite's own comes every 1,000 pages: at a busy server's
#: 20,000 decisions a second, about as often)
EVERY = 1.0

#: a write lock found taken this soon after a checkpoint ended was the checkpoint's
JUST_ENDED = 0.05

#: pages of log (4 KiB each) past which a checkpoint copies without the lock first
LARGE_LOG = 10_000

#: seconds a closing store waits for the thread's last copy (a few milliseconds, unless the
#: disk hangs: then the thread is left to end on its own)
STOP_WAIT = 5.0


class Checkpointer:
    """``connect()`` opens the thread's own connection (in the thread). ``failure`` says
    why the thread ended when it was not stopped: the server's connection then takes the
    checkpoints back (a log nobody copies would grow without end)."""

    def __init__(self, connect, error: type[BaseException]) -> None:
        self.wake = _thread.allocate_lock()
        self.wake.acquire()   # held: the thread waits on it EVERY seconds, or until stopped
        self.stopped = False
        self.failure: str | None = None
        self.checkpoints = 0
        #: pages of the log its last checkpoint could not copy: another connection's old read
        #: transaction (an sqlite3 shell left open) holds them, and the -wal file grows
        self.behind = 0
        self.error = error    # the store's failures (busy, I/O): the next batch tries again
        self.log: int | None = None  # pages in the log at the last checkpoint (None: not yet)
        self.copying = False  # a checkpoint holds the write lock (or is about to)
        self.ended = float("-inf")  # when the last one let it go (time.monotonic)
        self.finished = _thread.allocate_lock()
        self.finished.acquire()  # released as the thread ends
        _thread.start_new_thread(self._run, (connect,))

    def stop(self, wait: float = STOP_WAIT) -> None:
        """Stop after one last copy, and wait (at most ``wait`` seconds) for the thread to
        end: nothing of a closed store goes on running beside its caller (a fork then, of
        a process whose thread held one of SQLite's locks, left the child waiting for ever)."""
        self.stopped = True
        try:
            self.wake.release()
        except RuntimeError:
            pass  # stopped already
        if self.finished.acquire(True, wait):
            self.finished.release()

    def holds_lock(self) -> bool:
        """Was a write lock just found taken most likely this thread's (not another writer's)?"""
        return self.copying or monotonic() - self.ended < JUST_ENDED

    def _run(self, connect) -> None:
        try:
            db = connect()
            del connect  # the store it came from is not kept alive by this thread
            try:
                last = False
                while not last:
                    self.wake.acquire(True, EVERY)
                    # stopped (the store closes, a SIGHUP reopens it): one last copy of what
                    # its final flush wrote, without waiting for the lock; a server reloaded
                    # more often than EVERY never checkpointed, and its -wal file grew
                    last = self.stopped
                    try:
                        # a read first: a connection that met the database new and empty (the
                        # server sets it up at its first decision) took it for a rollback-mode
                        # file, and a checkpoint alone never looks again: every one was a no-op
                        # and the -wal file grew for as long as the server ran
                        db.execute("PRAGMA schema_version").fetchone()
                        row = None
                        if last or self.log is None or self.log > LARGE_LOG:
                            # a large log (left by an earlier run, or by a long expire) is
                            # copied without the lock first: the lock is then held only for
                            # what was committed meanwhile, not for a copy of gigabytes
                            row = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                        if not last:
                            self.copying = True
                            row = db.execute("PRAGMA wal_checkpoint(FULL)").fetchone()
                        self.log = row[1] if row else None
                        self.behind = max(0, row[1] - row[2]) if row else 0
                        self.checkpoints += 1
                    except self.error:
                        pass
                    finally:
                        if self.copying:
                            self.copying = False
                            self.ended = monotonic()
            finally:
                db.close()
        except BaseException as exc:  # noqa: BLE001 - reported through failure, never lost
            self.failure = f"{type(exc).__name__}: {exc}"
        finally:
            self.finished.release()
