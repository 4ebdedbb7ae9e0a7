"""Content identity: which files hold a model's weights, whether they are whole, and hashes that say whether two
models (or two exports) are the same.

Two strengths of hash, for two jobs:

* a full SHA-256 of every file (:func:`sha256_files`): what an export records about the checkpoint it was made from
  and about the graphs it wrote; computed once, then trusted while the file's :func:`stamp` (size, mtime, inode) is
  unchanged, so loading an export does not hash gigabytes every time;
* a *fingerprint* (:func:`hash_folder`): configs in full, and of each weight file its size, safetensors header and
  evenly spaced samples of its data (about 1 MB read per file): the fast identity checked on every load.

This module imports nothing of the project's but its errors: checkpoints, decoders, LoRAs and manifests all use it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .errors import CheckpointError, ExportError

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024

#: (size, mtime in ns, inode) per file: see :func:`stamp`
Stamp = list[list[int]]


# ------------------------------------------------------------------------------------------------- weight files
def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding one component's weights (single file or sharded with an index).

    Raises :class:`CheckpointError` when there are none; pickled ``.bin`` weights are refused, never loaded.
    """
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"unreadable shard index {indexes[0]}: {e}") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder} is missing weight shards: {', '.join(missing)}")
        return files
    files = sorted(f for f in folder.glob("*.safetensors") if len(f.suffixes) == 1)  # not the .fp16. variants
    if files:
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.ckpt")):
        raise CheckpointError(
            f"{folder} holds only pickled weights (.bin/.ckpt); instaflow-rt loads safetensors only "
            "(convert them with a trusted tool first)"
        )
    raise CheckpointError(f"no safetensors weights in {folder}")


def check_safetensors(path: Path) -> None:
    """Check that a safetensors file is whole: a readable header whose tensors end exactly at the end of the file.

    Catches truncated downloads and most corruption without reading the tensor data.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or n > min(size - 8, _MAX_SAFETENSORS_HEADER):
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupted safetensors file {path} ({e})") from None
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        raise CheckpointError(
            f"corrupted safetensors file {path}: {size} bytes, header says {expected} (truncated download?)"
        )


def config_files(folder: Path) -> list[Path]:
    """A model folder's configs and tokenizer files (``.json``, ``.txt``), sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in {".json", ".txt"})


# ------------------------------------------------------------------------------------------------------- hashes
def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of one file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: Iterable[Path]) -> str:
    """One SHA-256 over several files (each hashed in full, in the order given)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def hash_folder(h: Any, folder: Path, label: str, weights: bool = True, blocks: int = 16,
                block: int = 1 << 16) -> None:
    """Feed a model folder's fingerprint into the hash ``h``: every config in full and, with ``weights``, of each
    weight file its size, safetensors header and ``blocks`` evenly spaced samples of ``block`` bytes."""
    for f in config_files(folder):
        h.update(f"{label}/{f.name}:".encode() + f.read_bytes())
    if not weights:
        return
    for f in weight_files(folder):
        size = f.stat().st_size
        h.update(f"{label}/{f.name}:{size}:".encode())
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(n))
            start, span = 8 + n, max(size - 8 - n - block, 0)
            for i in range(blocks):
                fh.seek(start + span * i // max(blocks - 1, 1))
                h.update(fh.read(block))


def folder_fingerprint(folder: Path) -> str:
    """The fingerprint (see the module docstring) of one model folder (config and sampled weights)."""
    h = hashlib.sha256()
    hash_folder(h, folder, "")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- stamps and checks
def stamp(files: Sequence[Path]) -> Stamp:
    """(size, mtime in ns, inode) of each file: recorded next to a hash, so that loads can trust the hash while the
    files are untouched instead of hashing gigabytes each time."""
    return [[st.st_size, st.st_mtime_ns, st.st_ino] for st in (f.stat() for f in files)]


def check_files(files: Sequence[Path], sha256: str, recorded_stamp: Any, what: str, full: bool = False,
                digest: Callable[[Sequence[Path]], str] = sha256_files) -> None:
    """Raise :class:`ExportError` (one line ending in ``what``: how to fix it) when ``files`` are missing or differ
    from the hash recorded for them (``digest`` of the files). They are hashed only when their stamp changed since
    the hash was recorded, or when ``full`` asks for it (verification)."""
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ExportError(f"{missing[0]} is missing; {what}")
    if not full and recorded_stamp == stamp(files):
        return
    if digest(files) != sha256:
        raise ExportError(f"{files[0]} does not match its manifest hash (corrupted or truncated); {what}")
