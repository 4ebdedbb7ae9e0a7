"""One spec per exported component: tensor names, symbolic shapes, sample inputs and TensorRT profiles.

The same object drives the ONNX export (names, dynamic axes), verification (random inputs at any batch), engine
building (optimisation profiles) and the runtime's buffer allocation. Every size comes from the checkpoint's configs.
Symbolic dimensions: ``B`` batch, ``h``/``w`` latent height/width, ``H``/``W`` = factor x ``h``/``w`` pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from runtime.models import Components

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[Dim, ...]
    dtype: str  # "int64", "float32", or "model" (the export precision)

    def concrete(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)

    def torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return {"int64": torch.int64, "float32": torch.float32}.get(self.dtype, model_dtype)


@dataclass(frozen=True)
class ComponentSpec:
    """An exported graph: its inputs, outputs and the module that computes it."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    factor: int  # VAE scale factor (pixels per latent cell)
    vocab: int  # token ids are drawn below this
    module: Callable[[Components], torch.nn.Module]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def dims(self, batch: int, h: int, w: int) -> dict[str, int]:
        return {"B": batch, "h": h, "w": w, "H": h * self.factor, "W": w * self.factor}

    def dynamic_axes(self, dynamic_hw: bool) -> dict[str, dict[int, str]]:
        """Legacy-exporter ``dynamic_axes``: batch always, spatial sizes on request."""
        names = {"B": "batch", "h": "height", "w": "width", "H": "image_height", "W": "image_width"}
        dyn = {"B"} | ({"h", "w", "H", "W"} if dynamic_hw else set())
        return {t.name: {i: names[d] for i, d in enumerate(t.shape) if isinstance(d, str) and d in dyn}
                for t in (*self.inputs, *self.outputs)}

    def sample_inputs(self, batch: int, h: int, w: int, dtype: torch.dtype = torch.float32,
                      seed: int = 0) -> dict[str, torch.Tensor]:
        """Fresh random inputs (never zeros): token ids, times in [0, 1000], Gaussian latents/embeddings."""
        g = torch.Generator().manual_seed(seed)
        dims = self.dims(batch, h, w)
        out = {}
        for t in self.inputs:
            shape = t.concrete(dims)
            if t.dtype == "int64":
                out[t.name] = torch.randint(0, self.vocab, shape, generator=g)
            elif t.name == "timestep":
                out[t.name] = torch.rand(shape, generator=g) * 1000.0
            else:
                out[t.name] = torch.randn(shape, generator=g).to(t.torch_dtype(dtype))
        return out

    def profile(self, min_batch: int, opt_batch: int, max_batch: int, hw: tuple[int, int],
                hw_range: tuple[tuple[int, int], tuple[int, int]] | None = None
                ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimisation profile: input name -> (min, opt, max) shapes."""
        (h_min, w_min), (h_max, w_max) = hw_range or (hw, hw)
        lo, opt, hi = self.dims(min_batch, h_min, w_min), self.dims(opt_batch, *hw), self.dims(max_batch, h_max, w_max)
        return {t.name: (t.concrete(lo), t.concrete(opt), t.concrete(hi)) for t in self.inputs}


# ------------------------------------------------------------------------------------------- export modules
class TextEncoderGraph(torch.nn.Module):
    """token ids [B, L] -> last hidden state [B, L, D] (pooler output dropped)."""

    def __init__(self, c: Components) -> None:
        super().__init__()
        self.text_encoder = c.text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


class UNetGraph(torch.nn.Module):
    """(sample, timestep [B], encoder_hidden_states) -> velocity."""

    def __init__(self, c: Components) -> None:
        super().__init__()
        self.unet = c.unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
                ) -> torch.Tensor:
        return self.unet(sample, timestep.to(sample.dtype), encoder_hidden_states=encoder_hidden_states,
                         return_dict=False)[0]


class VaeDecoderGraph(torch.nn.Module):
    """unscaled latents -> image in about [-1, 1] (the runtime divides by the scaling factor first)."""

    def __init__(self, c: Components) -> None:
        super().__init__()
        self.vae = c.vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]


class OneStepGraph(torch.nn.Module):
    """The whole one-step hot path: (text embeddings, noise) -> image in [0, 1].

    One Euler step from UNet time 1000 (``runtime.flow``), the VAE scaling/shift, the decoder and the
    [-1, 1] -> [0, 1] mapping, in one graph.
    """

    def __init__(self, c: Components) -> None:
        super().__init__()
        from runtime import flow

        self.unet, self.vae = c.unet, c.vae
        self.t = float(flow.time_grid(1)[0])
        self.scaling, self.shift = c.scaling_factor, c.shift_factor

    def forward(self, text_embeddings: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        from runtime import flow

        t = torch.full((noise.shape[0],), self.t, dtype=noise.dtype, device=noise.device)
        v = self.unet(noise, t, encoder_hidden_states=text_embeddings, return_dict=False)[0]
        latents = flow.euler_step(noise, v, 1.0)
        image = self.vae.decode(latents / self.scaling + self.shift, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)


def component_specs(c: Components, fused: bool = False) -> list[ComponentSpec]:
    """Specs of ``text_encoder``, ``unet``, ``vae_decoder`` (and ``onestep`` when ``fused``) for ``c``."""
    L, D = c.max_length, int(c.text_encoder.config.hidden_size)
    C, f, vocab = c.latent_channels, c.vae_scale_factor, int(c.text_encoder.config.vocab_size)
    latent = ("B", C, "h", "w")
    image = ("B", 3, "H", "W")
    emb = ("B", L, D)
    specs = [
        ComponentSpec("text_encoder", (TensorSpec("input_ids", ("B", L), "int64"),),
                      (TensorSpec("text_embeddings", emb, "model"),), f, vocab, TextEncoderGraph),
        ComponentSpec("unet", (TensorSpec("sample", latent, "model"), TensorSpec("timestep", ("B",), "float32"),
                               TensorSpec("encoder_hidden_states", emb, "model")),
                      (TensorSpec("velocity", latent, "model"),), f, vocab, UNetGraph),
        ComponentSpec("vae_decoder", (TensorSpec("latents", latent, "model"),),
                      (TensorSpec("image", image, "model"),), f, vocab, VaeDecoderGraph),
    ]
    if fused:
        specs.append(ComponentSpec("onestep", (TensorSpec("text_embeddings", emb, "model"),
                                               TensorSpec("noise", latent, "model")),
                                   (TensorSpec("image", image, "model"),), f, vocab, OneStepGraph))
    return specs
