"""Resumable training state with ``torch.distributed.checkpoint`` (DCP): every rank writes and reads its part.

A state is a folder ``OUT/state/step-00001000/`` holding DCP's files (``__0_0.distcp`` ... one per rank, and
``.metadata``) and ``meta.json`` (step, the run's identity, optimizer hyperparameters, LR schedule, gradient scaler,
world size). Only tensors go through DCP (the model, EMA, AdamW moments, each rank's sampling RNG); everything else is
JSON, so loading unpickles nothing of ours, and DCP's own ``.metadata`` is read by a restricted unpickler that admits
DCP's metadata classes only.

* Parallel: DCP de-duplicates the replicated (DDP) tensors across ranks, so each of N ranks writes about 1/N of the
  bytes, at the same time; on resume each rank reads into its own tensors in place (no whole-file copy in memory).
* Atomic: all ranks write into ``.tmp-step-N/``; after DCP's collective finish, rank 0 writes ``meta.json`` into it,
  fsyncs and renames it to ``step-N/``. A save killed at any moment leaves ``.tmp-*`` (ignored, removed by the next
  save) and the previous state untouched. Old states go by rename to ``.trash-*`` then removal, so a half-deleted
  state is never taken for a state. ``--keep K`` keeps the newest K.
* Resharding: DCP reads a state into any world size (the model and optimizer are whole on every DDP rank); each rank
  takes its own saved RNG when the world size is unchanged, a fresh seeded one otherwise.

Every rank must see the same ``OUT`` folder (a shared file system across nodes).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from runtime.files import atomic_write_json

from .common import Dist, TrainError

STATE_FORMAT = 2
META = "meta.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle: admit only DCP's metadata classes and the torch types they hold."""

    _MODULES = ("torch.distributed.checkpoint.", "torch.distributed._shard.", "torch.distributed.tensor.")
    _ALLOWED = {("torch", "Size"), ("torch", "float32"), ("torch", "float16"), ("torch", "bfloat16"),
                ("torch", "float64"), ("torch", "int64"), ("torch", "int32"), ("torch", "uint8"), ("torch", "bool"),
                ("torch", "int8"), ("torch", "int16"), ("torch", "strided"), ("torch", "contiguous_format"),
                ("torch", "preserve_format"), ("torch", "channels_last"), ("collections", "OrderedDict"),
                ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
                ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(self._MODULES) or (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


class _Reader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as e:
            raise TrainError(f"{Path(self.path)} is damaged ({type(e).__name__}); delete it to resume from the "
                             "state before it") from None
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def states(folder: Path) -> list[Path]:
    """Finished states in ``folder``, oldest first (a state is finished once renamed, with its ``meta.json``)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if p.is_dir() and (p / META).is_file())


def legacy_states(folder: Path) -> list[Path]:
    return sorted(folder.glob("step-*.pt")) if folder.is_dir() else []


def save(folder: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], d: Dist,
         keep: int) -> Path:
    """Write state ``step`` (collective: every rank calls it with its own ``tensors``); returns its folder."""
    final, tmp = folder / f"step-{step:08d}", folder / f".tmp-step-{step:08d}"
    if d.main:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".tmp-step-*"):  # saves killed before they finished
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    d.barrier()
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process, as asked
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), no_dist=d.world == 1)
    if d.main:
        atomic_write_json(tmp / META, {"format": STATE_FORMAT, "step": step, "world": d.world, **meta})
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. after --max-steps grew): replace it
            _discard(final)
        os.rename(tmp, final)
        _fsync_dir(folder)
        for old in states(folder)[:-keep]:
            _discard(old)
    d.barrier()
    return final


def _discard(path: Path) -> None:
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"{path / META} is damaged ({type(e).__name__}); delete {path} to resume from the state "
                         "before it") from None
    if meta.get("format") != STATE_FORMAT:
        raise TrainError(f"{path} was written by another version of the trainer (format {meta.get('format')}); "
                         "use another -o folder, or --force to start over")
    return meta


def saved_tensors(path: Path) -> dict[str, Any]:
    """Name -> (shape, dtype) of every tensor in the state at ``path`` (from DCP's metadata, no data read)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = _Reader(path).read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def load(path: Path, tensors: dict[str, torch.Tensor], d: Dist) -> None:
    """Read the state at ``path`` into ``tensors`` in place (collective)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, storage_reader=_Reader(path), no_dist=d.world == 1)
    except dcp.CheckpointException as e:
        raise TrainError(f"cannot read the state {path} ({str(e).splitlines()[0][:160]}); delete it to resume from "
                         "the state before it") from None
