"""The prompt-embedding cache: repeated prompts skip the text encoder (an LRU of text -> embedding row, shared
safely between threads)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable

import torch


class EmbeddingCache:
    """At most ``size`` embeddings, least recently used dropped first; ``size = 0`` disables it."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, texts: Iterable[str]) -> dict[str, torch.Tensor]:
        """The cached embeddings among ``texts`` (marked as recently used)."""
        with self._lock:
            found = {t: self._items[t] for t in dict.fromkeys(texts) if t in self._items}
            for t in found:
                self._items.move_to_end(t)
        return found

    def put(self, new: dict[str, torch.Tensor]) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items.update(new)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
