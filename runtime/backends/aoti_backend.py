"""AOTInductor backend: runs the packages ``python -m export.aoti`` compiles ahead of time (``.pt2`` files loaded
with ``torch._inductor.aoti_load_package``): no compilation at start-up, the speed of ``torch.compile``.

A package is machine code for one torch version and one device (a GPU architecture, or the CPU's instruction set):
:meth:`AOTIBackend.open_export` refuses, in one line, packages built for another. Each package takes the batch and
latent sizes of the profile it was compiled for (recorded in the manifest; checked before any work, since a package
called outside them fails deep inside its C++ wrapper); inputs are passed contiguous and in the exported dtypes (a
package does not check strides the way eager torch does). On a GPU the text encoder and the one-step path are
replayed from CUDA graphs, one per input shape, as the torch backend's hot path is: the fused one-step package when
the export has one, else the UNet and decoder packages captured together in one graph (one replay for the whole
step, as the fused package's; the Euler step and the VAE scaling between them in fp32, as the torch backend's graph
does them, where the fused package keeps its dtype; its compile, as long as theirs together, is then saved).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import flow
from ..cache import default_export_dir, device_target
from ..checkpoints import Checkpoint
from ..errors import BackendUnavailableError, ExportError
from ..manifest import GraphEntry, Manifest, read_manifest
from ..specs import DTYPES
from .base import ProfiledBackend
from .graphs import GraphCache, capture_torch

#: the graphs a usable export holds (the fused one-step package is optional)
REQUIRED = ("text_encoder", "unet", "vae_decoder")


def load_package(path: Path, device: torch.device) -> Any:
    """A compiled package, loaded for ``device`` (one line when it cannot be), to be run one call at a time.

    ``run_single_threaded``: the model container's thread-aware ``run`` records a CUDA event after every call and
    queries it at the next one to find a free model instance; once a call has been captured in a CUDA graph that
    event was last recorded in a capturing stream, and the query fails (``cudaErrorCapturedEvent``), failing the
    next capture or call and the CUDA work after it. The single-threaded run skips that bookkeeping (torch's
    docs: "useful to avoid conflicts with CUDAGraphs"); :class:`AOTIBackend` runs one call at a time anyway."""
    from torch._inductor import aoti_load_package

    kwargs: dict[str, Any] = {"run_single_threaded": True}
    if device.type == "cuda":
        kwargs["device_index"] = device.index or 0
    try:
        return aoti_load_package(str(path), **kwargs)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/zipfile errors from C++ and Python
        if isinstance(e, TypeError) and "unexpected keyword" in str(e):
            raise ExportError(f"the aoti backend needs a torch whose aoti_load_package takes run_single_threaded and "
                              f"device_index (2.7 or later); this is torch {torch.__version__}") from None
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot load the AOTInductor package {path} ({text}); re-export it with "
                          "`python -m export.aoti --force`") from None


class Package:
    """One loaded package, called with its inputs cast to its dtypes and made contiguous."""

    def __init__(self, folder: Path, entry: GraphEntry, device: torch.device) -> None:
        self.device = device
        self.names = [t.name for t in entry.inputs]
        self.dtypes = [DTYPES[t.dtype] for t in entry.inputs]
        self.runner = load_package(folder / entry.file, device)

    def cast(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [x.to(device=self.device, dtype=dt).contiguous() for x, dt in zip(inputs, self.dtypes)]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.runner(*inputs)
        return out[0] if isinstance(out, (list, tuple)) else out


class AOTIBackend(ProfiledBackend):
    """Runs the AOTInductor packages of an export: text encoder, UNet, VAE decoder and (optional) the fused one-step
    graph.

    ``cuda_graph``: replay the text encoder and the one-step path from CUDA graphs captured per input shape (default
    on a GPU; at most ``max_graphs`` per package, least recently used dropped). ``allow_unverified``: run packages
    whose verification never ran (``--no-verify``).
    """

    name = "aoti"
    kind = "aoti"
    command = "python -m export.aoti"
    noun = "packages"
    thread_safe = False  # a package's model container and the graphs' static buffers: one call at a time

    @classmethod
    def folder(cls, checkpoint: Checkpoint, export_dir: str | os.PathLike[str] | None, device: torch.device
               ) -> Path:
        """``export_dir``, else the export cache's folder for this kind of device (``aoti/NAME-HASH-cuda``)."""
        return Path(export_dir) if export_dir is not None else default_export_dir(checkpoint, cls.kind, device.type)

    @classmethod
    def open_export(cls, checkpoint: Checkpoint, folder: Path, device: torch.device, allow_unverified: bool = False,
                    **options: Any) -> Manifest:
        manifest = read_manifest(folder) if folder.is_dir() else None
        if manifest is None or manifest.kind != "aoti":
            raise BackendUnavailableError(
                f"no AOTInductor packages of {checkpoint.name} in {folder}; compile them with "
                f"`{cls.command} --ckpt {checkpoint.name} -o {folder}`")
        manifest.source.check_matches(checkpoint, folder, cls.command)
        built = manifest.target
        mismatch = "no target recorded" if built is None else built.mismatch(device_target(device))
        if mismatch:
            raise ExportError(f"the packages in {folder} were {mismatch}; re-export with `{cls.command} --ckpt "
                              f"{checkpoint.name} -o {folder} --force` here")
        problem = manifest.unusable_reason(folder, REQUIRED, allow_unverified)
        if problem:
            raise ExportError(problem)
        return manifest

    def __init__(self, checkpoint: Checkpoint, export_dir: str | os.PathLike[str] | None, device: torch.device,
                 dtype: torch.dtype, cuda_graph: bool | None = None, max_graphs: int = 16,
                 allow_unverified: bool = False) -> None:
        folder = self.folder(checkpoint, export_dir, device)
        manifest = self.open_export(checkpoint, folder, device, allow_unverified=allow_unverified)
        if cuda_graph and device.type != "cuda":
            raise BackendUnavailableError("cuda_graph=True needs a CUDA device")
        self.device, self.export_dir, self.manifest = device, folder, manifest
        self.dims = manifest.dims
        self.dtype = DTYPES[manifest.components["unet"].dtype]
        self.profiles = {name: entry.profile for name, entry in manifest.components.items()}
        self.packages: dict[str, Package] = {}
        for name, entry in manifest.components.items():
            entry.check(folder)
            self.packages[name] = Package(folder, entry, device)
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        self._graphs = {name: GraphCache(capture_torch(self.packages[name], device), max_graphs)
                        for name in ("text_encoder", "onestep") if self.cuda_graph and name in self.packages}
        if self.cuda_graph and "onestep" not in self.packages:  # the UNet and decoder packages in one graph
            self._graphs["onestep"] = GraphCache(capture_torch(self._composed_one_step, device), max_graphs)

    def _run(self, name: str, *tensors: torch.Tensor) -> torch.Tensor:
        package = self.packages[name]
        self.check_inputs(name, package.names, tensors)
        inputs = package.cast(tensors)
        if name in self._graphs:
            return self._graphs[name](*inputs)
        return package(*inputs)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._run("text_encoder", input_ids)

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self._run("unet", latents, t, embeddings)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run("vae_decoder", latents)

    @property
    def has_one_step(self) -> bool:
        """The fused package, or (on a GPU) the UNet and decoder packages replayed as one CUDA graph."""
        return "onestep" in self.packages or "onestep" in self._graphs

    def one_step(self, embeddings: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if "onestep" in self.packages:
            return self._run("onestep", embeddings, noise)
        self.check_inputs("unet", ["encoder_hidden_states", "sample"], (embeddings, noise))  # before the replay
        return self._graphs["onestep"](embeddings, noise)

    def _composed_one_step(self, embeddings: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The one-step path from the UNet and decoder packages (:func:`runtime.flow.one_step_image`, as the fused
        package computes it)."""
        source = self.manifest.source
        return flow.one_step_image(lambda x, t: self._run("unet", x, t, embeddings).float(),
                                   lambda z: self._run("vae_decoder", z).float(), noise, source.scaling_factor,
                                   source.shift_factor)
