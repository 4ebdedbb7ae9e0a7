"""Atomic file writes: a crash never leaves a half-written file under the final name.

Every writer of the project (images, manifests, engines, pair shards, checkpoints, reports) goes through here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def _read_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: done once, at import, before any writer thread runs
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a temporary file in the same folder, flush it to disk, then rename it to ``path``. The file
    gets the permissions a plain ``open(path, "w")`` would give (mkstemp's are owner-only)."""
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_with(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> None:
    """:func:`atomic_write_bytes` for large content: ``write`` streams it into the open temporary file (e.g.
    ``lambda f: torch.save(state, f)``), so it is never held in memory as one ``bytes`` object."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike[str], doc: Any) -> None:
    """``doc`` as indented JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode())
