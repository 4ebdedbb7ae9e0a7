"""The modules ``export.onnx`` traces, one per component spec (:mod:`runtime.specs`): each takes the spec's inputs
in order and returns its output."""

from __future__ import annotations

import torch

from runtime import flow
from runtime.models import Components


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
    """The whole one-step hot path, :func:`runtime.flow.one_step_image`: (text embeddings, noise) -> image in
    [0, 1], in one graph. The decoder runs as the submodule ``vae_decoder``, so its nodes are named
    ``/vae_decoder/...`` (``--vae-fp32`` keeps exactly those in fp32)."""

    def __init__(self, c: Components) -> None:
        super().__init__()
        self.unet = c.unet
        self.vae_decoder = VaeDecoderGraph(c)
        self.scaling, self.shift = c.scaling_factor, c.shift_factor

    def forward(self, text_embeddings: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        image = flow.one_step_image(
            lambda x, t: self.unet(x, t, encoder_hidden_states=text_embeddings, return_dict=False)[0],
            self.vae_decoder, noise, self.scaling, self.shift, t_dtype=noise.dtype)
        return image.float()  # the spec's output type, whatever the graph's precision


#: component name -> the module that computes its graph
MODULES: dict[str, type[torch.nn.Module]] = {"text_encoder": TextEncoderGraph, "unet": UNetGraph,
                                             "vae_decoder": VaeDecoderGraph, "onestep": OneStepGraph}


def module_for(name: str, components: Components) -> torch.nn.Module:
    """The module of component ``name`` over ``components``, in eval mode."""
    return MODULES[name](components).eval()
