"""Backends: thin adapters that run the three networks. The pipeline logic lives in :mod:`runtime.pipeline`.

Every backend fills in the contract of :mod:`runtime.backends.base`; :data:`REGISTRY` names them (imported only when
chosen), :func:`choose` resolves ``auto``, :func:`create` builds one.
"""

from __future__ import annotations

import importlib
import inspect
import numbers
import os
import warnings
from typing import Any

import numpy as np
import torch

from ..checkpoints import Checkpoint
from ..errors import BackendUnavailableError, ExportError, InvalidInputError, InvalidTypeError
from ..models import Components
from .base import Backend, ExportedBackend

#: backend name -> "module:class" (a new backend: one file, one line here)
REGISTRY: dict[str, str] = {
    "torch": "runtime.backends.torch_backend:TorchBackend",
    "onnxruntime": "runtime.backends.onnxruntime_backend:OnnxRuntimeBackend",
    "tensorrt": "runtime.backends.tensorrt_backend:TensorRTBackend",
    "aoti": "runtime.backends.aoti_backend:AOTIBackend",
}

#: Backend names accepted by ``Pipeline.from_pretrained(..., backend=...)``.
BACKENDS = (*REGISTRY, "auto")

#: what ``auto`` tries first, in order, per device type: exports that can run here (fastest first); then torch
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("tensorrt", "aoti"), "cpu": ("onnxruntime", "aoti")}

#: options that only some exported backends take: ``auto`` passes them to whichever takes them, drops them for torch
_EXPORT_ONLY_OPTIONS = ("allow_unverified",)

#: the constructor arguments every backend gets from the pipeline (not options)
_FIXED = ("self", "components", "checkpoint", "export_dir", "device", "dtype")


def backend_class(name: str) -> type[Backend]:
    """The class of backend ``name`` (imported now)."""
    check_name(name)
    if name == "auto":
        raise BackendUnavailableError("'auto' stands for another backend: resolve it with choose() first")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def check_name(name: str) -> None:
    """One line for an unknown backend name (checked before anything is loaded)."""
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def option_names(cls: type[Backend]) -> list[str]:
    """The keyword options a backend's constructor takes."""
    return [p for p in inspect.signature(cls.__init__).parameters if p not in _FIXED]


def given(options: dict[str, Any]) -> dict[str, Any]:
    """The options a caller set: ``None`` stands for the backend's default, as if the option were left out."""
    return {k: v for k, v in options.items() if v is not None}


def check_options(cls: type[Backend], options: dict[str, Any]) -> None:
    """One line for an unknown keyword option (a typo, or an option of another backend), listing the valid ones,
    and for a value of the wrong kind where the constructor says which: a flag must be True or False (a config's
    string ``"false"`` would otherwise switch it on), a count a positive int. ``None`` is every option's default."""
    valid = option_names(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise InvalidInputError(f"unknown option(s) {', '.join(map(repr, unknown))} for the {cls.name} backend; "
                                f"it takes {', '.join(valid)}")
    params = inspect.signature(cls.__init__).parameters
    for key, value in given(options).items():
        kind = str(params[key].annotation).replace(" ", "")
        if kind in ("bool", "bool|None") and not isinstance(value, (bool, np.bool_)):
            raise InvalidTypeError(f"{key} must be True or False, got {value!r}")
        if kind in ("int", "int|None"):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
                raise InvalidTypeError(f"{key} must be an int, got {value!r}")
            if value < 1:
                raise InvalidInputError(f"{key} must be a positive int, got {value!r} (None for the default)")


def torch_defaults(device: torch.device) -> dict[str, Any]:
    """The torch options ``auto`` uses: the fastest path that needs no long compilation. On a GPU, CUDA graphs of
    the one-step hot path and the text encoder, channels-last convolutions and fused QKV projections (where the
    modules have them); on the CPU channels-last (see benchmarks/RESULTS.md)."""
    if device.type == "cuda":
        return {"cuda_graph": True, "channels_last": True, "fuse_qkv": True}
    return {"channels_last": True}


def choose(name: str, device: torch.device, checkpoint: Checkpoint | None,
           export_dir: str | os.PathLike[str] | None, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Check ``name``; resolve ``auto`` to the backend it stands for here, with that backend's options (the caller's
    win over ``auto``'s defaults). Other names come back unchanged.

    ``auto`` tries the exported backends of :data:`AUTO_ORDER` that take every option given, in order, and takes
    the first whose export can run here (:meth:`ExportedBackend.open_export`; one that exists but cannot run is
    passed over with one warning); otherwise torch with :func:`torch_defaults` (with one warning saying why when
    the caller named an ``export_dir``, which must be a folder)."""
    check_name(name)
    if export_dir is not None and not os.path.isdir(export_dir):
        raise InvalidInputError(f"export_dir {os.fspath(export_dir)!r} is not a folder (a typo? leave it out to use "
                                "the export cache)")
    options = given(options)
    if name != "auto":
        return name, options
    passed_over: list[str] = []  # why nothing was used (said once when the caller named an export_dir)
    warned = False
    if checkpoint is not None:
        for candidate in AUTO_ORDER.get(device.type, ()):
            cls = backend_class(candidate)
            others = sorted(set(options) - set(option_names(cls)))
            if others:  # an option only another backend takes (compile=True, say) narrows the choice
                passed_over.append(f"{candidate} takes no {', '.join(others)}")
                continue
            assert issubclass(cls, ExportedBackend)
            check_options(cls, options)  # the values, before the export is opened with them
            try:
                cls.open_export(checkpoint, cls.folder(checkpoint, export_dir, device), device, **options)
            except BackendUnavailableError as e:
                passed_over.append(f"{candidate}: {e}")
                continue
            except ExportError as e:  # an export that must not run here: say so, and use the next
                warnings.warn(f"{candidate} not used ({e}); trying the next backend", RuntimeWarning, stacklevel=3)
                warned = True
                continue
            return candidate, options
    if export_dir is not None and passed_over and not warned:
        warnings.warn(f"auto runs torch: nothing in export_dir {os.fspath(export_dir)!r} runs here "
                      f"({'; '.join(passed_over)})", RuntimeWarning, stacklevel=3)
    plain = {k: v for k, v in options.items() if k not in _EXPORT_ONLY_OPTIONS}
    return "torch", {**torch_defaults(device), **plain}


def create(name: str, components: Components, device: torch.device, dtype: torch.dtype,
           checkpoint: Checkpoint | None = None, export_dir: str | os.PathLike[str] | None = None,
           **options: Any) -> Backend:
    """Instantiate the backend called ``name`` (see :data:`BACKENDS`; ``auto`` is resolved by :func:`choose`) over
    ``components``; exported backends run an export of ``checkpoint`` found in ``export_dir`` (default: the export
    cache, see :func:`runtime.cache.default_export_dir`)."""
    name, options = choose(name, device, checkpoint, export_dir, options)
    cls = backend_class(name)
    check_options(cls, options)
    if not issubclass(cls, ExportedBackend):
        return cls(components, device=device, dtype=dtype, **options)
    if checkpoint is None:
        raise BackendUnavailableError(f"the {name} backend runs an export of a checkpoint folder; load the "
                                      "pipeline with Pipeline.from_pretrained(...)")
    return cls(checkpoint, export_dir, device=device, dtype=dtype, **options)


__all__ = ["AUTO_ORDER", "BACKENDS", "REGISTRY", "Backend", "ExportedBackend", "backend_class", "check_name",
           "check_options", "choose", "create", "torch_defaults"]
