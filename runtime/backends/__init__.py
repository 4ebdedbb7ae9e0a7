"""Backends: thin adapters that run the three networks. The pipeline logic lives in :mod:`runtime.pipeline`.

Every backend implements :class:`~runtime.backends.base.Backend`; :func:`create` picks one by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import BackendUnavailableError
from .base import Backend

if TYPE_CHECKING:
    from ..models import Components

#: Backend names accepted by ``Pipeline.from_pretrained(..., backend=...)``.
BACKENDS = ("torch", "onnxruntime", "tensorrt", "auto")


def create(name: str, components: "Components", device: torch.device, dtype: torch.dtype) -> Backend:
    """Instantiate the backend called ``name`` over ``components``."""
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name in ("torch", "auto"):
        from .torch_backend import TorchBackend

        return TorchBackend(components, device=device, dtype=dtype)
    raise BackendUnavailableError(f"the {name!r} backend is not available in this version yet; use backend='torch'")


__all__ = ["BACKENDS", "Backend", "create"]
