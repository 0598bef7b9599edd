"""A least-recently-used set bounded by entry count and by total size.

functools.lru_cache bounds only the number of entries, and webhook URLs come from messages:
4,096 URLs of 400 KB each took the process from 56 to 221 MB. Here every entry is charged its
size, the total is capped, and an entry bigger than ``max_item`` is never kept (checking a huge
URL again costs less than holding it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedSet:
    def __init__(self, max_entries: int, max_bytes: int, max_item: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_item = max_item
        self.size = 0  # sum of the sizes of the entries held
        self._items: OrderedDict[Hashable, int] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        if key in self._items:
            self._items.move_to_end(key)
            return True
        return False

    def __len__(self) -> int:
        return len(self._items)

    def add(self, key: Hashable, size: int) -> None:
        if size > self.max_item:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.size -= old
        self._items[key] = size
        self.size += size
        while self._items and (len(self._items) > self.max_entries or self.size > self.max_bytes):
            _, dropped = self._items.popitem(last=False)
            self.size -= dropped

    def clear(self) -> None:
        self._items.clear()
        self.size = 0


class BoundedMap(Generic[K, V]):
    """The same bounds for a mapping: at most ``max_entries`` and ``max_bytes`` (the sizes given
    to ``put``), least recently used dropped first; an entry bigger than ``max_item`` is not kept."""

    def __init__(self, max_entries: int, max_bytes: int, max_item: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_item = max_item
        self.size = 0
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: K, value: V, size: int) -> None:
        if size > self.max_item:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.size -= old[1]
        self._items[key] = (value, size)
        self.size += size
        while self._items and (len(self._items) > self.max_entries or self.size > self.max_bytes):
            _, (_, dropped) = self._items.popitem(last=False)
            self.size -= dropped

    def clear(self) -> None:
        self._items.clear()
        self.size = 0
