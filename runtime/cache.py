"""The project's cache folder: exports made for a checkpoint (ONNX graphs, TensorRT engines), under
``$INSTAFLOW_CACHE`` (default ``~/.cache/instaflow-rt``)."""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoints import Checkpoint


def cache_root() -> Path:
    """``$INSTAFLOW_CACHE`` or ``~/.cache/instaflow-rt``."""
    return Path(os.environ.get("INSTAFLOW_CACHE") or Path.home() / ".cache" / "instaflow-rt")


def default_export_dir(ckpt: Checkpoint, kind: str = "onnx") -> Path:
    """Default folder of a checkpoint's exports of one ``kind`` (``onnx``, ``trt``, ``aoti``):
    ``<cache>/<kind>/<name>-<fingerprint[:12]>``."""
    return cache_root() / kind / f"{_slug(Path(ckpt.name).name or 'ckpt')}-{ckpt.fingerprint()[:12]}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
