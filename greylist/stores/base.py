"""The one storage interface every store implements.

A store maps a key (a client address, a network, or a triplet of client,
sender and recipient: see :class:`~greylist.core.keys.Keying`; auto-whitelist
tallies are keys too) to a :class:`~greylist.core.policy.Record`. Stores make
no decisions; they keep records and count their own operations so that the
simulator and benchmarks can report filesystem or database load without a
second implementation. What a store can do beyond the five basic operations
it declares in :attr:`Store.capabilities`, so callers ask instead of probing.
"""

from __future__ import annotations

from greylist.core.policy import Record


class _NoTransaction:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_TRANSACTION = _NoTransaction()


def text_key(key: str) -> str:
    """A key that any text column or protocol takes: keys built from the environment
    may carry undecodable bytes (as surrogates, from os.environ); they are written as
    backslash escapes, the same for the same bytes, so the key is stable."""
    if key.isascii():
        return key
    try:
        key.encode("utf-8")
        return key
    except UnicodeEncodeError:
        return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def record_of(first: object, last: object, passes: object) -> Record | None:
    """A record from stored values, or None when they are not numbers (a garbage row)."""
    if (type(first) not in (int, float) or type(last) not in (int, float) or type(passes) is not int):
        return None
    return Record(float(first), float(last), passes)


class StoreError(Exception):
    """The store cannot be read or written (permissions, full disk, server down)."""


#: Capabilities a store may declare.
SCAN = "scan"              # scan(): every (key, record), for expire, stats and migrate
COUNT = "count"            # size() is cheap (no full scan): the simulator samples it hourly
DISK_USAGE = "disk_usage"  # disk_usage(): files, directories and bytes on disk
TTL = "ttl"                # the store expires entries itself (the ttl argument is used)
PATHS = "paths"            # path_of(key): where an entry lives, for `greylist show`
TEMP_FILES = "temp_files"  # stale_temp_files(): leftovers of killed writers, for expire
SHARED = "shared"          # a server other hosts may use: a simulation cleans up after itself


class Store:
    """Interface and shared bookkeeping. Subclasses implement the five methods.

    ``ops`` counts low-level operations by name (``stat``, ``mkdir``, ``create``,
    ``write``, ``rename``, ``utime``, ``unlink``, ``read`` for the file tree).
    """

    url = ""
    capabilities: frozenset = frozenset({SCAN})
    #: ``?name=value`` options the store's URL accepts
    OPTIONS: tuple = ()

    @classmethod
    def open(cls, where, lean: bool = True) -> "Store":
        """The store at a parsed URL (:class:`~greylist.stores.StoreURL`)."""
        raise NotImplementedError

    @classmethod
    def scratch_url(cls, where, run: int, make_dir) -> str:
        """The URL of an empty store for simulation run ``run``.

        The default is the URL itself (a memory store is new at every open, a
        shared server is checked empty and cleaned after each run); stores
        that live in files put each run in its own place, and ``make_dir()``
        gives scratch space when the URL names none.
        """
        return where.url

    @classmethod
    def missing(cls, where) -> str | None:
        """Why there is no store at the URL yet, or None (a server store is always there)."""
        return None

    @classmethod
    def in_use(cls, where) -> str | None:
        """Why the place a URL names holds data already (a simulation must not mix
        with real entries), or None. The default opens it and counts entries."""
        store = cls.open(where, lean=False)
        try:
            return "it already holds greylist entries" if store.size() else None
        finally:
            store.close()

    def disk_usage(self) -> dict[str, int]:
        """Files, directories and bytes on disk (stores declaring DISK_USAGE)."""
        raise NotImplementedError

    def path_of(self, key: str) -> tuple[str, str]:
        """(directory, file) of an entry (stores declaring PATHS)."""
        raise NotImplementedError

    def stale_temp_files(self, older_than: float):
        """Paths of temporary files older than ``older_than`` (stores declaring TEMP_FILES)."""
        return iter(())

    def __init__(self) -> None:
        self.ops: dict[str, int] = {}
        #: things the store found and handled that an admin should hear of (a corrupt
        #: entry replaced, say); the service moves them into the connection's log line
        self.warnings: list[str] = []

    def count(self, op: str, n: int = 1) -> None:
        ops = self.ops
        ops[op] = ops.get(op, 0) + n

    def get(self, key: str) -> Record | None:
        """The record for key, or None."""
        raise NotImplementedError

    def add(self, key: str, record: Record, ttl: float | None = None) -> bool:
        """Create the record only if the key is absent; False if it already existed.

        ``ttl``: seconds until the record goes stale, for stores that expire
        entries themselves (Redis); the others leave that to ``greylist expire``.
        """
        raise NotImplementedError

    def get_or_add(self, key: str, record: Record, ttl: float | None = None) -> Record | None:
        """The existing record, or None after creating ``record`` (race-safe).

        Exactly one of several simultaneous callers for one absent key gets
        None; the others get the record it created. An entry that exists but
        cannot be read as a record is replaced (else its client would wait
        forever). Stores that can do this in one operation override it.
        """
        existing = self.get(key)
        if existing is not None:
            return existing
        if self.add(key, record, ttl):
            return None
        existing = self.get(key)  # created by a simultaneous connection, or unreadable
        if existing is None:
            self.put(key, record, ttl)
        return existing

    def put(self, key: str, record: Record, ttl: float | None = None) -> None:
        """Create or overwrite the record (atomically: readers see old or new)."""
        raise NotImplementedError

    def transaction(self):
        """Context for one decision's read and write; a database store makes it one transaction."""
        return _NO_TRANSACTION

    def delete(self, key: str, expected: Record | None = None) -> bool:
        """Remove the key; with ``expected``, only if it still holds that record."""
        raise NotImplementedError

    def scan(self):
        """Iterate over (key, record) pairs. Entries that cannot be read are skipped."""
        raise NotImplementedError

    def size(self) -> int:
        """How many entries there are. The default counts a full scan; stores that can count cheaply override it."""
        return sum(1 for _ in self.scan())

    #: decisions written but not yet committed (a store holding commits, see hold_commits)
    pending = False
    #: rows the loop round's decisions left to :meth:`write_owed` (none: nothing to call)
    owed = 0

    def hold_commits(self, seconds: float, in_rounds: bool = False) -> None:
        """Let a long-lived server commit many decisions at once, at most ``seconds`` after
        the first: it then calls :meth:`flush` within that time (and, ``in_rounds``,
        :meth:`write_owed` at the end of each round of its event loop). Stores that make
        every write durable at once (memory, files, Redis) have nothing to hold."""

    def write_owed(self) -> None:
        """A server's loop round is over: write what its decisions left to it (see
        hold_commits); stores that hold nothing have nothing to write."""

    @classmethod
    def prepare_server(cls) -> None:
        """Import now what a long-lived server of this store will use (it may drop its
        privileges next, after which it may no longer read its own installation)."""

    def writes_as_it_decides(self) -> bool:
        """Whether the decisions being made write what is held, a few rows each, so that
        a timer need not write it all at once (True only while they keep up)."""
        return False

    def flush(self, wait: bool = True) -> None:
        """Commit what :meth:`hold_commits` held back (``wait``: for other writers, if any
        must be waited for; without it, what cannot be written now stays held and
        ``pending``)."""

    def hand_over(self) -> dict:
        """Before a reload closes this store: what it holds and cannot write now (another
        writer's lock), for the next store of the same URL to :meth:`take_over`; stores
        that hold nothing hand over nothing."""
        return {}

    def take_over(self, held: dict) -> None:
        """Hold what the closed store handed over, as if decided here."""

    def close(self) -> None:
        """Release connections or handles; the default has none."""

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
