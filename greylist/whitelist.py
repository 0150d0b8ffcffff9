"""Whitelists: client networks, host name patterns, and recipients who opt out.

A client whitelist file holds one entry a line (``#`` starts a comment):

- an address or CIDR network, IPv4 or IPv6: ``64.233.160.0/19``, ``2001:4860:4000::/36``;
- a host name, matched against the client's verified name (TCPREMOTEHOST from
  tcpserver, ``client_name`` from Postfix): ``google.com`` matches that name and
  every name below it;
- a regular expression between slashes, as postgrey allows: ``/^mail\\d+\\.example\\.org$/``,
  case ignored as postgrey ignores it, matched with RE2 (google-re2), whose time
  is linear in the name's length: no pattern can make a connection wait (Perl's
  backreferences and lookarounds, which need backtracking, are refused with a
  warning for that line);
- a partial address, as postgrey and tcprules write it: ``66.94.237.`` or
  ``195.235.39`` is that /24, ``10.`` that /8, ``198.51`` that /16 (postgrey reads
  the last as 198.51.0.0/24, and one ending in a dot as a name that never matches).

Several files may be given (``--whitelist`` repeated, or ``GREYLIST_WHITELIST``
with paths separated by ``:``); all count. Files are read only if they are
regular files of at most 16 MiB (``/dev/zero`` is refused, never read). A line
that cannot match anything is skipped with a warning naming its file and line;
the rest of the file still counts.

A recipient whitelist holds addresses (``abuse@example.com``), local parts
(``postmaster@``), domains (``example.net`` or ``@example.net``, with their
subdomains) or ``/regex/`` lines, read and matched as postgrey reads and matches
its whitelist_recipients (an address or local part also matches it with a
``+extension``).

The wrapper starts once per connection, so a whitelist is compiled (networks
to sorted integer ranges, looked up by bisection) and the compiled form cached
with ``marshal`` in ``FILE.cache`` beside it when that directory is writable;
the cache is used while the file's size and mtime match.
"""

from __future__ import annotations

import marshal
import os

from greylist.core.keys import BadAddress, packed_ip

CACHE_VERSION = 2


MAX_FILE = 16 * 1024 * 1024


class WhitelistError(ValueError):
    """A whitelist file cannot be read; the message names the file."""


def _re2_options():
    import re2

    options = re2.Options()
    options.log_errors = False  # an unusable pattern is our warning, not RE2's stderr line
    options.case_sensitive = False  # as postgrey's qr{...}i, in both kinds of list
    return options


def _compile(pattern: str) -> tuple[object, str | None]:
    """A whitelist's ``/regex/`` compiled, or None and the reason it cannot be used."""
    import re2

    try:
        return re2.compile(pattern, _re2_options()), None
    except re2.error as exc:
        why = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        return None, f"pattern not usable by the linear-time engine ({why})"


def read_regular(path: str, what: str = "whitelist") -> str:
    """A whitelist's text: only a regular file (links to one are fine), at most MAX_FILE bytes."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise WhitelistError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise WhitelistError(f"cannot read {what} {path}: not a regular file")
        if st.st_size > MAX_FILE:
            raise WhitelistError(f"cannot read {what} {path}: {st.st_size} bytes, more than {MAX_FILE}")
        chunks, size = [], 0
        while size <= MAX_FILE:
            data = os.read(fd, 1 << 20)
            if not data:
                break
            chunks.append(data)
            size += len(data)
        if size > MAX_FILE:
            raise WhitelistError(f"cannot read {what} {path}: grew past {MAX_FILE} bytes")
    except OSError as exc:
        raise WhitelistError(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


def split_paths(value: str) -> list[str]:
    """The files of a whitelist setting: one path, or several separated by ``:``."""
    return [p for p in value.split(":") if p]


#: bisect_right, imported at the first lookup: the wrapper, which starts once per SMTP
#: connection and may have no network list, does not load it; a server does not import
#: it at every decision (a `from ... import` in the hot path cost 8,000 instructions each)
_bisect_right = None


def _load_bisect():
    global _bisect_right
    from _bisect import bisect_right

    _bisect_right = bisect_right
    return bisect_right


class ClientWhitelist:
    __slots__ = ("ranges", "names", "patterns", "warnings", "_compiled")

    def __init__(self, ranges: dict, names: frozenset, patterns: tuple, warnings: tuple = ()) -> None:
        self.ranges = ranges  # {4: (starts, ends), 16: (starts, ends)}, sorted and merged
        self.names = names
        self.patterns = patterns
        self.warnings = warnings
        self._compiled = None

    @classmethod
    def parse(cls, text: str, source: str = "whitelist") -> "ClientWhitelist":
        spans: dict[int, list[tuple[int, int]]] = {4: [], 16: []}
        names, patterns, warnings = set(), [], []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            problem = _add_line(line, spans, names, patterns)
            if problem:
                warnings.append(f"{source}:{number}: {problem}, skipped: {line[:80]!r}")
        return cls(_merge(spans), frozenset(names), tuple(patterns), tuple(warnings))

    @classmethod
    def combine(cls, lists: list["ClientWhitelist"]) -> "ClientWhitelist":
        """Several files as one list: every network, name and pattern of each counts."""
        if len(lists) == 1:
            return lists[0]
        spans: dict[int, list[tuple[int, int]]] = {4: [], 16: []}
        for wl in lists:
            for family in (4, 16):
                starts, ends = wl.ranges.get(family, ((), ()))
                spans[family].extend(zip(starts, ends))
        return cls(_merge(spans), frozenset().union(*(wl.names for wl in lists)),
                   tuple(p for wl in lists for p in wl.patterns),
                   tuple(w for wl in lists for w in wl.warnings))

    def matches(self, ip: str, host: str = "") -> bool:
        """True when the client address is in a listed network or its (verified) name matches."""
        try:
            packed = packed_ip(ip)
        except BadAddress:
            return False
        starts, ends = self.ranges.get(len(packed), ((), ()))
        if starts:
            number = int.from_bytes(packed, "big")
            i = (_bisect_right or _load_bisect())(starts, number) - 1
            if i >= 0 and number <= ends[i]:
                return True
        if host:
            return self.matches_name(host)
        return False

    def matches_name(self, host: str) -> bool:
        name = host.lower().rstrip(".")
        if len(name) > 253:
            return False  # longer than any DNS name: not a name at all
        labels = name.split(".")
        for i in range(len(labels)):
            if ".".join(labels[i:]) in self.names:
                return True
        if self.patterns:
            if self._compiled is None:
                import re2

                options = _re2_options()
                self._compiled = [re2.compile(p, options) for p in self.patterns]
            return any(p.search(name) for p in self._compiled)
        return False

    @property
    def has_names(self) -> bool:
        return bool(self.names or self.patterns)

    def _dump(self) -> tuple:
        return (self.ranges[4], self.ranges[16], sorted(self.names), list(self.patterns), list(self.warnings))


def _add_line(line: str, spans: dict, names: set, patterns: list) -> str | None:
    """Add one whitelist line; the reason it cannot match anything, or None."""
    if line.startswith("/") and line.endswith("/") and len(line) > 2:
        _, problem = _compile(line[1:-1])  # checked now; kept as text, for the cache
        if problem:
            return problem
        patterns.append(line[1:-1])
        return None
    address, slash, bits = line.partition("/")
    if not slash and _partial_ipv4(line):
        octets = [int(o) for o in (line[:-1] if line.endswith(".") else line).split(".")]
        prefix = 8 * len(octets)
        start = int.from_bytes(bytes(octets + [0] * (4 - len(octets))), "big")
        spans[4].append((start, start + (1 << (32 - prefix)) - 1))
        return None
    try:
        packed = packed_ip(address)
    except BadAddress:
        if slash or not line.strip(".") or not all(c.isalnum() or c in ".-_" for c in line.lstrip(".")):
            return "not an address, network, partial address or host name"
        names.add(line.lower().strip("."))
        return None
    size = len(packed) * 8
    try:
        prefix = int(bits) if slash else size
    except ValueError:
        prefix = -1
    if not 0 <= prefix <= size:
        return "bad prefix length"
    start = int.from_bytes(packed, "big") & ~((1 << (size - prefix)) - 1)
    spans[len(packed)].append((start, start + (1 << (size - prefix)) - 1))
    return None


def _partial_ipv4(line: str) -> bool:
    """``66.94.237.``, ``195.235.39``, ``10.``: one to three octets (a dot may end them)."""
    dotted = line.endswith(".")
    parts = (line[:-1] if dotted else line).split(".")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() and len(p) <= 3 and int(p) <= 255 for p in parts):
        return False
    return dotted or len(parts) >= 2


def _merge(spans: dict) -> dict:
    ranges = {}
    for family, items in spans.items():
        items = sorted(items)
        merged: list[list[int]] = []
        for start, end in items:
            if merged and start <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        ranges[family] = ([m[0] for m in merged], [m[1] for m in merged])
    return ranges


def load_clients(paths: str, cache: bool = True) -> ClientWhitelist:
    """The compiled whitelist of one or several files (``a:b``), each from its cache when
    current. ``cache=False`` (a server, which reads it once) neither reads nor writes a
    cache: a daemon that writes beside the files it is given would leave its own file in
    /etc/postgrey, which dpkg then finds in a package's directory."""
    return ClientWhitelist.combine([_load_one(path, cache) for path in split_paths(paths)])


def _load_one(path: str, cache: bool = True) -> ClientWhitelist:
    if not cache:
        return ClientWhitelist.parse(read_regular(path), path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise WhitelistError(f"cannot read whitelist {path}: {exc.strerror}") from None
    stamp = (CACHE_VERSION, st.st_size, st.st_mtime_ns, st.st_ino)
    cached = path + ".cache"
    try:
        fd = os.open(cached, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            data = marshal.load(f)
        if data[0] == stamp:
            v4, v6, names, patterns, warnings = data[1]
            return ClientWhitelist({4: tuple(v4), 16: tuple(v6)}, frozenset(names), tuple(patterns),
                                   tuple(warnings))
    except (OSError, EOFError, ValueError, TypeError, IndexError):
        pass
    whitelist = ClientWhitelist.parse(read_regular(path), path)
    # best effort (a read-only directory just means no cache): a new file under an
    # unpredictable name, never through a link, renamed into place
    tmp = f"{cached}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                     0o644)
        with os.fdopen(fd, "wb") as f:
            marshal.dump((stamp, whitelist._dump()), f)
        os.replace(tmp, cached)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return whitelist


class RecipientWhitelist:
    """Recipients who opt out, matched as postgrey matches its whitelist_recipients (so a
    postgrey site's file means what it meant): ``user@domain`` and ``user@`` also match
    ``user+extension``, a bare ``domain`` also its subdomains, ``/regex/`` is searched in
    the recipient, case ignored (with RE2: linear time, as client patterns). ``@domain``,
    Postfix's access(5) form, is the domain and its subdomains (postgrey reads it but never
    matches it). Case never matters. A line that can match nothing is skipped with a warning."""

    __slots__ = ("addresses", "locals", "domains", "patterns", "warnings")

    def __init__(self, text: str, source: str = "whitelist") -> None:
        self.addresses, self.locals, self.domains = set(), set(), set()
        self.patterns: list = []  # compiled: a recipient list is read once, never cached
        warnings = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            problem = self._add(line)
            if problem:
                warnings.append(f"{source}:{number}: {problem}, skipped: {line[:80]!r}")
        self.warnings = tuple(warnings)

    def _add(self, line: str) -> str | None:
        if any(c.isspace() for c in line):
            return "not an address, local part, domain or /regex/"
        if len(line) > 2 and line[0] == "/" and line[-1] == "/":
            compiled, problem = _compile(line[1:-1])
            if compiled is not None:
                self.patterns.append(compiled)
            return problem
        line = line.lower().strip("<>")
        local, at, domain = line.partition("@")  # postgrey splits at the first @
        if not at:
            self.domains.add(line)
        elif not local:
            self.domains.add(domain)
        elif not domain:
            self.locals.add(local)
        else:
            self.addresses.add(line)
        return None

    def merge(self, other: "RecipientWhitelist") -> "RecipientWhitelist":
        self.addresses |= other.addresses
        self.locals |= other.locals
        self.domains |= other.domains
        self.patterns += other.patterns
        self.warnings += other.warnings
        return self

    def matches(self, recipient: str) -> bool:
        r = recipient.strip().strip("<>")
        if self.patterns and any(p.search(r) for p in self.patterns):
            return True
        r = r.lower()
        local, at, domain = r.rpartition("@")
        if at and (self.addresses or self.locals):
            # the local part, and each part of it before a "+" that has an extension after it
            if local in self.locals or r in self.addresses:
                return True
            if "+" in local:
                bases = [local[:i] for i, c in enumerate(local) if c == "+" and i + 1 < len(local)]
                for base in bases:
                    if base in self.locals or f"{base}@{domain}" in self.addresses:
                        return True
        if self.domains:
            labels = domain.split(".")
            for i in range(0 if at else 1, len(labels)):  # after the @ or after a dot
                if ".".join(labels[i:]) in self.domains:
                    return True
        return False


def load_recipients(paths: str) -> RecipientWhitelist:
    lists = [RecipientWhitelist(read_regular(path, "recipient whitelist"), path) for path in split_paths(paths)]
    result = lists[0] if lists else RecipientWhitelist("")
    for other in lists[1:]:
        result.merge(other)
    return result
