"""The backend contract: what a backend must do, what it may do, and the defaults.

A backend runs the three networks of a text-to-image flow; everything else (tokens, noise, Euler steps, guidance,
images) is the pipeline's (:mod:`runtime.pipeline`). To add one, write one file with a subclass of :class:`Backend`
(runs modules in memory) or :class:`ExportedBackend` (runs an export made by an ``export.*`` command), fill in the
abstract members, override the optional ones that apply, and name it in :data:`runtime.backends.REGISTRY`.

Required: :attr:`Backend.name`, :meth:`~Backend.encode`, :meth:`~Backend.velocity`, :meth:`~Backend.decode`; for an
exported backend also :attr:`~ExportedBackend.kind`, :attr:`~ExportedBackend.command` and
:meth:`~ExportedBackend.open_export`, the one place that says whether an export can run here (``backend="auto"``
asks it before choosing the backend; the constructor asks it again and runs what it returns).

Optional, with their defaults: :attr:`~Backend.thread_safe` (True), :attr:`~Backend.has_one_step` (False) with
:meth:`~Backend.one_step`, :meth:`~Backend.check_size` and :meth:`~Backend.check_batch` (any size, any batch),
:meth:`~Backend.check_lora_change` (refused: LoRAs are fused at export time).

All tensors are on :attr:`~Backend.device`; inputs may come in any float dtype and are cast as the backend needs;
outputs are fresh tensors a later call never overwrites.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..cache import default_export_dir
from ..checkpoints import Checkpoint
from ..errors import InvalidInputError


class Backend(abc.ABC):
    """Runs the networks: text encoder, UNet velocity, VAE decoder (and optionally a fused one-step path)."""

    #: the name ``Pipeline.from_pretrained(backend=...)`` takes
    name: ClassVar[str]
    #: False when calls share mutable state (CUDA graphs of one thread, execution contexts, activation memory): the
    #: pipeline then runs one call at a time. An instance may set it from its options.
    thread_safe: bool = True
    device: torch.device
    dtype: torch.dtype

    @abc.abstractmethod
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``[B, L]`` -> text embeddings ``[B, L, D]`` (last hidden state)."""

    @abc.abstractmethod
    def velocity(self, latents: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """UNet velocity for ``latents [B, C, h, w]`` at UNet times ``t [B]`` given ``embeddings [B, L, D]``."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decoder on already unscaled latents -> images ``[B, 3, H, W]`` in about [-1, 1]."""

    # ---------------------------------------------------------------------------------------------- optional
    @property
    def has_one_step(self) -> bool:
        """Whether :meth:`one_step` runs the fused hot path (the pipeline then uses it for one step without
        guidance)."""
        return False

    def one_step(self, embeddings: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One Euler step from ``noise`` at UNet time 1000 and the decode, fused: -> images in [0, 1] (float), as
        :func:`runtime.flow.one_step_image` computes them."""
        raise NotImplementedError(f"the {self.name} backend has no fused one-step path")

    def check_size(self, height: int, width: int) -> None:
        """Raise :class:`InvalidInputError` (one line) for an image size this backend's graphs cannot take; called
        before any work. Default: every size the pipeline allows."""

    def check_batch(self, images: int) -> None:
        """Raise :class:`InvalidInputError` (one line) for more images in one call than this backend takes; called
        before any work. Default: any number."""

    def check_lora_change(self) -> None:
        """Raise :class:`InvalidInputError` (one line) when LoRAs cannot be fused into (or taken out of) the running
        weights. Default: refused, since an export holds its weights; fuse them at export time."""
        raise InvalidInputError(f"the {self.name} backend runs an export: fuse LoRAs into it at export time "
                                "(`--lora FILE[:SCALE]`)")


class ExportedBackend(Backend):
    """A backend that runs an export: graphs, engines or packages written by an ``export.*`` command, found in an
    ``export_dir`` or in the export cache (:func:`runtime.cache.default_export_dir` of :attr:`kind`)."""

    #: the export cache's sub-folder for this backend's exports (``onnx``, ``trt``, ``aoti``)
    kind: ClassVar[str]
    #: the command that makes such an export (named in messages)
    command: ClassVar[str]

    @classmethod
    def folder(cls, checkpoint: Checkpoint, export_dir: str | os.PathLike[str] | None, device: torch.device
               ) -> Path:
        """Where this backend looks for ``checkpoint``'s export for ``device``: ``export_dir``, else the export
        cache."""
        return Path(export_dir) if export_dir is not None else default_export_dir(checkpoint, cls.kind)

    @classmethod
    @abc.abstractmethod
    def open_export(cls, checkpoint: Checkpoint, folder: Path, device: torch.device, **options: Any) -> Any:
        """The export in ``folder``, checked to run here for ``checkpoint`` on ``device`` with the constructor's
        ``options``, or one line saying why not: :class:`~runtime.errors.BackendUnavailableError` when there is
        nothing to run (no export, no library, wrong kind of device: ``auto`` passes over it silently),
        :class:`~runtime.errors.ExportError` when there is an export that must not run here (another checkpoint,
        GPU or library version, corrupted, unverified: ``auto`` passes over it with one warning)."""

    def check_lora_change(self) -> None:
        raise InvalidInputError(f"the {self.name} backend runs an export: fuse LoRAs into it with "
                                f"`{self.command} --lora FILE[:SCALE]`")


class ProfiledBackend(ExportedBackend):
    """An exported backend whose graphs take a range of shapes fixed when they were built (TensorRT engines'
    optimisation profiles, AOTInductor packages' dynamic dimensions): sizes and batches are checked against them
    before any work, and every graph's inputs before it runs, in one line each (outside its range a graph fails
    deep inside the library). Subclasses set :attr:`profiles` and :attr:`dims` in their constructor."""

    #: what the graphs are called in messages ("engines", "packages")
    noun: ClassVar[str]
    #: per graph: input name -> (min, opt, max) shapes
    profiles: dict[str, dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]
    dims: Any  # runtime.specs.ModelDims
    export_dir: Path

    def check_size(self, height: int, width: int) -> None:
        f = self.dims.vae_scale_factor
        h, w = height // f, width // f
        self.dims.check_latent_size(h, w, what=f"the {self.noun} in {self.export_dir}")
        lo, _, hi = self.profiles["unet"]["sample"]
        if not (lo[2] <= h <= hi[2] and lo[3] <= w <= hi[3]):
            raise InvalidInputError(f"{height}x{width} px is outside what the {self.noun} in {self.export_dir} were "
                                    f"built for ({lo[2] * f}x{lo[3] * f} .. {hi[2] * f}x{hi[3] * f} px); rebuild "
                                    f"with other --height/--width (`{self.command}`)")

    def check_batch(self, images: int) -> None:
        most = self.profiles["vae_decoder"]["latents"][2][0]
        if images > most:
            raise InvalidInputError(f"{images} images in one call, but the {self.noun} in {self.export_dir} were "
                                    f"built for at most {most}; rebuild with `{self.command} --max-batch {images}`")

    def check_inputs(self, name: str, names: list[str], tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]
                     ) -> None:
        """One line when a graph's inputs are outside its profile."""
        for tensor_name, x in zip(names, tensors):
            lo, _, hi = self.profiles[name][tensor_name]
            shape = tuple(x.shape)
            if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
                raise InvalidInputError(f"{tensor_name} shape {list(shape)} is outside what the {name} "
                                        f"{self.noun[:-1]} was built for ({list(lo)} .. {list(hi)}); rebuild with "
                                        "other --max-batch/--height/--width")
