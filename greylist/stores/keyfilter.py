"""Which keys a database may hold, in two bits a key: a lookup it rules out needs no query.

At a busy MX most triplets are new (most are spam that never comes back), and
a server that holds its writes (:meth:`SqliteStore.hold_commits`) would ask
SQLite twice per request for rows that are not there: the triplet and the
client's auto-whitelist tally. Measured with one persistent Postfix client,
those two queries were a quarter of the server's CPU per request. A Bloom
filter of every key in the file answers "certainly absent" for nearly all of
them from memory (a false "maybe" costs the query it would have cost anyway;
it can never say absent for a key that is there).

It is only as good as its completeness, so :class:`SqliteStore` builds it by
scanning the table 128 keys a decision, adds every key it writes new, and
throws it away whenever another connection has committed (SQLite's
``data_version``: ``greylist expire``, a qmail front end on the same file),
to build it again once the others have been quiet for a second (longer while
they keep coming back). Until a filter is complete, every lookup is a query.
"""

from __future__ import annotations

#: bits a key at a layer's capacity: with two hash positions, 1.4% of absent keys still
#: read as "maybe" in a full layer (fewer before)
BITS_PER_KEY = 16
#: the first layer, 128 KiB: 65,536 keys; each further layer is twice the one before
MIN_CAPACITY = 1 << 16
#: no layer larger than this (32 MiB, 16 million keys)
MAX_CAPACITY = 1 << 24


class KeyFilter:
    """A Bloom filter of keys (strings as the database compares them, or bytes): never a
    false "absent". It grows without a rescan: when its newest layer is full, keys go
    to a new one twice as large, and a lookup asks every layer (a few at most: layers
    double). ``count`` is how many keys were added (a key added twice counts twice)."""

    __slots__ = ("layers", "count", "room", "after")

    def __init__(self, capacity: int = MIN_CAPACITY) -> None:
        self.layers: list[tuple[bytearray, int]] = []
        self.count = 0
        self.room = 0          # keys the newest layer takes before the next one is made
        self.after: object = None   # while being built: the last key of the table scanned
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        size = MIN_CAPACITY
        while size < capacity and size < MAX_CAPACITY:
            size <<= 1
        bits = size * BITS_PER_KEY   # a power of two, below 2**32: positions are 32-bit halves
        self.layers.append((bytearray(bits // 8), bits - 1))
        self.room = size

    def add(self, key: object) -> None:
        if not self.room:
            self._grow(2 * len(self.layers[-1][0]) * 8 // BITS_PER_KEY)
        self.room -= 1
        self.count += 1
        # Python's own hash (SipHash, per process): 64 bits, two positions of 32
        h = hash(key)
        bits, mask = self.layers[-1]
        i, j = h & mask, (h >> 32) & mask
        bits[i >> 3] |= 1 << (i & 7)
        bits[j >> 3] |= 1 << (j & 7)

    def maybe(self, key: object) -> bool:
        """``key in filter``, called as a method: the ``in`` operator finds a Python
        ``__contains__`` through the type's slot, some 500 instructions more."""
        h = hash(key)
        for bits, mask in self.layers:
            i, j = h & mask, (h >> 32) & mask
            if bits[i >> 3] >> (i & 7) & 1 and bits[j >> 3] >> (j & 7) & 1:
                return True
        return False

    __contains__ = maybe
