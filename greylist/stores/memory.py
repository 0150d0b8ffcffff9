"""``memory://``: a dict, for tests and the simulator's fastest runs."""

from __future__ import annotations

from greylist.core.policy import Record
from greylist.stores.base import COUNT, SCAN, Store


class MemoryStore(Store):
    url = "memory://"
    capabilities = frozenset({SCAN, COUNT})

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[str, Record] = {}

    @classmethod
    def open(cls, where, lean: bool = True) -> "MemoryStore":
        return cls()

    def get(self, key: str) -> Record | None:
        return self.data.get(key)

    def add(self, key: str, record: Record, ttl: float | None = None) -> bool:
        if key in self.data:
            return False
        self.data[key] = record
        return True

    def get_or_add(self, key: str, record: Record, ttl: float | None = None) -> Record | None:
        existing = self.data.get(key)
        if existing is None:
            self.data[key] = record
        return existing

    def put(self, key: str, record: Record, ttl: float | None = None) -> None:
        self.data[key] = record

    def delete(self, key: str, expected: Record | None = None) -> bool:
        current = self.data.get(key)
        if current is None or (expected is not None and current != expected):
            return False
        del self.data[key]
        return True

    def scan(self):
        return iter(list(self.data.items()))

    def size(self) -> int:
        return len(self.data)
