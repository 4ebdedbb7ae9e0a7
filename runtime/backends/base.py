"""The one interface every backend implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Backend(Protocol):
    """Runs the networks of a text-to-image flow; everything else (tokens, noise, Euler, images) is shared.

    All tensors are on :attr:`device`; inputs may come in any float dtype and are cast as the backend needs.
    """

    name: str
    device: torch.device
    dtype: torch.dtype

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``[B, L]`` -> text embeddings ``[B, L, D]`` (last hidden state)."""
        ...

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """UNet velocity for ``latents [B, C, h, w]`` at UNet times ``t [B]`` given ``embeddings [B, L, D]``."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decoder on already unscaled latents -> images ``[B, 3, H, W]`` in about [-1, 1]."""
        ...

    # Optional: ``check_size(height, width)`` raises InvalidInputError for an image size the backend's graphs
    # cannot take (exported graphs fix their sizes or the UNet's downsampling multiple), ``check_batch(images)``
    # for too many images in one call; the pipeline calls both before any work. ``has_one_step`` and
    # ``one_step(embeddings, noise)`` run the fused one-step hot path.
