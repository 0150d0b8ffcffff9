"""Stores, chosen by URL and imported only when chosen.

``memory://`` keeps entries in a dict (tests, the simulator); ``file:///DIR``
is the cqgreylist file tree (the default, ``file:///var/qmail/cqgreylist``);
``sqlite:///PATH`` one database file; ``redis://HOST:PORT/DB`` and
``redis+unix:///PATH.sock`` a Redis server shared by several MX hosts.
The wrapper pays only for the store it uses: this module imports none of them.
"""

from __future__ import annotations

from greylist.stores.base import Store, StoreError

DEFAULT_URL = "file:///var/qmail/cqgreylist"

_SCHEMES = {
    "memory": ("greylist.stores.memory", "MemoryStore"),
    "file": ("greylist.stores.filetree", "FileStore"),
    "sqlite": ("greylist.stores.sqlite", "SqliteStore"),
    "redis": ("greylist.stores.redisstore", "RedisStore"),
    "redis+unix": ("greylist.stores.redisstore", "RedisStore"),
}


def open_store(url: str, lean: bool = True) -> Store:
    """Open the store a URL names; raise StoreError with a clear message otherwise.

    ``lean``: the per-connection wrapper's choice; with False a store may use
    a heavier client library that long-running commands prefer (redis-py).
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in _SCHEMES)
        raise StoreError(f"unknown store URL {url!r}: expected one of {known}")
    module_name, class_name = _SCHEMES[scheme]
    module = __import__(module_name, fromlist=[class_name])
    cls = getattr(module, class_name)
    if not lean and hasattr(cls, "from_url_full"):
        return cls.from_url_full(url)
    return cls.from_url(url)


__all__ = ["DEFAULT_URL", "Store", "StoreError", "open_store"]
