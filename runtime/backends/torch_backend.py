"""PyTorch backend: the components as loaded, called eagerly."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..models import Components


class TorchBackend:
    """Eager PyTorch execution of the three networks (SDPA attention is diffusers' default)."""

    name = "torch"

    def __init__(self, components: "Components", device: torch.device, dtype: torch.dtype) -> None:
        self.components = components
        self.device = device
        self.dtype = dtype
        self._mask = bool(getattr(components.text_encoder.config, "use_attention_mask", False))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = attention_mask if self._mask else None
        return self.components.text_encoder(input_ids, attention_mask=mask, return_dict=False)[0]

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self.components.unet(
            latents.to(self.dtype), t, encoder_hidden_states=embeddings.to(self.dtype), return_dict=False
        )[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.components.vae.decode(latents.to(self.dtype), return_dict=False)[0]
