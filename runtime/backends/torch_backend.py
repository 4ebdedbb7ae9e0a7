"""PyTorch backend: eager by default; on a GPU optionally channels-last, ``torch.compile`` and CUDA graphs."""

from __future__ import annotations

import warnings

import torch

from .. import flow
from ..cache import use_compile_cache
from ..errors import BackendUnavailableError, InvalidInputError
from ..inductor import autotune_settings
from ..models import Components
from .base import Backend
from .graphs import GraphCache, capture_torch
from .group_norm import use_split_group_norm


class TorchBackend(Backend):
    """The components called from PyTorch (diffusers uses SDPA attention by default).

    Options (each changes speed only; the CUDA-graph path is tested to equal the eager one):

    * ``channels_last``: NHWC memory format for the UNet and VAE convolutions (faster on tensor cores).
    * ``fuse_qkv``: one matrix multiply for the query/key/value projections of every attention layer (diffusers'
      ``fuse_qkv_projections``; same results up to rounding), in the modules that have them (a tiny decoder has
      no attention). LoRAs loaded later are written into the fused projections too.
    * ``fast_group_norm``: GroupNorm as split reductions and one fused multiply-add
      (:mod:`runtime.backends.group_norm`) instead of PyTorch's kernel, which runs one thread block per (image,
      group) and copies channels-last input around itself; the same function up to rounding. Meant for eager and
      CUDA-graph runs on a GPU at small batch (Inductor fuses the native one well by itself).
    * ``compile``: ``torch.compile`` the UNet and VAE decoder (minutes of compilation on first use per shape, once
      per machine: Inductor's caches are kept in the project's cache folder, per torch version and device, see
      :func:`runtime.cache.use_compile_cache`; a later process compiles in seconds).
    * ``autotune`` (with ``compile``): Inductor's slow autotuning (:mod:`runtime.inductor`; meant for a GPU: on the
      CPU it has nothing to choose between here): more compilation per shape, cached the same way.
    * ``cuda_graph``: replay CUDA graphs captured per input shape (see :mod:`runtime.backends.graphs`): one for the
      whole one-step hot path (UNet -> Euler step -> VAE decode -> [0, 1] image) per (batch, height, width) and one
      for the text encoder per batch size; static buffers, warm-up before capture, outputs copied out so calls never
      alias each other. The text encoder has a graph of its own so that the pipeline's prompt-embedding cache can
      skip it.
    """

    name = "torch"

    def __init__(self, components: Components, device: torch.device, dtype: torch.dtype,
                 channels_last: bool = False, compile: bool = False, cuda_graph: bool = False,
                 fuse_qkv: bool = False, fast_group_norm: bool = False, autotune: bool = False,
                 max_graphs: int = 16) -> None:
        if cuda_graph and device.type != "cuda":
            raise BackendUnavailableError("cuda_graph=True needs a CUDA device")
        if autotune and not compile:
            raise InvalidInputError("autotune=True tunes what torch.compile compiles: pass compile=True too")
        self.components = components
        self.device = device
        self.dtype = dtype
        self._mask = bool(getattr(components.text_encoder.config, "use_attention_mask", False))
        self._encode_graphs: GraphCache | None = None
        self.cuda_graph = cuda_graph  # eager calls share nothing; graph caches serialise their own replays
        self.unet, self.vae_decode = components.unet, components.vae.decode
        if channels_last:
            components.unet.to(memory_format=torch.channels_last)
            components.vae.to(memory_format=torch.channels_last)
        self.fuse_qkv = fuse_qkv
        if fuse_qkv:  # changes the modules in place, like channels_last
            for module in (components.unet, components.vae):
                if hasattr(module, "fuse_qkv_projections") and not is_fused(module):
                    module.fuse_qkv_projections()
        if fast_group_norm:  # in place too
            for module in (components.unet, components.vae):
                use_split_group_norm(module)
        if compile:  # what compiles once per shape is kept on disk: a later process loads it (runtime.cache)
            self.compile_cache = use_compile_cache(device)
            options = autotune_settings(device) if autotune else None
            self.unet = torch.compile(components.unet, fullgraph=False, options=options)
            self.vae_decode = torch.compile(components.vae.decode, fullgraph=False, options=options)
        if cuda_graph:
            self._one_step_graphs = GraphCache(capture_torch(self._one_step_eager, device), max_graphs)
            self._encode_graphs = GraphCache(capture_torch(self._encode_eager, device), max_graphs)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = attention_mask if self._mask else None
        if self._encode_graphs is not None:
            inputs = (input_ids,) if mask is None else (input_ids, mask)
            try:
                return self._encode_graphs(*inputs)
            except RuntimeError as e:  # a text encoder with host syncs cannot be captured: run it eagerly
                warnings.warn(f"the text encoder cannot be captured as a CUDA graph and runs eagerly "
                              f"({str(e).splitlines()[0][:160]})", RuntimeWarning, stacklevel=2)
                self._encode_graphs = None
        return self._encode_eager(input_ids, mask)

    def _encode_eager(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.components.text_encoder(input_ids, attention_mask=mask, return_dict=False)[0]

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self.unet(latents.to(self.dtype), t, encoder_hidden_states=embeddings.to(self.dtype),
                         return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae_decode(latents.to(self.dtype), return_dict=False)[0]

    # ------------------------------------------------------------------------------------------ one step
    @property
    def has_one_step(self) -> bool:
        """A fused one-step path pays off only as one captured CUDA graph; eagerly it is the pipeline's own
        step-by-step path, so it is offered exactly when ``cuda_graph`` is on."""
        return self.cuda_graph

    def check_lora_change(self) -> None:
        """LoRAs are fused into the weights in place (fused QKV projections included): always allowed."""

    def _one_step_eager(self, embeddings: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        c = self.components
        return flow.one_step_image(lambda x, t: self.velocity(x, t, embeddings).float(),
                                   lambda z: self.decode(z).float(), noise, c.scaling_factor, c.shift_factor)

    def one_step(self, embeddings: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One Euler step + decode -> images in [0, 1], replayed from the CUDA graph captured for this shape."""
        return self._one_step_graphs(embeddings, noise)


def is_fused(module: torch.nn.Module) -> bool:
    """Whether ``module``'s attention projections are fused already. Fusing again would replace every ``to_qkv`` /
    ``to_kv`` with new tensors, which breaks the CUDA graphs and compiled code of another pipeline sharing the
    modules (they keep reading the old, freed weights)."""
    return any(getattr(m, "fused_projections", False) for m in module.modules())

