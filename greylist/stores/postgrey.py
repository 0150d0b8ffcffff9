"""``postgrey:///var/lib/postgrey``: postgrey's database, read for ``greylist migrate``.

postgrey keeps two Berkeley DB files: ``postgrey.db`` (``NET/SENDER/RECIPIENT``
-> ``FIRST,LAST``) and ``postgrey_clients.db`` (client address -> ``COUNT,LAST``,
its auto-whitelist). They are read with Debian's ``db_dump`` (package
db-util), which reads every Berkeley DB version postgrey wrote, rather than
through Python bindings that must be compiled against the same libdb.

Each triplet becomes our key (``NET/BITS|sender|recipient`` as postgrey looks
up by subnet, or ``IP|sender|recipient`` with ``?lookup=host``); a triplet
whose last attempt came at least the delay after its first (``?delay=``,
postgrey's 300 s by default) had passed, and is known to us; the others are
pending. Each client's count becomes its auto-whitelist tally. A database
written with ``--privacy`` holds SHA-1 hashes: its auto-whitelisted clients
carry over (the hash of an address is our ``--privacy`` key as well), its
triplets cannot (they hash postgrey's own key text): they are counted as
unreadable and a warning says why. The store is read-only: migrate from it.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import tempfile

from greylist.core.check import AWL_PREFIX
from greylist.core.keys import BadAddress, normalize_recipient, normalize_sender, parse_ip
from greylist.core.policy import Record
from greylist.stores.base import SCAN, Store, StoreError

#: db_dump silent this long (a lock in postgrey's environment it waits for) is given up on
DUMP_TIMEOUT = 600.0


def unescape(line: str) -> bytes:
    """A db_dump -p data line (a leading space, ``\\\\`` and ``\\xx`` escapes) as bytes."""
    # nearly every line: printable text, nothing escaped (undone a character at a time, every
    # line, it was half of a million triplets' migration: 20 s, then 10.5)
    if "\\" not in line:
        return line[1:].encode("latin-1", "replace")
    text, out, i = line[1:], bytearray(), 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] == "\\":
            out.append(0x5C)
            i += 2
        elif c == "\\" and i + 2 < len(text):
            out.append(int(text[i + 1:i + 3], 16))
            i += 3
        else:
            out.extend(c.encode("latin-1", "replace"))
            i += 1
    return bytes(out)


def dump_lines(argv: list[str], path: str):
    """The lines db_dump writes, as it writes them: a million entries held whole (its output
    and the pairs) took 509 MB in ``greylist migrate``. Its errors go to a file, never a
    pipe nobody reads while it writes; one that writes nothing for DUMP_TIMEOUT seconds is
    stopped, and so is one whose reader stops early. A failure after some lines raises after
    them: what was read has been yielded (a migration that stops there copied those)."""
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from None
        try:
            fd, rest = proc.stdout.fileno(), b""
            while True:
                if not select.select([fd], [], [], DUMP_TIMEOUT)[0]:
                    raise StoreError(f"cannot read {path}: db_dump wrote nothing for {DUMP_TIMEOUT:.0f} s")
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    yield line.decode("latin-1")  # -p writes ASCII; any other byte kept as it is
            if rest:
                yield rest.decode("latin-1")
            if proc.wait() != 0:
                errors.seek(0)
                said = errors.read(4096).decode("utf-8", "replace").strip()
                raise StoreError(f"cannot read {path}: {said[:200] or f'db_dump exited {proc.returncode}'}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def dump_pairs(path: str):
    """(key, value) byte pairs of a Berkeley DB file, read by db_dump -p inside postgrey's
    environment (``-h DIR``): recent changes may still be in its log, not yet in the file."""
    tool = shutil.which("db_dump") or shutil.which("db5.3_dump")
    if tool is None:
        raise StoreError("reading postgrey's database needs db_dump (apt-get install db-util)")
    directory, name = os.path.split(path)
    inside, key = False, None
    for line in dump_lines([tool, "-h", directory, "-p", name], path):
        if line == "HEADER=END":
            inside = True
        elif line == "DATA=END":
            inside = False
        elif inside and line.startswith(" "):
            if key is None:
                key = unescape(line)
            else:
                yield key, unescape(line)
                key = None


class PostgreyStore(Store):
    capabilities = frozenset({SCAN})
    OPTIONS = ("delay", "ipv4cidr", "ipv6cidr", "lookup")

    def __init__(self, directory: str, delay: float = 300.0, v4_bits: int = 24, v6_bits: int = 64,
                 by_host: bool = False) -> None:
        super().__init__()
        if not directory.startswith("/"):
            raise StoreError(f"postgrey store needs an absolute directory, not {directory!r}")
        self.directory = directory.rstrip("/") or "/"
        self.url = f"postgrey://{self.directory}"
        self.delay, self.v4_bits, self.v6_bits, self.by_host = delay, v4_bits, v6_bits, by_host

    @classmethod
    def open(cls, where, lean: bool = True) -> "PostgreyStore":
        o = where.options
        try:
            return cls(where.location, float(o.get("delay", 300)), int(o.get("ipv4cidr", 24)),
                       int(o.get("ipv6cidr", 64)), o.get("lookup", "subnet") == "host")
        except ValueError:
            raise StoreError(f"{where.url}: delay, ipv4cidr and ipv6cidr are numbers") from None

    @classmethod
    def missing(cls, where) -> str | None:
        return None if os.path.isfile(f"{where.location}/postgrey.db") else "no postgrey.db there"

    def _read_only(self, *args, **kwargs):
        raise StoreError(f"{self.url} is read-only: migrate from it to a store of ours")

    get = add = put = delete = _read_only

    def scan(self):
        hashed = 0
        for raw_key, raw_value in dump_pairs(f"{self.directory}/postgrey.db"):
            entry = self._triplet(raw_key.decode("utf-8", "surrogateescape"), raw_value)
            if entry is None:
                self.count("unreadable")
                hashed += _is_hash(raw_key.decode("ascii", "replace"))
            else:
                yield entry
        if hashed:
            self.warnings.append(f"{hashed} triplets are postgrey --privacy hashes and cannot be carried over: "
                                 "those clients are greylisted once more (auto-whitelisted clients do carry over "
                                 "to a store used with --privacy)")
        clients = f"{self.directory}/postgrey_clients.db"
        if os.path.isfile(clients):
            for raw_key, raw_value in dump_pairs(clients):
                entry = self._client(raw_key.decode("utf-8", "surrogateescape"), raw_value)
                if entry is None:
                    self.count("unreadable")
                else:
                    yield entry

    def _triplet(self, key: str, value: bytes):
        net, sep, rest = key.partition("/")
        sender, sep2, recipient = rest.rpartition("/")
        times = _numbers(value, 2)
        if not sep or not sep2 or times is None:
            return None
        try:
            address = parse_ip(net)
        except BadAddress:
            return None  # --privacy: a hash, not an address
        client = address if self.by_host else f"{address}/{self.v6_bits if ':' in address else self.v4_bits}"
        first, last = times
        passed = last - first >= self.delay
        record = Record(first, last, 1) if passed else Record(first, first, 0)
        return f"{client}|{normalize_sender(sender)}|{normalize_recipient(recipient)}", record

    def _client(self, key: str, value: bytes):
        numbers = _numbers(value, 2)
        try:
            address = parse_ip(key)
        except BadAddress:
            if not _is_hash(key):
                return None
            address = key  # --privacy: sha1_hex of the address, which is our --privacy key too
        if numbers is None or numbers[0] < 0:
            return None
        count, last = numbers
        return AWL_PREFIX + address, Record(last, last, int(count))


def _is_hash(key: str) -> bool:
    """postgrey --privacy's keys: SHA-1 in hex."""
    return len(key) == 40 and all(c in "0123456789abcdef" for c in key)


def _numbers(value: bytes, count: int) -> tuple[float, ...] | None:
    parts = value.split(b",")[:count]
    try:
        numbers = tuple(float(p) for p in parts)
    except ValueError:
        return None
    return numbers if len(numbers) == count else None
