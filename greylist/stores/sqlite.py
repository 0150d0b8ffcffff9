"""``sqlite:///ABS/PATH``: one database file for one MX, safe under many wrappers.

WAL mode (set once, when the database is created) lets readers run beside a
writer; each decision is one short ``BEGIN IMMEDIATE`` transaction (read,
decide, write), so simultaneous connections from one new client are
serialised and leave one entry; a busy timeout (default 2 s, ``?timeout=`` in
the URL) bounds the wait. Expiry is ``greylist expire``, which deletes an
entry only if it still holds the record the scan read.

The wrapper imports the C module ``_sqlite3`` directly: ``import sqlite3``
also loads ``datetime`` and the DB-API adapters, about 1.5 ms more at every
SMTP connection, and none of them is used here.
"""

from __future__ import annotations

try:
    import _sqlite3 as sqlite
except ImportError:  # pragma: no cover - a Python without the C module's private name
    import sqlite3 as sqlite

from time import monotonic

from greylist.core.policy import Record
from greylist.stores.base import COUNT, DISK_USAGE, SCAN, Store, StoreError, record_of, text_key

# What only a long-lived server uses (a key filter, a checkpoint thread) is imported when
# it holds its commits (and before it drops privileges: prepare_server), never by the
# wrapper, which starts once per SMTP connection
KeyFilter = Checkpointer = None

SCHEMA = """CREATE TABLE IF NOT EXISTS greylist (
    key TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    passes INTEGER NOT NULL
) WITHOUT ROWID"""


#: a server holding writes flushes at this many, before its window has passed
HELD_ROWS = 1024

#: rows a decision writes of the batch being written, after its own answer is known: a
#: flush of a thousand rows at once held every client for milliseconds. A server on this
#: package's event loop has the rows its round's decisions owe written together at the
#: round's end (write_owed), after their answers are sent: fewer statements, and SQLite's
#: code and pages still warm. The statements a batch takes no longer depend on this step,
#: only the size of each: at 8 a round of 50 decisions wrote 400 rows, 1.1 ms (p90 1.7 ms)
#: with every client waiting; at 3, 0.3 ms (p90 0.6). Per turn of 20,000 requests (50
#: clients, a connection per request), the p99 was lower at 3 in 27 turns of 41. A
#: decision makes at most two rows, so a batch is still written before the next (and a
#: batch grown while another writer held the lock is caught up with); a full batch holds
#: the write lock for 342 decisions at most.
DRAIN_STEP = 3

#: rows the end of a loop round writes at least, while a batch is being written. Each
#: statement (executemany) finds SQLite's code and the table's pages cold again on a
#: server that waits between requests, and most of a statement's cost is that: with one
#: persistent client, 8 rows a round cost 3-5% more server CPU a request than 64 (one
#: client alternating requests between the two servers, medians of 9 turns), and a
#: decision found 3.4% more cache lines cold (benchmarks/instructions.py: 3,774 against
#: 3,647). A busy server's rounds of 22 decisions or more owe more than this anyway
#: (DRAIN_STEP rows each); a quiet one's next client waits some 0.2 ms, once a batch in 16.
ROUND_ROWS = 64

#: a server holding writes never waits for another connection's write lock (a qmail
#: wrapper on the same file, an admin's sqlite3 shell): while it is taken, the rows stay
#: held (and are read back by the decisions) and the lock is tried again this much later.
#: Waiting the busy timeout instead held every client 2 s a window and, when it ran out,
#: lost the window's rows: every retry was greylisted as new for as long as the lock stayed
LOCK_RETRY = 0.05
#: how soon the write lock is tried again when the server's own checkpoint had it
CHECKPOINT_RETRY = 0.01
#: how long the checkpoint thread waits for the write lock (a batch being written): its
#: checkpoint takes the lock so that the copy ends complete (greylist.stores.checkpointer).
#: Taken only at once, a busy server's -wal file grew to 27 MB between checkpoints that
#: ended complete (50 persistent clients, 20,000 decisions a second); waited for, 15 MB
CHECKPOINT_WAIT = 0.1
#: held rows kept while the write lock stays taken; beyond them the oldest are dropped
#: (those clients wait once more), so memory stays bounded (about 300 bytes a row)
MAX_HELD = 8 * HELD_ROWS

#: the size a holding server's -wal file is cut back to when its log starts again (SQLite's
#: journal_size_limit): a burst, a long expire or an old read snapshot can make the log
#: large, and the file would otherwise keep that size for good
WAL_SIZE_LIMIT = 64 << 20

#: pages of the write-ahead log the checkpoint thread cannot copy (another connection's old
#: read transaction holds them) before the log says so: the -wal file grows until it ends
WAL_BEHIND = 25_000  # about 100 MB of 4 KiB pages

#: keys of the table a decision adds to the key filter being built (about 60 us): a
#: server starts with none, and builds one again after another connection has written
BUILD_STEP = 128
#: seconds without another writer before it is built again (doubled while others keep
#: writing before a build is done, up to MAX_QUIET)
QUIET = 1.0
MAX_QUIET = 600.0

#: rows :meth:`SqliteStore.scan` reads a query (some 250 bytes of memory each)
SCAN_PAGE = 1000

_CREATE = "INSERT OR IGNORE INTO greylist VALUES (?, ?, ?, ?)"
_REPLACE = "INSERT OR REPLACE INTO greylist VALUES (?, ?, ?, ?)"
#: a held update: written if the key still holds what was read, or is gone (greylist expire
#: deleted it meanwhile: as an UPDATE, the client's new first sighting was lost, and its
#: retry greylisted again); another writer's newer record is left as it is
_UPDATE = ("INSERT INTO greylist VALUES (?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET"
           " first_seen = excluded.first_seen, last_seen = excluded.last_seen, passes = excluded.passes"
           " WHERE first_seen = ? AND last_seen = ? AND passes = ?")


#: SQLite's primary result codes that matter here (an extended code's low byte)
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY = 5, 6, 8


def _code(exc: Exception, default: int = 0) -> int:
    return getattr(exc, "sqlite_errorcode", default) & 0xFF


def _failure(where: str, exc: Exception) -> StoreError:
    """The store's failure, in SQLite's words; a database this process may not write says
    what to mend, wherever it shows (the wrapper's write, a server's open)."""
    if _code(exc) == SQLITE_READONLY:
        return StoreError(f"{where}: {exc}: {_who_cannot_write()}")
    return StoreError(f"{where}: {exc}")


def _who_cannot_write() -> str:
    """What an admin needs to mend a database this process may not write."""
    import os
    import pwd

    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return (f"this process runs as {name} (uid {uid}), and the database file, its -wal and -shm files "
            f"and their directory must be writable by that user (chown {name})")


def _values(key: str, record: Record) -> tuple:
    """A row of the table, as _CREATE and _REPLACE take it."""
    return (text_key(key), record.first_seen, record.last_seen, record.passes)


#: what a held write expects to find at the flush (besides a Record read from the database)
_ABSENT = "absent"    # no row when read: the write creates it, unless another writer did meanwhile
_ANY = "any"          # not read, or a row that was not a record: the write replaces whatever is there


class _Transaction:
    """One decision's transaction. With commits held (a long-lived server), no database
    transaction at all: the decision's writes are kept, with what each key held when it
    was read, and written with the window's others at :meth:`SqliteStore.flush`."""

    __slots__ = ("store",)

    def __init__(self, store: "SqliteStore") -> None:
        self.store = store

    def __enter__(self) -> None:
        store = self.store
        if store.window:
            store.decision = {}
            store.read = {}
            return
        store._execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        store = self.store
        if store.window:
            writes, store.decision, store.read = store.decision, None, None
            held = store.held
            if exc_type is None:  # a failed decision leaves nothing behind
                store._hold(writes)
            if store.draining is not None:
                store._owe(DRAIN_STEP)
            elif store.pending and (len(held) >= HELD_ROWS or monotonic() - store.opened >= store.window):
                # a busy server (or the server's timer is late): the window's writes go
                # out a few rows a decision, the write lock held only until the last
                store._start_drain()
                store.opened = monotonic()  # pending still: the server's timer ends what is left
                if store.draining is not None:
                    store._owe(DRAIN_STEP)
            return
        if exc_type is not None:
            try:
                store._execute("ROLLBACK")
            except StoreError:
                pass  # the failure being raised says more
        else:
            store._execute("COMMIT")


def _own_file(path: str) -> tuple[int, int]:
    """The database file, made here if it is new (O_EXCL, O_NOFOLLOW: never through a link,
    as every file we create) and never opened through a link: SQLite follows one, and
    root's greylist migrate or expire in a directory another user may write (the postgrey
    user's /var/lib/postgrey) would create or change whatever file a link there names.
    Returns the file's (device, inode), for :func:`_same_file`."""
    import os
    import stat

    fd = None
    try:
        while fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                except FileExistsError:
                    pass  # made meanwhile (wrappers meeting a new database at once): open that one
    except OSError as exc:
        if os.path.islink(path):
            raise StoreError(f"{path} is a symbolic link: give the database's own path "
                             "(a store is never opened through a link)") from None
        raise StoreError(f"cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"cannot open {path}: not a regular file")
    return st.st_dev, st.st_ino


def _same_file(path: str, identity: tuple[int, int], db) -> None:
    """SQLite opened the file :func:`_own_file` checked, not one put in its place meanwhile."""
    import os

    try:
        st = os.stat(path)
        same = (st.st_dev, st.st_ino) == identity
    except OSError:
        same = False
    if not same:
        db.close()
        raise StoreError(f"cannot open {path}: it was replaced while it was being opened")


class SqliteStore(Store):
    capabilities = frozenset({SCAN, COUNT, DISK_USAGE})
    OPTIONS = ("timeout",)

    def __init__(self, path: str, timeout: float = 2.0, lean: bool = True) -> None:
        super().__init__()
        if not path.startswith("/"):
            raise StoreError(f"sqlite store needs an absolute path (sqlite:///var/lib/greylist.db), not {path!r}")
        self.path = path
        self.url = f"sqlite://{path}"
        self.lean = lean
        self.timeout = timeout
        identity = _own_file(path)
        try:
            self.db = sqlite.connect(path, timeout=timeout, isolation_level=None,
                                     check_same_thread=False)
            _same_file(path, identity, self.db)
            # A new database is set up when a statement first finds no table
            # (see _execute): the usual case, an existing one, pays nothing.
            # No fsync at each commit (a lost entry costs one more tempfail, not mail).
            self.db.execute("PRAGMA synchronous=NORMAL")
        except sqlite.Error as exc:
            raise _failure(f"cannot open {path}", exc) from None
        self._transaction = _Transaction(self)
        self.window = 0.0   # hold_commits: seconds a decision's writes may wait
        self.opened = 0.0   # when the first held write of the window was made
        #: held writes of the window: key -> (what it held when read, the record to write)
        self.held: dict[str, tuple[object, Record]] = {}
        self.decision: dict[str, tuple[object, Record]] | None = None  # the deciding one's writes
        self.read: dict[str, object] | None = None  # what the deciding one read from the database
        self.draining: dict[str, tuple[object, Record]] | None = None  # the batch being written
        self.todo: list[tuple[str, tuple[object, Record]]] = []  # its rows not written yet
        self.unwritten = 0  # its rows not written yet or not taken (another writer was first)
        self.in_rounds = False  # hold_commits: decisions leave their rows to write_owed
        self.owed = 0  # rows of the batch the round's decisions left to write_owed
        #: holding: every key the file may hold (a key it rules out needs no query), complete
        #: while no other connection has written since it was begun (``version``)
        self.known: KeyFilter | None = None
        self.building: KeyFilter | None = None  # the next one, a few keys a decision
        self.version: object = None  # SQLite's data_version when last looked at
        self.sized = 0  # keys in the last complete filter: the next one starts that large
        self.others_wrote = float("-inf")  # when another connection's commit was last seen
        self.quiet = QUIET  # seconds of no other writer before a filter is built again
        self.checkpointer: Checkpointer | None = None  # holding: the WAL's copying thread
        self.lock_busy_since: float | None = None  # holding: another connection kept the write lock
        self.lock_dropped = 0  # holding: held rows dropped since (MAX_HELD)
        self.retry_lock_at = 0.0  # holding: when to try for the write lock again
        self.wal_said = False  # holding: the log said the checkpoints are held back
        self.lost_said = 0  # held rows the warnings have said were not written

    def _setup(self) -> None:
        """WAL mode is kept in the file, so only a new database needs it set.

        Several wrappers may meet a new database at once; switching the journal
        mode then fails with "locked" for all but one, so wait and look again.
        Any other failure is said at once: an empty file that only root may write
        (greylist migrate from an empty store, run as root) was "locked" too, and
        each SMTP connection waited 10 s to be told so.
        """
        import time

        for attempt in range(100):
            mode = self.db.execute("PRAGMA journal_mode").fetchone()
            if mode is not None and str(mode[0]).lower() == "wal":
                return
            try:
                mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()
            except sqlite.OperationalError as exc:
                if _code(exc, SQLITE_BUSY) not in (SQLITE_BUSY, SQLITE_LOCKED):  # waiting mends nothing
                    raise _failure(self.path, exc) from None
                time.sleep(0.002 * (attempt + 1))
                continue
            if mode is None or str(mode[0]).lower() != "wal":
                raise StoreError(f"{self.path}: cannot switch to WAL mode")
            self.db.execute(SCHEMA)
            return
        raise StoreError(f"{self.path}: the database stayed locked while being set up")

    @classmethod
    def open(cls, where, lean: bool = True) -> "SqliteStore":
        timeout = 2.0
        if "timeout" in where.options:
            try:
                timeout = float(where.options["timeout"])
            except ValueError:
                timeout = -1.0
            if not 0 <= timeout <= 60:
                raise StoreError(f"{where.url}: timeout must be a number of seconds (0 to 60)")
        return cls(where.location, timeout, lean)

    @classmethod
    def missing(cls, where) -> str | None:
        import os

        return None if os.path.isfile(where.location) else "no such database file"

    @classmethod
    def in_use(cls, where) -> str | None:
        import os

        try:
            return "the database exists" if os.stat(where.location).st_size else None
        except OSError:
            return None

    @classmethod
    def scratch_url(cls, where, run: int, make_dir) -> str:
        if not where.location:
            return where.with_location(f"{make_dir()}/greylist.db")
        return where.with_location(f"{where.location}.run{run}") if run else where.url

    def _execute(self, sql: str, args: tuple = ()):
        self.count("query")
        try:
            return self.db.execute(sql, args)
        except sqlite.OperationalError as exc:
            if "no such table" not in str(exc):
                raise _failure(self.path, exc) from None
        except sqlite.Error as exc:  # a corrupt page, say: the store's failure, not ours
            raise _failure(self.path, exc) from None
        # A new database: WAL mode and the table. The journal mode cannot change
        # inside a transaction, so leave the one we are in and enter it again.
        try:
            in_transaction = self.db.in_transaction
            if in_transaction:
                self.db.execute("ROLLBACK")
            self._refuse_foreign()
            self._setup()
            self.db.execute(SCHEMA)
            if in_transaction:  # holding writes, the only one open between flushes is a read snapshot
                self.db.execute("BEGIN" if self.window else "BEGIN IMMEDIATE")
            if self.version is not None:
                # switching to WAL moved data_version as another writer's commit would: taken
                # for one, it cost a new server's key filter (every lookup a query) for a second
                self.version = self.db.execute("PRAGMA data_version").fetchone()[0]
            return self.db.execute(sql, args)
        except sqlite.Error as exc:
            raise _failure(self.path, exc) from None

    def _refuse_foreign(self) -> None:
        """A database that holds tables, none of them ours, is another program's: a path
        mistyped in a cron line or a run script. Set up as ours, it was switched to WAL
        mode and given our table, by ``greylist stats`` as much as by a server, and the
        program whose file it is may not read a WAL database (an older SQLite, a network
        file system). It is said, and left as it is."""
        names = [row[0] for row in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view', 'index', 'trigger') "
            "AND name != 'greylist' AND name NOT LIKE 'sqlite!_%' ESCAPE '!' LIMIT 4")]
        if names:
            raise StoreError(f"{self.path} is not a greylist database (it holds {', '.join(names)}); "
                             "it is left as it is")

    def transaction(self) -> _Transaction:
        return self._transaction

    def hold_commits(self, seconds: float, in_rounds: bool = False) -> None:
        """A server that decides thousands of times a second writes once per window:
        a decision's writes wait (at most ``seconds``) and are written with the window's
        others in one short transaction at :meth:`flush`. No lock is held in between,
        so other writers (the qmail front ends on the same file, ``greylist expire``)
        get in at any time; the server reads its own held writes before the database,
        and the database from one read snapshot per window (which blocks no writer).
        At the flush, a write whose key another writer changed since it was read is
        dropped (theirs is the newer news): each write is conditional on what the key
        held when read (a key deleted meanwhile, by greylist expire, is written). A
        crash, or a flush that fails, loses the writes of at most one window, which
        costs those clients one more delay. Such a server also keeps a
        filter of the file's keys (greylist.stores.keyfilter: a key never seen costs no
        query) and checkpoints on a thread of its own (greylist.stores.checkpointer).
        ``in_rounds``: the server calls :meth:`write_owed` at the end of each round of
        its event loop, and decisions leave the batch's rows to it (see DRAIN_STEP)."""
        self.in_rounds = in_rounds
        self.window = max(0.0, seconds)
        if not self.window or self.checkpointer is not None:
            return
        self.prepare_server()
        try:
            self._can_write()
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            self.db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        except sqlite.Error as exc:
            raise _failure(self.path, exc) from None
        self.checkpointer = Checkpointer(self._connect_checkpointer, sqlite.Error)

    def _can_write(self) -> None:
        """A held write that cannot be made fails only at the flush, after its client was
        told to come back: a database its server may read but not write (a file that root
        created, with greylist migrate or expire, and nobody handed to the server's user)
        greylisted every retry as new again, for as long as mail was retried, and nothing
        was logged. So a holding server writes once when it opens the store (the header's
        user_version, rolled back) and treats a database it cannot write as a store that
        failed (on_error). A write lock another connection holds says nothing either way:
        the flushes will tell."""
        if not self._begin_at_once():
            return
        db = self.db
        try:
            try:
                version = int(db.execute("PRAGMA user_version").fetchone()[0])
                db.execute(f"PRAGMA user_version={version}")
            finally:
                db.execute("ROLLBACK")
        except sqlite.Error as exc:
            raise _failure(self.path, exc) from None

    def _begin_at_once(self) -> bool:
        """BEGIN IMMEDIATE without waiting for another connection's write lock (the busy
        timeout set aside for it): False when that lock is taken."""
        db = self.db
        try:
            db.execute("PRAGMA busy_timeout=0")
            try:
                db.execute("BEGIN IMMEDIATE")
                return True
            except sqlite.OperationalError as exc:
                if _code(exc, SQLITE_BUSY) != SQLITE_BUSY:
                    raise
            finally:
                db.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        except sqlite.Error as exc:
            raise _failure(self.path, exc) from None
        return False

    @classmethod
    def prepare_server(cls) -> None:
        global KeyFilter, Checkpointer
        from greylist.stores.checkpointer import Checkpointer
        from greylist.stores.keyfilter import KeyFilter

    def _connect_checkpointer(self):
        return sqlite.connect(self.path, timeout=CHECKPOINT_WAIT, isolation_level=None, check_same_thread=False)

    def _watch_checkpointer(self) -> None:
        """After a batch's commit: is the checkpoint thread still there to copy it?"""
        checkpointer = self.checkpointer
        if checkpointer.failure is None:
            behind = checkpointer.behind
            if behind > WAL_BEHIND and not self.wal_said:
                self.wal_said = True
                self.warnings.append(f"{behind} pages of the write-ahead log cannot be copied into the database: "
                                     "another connection keeps an old read transaction open (an sqlite3 shell?), "
                                     "and the -wal file grows until it ends")
            elif behind < WAL_BEHIND // 2:
                self.wal_said = False
            return
        self.checkpointer = None  # it ended: this connection checkpoints again, as SQLite does
        self.warnings.append(f"checkpoint thread ended ({checkpointer.failure}): checkpoints "
                             "are made by the server's connection again")
        try:
            self.db.execute("PRAGMA wal_autocheckpoint=1000")
        except sqlite.Error as exc:
            raise _failure(self.path, exc) from None

    def writes_as_it_decides(self) -> bool:
        """Decisions write the held rows from the window's end on (or at HELD_ROWS): a
        batch is being written, or the window they fill began less than two windows ago."""
        return self.draining is not None or monotonic() - self.opened < 2 * self.window

    def write_owed(self) -> None:
        """The end of a server's loop round: the batch's rows its decisions owe, written
        together (and the batch committed after its last)."""
        owed, self.owed = self.owed, 0
        if owed and self.draining is not None:
            self._drain(owed if owed > ROUND_ROWS else ROUND_ROWS)

    def _owe(self, rows: int) -> None:
        if self.in_rounds:
            self.owed += rows
        else:
            self._drain(rows)

    def flush(self, wait: bool = True) -> None:
        """Write everything held now (an admin command, close; the server's timer with
        ``wait`` False: if another connection holds the write lock, the rows stay held
        and ``pending`` stays set, so the timer comes back)."""
        self.pending = False
        self.owed = 0
        if self.draining is not None:
            self._drain(len(self.todo))
        try:
            self._start_drain(wait)
        finally:
            self.pending = bool(self.held)  # the write lock was not to be had: held still
        if self.draining is not None:
            self._drain(len(self.todo))

    def _start_drain(self, wait: bool = False) -> None:
        """End the window's read snapshot and begin writing what it held: the write lock
        is taken now and kept until :meth:`_drain` has written the last row. Without
        ``wait``, a write lock another connection holds leaves the rows held (see
        LOCK_RETRY)."""
        if not wait and self.held and monotonic() < self.retry_lock_at:
            return  # taken a moment ago: the read snapshot goes on meanwhile
        if self.db.in_transaction:  # the read snapshot: the writes need the write lock
            try:
                self.db.execute("COMMIT")
            except sqlite.Error as exc:
                failure = _failure(self.path, exc)
                if self.held:
                    self._lost(len(self.held), failure)
                self.held = {}
                raise failure from None
        if not self.held:
            return
        if wait:
            self._execute("BEGIN IMMEDIATE")
        elif not self._try_write_lock():
            return
        if self.lock_busy_since is not None:
            self.warnings.append(f"the write lock was free again after {monotonic() - self.lock_busy_since:.1f} s:"
                                 f" {len(self.held)} held rows written"
                                 + (f", {self.lock_dropped} dropped" if self.lock_dropped else ""))
            self.lock_busy_since, self.lock_dropped = None, 0
        held, self.held = self.held, {}
        # the rows are made into statements as they are written (a thousand at once took
        # most of a millisecond, every client waiting)
        self.draining, self.todo, self.unwritten = held, list(held.items()), len(held)
        self._look_for_others()  # the write lock reads the newest state: did anyone else write?

    def _drain(self, rows: int) -> None:
        """Write up to ``rows`` of the rows being written; commit after the last."""
        try:
            todo = self.todo
            if rows < len(todo):
                batch = todo[-rows:]
                del todo[-rows:]
            else:
                batch, self.todo = todo, []
            creates, replaces, updates = [], [], []
            for key, (expected, record) in batch:
                if expected is _ABSENT:
                    creates.append(_values(key, record))
                elif expected is _ANY:
                    replaces.append(_values(key, record))
                else:
                    updates.append((text_key(key), record.first_seen, record.last_seen, record.passes,
                                    expected.first_seen, expected.last_seen, expected.passes))
            for sql, run in ((_CREATE, creates), (_REPLACE, replaces), (_UPDATE, updates)):
                if run:
                    self.unwritten -= self._many(sql, run)
            if not self.todo:
                self._execute("COMMIT")
                if self.unwritten:  # another writer was first: its record stays
                    self.count("superseded", self.unwritten)
                self.draining = None
                if self.checkpointer is not None:
                    self._watch_checkpointer()
        except BaseException as exc:
            if isinstance(exc, StoreError) and self.draining:  # rolled back: the whole batch
                self._lost(len(self.draining), exc)
            self.draining, self.todo, self.owed = None, [], 0
            try:
                self.db.execute("ROLLBACK")
            except sqlite.Error:
                pass
            raise

    def hand_over(self) -> dict:
        """Before a reload (SIGHUP) closes this store: what is held is written now if the
        write lock is to be had, and otherwise handed over (see :meth:`take_over`) instead of
        waited for. The close waited its busy timeout with every client, then lost them."""
        self.flush(wait=False)
        held, self.held = self.held, {}
        self.pending = False
        return held

    def take_over(self, held: dict) -> None:
        """The rows a closing store handed over, held here as this window's own: read back
        by decisions, written once the write lock is free."""
        if not held:
            return
        newer, self.held = self.held, {}
        self._hold(held)  # the oldest first, as MAX_HELD drops them
        self._hold(newer)  # decided here since: the newer
        for keys in (self.known, self.building):
            if keys is not None:
                for key in held:
                    keys.add(text_key(key))

    def _hold(self, writes: dict) -> None:
        """Writes join the window's held ones; a key written twice in a window keeps what it
        held when first read."""
        held = self.held
        for key, (expected, record) in writes.items():
            earlier = held.get(key)
            held[key] = (expected if earlier is None else earlier[0], record)
        if writes and not self.pending:
            self.pending = True
            self.opened = monotonic()

    def _lost(self, rows: int, exc: Exception) -> None:
        """Held rows that will not be written: said once each, so the log's counts add up."""
        self.lost_said += rows
        self.warnings.append(f"{rows} held rows not written: {exc}")

    def _try_write_lock(self) -> bool:
        """BEGIN IMMEDIATE without waiting for another connection's write lock. False (the
        rows stay held) when it is taken; past MAX_HELD rows the oldest are dropped."""
        now = monotonic()
        if self._begin_at_once():
            return True
        checkpointer = self.checkpointer
        ours = checkpointer is not None and checkpointer.holds_lock()
        if ours:  # our own checkpoint copying the log (milliseconds): nobody else's lock
            self.retry_lock_at = now + CHECKPOINT_RETRY
        else:
            self.retry_lock_at = now + LOCK_RETRY
            if self.lock_busy_since is None:
                self.lock_busy_since = now
                self.warnings.append("another connection holds the database's write lock: decisions are held "
                                     "(and read back) until it is free")
        held = self.held
        if len(held) > MAX_HELD:
            if self.lock_busy_since is None:  # our own checkpoint held it this long
                self.lock_busy_since = now
            dropped = len(held) - MAX_HELD
            for key in list(held)[:dropped]:  # in order of first write: the oldest
                del held[key]
            self.count("dropped", dropped)
            if not self.lock_dropped:  # said once; the total when the lock is free again
                self.warnings.append(f"the write lock has been taken for {now - self.lock_busy_since:.1f} s: "
                                     f"{dropped} held rows dropped (those clients are greylisted once more)")
            self.lock_dropped += dropped
        return False

    def _many(self, sql: str, rows: list) -> int:
        self.count("query")
        try:
            cursor = self.db.executemany(sql, rows)
        except sqlite.Error as exc:
            raise _failure(self.path, exc) from None
        return len(rows) if cursor.rowcount < 0 else cursor.rowcount

    def _look_for_others(self) -> None:
        """At the start of each read snapshot (and of each batch's write transaction): if
        another connection has committed since we last looked (SQLite's data_version
        changed), what it wrote is unknown, and the key filter can no longer rule a key
        out: it is dropped, and built again a few keys a decision once the others have
        been quiet for a while (a second; twice as long each time they came back before
        a build was complete, up to ten minutes: qmail front ends writing all the time
        on the same file would make every decision pay for builds never finished)."""
        version = self._execute("PRAGMA data_version").fetchone()[0]
        if version != self.version:
            if self.version is not None:
                self.others_wrote = monotonic()
                if self.building is not None:
                    self.quiet = min(2 * self.quiet, MAX_QUIET)
            self.version = version
            if self.known is not None:
                self.sized = max(self.sized, self.known.count)
            self.known = self.building = None
        if self.building is None and self.known is None and monotonic() - self.others_wrote >= self.quiet:
            building = self.building = KeyFilter(2 * self.sized)
            for writes in (self.held, self.draining, self.decision):  # held, so not in the file yet
                for key in writes or ():
                    building.add(text_key(key))

    def _build_step(self) -> None:
        """Scan the next ``BUILD_STEP`` keys of the table into the filter being built (in the
        snapshot just checked by :meth:`_look_for_others`); the last step completes it."""
        building = self.building
        rows = self._page("key", building.after, BUILD_STEP)
        add = building.add
        for (key,) in rows:
            add(key)
        if len(rows) < BUILD_STEP:
            self.known, self.building = building, None
            self.sized = building.count
            self.quiet = QUIET
        else:
            building.after = rows[-1][0]

    def _page(self, columns: str, after: object, limit: int) -> list:
        """``limit`` rows of ``columns`` in key order after the key ``after`` (None: from the
        first): the key filter's build and :meth:`scan` walk the table so, a page a query."""
        if after is None:
            return self._execute(f"SELECT {columns} FROM greylist ORDER BY key LIMIT ?", (limit,)).fetchall()
        return self._execute(f"SELECT {columns} FROM greylist WHERE key > ? ORDER BY key LIMIT ?",
                             (after, limit)).fetchall()

    def _row(self, key: str) -> object:
        """What the database holds for ``key``: a Record, _ABSENT, or _ANY (not a record)."""
        row = self._execute("SELECT first_seen, last_seen, passes FROM greylist WHERE key = ?",
                            (key,)).fetchone()
        if row is None:
            return _ABSENT
        record = record_of(*row)
        return _ANY if record is None else record

    def get(self, key: str) -> Record | None:
        decision = self.decision
        if decision is not None:  # holding: the deciding one's writes, the window's, then the file
            written = decision.get(key) or self.held.get(key)
            if written is not None:
                return written[1]
            draining = self.draining
            if draining is not None and key in draining:  # being written: what the file will hold
                found = self.read[key] = draining[key][1]
                return found
            if not self.db.in_transaction:
                # one read snapshot for the window, not one per statement (each costs a
                # few microseconds); it blocks no writer in WAL mode, and the flush ends it
                self._execute("BEGIN")
                self._look_for_others()
                if not self.pending:
                    self.pending = True
                    self.opened = monotonic()
            if self.building is not None and not self.read:  # once a decision
                self._build_step()
            stored = text_key(key)
            known = self.known
            if known is not None and not known.maybe(stored):
                found = self.read[key] = _ABSENT  # certainly not in the file: no query
            else:
                found = self.read[key] = self._row(stored)
        else:
            found = self._row(text_key(key))
        return found if type(found) is Record else None  # a garbage row counts as absent: replaced

    def get_or_add(self, key: str, record: Record, ttl: float | None = None) -> Record | None:
        """Inside the decision's write transaction no other writer can come between, so a
        new key (most keys at a busy MX) costs one INSERT instead of a SELECT and an INSERT.
        With writes held, the key is looked up (held writes first) and a new one held."""
        if self.decision is not None:
            existing = self.get(key)
            if existing is None:
                self.put(key, record, ttl)
            return existing
        if not self.db.in_transaction:
            return super().get_or_add(key, record, ttl)
        if self.add(key, record, ttl):
            return None
        existing = self.get(key)
        if existing is None:  # a row that is not a record: replaced, or its client waits forever
            self.put(key, record, ttl)
        return existing

    def add(self, key: str, record: Record, ttl: float | None = None) -> bool:
        if self.decision is not None:
            if self.get(key) is not None:
                return False
            self.put(key, record, ttl)
            return True
        return self._execute(_CREATE, _values(key, record)).rowcount == 1

    def put(self, key: str, record: Record, ttl: float | None = None) -> None:
        decision = self.decision
        if decision is not None:
            earlier = decision.get(key)
            if earlier is not None:
                decision[key] = (earlier[0], record)
                return
            read = self.read.get(key, _ANY)
            decision[key] = (read, record)
            if (type(read) is not Record and key not in self.held
                    and (self.draining is None or key not in self.draining)):
                # new to the file: the key filters must say so already (a key read from the
                # file is in them, or in the scan still to come; added again at every update,
                # a busy server's filter grew two bytes a write, for ever)
                stored = text_key(key)
                if self.known is not None:
                    self.known.add(stored)
                if self.building is not None:
                    self.building.add(stored)
            return
        self._execute(_REPLACE, _values(key, record))

    def delete(self, key: str, expected: Record | None = None) -> bool:
        if self.held or self.draining is not None:
            self.flush()  # an admin command on a store that holds writes: theirs first
        if expected is None:
            cursor = self._execute("DELETE FROM greylist WHERE key = ?", (text_key(key),))
        else:
            cursor = self._execute(
                "DELETE FROM greylist WHERE key = ? AND first_seen = ? AND last_seen = ? AND passes = ?",
                (text_key(key), expected.first_seen, expected.last_seen, expected.passes))
        return cursor.rowcount == 1

    def scan(self):
        """Every row, in key order, ``SCAN_PAGE`` rows a query: memory stays that of a page
        however large the table (read whole, a million rows took 269 MB in ``greylist
        expire``, the nightly clean-up of ``greylist postgrey`` included). No statement is
        left open between pages, so the caller may delete as it goes (expire), and each
        page is read where the last ended (``key > last``): rows another connection adds or
        removes meanwhile are seen or not, as they would be a moment later; none twice."""
        after = None
        while True:
            rows = self._page("key, first_seen, last_seen, passes", after, SCAN_PAGE)
            for key, first, last, passes in rows:
                record = record_of(first, last, passes)
                if record is None or not isinstance(key, str):
                    self.count("unreadable")  # skipped and counted: admin commands report it
                    continue
                yield key, record
            if len(rows) < SCAN_PAGE:
                return
            after = rows[-1][0]

    def size(self) -> int:
        return self._execute("SELECT COUNT(*) FROM greylist").fetchone()[0]

    def disk_usage(self) -> dict[str, int]:
        import os

        size = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                size += os.stat(self.path + suffix).st_blocks * 512
            except OSError:
                pass
        return {"files": 1, "directories": 0, "bytes": size}

    def close(self) -> None:
        """Admin commands close (and checkpoint) the database. The wrapper does not:
        the last connection to close checkpoints the WAL and deletes it, 0.5 ms
        at every SMTP connection; exec or exit drops the handle just as safely.
        Held writes are written first, in every case; a transaction a failure left
        open is rolled back, so the handle never keeps the write lock."""
        unwritten = len(self.held) + len(self.draining or ())
        said = self.lost_said
        try:
            self.flush()
        except StoreError as exc:  # closed because it failed: nothing more can be saved
            unsaid = unwritten - (self.lost_said - said)  # those the failing write has not said
            if unsaid > 0:  # said (a stopping server logs it): those clients wait once more
                self._lost(unsaid, exc)
        finally:  # a bug of ours too (raised on to be said): the thread and the lock let go
            self._release()

    def _release(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.stop()
            self.checkpointer = None
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        except sqlite.Error:
            pass
        if self.lean and not self.window:
            return
        # A server's store (it holds commits) is closed at every SIGHUP: its connection (a
        # page cache, three descriptors) and key filter went only with a full garbage
        # collection, the store referring to itself through its transaction. greylist
        # serve reloaded twice a second grew from 26 to 65 MB in 100 s; closed now, it stays at 26 MB.
        self.known = self.building = None
        try:
            self.db.close()
        except sqlite.Error:
            pass
