"""Whitelists: client networks, host name patterns, and recipients who opt out.

A client whitelist file holds one entry a line (``#`` starts a comment):

- an address or CIDR network, IPv4 or IPv6: ``64.233.160.0/19``, ``2001:4860:4000::/36``;
- a host name, matched against the client's verified name (TCPREMOTEHOST from
  tcpserver, ``client_name`` from Postfix): ``google.com`` matches that name and
  every name below it;
- a regular expression between slashes, as postgrey allows: ``/^mail\\d+\\.example\\.org$/``.

A recipient whitelist holds addresses (``abuse@example.com``), local parts
(``postmaster@``) or whole domains (``@example.net``).

The wrapper starts once per connection, so a whitelist is compiled (networks
to sorted integer ranges, looked up by bisection) and the compiled form cached
with ``marshal`` in ``FILE.cache`` beside it when that directory is writable;
the cache is used while the file's size and mtime match.
"""

from __future__ import annotations

import marshal
import os

from greylist.core.keys import BadAddress, packed_ip

CACHE_VERSION = 1


class WhitelistError(ValueError):
    """A whitelist file cannot be read; the message names the file and line."""


class ClientWhitelist:
    __slots__ = ("ranges", "names", "patterns", "_compiled")

    def __init__(self, ranges: dict, names: frozenset, patterns: tuple) -> None:
        self.ranges = ranges  # {4: (starts, ends), 16: (starts, ends)}, sorted and merged
        self.names = names
        self.patterns = patterns
        self._compiled = None

    @classmethod
    def parse(cls, text: str, source: str = "whitelist") -> "ClientWhitelist":
        spans: dict[int, list[tuple[int, int]]] = {4: [], 16: []}
        names, patterns = set(), []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("/") and line.endswith("/") and len(line) > 2:
                import re

                try:
                    re.compile(line[1:-1])
                except re.error as exc:
                    raise WhitelistError(f"{source}:{number}: bad pattern {line}: {exc}") from None
                patterns.append(line[1:-1])
                continue
            address, slash, bits = line.partition("/")
            try:
                packed = packed_ip(address)
            except BadAddress:
                if slash or not all(c.isalnum() or c in ".-_" for c in line.lstrip(".")):
                    raise WhitelistError(f"{source}:{number}: not an address, network or host "
                                         f"name: {line!r}") from None
                names.add(line.lower().strip("."))
                continue
            size = len(packed) * 8
            try:
                prefix = int(bits) if slash else size
            except ValueError:
                prefix = -1
            if not 0 <= prefix <= size:
                raise WhitelistError(f"{source}:{number}: bad prefix length in {line!r}")
            start = int.from_bytes(packed, "big") & ~((1 << (size - prefix)) - 1)
            spans[len(packed)].append((start, start + (1 << (size - prefix)) - 1))
        ranges = {}
        for family, items in spans.items():
            items.sort()
            merged: list[list[int]] = []
            for start, end in items:
                if merged and start <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], end)
                else:
                    merged.append([start, end])
            ranges[family] = ([m[0] for m in merged], [m[1] for m in merged])
        return cls(ranges, frozenset(names), tuple(patterns))

    def matches(self, ip: str, host: str = "") -> bool:
        """True when the client address is in a listed network or its name matches."""
        try:
            packed = packed_ip(ip)
        except BadAddress:
            return False
        starts, ends = self.ranges.get(len(packed), ((), ()))
        if starts:
            from _bisect import bisect_right

            number = int.from_bytes(packed, "big")
            i = bisect_right(starts, number) - 1
            if i >= 0 and number <= ends[i]:
                return True
        if host:
            name = host.lower().rstrip(".")
            labels = name.split(".")
            for i in range(len(labels)):
                if ".".join(labels[i:]) in self.names:
                    return True
            if self.patterns:
                import re

                if self._compiled is None:
                    self._compiled = [re.compile(p) for p in self.patterns]
                return any(p.search(name) for p in self._compiled)
        return False

    def _dump(self) -> tuple:
        return (self.ranges[4], self.ranges[16], sorted(self.names), list(self.patterns))


def load_clients(path: str) -> ClientWhitelist:
    """The compiled whitelist of a file, from its cache when the cache is current."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise WhitelistError(f"cannot read whitelist {path}: {exc.strerror}") from None
    stamp = (CACHE_VERSION, st.st_size, st.st_mtime_ns)
    cache = path + ".cache"
    try:
        with open(cache, "rb") as f:
            data = marshal.load(f)
        if data[0] == stamp:
            v4, v6, names, patterns = data[1]
            return ClientWhitelist({4: tuple(v4), 16: tuple(v6)}, frozenset(names), tuple(patterns))
    except (OSError, EOFError, ValueError, TypeError, IndexError):
        pass
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            whitelist = ClientWhitelist.parse(f.read(), path)
    except OSError as exc:
        raise WhitelistError(f"cannot read whitelist {path}: {exc.strerror}") from None
    tmp = f"{cache}.{os.getpid()}.tmp"
    try:  # best effort: a read-only directory just means no cache
        with open(tmp, "wb") as f:
            marshal.dump((stamp, whitelist._dump()), f)
        os.replace(tmp, cache)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return whitelist


class RecipientWhitelist:
    __slots__ = ("addresses", "locals", "domains")

    def __init__(self, text: str, source: str = "whitelist") -> None:
        self.addresses, self.locals, self.domains = set(), set(), set()
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip().lower().strip("<>")
            if not line:
                continue
            local, at, domain = line.rpartition("@")
            if not at:
                self.domains.add(line)
            elif not local:
                self.domains.add(domain)
            elif not domain:
                self.locals.add(local)
            else:
                self.addresses.add(line)

    def matches(self, recipient: str) -> bool:
        r = recipient.strip().strip("<>").lower()
        local, _, domain = r.rpartition("@")
        return r in self.addresses or local in self.locals or domain in self.domains


def load_recipients(path: str) -> RecipientWhitelist:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return RecipientWhitelist(f.read(), path)
    except OSError as exc:
        raise WhitelistError(f"cannot read recipient whitelist {path}: {exc.strerror}") from None
