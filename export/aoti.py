"""Compile text encoder, UNet, VAE decoder and the fused one-step graph ahead of time with AOTInductor, once per
machine, so that a process loads them in seconds instead of compiling for minutes.

    python -m export.aoti --ckpt CKPT [-o DIR] [--device cuda|cpu] [--fp32] [--max-batch 8] [--autotune]
                          [--height H --width W | --static] [--vae taesd] [--lora FILE[:SCALE]] [--force]

Each graph (the modules of :mod:`export.graphs`, the tensors of :mod:`runtime.specs`) goes through
``torch.export.export`` with the batch and, unless ``--static``, the latent height and width as dynamic dimensions
over the ranges of the component spec's profile (batch 1 to ``--max-batch`` images, doubled for the graphs that see
guidance; sides from half to twice the default, in multiples of the UNet's downsampling), then through
``torch._inductor.aoti_compile_and_package`` into ``NAME.pt2``. fp16 on CUDA by default, fp32 on the CPU. The
packages are verified against PyTorch in fp32 like ONNX graphs (:mod:`export.compare`: two batch sizes and a second
size, its fp32 and fp16 tolerances) and listed in ``manifest.json`` with the torch version and device they were
compiled for;
``Pipeline.from_pretrained(ckpt, backend="aoti", export_dir=DIR)`` runs them (``auto`` finds them in the export
cache, ``~/.cache/instaflow-rt/aoti/NAME-HASH-DEVICE``, where they go without ``-o``).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from runtime.backends.aoti_backend import Package
from runtime.cache import default_export_dir, device_target
from runtime.checkpoints import Checkpoint
from runtime.cli import description, run_cli
from runtime.errors import BackendUnavailableError, ExportError
from runtime.inductor import autotune_settings
from runtime.inputs import parse_device
from runtime.manifest import ExportSettings, GraphEntry, Manifest, Source, Target, Verification
from runtime.models import Components
from runtime.specs import ComponentSpec, ModelDims

from .compare import Runner, compare
from .exporter import Exporter, check_free_space, latent_size_of
from .graphs import module_for


class AOTIExporter(Exporter):
    """AOTInductor packages, compiled for one device and verified against PyTorch. ``autotune``: Inductor's
    slow autotuning (:func:`runtime.inductor.autotune_settings`)."""

    kind = "aoti"
    command = "python -m export.aoti"

    def __init__(self, settings: ExportSettings, device: torch.device, max_batch: int = 8,
                 hw: tuple[int, int] | None = None, autotune: bool = False) -> None:
        super().__init__(settings)
        self.device, self.max_batch, self.hw, self.autotune = device, max_batch, hw, autotune

    def check_settings(self) -> None:
        super().check_settings()
        if self.settings.vae_fp32:
            raise ExportError("--vae-fp32 is not available for AOTInductor packages (ONNX and TensorRT only)")
        if self.settings.fp16 and self.device.type != "cuda":
            raise ExportError("fp16 packages are compiled for CUDA only; on the CPU they are fp32 (fp16=True was given "
                              "with device='cpu')")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("--device cuda, but this machine has no CUDA GPU (use --device cpu)")
        if self.max_batch < 1:
            raise ExportError(f"--max-batch must be >= 1, got {self.max_batch}")

    def default_folder(self, checkpoint: Checkpoint) -> Path:
        """The export cache's folder for this kind of device, where the aoti backend looks."""
        return default_export_dir(checkpoint, self.kind, self.device.type)

    def target(self) -> Target:
        return device_target(self.device)

    def exporter_info(self) -> dict[str, Any]:
        return {"name": "aoti", **self.versions()}

    # ----------------------------------------------------------------------------------------------- shapes
    def latent_hw(self, dims: ModelDims) -> tuple[int, int]:
        """The latent size the packages are compiled around: ``hw`` (checked by :func:`export_aoti` when it was
        given), else the checkpoint's."""
        return self.hw or dims.latent_size

    def profile(self, spec: ComponentSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        hw = self.latent_hw(spec.dims)
        return spec.profile(1, 1, self.max_batch, hw, spec.dims.size_range(hw) if self.settings.dynamic_hw else None)

    def dynamic_shapes(self, spec: ComponentSpec) -> dict[str, dict[int, Any]]:
        """``torch.export`` dynamic shapes from the profile: one batch dimension shared by all inputs and, with
        dynamic sizes, latent height and width as multiples of the UNet's downsampling."""
        from torch.export import Dim

        profile, m = self.profile(spec), spec.dims.latent_multiple
        first = profile[spec.inputs[0].name]
        batch = Dim("batch", min=first[0][0], max=first[2][0]) if first[0][0] < first[2][0] else None
        sides: dict[str, Any] = {}
        latents = [profile[t.name] for t in spec.inputs if "h" in t.shape]
        if self.settings.dynamic_hw and latents:
            lo, _, hi = latents[0]
            for sym, axis in (("h", 2), ("w", 3)):
                if lo[axis] < hi[axis]:
                    core = Dim(f"_{sym}", min=lo[axis] // m, max=hi[axis] // m)
                    sides[sym] = m * core if m > 1 else core
        out: dict[str, dict[int, Any]] = {}
        for t in spec.inputs:
            axes: dict[int, Any] = {}
            for i, d in enumerate(t.shape):
                if d == "B" and batch is not None:
                    axes[i] = batch
                elif d in sides:
                    axes[i] = sides[d]
            out[t.name] = axes
        return out

    def key(self, spec: ComponentSpec, source: Source) -> dict[str, Any]:
        profile = {k: [list(s) for s in v] for k, v in self.profile(spec).items()}
        return {**super().key(spec, source), "profile": profile, "target": vars(self.target()).copy(),
                "inductor": self.inductor_configs()}

    def inductor_configs(self) -> dict[str, Any]:
        """Inductor settings of every package (part of the reuse key: packages made otherwise are made again)."""
        tuning = autotune_settings(self.device) if self.autotune else {}
        if self.device.type == "cuda":  # the C++ wrapper only launches kernels (replayed from CUDA graphs): compile
            return {"aot_inductor.compile_wrapper_opt_level": "O0", **tuning}  # it fast
        # CPU: weights as constants, so convolutions and linears run on weights prepacked for oneDNN at compile time
        # (without it the small SD-shaped subject ran 1.28x slower than eager; with it 0.96x, benchmarks/RESULTS.md)
        return {"freezing": True, **tuning}

    # --------------------------------------------------------------------------------------------- the graph
    def make(self, spec: ComponentSpec, components: Components, out: Path, key: dict[str, Any]) -> GraphEntry:
        from torch._inductor import aoti_compile_and_package

        dtype = self.settings.dtype_of(spec.name)
        module = module_for(spec.name, components)
        check_free_space(out, spec.name, module, factor=1.0)
        if (self.device.type, dtype) != ("cpu", torch.float32):  # the fp32 CPU modules stay the reference
            module = copy.deepcopy(module).to(self.device, dtype)
        batch = min(2, self.profile(spec)[spec.inputs[0].name][2][0])  # not 1: torch.export specialises size 1
        inputs = {k: v.to(self.device) for k, v in spec.sample_inputs(batch, *self.latent_hw(spec.dims),
                                                                      dtype=dtype).items()}
        file = f"{spec.name}.pt2"
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=out))
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.export(module, tuple(inputs.values()),
                                              dynamic_shapes=self.dynamic_shapes(spec), strict=False)
                configs: dict[str, Any] = {"aot_inductor.metadata": {"instaflow_graph": spec.name,
                                                                     "instaflow_torch": torch.__version__},
                                           **self.inductor_configs()}
                aoti_compile_and_package(program, package_path=str(tmp / file), inductor_configs=configs)
            (tmp / file).replace(out / file)
        except (RuntimeError, ValueError, TypeError, AssertionError) as e:  # torch's export/compile failures
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ExportError(f"AOTInductor could not compile {spec.name} ({type(e).__name__}: {first})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        del module
        sha256, stamp = GraphEntry.hash_of(out, file)
        return GraphEntry(file=file, sha256=sha256, stamp=stamp, dtype=str(dtype).replace("torch.", ""),
                          inputs=tuple(t.resolved(dtype) for t in spec.inputs),
                          outputs=tuple(t.resolved(dtype) for t in spec.outputs), key=key,
                          profile=self.profile(spec))

    def verify(self, out: Path, manifest: Manifest, components: Components) -> Verification:
        return verify_aoti(out, manifest, components)


def package_runner(folder: Path, entry: GraphEntry, device: torch.device) -> Runner:
    """A :data:`~export.compare.Runner` of a compiled package on ``device`` (outputs back on the CPU)."""
    package = Package(folder, entry, device)
    return lambda inputs: package(*package.cast(inputs)).cpu()


def verify_aoti(folder: Path, manifest: Manifest, components: Components, batches: Sequence[int] = (1, 2)
                ) -> Verification:
    """:func:`export.compare.compare` for the packages of an export, run on the device they were compiled for
    (batches beyond the packages' range are left out)."""
    if manifest.target is None:
        return Verification(False, (), f"{folder}: the manifest records no target device")
    device = torch.device(manifest.target.device)
    most = min(e.profile[e.inputs[0].name][2][0] for e in manifest.components.values())
    usable = tuple(dict.fromkeys(min(b, most) for b in batches))
    return compare(folder, manifest, components, lambda entry: package_runner(folder, entry, device), usable)


def export_aoti(ckpt: str, out: str | Path | None = None, device: str | torch.device | None = None,
                fp16: bool | None = None, max_batch: int = 8, height: int | None = None, width: int | None = None,
                static: bool = False, force: bool = False, verify: bool = True, only: Sequence[str] | None = None,
                vae: str | None = None, lora: Any = None, autotune: bool = False) -> Manifest:
    """Compile (or reuse) the packages of ``ckpt`` into ``out`` (default: the export cache's folder for the device,
    where ``auto`` finds them) for ``device`` (default: CUDA when available), verify them and return the manifest;
    ``fp16`` defaults to True on CUDA. ``height``/``width`` in pixels set the size the dynamic range is centred on
    (default: the checkpoint's). ``autotune``: Inductor's slow autotuning (longer compiles; packages compiled
    without it are compiled again)."""
    dev = parse_device(device)
    half = dev.type == "cuda" if fp16 is None else fp16
    settings = ExportSettings(fp16=half, dynamic_hw=not static, fused=True)
    hw = latent_size_of(ckpt, height, width, static, vae) if height is not None or width is not None else None
    exporter = AOTIExporter(settings, dev, max_batch, hw, autotune=autotune)
    return exporter.run(ckpt, out, force=force, verify=verify, only=only, vae=vae, lora=lora)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.aoti", description=description(__doc__))
    p.add_argument("--ckpt", required=True, help="alias, hub id or local diffusers folder")
    p.add_argument("-o", "--output", default=None,
                   help="output folder [the export cache, where Pipeline.from_pretrained finds it: "
                        "$INSTAFLOW_CACHE/aoti/NAME-FINGERPRINT-DEVICE]")
    p.add_argument("--device", default=None, help="cuda or cpu [cuda when available]")
    p.add_argument("--fp32", action="store_true", help="fp32 packages on CUDA (default there: fp16)")
    p.add_argument("--max-batch", type=int, default=8, help="most images per call [8]")
    p.add_argument("--height", type=int, default=None, help="pixels [the checkpoint's default]")
    p.add_argument("--width", type=int, default=None, help="pixels [the checkpoint's default]")
    p.add_argument("--static", action="store_true", help="the checkpoint's default size only")
    p.add_argument("--autotune", action="store_true",
                   help="Inductor's max-autotune (benchmarks kernel choices while compiling): longer, once")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="compile only these graphs (text_encoder, unet, vae_decoder, onestep)")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch (not recommended)")
    p.add_argument("--force", action="store_true", help="replace an export of another checkpoint in the folder")
    p.add_argument("--vae", default=None, help="tiny decoder instead of the checkpoint's VAE: taesd, hub id, folder")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="fuse a LoRA into the compiled weights; repeat for several")
    args = p.parse_args(argv)
    return run_cli(lambda: export_aoti(args.ckpt, args.output, device=args.device, fp16=False if args.fp32 else None,
                                       max_batch=args.max_batch, height=args.height, width=args.width,
                                       static=args.static, force=args.force, verify=not args.no_verify,
                                       only=args.only, vae=args.vae, lora=args.lora, autotune=args.autotune))


if __name__ == "__main__":
    sys.exit(main())
