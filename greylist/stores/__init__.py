"""Stores, chosen by URL and imported only when chosen.

``memory://`` keeps entries in a dict (tests, the simulator); ``file:///DIR``
is the cqgreylist file tree (the default, ``file:///var/qmail/cqgreylist``).
The wrapper pays only for the store it uses: this module imports none of them.
"""

from __future__ import annotations

from greylist.stores.base import Store, StoreError

DEFAULT_URL = "file:///var/qmail/cqgreylist"

_SCHEMES = {
    "memory": ("greylist.stores.memory", "MemoryStore"),
    "file": ("greylist.stores.filetree", "FileStore"),
}


def open_store(url: str) -> Store:
    """Open the store a URL names; raise StoreError with a clear message otherwise."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in _SCHEMES)
        raise StoreError(f"unknown store URL {url!r}: expected one of {known}")
    module_name, class_name = _SCHEMES[scheme]
    module = __import__(module_name, fromlist=[class_name])
    return getattr(module, class_name).from_url(url)


__all__ = ["DEFAULT_URL", "Store", "StoreError", "open_store"]
