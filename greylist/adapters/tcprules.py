"""tcprules' compiled rules (``tcpserver -x FILE.cdb``), looked up as tcpserver does.

A rule's cdb record holds, for a deny rule, ``D\\0``, and for each variable
``+NAME=VALUE\\0`` (ucspi-tcp's tcprules.c; an allow rule without variables is
empty). tcpserver tries these keys in turn and follows the first that exists
(tcprules(1), ucspi-tcp's rules.c):

1. ``INFO@IP`` and 2. ``INFO@=HOST`` when $TCPREMOTEINFO is set (HOST when known);
3. ``IP``; 4. ``=HOST``; 5. shorter and shorter prefixes of IP ending with a
dot (or, for IPv6, a colon); 6. shorter and shorter suffixes of HOST starting
with a dot, preceded by ``=``; 7. ``=`` when HOST is known; 8. the empty key.

The cdb reader is our own: the format is 2,048 bytes of table pointers and
open-addressed hash tables (D. J. Bernstein's cdb), about forty lines, and a
file is read whole once per change (``Rules.lookup`` stats it per connection,
so a new ``tcprules`` run takes effect at the next connection, as with
tcpserver, without re-reading an unchanged file).
"""

from __future__ import annotations

import os
import struct

#: A rules file larger than this is read per lookup from disk instead of kept in memory.
MAX_CACHED = 64 * 1024 * 1024

_PAIR = struct.Struct("<II")


class RulesError(OSError):
    """The rules file exists but cannot be read (tcpserver drops the connection then)."""


def cdb_hash(key: bytes) -> int:
    h = 5381
    for c in key:
        h = ((h << 5) + h) & 0xFFFFFFFF ^ c
    return h


class Cdb:
    """A constant database held in memory: ``get(key) -> bytes | None``."""

    def __init__(self, data: bytes, source: str = "cdb") -> None:
        if len(data) < 2048:
            raise RulesError(f"{source}: not a cdb file (shorter than its 2048-byte header)")
        self.data = data
        self.source = source

    def get(self, key: bytes) -> bytes | None:
        data = self.data
        h = cdb_hash(key)
        table, slots = _PAIR.unpack_from(data, (h & 255) * 8)
        if not slots:
            return None
        slot = (h >> 8) % slots
        try:
            for _ in range(slots):
                slot_hash, pos = _PAIR.unpack_from(data, table + slot * 8)
                if not pos:
                    return None
                if slot_hash == h:
                    klen, dlen = _PAIR.unpack_from(data, pos)
                    if data[pos + 8:pos + 8 + klen] == key:
                        end = pos + 8 + klen + dlen
                        if end > len(data):
                            break
                        return data[pos + 8 + klen:end]
                slot = (slot + 1) % slots
        except struct.error:
            pass
        raise RulesError(f"{self.source}: corrupt cdb file")


class Rule:
    """What a rule says: deny or allow, and the variables it sets (in file order)."""

    __slots__ = ("key", "deny", "env")

    def __init__(self, key: str | None, deny: bool, env: dict[str, str]) -> None:
        self.key = key  # the address that matched, None when no rule matched
        self.deny = deny
        self.env = env

    @classmethod
    def parse(cls, key: str | None, data: bytes) -> "Rule":
        deny, env = False, {}
        for item in data.split(b"\0"):
            if item == b"D":
                deny = True
            elif item.startswith(b"+") and b"=" in item:
                name, _, value = item[1:].partition(b"=")
                env[name.decode("latin-1")] = value.decode("latin-1")
        return cls(key, deny, env)


NO_RULE = Rule(None, False, {})


def candidates(ip: str, host: str | None = None, info: str | None = None):
    """The keys tcpserver tries, in its order."""
    if info:
        yield f"{info}@{ip}"
        if host:
            yield f"{info}@={host}"
    yield ip
    if host:
        yield f"={host}"
    for end in range(len(ip) - 1, 0, -1):
        if ip[end - 1] == "." or (ip[end - 1] == ":" and end > 1):
            yield ip[:end]
    if host:
        for i, c in enumerate(host):
            if c == ".":
                yield f"={host[i:]}"
        yield "="
    yield ""


class Rules:
    """``-x FILE.cdb``: read when it changes, looked up per connection.

    ``missing_ok`` is tcpserver's ``-X``: without it a missing file drops
    every connection (tcpserver's behaviour, so a typo in the run script
    cannot open the server to everybody).
    """

    def __init__(self, path: str, missing_ok: bool = False) -> None:
        self.path = path
        self.missing_ok = missing_ok
        self._stamp: tuple | None = None
        self._cdb: Cdb | None = None

    def _current(self) -> Cdb | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self.missing_ok:
                return None
            raise RulesError(f"unable to read {self.path}: file does not exist") from None
        except OSError as exc:
            raise RulesError(f"unable to read {self.path}: {exc.strerror}") from None
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp or self._cdb is None:
            if st.st_size > MAX_CACHED:
                raise RulesError(f"{self.path}: {st.st_size} bytes is more than the "
                                 f"{MAX_CACHED} this server reads")
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
                try:
                    data = os.read(fd, st.st_size + 1)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise RulesError(f"unable to read {self.path}: {exc.strerror}") from None
            self._cdb = Cdb(data, self.path)
            self._stamp = stamp
        return self._cdb

    def lookup(self, ip: str, host: str | None = None, info: str | None = None) -> Rule:
        """The first matching rule (allow with no variables when none matches). Raises RulesError."""
        cdb = self._current()
        if cdb is None:
            return NO_RULE
        for key in candidates(ip, host, info):
            data = cdb.get(key.encode("latin-1", "replace"))
            if data is not None:
                return Rule.parse(key, data)
        return NO_RULE
