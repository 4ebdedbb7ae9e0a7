"""PyTorch backend: eager by default; on a GPU optionally channels-last, ``torch.compile`` and CUDA graphs."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

from .. import flow

if TYPE_CHECKING:
    from ..models import Components


class TorchBackend:
    """The components called from PyTorch (diffusers uses SDPA attention by default).

    Options (each changes speed only; the CUDA-graph path is tested to equal the eager one):

    * ``channels_last``: NHWC memory format for the UNet and VAE convolutions (faster on tensor cores).
    * ``compile``: ``torch.compile`` the UNet and VAE decoder (minutes of compilation on first use per shape).
    * ``cuda_graph``: capture the one-step hot path (UNet -> Euler step -> VAE decode -> [0, 1] image) as ONE CUDA
      graph per (batch, height, width), with static buffers and a warm-up before capture; outputs are copied out so
      calls never alias each other. The text encoder stays outside the graph: its results are cached per prompt.
    """

    name = "torch"

    def __init__(self, components: "Components", device: torch.device, dtype: torch.dtype,
                 channels_last: bool = False, compile: bool = False, cuda_graph: bool = False) -> None:
        if cuda_graph and device.type != "cuda":
            from ..errors import BackendUnavailableError

            raise BackendUnavailableError("cuda_graph=True needs a CUDA device")
        self.components = components
        self.device = device
        self.dtype = dtype
        self._mask = bool(getattr(components.text_encoder.config, "use_attention_mask", False))
        self.cuda_graph = cuda_graph
        self.thread_safe = not cuda_graph  # graphs replay into shared static buffers
        self._graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._capture_lock = threading.Lock()
        self.unet, self.vae_decode = components.unet, components.vae.decode
        if channels_last:
            components.unet.to(memory_format=torch.channels_last)
            components.vae.to(memory_format=torch.channels_last)
        if compile:
            self.unet = torch.compile(components.unet, fullgraph=False)
            self.vae_decode = torch.compile(components.vae.decode, fullgraph=False)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = attention_mask if self._mask else None
        return self.components.text_encoder(input_ids, attention_mask=mask, return_dict=False)[0]

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self.unet(latents.to(self.dtype), t, encoder_hidden_states=embeddings.to(self.dtype),
                         return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae_decode(latents.to(self.dtype), return_dict=False)[0]

    # ------------------------------------------------------------------------------------------ CUDA graphs
    @property
    def has_one_step(self) -> bool:
        return self.cuda_graph

    def _one_step_eager(self, embeddings: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        c = self.components
        t = torch.full((noise.shape[0],), flow.time_grid(1)[0], device=noise.device, dtype=torch.float32)
        x = flow.euler_step(noise, self.velocity(noise, t, embeddings).float(), 1.0)
        image = self.decode(x / c.scaling_factor + c.shift_factor)
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def one_step(self, embeddings: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One Euler step + decode -> images in [0, 1], replayed from a CUDA graph captured for this shape."""
        key = (*embeddings.shape, *noise.shape)
        entry = self._graphs.get(key)
        if entry is None:
            with self._capture_lock:
                entry = self._graphs.get(key) or self._capture(embeddings, noise)
                self._graphs[key] = entry
        graph, static_emb, static_noise, static_out = entry
        static_emb.copy_(embeddings)
        static_noise.copy_(noise)
        graph.replay()
        return static_out.clone()

    def _capture(self, embeddings: torch.Tensor, noise: torch.Tensor):
        static_emb, static_noise = embeddings.clone(), noise.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: cuDNN/cuBLAS choices and lazy allocations happen outside the capture
                self._one_step_eager(static_emb, static_noise)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._one_step_eager(static_emb, static_noise)
        return graph, static_emb, static_noise, static_out
