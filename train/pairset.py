"""Pairs for training, streamed from their shards: memory stays bounded whatever the number of pairs.

A :class:`PairSet` opens a finished pairs folder (manifest, prompts, each shard's pair count from its safetensors
header) without reading any pair; shards are read when a batch needs them, checked against their checksum, and kept
in a small LRU cache. A :class:`PairStream` gives each DDP rank its micro-batches:

* every epoch ``e`` the shards are permuted (seeded by ``(seed, e)``) and dealt round-robin to the ranks, so ranks
  never share a pair within an epoch and together see every pair once;
* a rank reads its shards in groups of ``group`` (the cache size) and shuffles the pairs of each group (seeded by
  ``(seed, e, rank, group index)``), mixing pairs across and within shards;
* micro-batch ``i`` of a rank is a pure function of ``(seed, rank, world, i)``: a resumed run continues exactly
  mid-epoch by skipping ``i`` batches, which reads no data.

A :class:`Loader` reads a stream's micro-batches ahead on a background thread (a bounded queue), so that reading and
checksumming shards overlaps training. A pairs folder may also hold cached text embeddings
(``embeddings/<key>/``, made by ``python -m train.embed`` for one text encoder): a side file per shard, aligned with
its pairs, read and checked with the shard.
"""

from __future__ import annotations

import json
import queue
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load

from .common import TrainError, sha256_bytes

MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings"


def read_manifest(folder: Path) -> dict[str, Any]:
    """A pairs folder's manifest, or one line when it is damaged."""
    path = folder / MANIFEST
    try:
        doc = json.loads(path.read_text())
        doc["settings"]  # noqa: B018 - a manifest without settings is damaged too
        return doc
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise TrainError(f"{path} is damaged ({type(e).__name__}); delete it and re-run the same "
                         "`python -m train.pairs` command (finished shards are kept and checked)") from None


class PairSet:
    """A finished pairs folder, read lazily: ``cache_shards`` shards at most in memory."""

    def __init__(self, folder: str | Path, cache_shards: int = 8) -> None:
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise TrainError(f"{folder} is not a pairs folder (no {MANIFEST}); make one with `python -m train.pairs`")
        doc = read_manifest(folder)
        if not doc.get("complete"):
            raise TrainError(f"{folder} is unfinished; re-run the same `python -m train.pairs` command")
        if cache_shards < 1:
            raise TrainError(f"the shard cache must hold at least one shard, got {cache_shards}")
        self.folder, self.settings, self.cache_shards = folder, doc["settings"], cache_shards
        self.shards: list[tuple[str, str]] = list(doc["shards"].items())  # (file name, sha256)
        self.digest = sha256_bytes(json.dumps(doc["shards"], sort_keys=True).encode())  # these pairs, by content
        self.prompts: list[str] = json.loads((folder / "prompts.json").read_text())
        self.sizes = np.array([self._count(name) for name, _ in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._ahead: dict[int, Any] = {}  # shard -> Future of a read started by read_ahead
        self._reader: Any = None
        self.embeddings: Path | None = None  # the text-embedding cache in use (see use_embeddings)
        self._emb_shards: dict[str, str] = {}

    def embedding_folder(self, identity: dict[str, Any]) -> Path:
        """Where the text-embedding cache for this text encoder (``train.embed.text_encoder_identity``) lives."""
        return self.folder / EMBEDDINGS / identity["key"]

    def use_embeddings(self, identity: dict[str, Any]) -> str | None:
        """Read cached text embeddings with the shards from now on, when a finished cache for this text encoder
        exists; returns its key (None: there is none)."""
        folder = self.embedding_folder(identity)
        try:
            doc = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if not doc.get("complete") or doc.get("encoder") != identity or doc.get("pairs") != self.digest:
            return None
        self.embeddings, self._emb_shards = folder, doc["shards"]
        self._cache.clear()
        return identity["key"]
    def _count(self, name: str) -> int:
        path = self.folder / name
        if not path.is_file():
            raise TrainError(f"{path} is missing; re-run `python -m train.pairs` with the same arguments")
        try:
            with safe_open(str(path), framework="pt") as f:
                return int(f.get_slice("x0").get_shape()[0])
        except Exception:  # noqa: BLE001 - a damaged header; the checksum would fail too
            raise TrainError(f"{path} is damaged; re-run `python -m train.pairs` with the same arguments to "
                             "regenerate it") from None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def shard(self, k: int) -> dict[str, torch.Tensor]:
        """Shard ``k``'s tensors (x0, x1, prompt_index; ``emb`` with a text-embedding cache), read and checked on
        first use (or taken from a read started by :meth:`read_ahead`), then cached (LRU)."""
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        pending = self._ahead.pop(k, None)
        self._cache[k] = pending.result() if pending is not None else self._read(k)
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return self._cache[k]

    def _read(self, k: int) -> dict[str, torch.Tensor]:
        """Read and check shard ``k`` (and its embeddings): touches no state, so it runs on any thread."""
        name, digest = self.shards[k]
        data = (self.folder / name).read_bytes()
        if sha256_bytes(data) != digest:
            raise TrainError(f"{self.folder / name} does not match its checksum; re-run `python -m train.pairs` "
                             "with the same arguments to regenerate it")
        tensors = st_load(data)
        if self.embeddings is not None:
            side = self.embeddings / name
            emb = side.read_bytes() if side.is_file() else b""
            if sha256_bytes(emb) != self._emb_shards.get(name):
                raise TrainError(f"{side} is missing or does not match its checksum; re-run `python -m train.embed "
                                 f"--pairs {self.folder}` to remake it")
            tensors["emb"] = st_load(emb)["emb"]
        return tensors

    def read_ahead(self, shards: Sequence[int]) -> None:
        """Start reading these shards on a background thread (at most ``cache_shards`` reads held ahead, besides
        the LRU cache: memory stays bounded), so that :meth:`shard` finds them ready."""
        from concurrent.futures import ThreadPoolExecutor

        for k in shards:
            if k in self._cache or k in self._ahead:
                continue
            if len(self._ahead) >= self.cache_shards:
                return
            if self._reader is None:
                self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-read")
            self._ahead[k] = self._reader.submit(self._read, k)

    def close(self) -> None:
        """Stop the read-ahead thread (reads under way finish; nothing else is started)."""
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader = None
        self._ahead.clear()

    def pairs(self, indices: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(x0, x1, prompts) of the pairs with these global indices (fp32, in the order given)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise TrainError(f"pair index out of range 0..{len(self) - 1}")
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        first = self.shard(int(shard_of[0])) if len(indices) else None
        x0 = torch.empty((len(indices), *first["x0"].shape[1:])) if first is not None else torch.empty(0)
        x1, prompt = torch.empty_like(x0), torch.empty(len(indices), dtype=torch.long)
        for k in np.unique(shard_of):
            t, rows = self.shard(int(k)), torch.from_numpy(np.nonzero(shard_of == k)[0])
            local = torch.from_numpy(indices[rows.numpy()] - self.offsets[k])
            x0[rows], x1[rows], prompt[rows] = t["x0"][local].float(), t["x1"][local].float(), t["prompt_index"][local]
        return x0, x1, [self.prompts[int(p)] for p in prompt]

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor | None]:
        """:meth:`pairs` plus the cached text embeddings of the pairs' prompts (fp32; None without a cache)."""
        x0, x1, texts = self.pairs(indices)
        if self.embeddings is None:
            return x0, x1, texts, None
        indices = np.asarray(indices, dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        rows = []
        for i, k in zip(indices, shard_of):
            rows.append(self.shard(int(k))["emb"][int(i - self.offsets[k])])
        return x0, x1, texts, torch.stack(rows).float()


class PairStream:
    """The micro-batches (global pair indices) of one DDP rank; see the module docstring."""

    def __init__(self, pairs: PairSet, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 group: int | None = None) -> None:
        if len(pairs.shards) < world:
            raise TrainError(f"{pairs.folder} has {len(pairs.shards)} shard(s), fewer than the {world} training "
                             "ranks: regenerate the pairs with a smaller --shard-size")
        self.pairs, self.batch_size, self.seed, self.rank, self.world = pairs, batch_size, seed, rank, world
        self.group = group or pairs.cache_shards

    def shards(self, e: int) -> np.ndarray:
        """This rank's shards in epoch ``e``: all shards permuted from (seed, e), dealt round-robin to the ranks."""
        return np.random.default_rng([self.seed, e]).permutation(len(self.pairs.shards))[self.rank::self.world]

    def epoch(self, e: int) -> np.ndarray:
        """This rank's global pair indices in epoch ``e``, in reading order."""
        shards = self.shards(e)
        order = []
        for g in range(0, len(shards), self.group):
            members = shards[g:g + self.group]
            idx = np.concatenate([np.arange(self.pairs.offsets[k], self.pairs.offsets[k + 1]) for k in members])
            order.append(np.random.default_rng([self.seed, e, self.rank, g]).permutation(idx))
        return np.concatenate(order)

    def batches(self, start: int = 0) -> Iterator[np.ndarray]:
        """Micro-batches ``start``, ``start + 1``, ... (endless: epochs follow each other)."""
        skip, e, buffer = start * self.batch_size, 0, np.empty(0, dtype=np.int64)
        while True:
            n = self.epoch_length(e)
            if skip >= n:  # whole epochs skipped without building them
                skip, e = skip - n, e + 1
                continue
            buffer = np.concatenate([buffer, self.epoch(e)[skip:]])
            skip, e = 0, e + 1
            while len(buffer) >= self.batch_size:
                yield buffer[:self.batch_size]
                buffer = buffer[self.batch_size:]

    def epoch_length(self, e: int) -> int:
        return int(self.pairs.sizes[self.shards(e)].sum())


class Loader:
    """Micro-batches ``(x0, x1, prompts, cached embeddings or None)`` of a stream from micro-batch ``start`` on.

    With ``prefetch > 0`` a background thread assembles up to ``prefetch`` micro-batches ahead (a bounded queue) and,
    looking one shard group ahead in the stream (indices are known in advance: they read no data), has the shards
    of the next group read and checked by a second thread while the current group is consumed, so the burst of
    reads at a group boundary overlaps training too (at most ``cache_shards`` shards held besides the cache). With
    ``prefetch == 0`` everything happens on the caller's thread. The order is the stream's either way, so
    prefetching changes nothing but the time; an error on a thread (a damaged shard) is raised by the ``next``
    that would have returned the batch."""

    def __init__(self, pairs: PairSet, stream: PairStream, start: int = 0, prefetch: int = 8,
                 pin: bool = False) -> None:
        from collections import deque

        self.pairs, self.pin = pairs, pin
        self._batches = stream.batches(start=start)
        self._ahead: Any = deque()
        largest_group = int(np.sort(pairs.sizes)[::-1][:stream.group].sum())
        self._window = -(-largest_group // stream.batch_size) + 1  # batches: one group, and the next one's first
        self._stop = threading.Event()
        self._queue: queue.Queue[Any] | None = None
        if prefetch > 0:
            self._queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(target=self._fill, name="pair-prefetch", daemon=True)
            self._thread.start()

    def _read(self) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor | None]:
        if self._queue is None:
            indices = next(self._batches)
        else:
            while len(self._ahead) < self._window:
                self._ahead.append(next(self._batches))
            upcoming = np.unique(np.concatenate([np.searchsorted(self.pairs.offsets, b, side="right") - 1
                                                 for b in self._ahead]))
            indices = self._ahead.popleft()
            now = set((np.searchsorted(self.pairs.offsets, indices, side="right") - 1).tolist())
            self.pairs.read_ahead([int(k) for k in upcoming if k not in now])
        x0, x1, texts, emb = self.pairs.batch(indices)
        if self.pin:  # page-locked: the copy to the GPU can overlap
            x0, x1 = x0.pin_memory(), x1.pin_memory()
            emb = emb.pin_memory() if emb is not None else None
        return x0, x1, texts, emb

    def _fill(self) -> None:
        assert self._queue is not None
        while not self._stop.is_set():
            try:
                item: Any = ("ok", self._read())
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                item = ("error", e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[0] == "error":
                return

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor | None]:
        if self._queue is None:
            return self._read()
        kind, value = self._queue.get()
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        self._stop.set()
        if self._queue is not None:
            self._thread.join(timeout=30)
        self.pairs.close()
