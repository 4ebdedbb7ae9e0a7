"""Backends: thin adapters that run the three networks. The pipeline logic lives in :mod:`runtime.pipeline`.

Every backend implements :class:`~runtime.backends.base.Backend`; :func:`create` picks one by name.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import BackendUnavailableError, ExportError, InvalidInputError
from .base import Backend

if TYPE_CHECKING:
    from ..checkpoints import Checkpoint
    from ..models import Components

#: Backend names accepted by ``Pipeline.from_pretrained(..., backend=...)``.
BACKENDS = ("torch", "onnxruntime", "tensorrt", "auto")


def create(name: str, components: "Components", device: torch.device, dtype: torch.dtype,
           checkpoint: "Checkpoint | None" = None, export_dir: str | os.PathLike[str] | None = None,
           **options: Any) -> Backend:
    """Instantiate the backend called ``name`` (see :data:`BACKENDS`) over ``components``.

    ``onnxruntime`` and ``tensorrt`` run an export of ``checkpoint`` found in ``export_dir`` (default: the export
    cache, see :func:`runtime.manifest.default_export_dir`). ``auto`` picks, in order: TensorRT engines on a GPU,
    torch on a GPU (with CUDA graphs and channels-last unless ``options`` say otherwise), onnxruntime on the CPU
    when an export exists, else torch (channels-last).
    """
    name, options = choose(name, device, checkpoint, export_dir, options)
    if name == "torch":
        from .torch_backend import TorchBackend

        _check_options(TorchBackend, name, options)
        return TorchBackend(components, device=device, dtype=dtype, **options)
    if checkpoint is None:
        raise BackendUnavailableError(f"the {name} backend runs an export of a checkpoint folder; load the "
                                      "pipeline with Pipeline.from_pretrained(...)")
    if name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend

        _check_options(OnnxRuntimeBackend, name, options)
        return OnnxRuntimeBackend(checkpoint, export_dir, device=device, dtype=dtype, **options)
    from .tensorrt_backend import TensorRTBackend

    if device.type != "cuda":
        raise BackendUnavailableError("the tensorrt backend needs a CUDA device")
    _check_options(TensorRTBackend, name, options)
    return TensorRTBackend(checkpoint, export_dir, device=device, dtype=dtype, **options)


def check_name(name: str) -> None:
    """One line for an unknown backend name (checked before anything is loaded)."""
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def choose(name: str, device: torch.device, checkpoint: "Checkpoint | None",
           export_dir: str | os.PathLike[str] | None, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Check ``name``; resolve ``auto`` to the backend it stands for here, with that backend's default options
    (``options`` given by the caller win). Other names come back unchanged."""
    check_name(name)
    if name != "auto":
        return name, options
    options = dict(options)
    allow_unverified = bool(options.pop("allow_unverified", False))  # an onnxruntime option, asked of auto
    name = resolve_auto(device, checkpoint, export_dir, allow_unverified)
    if name == "onnxruntime" and allow_unverified:
        options["allow_unverified"] = True
    if name == "torch":  # channels-last on the CPU too: see channels_last/ours in benchmarks/RESULTS.md
        options = {"cuda_graph": device.type == "cuda", "channels_last": True, **options}
    return name, options


def _check_options(cls: type, name: str, options: dict[str, Any]) -> None:
    """Unknown keyword options (a typo, or an option of another backend) -> one line listing the valid ones."""
    import inspect

    valid = [p for p in inspect.signature(cls.__init__).parameters
             if p not in ("self", "components", "checkpoint", "export_dir", "device", "dtype")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise InvalidInputError(f"unknown option(s) {', '.join(map(repr, unknown))} for the {name} backend; "
                                f"it takes {', '.join(valid)}")


def resolve_auto(device: torch.device, checkpoint: "Checkpoint | None",
                 export_dir: str | os.PathLike[str] | None, allow_unverified: bool = False) -> str:
    """The backend ``auto`` stands for on this machine, for this checkpoint."""
    if checkpoint is None:
        return "torch"
    from .. import manifest as mf

    if device.type == "cuda":
        trt_dir = Path(export_dir) if export_dir is not None else mf.default_export_dir(checkpoint, "trt")
        try:
            import tensorrt
        except ImportError:
            return "torch"
        if not (trt_dir / mf.ENGINES).is_file():
            return "torch"
        rebuild = f"`python -m export.trt --ckpt {checkpoint.name} -o {trt_dir} --force`"
        try:
            mismatch = mf.engines_mismatch(mf.read_engines(trt_dir), tensorrt.__version__,
                                           torch.cuda.get_device_name(device))
            reason = mismatch and f"the engines in {trt_dir} were {mismatch}; rebuild with {rebuild}"
        except ExportError as e:
            reason = str(e)
        if reason:  # auto falls back; an explicit backend="tensorrt" keeps the one-line error
            warnings.warn(f"TensorRT not used ({reason}); running torch instead", RuntimeWarning, stacklevel=3)
            return "torch"
        return "tensorrt"

    folder = Path(export_dir) if export_dir is not None else mf.default_export_dir(checkpoint)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    try:
        doc = mf.read(folder) if (folder / mf.MANIFEST).is_file() else None
    except ExportError as e:
        warnings.warn(f"onnxruntime not used ({e}); running torch instead", RuntimeWarning, stacklevel=3)
        return "torch"
    if not doc or doc.get("checkpoint", {}).get("fingerprint") != mf.fingerprint(checkpoint):
        return "torch"
    problem = mf.usable_export_problem(doc, folder, allow_unverified)
    if problem:  # auto falls back; an explicit backend="onnxruntime" keeps the one-line error
        warnings.warn(f"onnxruntime not used ({problem}); running torch instead", RuntimeWarning, stacklevel=3)
        return "torch"
    return "onnxruntime"


__all__ = ["BACKENDS", "Backend", "check_name", "choose", "create", "resolve_auto"]
