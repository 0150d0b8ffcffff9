"""Stores, chosen by URL from one registry and imported only when chosen.

``memory://`` keeps entries in a dict (tests, the simulator); ``file:///DIR``
is the cqgreylist file tree (the default, ``file:///var/qmail/cqgreylist``);
``sqlite:///PATH`` one database file; ``redis://HOST:PORT/DB`` and
``redis+unix:///PATH.sock`` a Redis server shared by several MX hosts.

A new store is one module with a :class:`~greylist.stores.base.Store` subclass
and one line in :data:`SCHEMES`; front ends, admin commands and the simulator
find it here. The wrapper pays only for the store it uses: this module imports
none of them.
"""

from __future__ import annotations

from greylist.core.values import Value
from greylist.stores.base import Store, StoreError

#: scheme -> (module, class). The one list of stores.
SCHEMES = {
    "memory": ("greylist.stores.memory", "MemoryStore"),
    "file": ("greylist.stores.filetree", "FileStore"),
    "sqlite": ("greylist.stores.sqlite", "SqliteStore"),
    "redis": ("greylist.stores.redisstore", "RedisStore"),
    "redis+unix": ("greylist.stores.redisstore", "RedisStore"),
    "postgrey": ("greylist.stores.postgrey", "PostgreyStore"),  # read-only: a source for migrate
}


class StoreURL(Value):
    """A store URL parsed once: scheme, location (path or host part) and ``?name=value`` options."""

    __slots__ = ("url", "scheme", "location", "options")

    def __init__(self, url: str, scheme: str, location: str, options: dict) -> None:
        self.url = url
        self.scheme = scheme
        self.location = location
        self.options = options

    def __hash__(self) -> int:
        return hash(self.url)

    def with_location(self, location: str) -> str:
        """The URL of the same kind of store, with the same options, somewhere else."""
        query = "&".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.scheme}://{location}" + (f"?{query}" if query else "")


def unknown(url: str) -> str | None:
    """Why ``url`` names no kind of store we have, or None (its scheme only: nothing imported)."""
    scheme, sep, _ = url.partition("://") if isinstance(url, str) else ("", "", "")
    if sep and scheme in SCHEMES:
        return None
    return f"unknown store URL {url!r}: expected one of {', '.join(f'{s}://' for s in SCHEMES)}"


def parse_url(url: str) -> StoreURL:
    """Split a store URL; raise StoreError for an unknown scheme or option."""
    why = unknown(url)
    if why is not None:
        raise StoreError(why)
    scheme, _, rest = url.partition("://")
    location, _, query = rest.partition("?")
    options: dict[str, str] = {}
    for part in query.split("&") if query else ():
        name, _, value = part.partition("=")
        options[name] = value
    parsed = StoreURL(url, scheme, location, options)
    allowed = store_class(parsed).OPTIONS
    for name in options:
        if name not in allowed:
            hint = ", ".join(allowed) if allowed else "none"
            raise StoreError(f"{url}: unknown option {name!r} (options: {hint})")
    return parsed


def store_class(where: StoreURL) -> type[Store]:
    """The class that implements a scheme, imported now."""
    module_name, class_name = SCHEMES[where.scheme]
    module = __import__(module_name, fromlist=[class_name])
    return getattr(module, class_name)


def open_store(url: str | StoreURL, lean: bool = True) -> Store:
    """Open the store a URL names; raise StoreError with a clear message otherwise.

    ``lean``: the per-connection wrapper's choice; with False a store may use
    a heavier client library that long-running commands prefer (redis-py).
    """
    where = url if isinstance(url, StoreURL) else parse_url(url)
    return store_class(where).open(where, lean)


__all__ = ["SCHEMES", "Store", "StoreError", "StoreURL", "open_store", "parse_url", "store_class"]
