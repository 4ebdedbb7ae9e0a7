"""Export text encoder, UNet and VAE decoder (and optionally the fused one-step graph) to ONNX, then verify.

    python -m export.onnx --ckpt CKPT [-o DIR] [--fp16 [--vae-fp32]] [--opset 17] [--dynamic-hw]
                          [--fused] [--force]

Graphs are exported with PyTorch's TorchScript-based exporter (``dynamo=False``) and explicit ``dynamic_axes``
(batch always, height/width on request); every exported shape is then checked by running the graph in
onnxruntime at two batch sizes (:mod:`export.verify`). Graphs over 2 GB (the fp32 SD UNet is 3.4 GB) are stored
with their weights in one ``NAME.onnx.data`` file beside them. A ``manifest.json`` records the checkpoint's content
hash, each file's hash, tensors, opset and tool versions; re-running with the same inputs reuses hash-checked files.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from runtime.cli import run_cli
from runtime.errors import ExportError
from runtime.manifest import ExportSettings, GraphEntry, Manifest, Verification
from runtime.models import Components
from runtime.specs import ComponentSpec

from .exporter import Exporter, check_free_space
from .graphs import module_for
from .verify import verify_onnx

MIN_OPSET, MAX_OPSET = 14, 20
DEFAULT_OPSET = 17
#: graphs with more weight bytes than this keep them in external data (protobuf cannot serialise 2 GB)
EXTERNAL_DATA_BYTES = 2**31 - 2**26

__all__ = ["ExportSettings", "OnnxExporter", "export"]


class OnnxExporter(Exporter):
    """ONNX graphs through PyTorch's TorchScript-based exporter, verified in onnxruntime."""

    kind = "onnx"
    command = "python -m export.onnx"

    def check_settings(self) -> None:
        super().check_settings()
        if not MIN_OPSET <= self.settings.opset <= MAX_OPSET:
            raise ExportError(f"unsupported opset {self.settings.opset}; choose {MIN_OPSET}..{MAX_OPSET}")

    def versions(self) -> dict[str, str]:
        import onnx

        return {**super().versions(), "onnx": onnx.__version__}

    def exporter_info(self) -> dict[str, Any]:
        return {"name": "torchscript", "opset": self.settings.opset, **self.versions()}

    def verify(self, out: Path, manifest: Manifest, components: Components) -> Verification:
        return verify_onnx(out, manifest, components)

    def make(self, spec: ComponentSpec, components: Components, out: Path, key: dict[str, Any]) -> GraphEntry:
        """Export one graph into ``out`` (through a temporary folder, renamed at the end)."""
        import onnx

        settings = self.settings
        dtype = settings.dtype_of(spec.name)
        module = module_for(spec.name, components)
        check_free_space(out, spec.name, module)
        inputs = spec.sample_inputs(1, dtype=torch.float32)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=out))
        try:
            path = tmp / spec.file
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module, tuple(inputs.values()), str(path), input_names=[t.name for t in spec.inputs],
                    output_names=[t.name for t in spec.outputs],
                    dynamic_axes=spec.dynamic_axes(settings.dynamic_hw), opset_version=settings.opset,
                    do_constant_folding=True, dynamo=False,
                )
            _consolidate(path)
            if dtype == torch.float16:
                _to_fp16(path, keep=[t.name for t in (*spec.inputs, *spec.outputs) if t.dtype == "float32"],
                         fp32_scopes=settings.fp32_scopes(spec.name))
            _set_output_shapes(path, spec, settings.dynamic_hw)
            onnx.shape_inference.infer_shapes_path(str(path), str(path))
            _consolidate(path)
            for f in tmp.iterdir():
                f.replace(out / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        sha256, stamp = GraphEntry.hash_of(out, spec.file)
        return GraphEntry(file=spec.file, sha256=sha256, stamp=stamp, dtype=str(dtype).replace("torch.", ""),
                          inputs=tuple(t.resolved(dtype) for t in spec.inputs),
                          outputs=tuple(t.resolved(dtype) for t in spec.outputs), key=key,
                          external_data=(out / (spec.file + ".data")).exists())


def export(ckpt: str, out: str | Path | None = None, settings: ExportSettings | None = None, force: bool = False,
           verify: bool = True, only: Sequence[str] | None = None, vae: str | None = None,
           lora: Any = None) -> Manifest:
    """Export (or reuse) the graphs of ``ckpt`` into ``out`` (all, or those named in ``only``; default: the export
    cache, where the onnxruntime backend finds them), verify them, and return the manifest
    (:meth:`export.exporter.Exporter.run`). A re-run whose graphs are all reused, hash-checked,
    keeps their earlier verification. ``vae``: a tiny decoder (``taesd``, hub id or folder) exported instead of the
    checkpoint's VAE decoder; ``lora``: LoRAs fused into the exported weights (as ``Pipeline.from_pretrained(lora=
    ...)`` takes them)."""
    return OnnxExporter(settings or ExportSettings()).run(ckpt, out, force=force, verify=verify, only=only, vae=vae,
                                                          lora=lora)


def _set_output_shapes(path: Path, spec: ComponentSpec, dynamic_hw: bool) -> None:
    """Write the spec's output shapes into the graph (the exporter leaves some static dims symbolic), so that
    consumers such as TensorRT see e.g. the 77-token axis as fixed. Weights stay where they are."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    axes = spec.dynamic_axes(dynamic_hw)
    for out, t in zip(model.graph.output, spec.outputs):
        dims = out.type.tensor_type.shape.dim
        for i, (d, s) in enumerate(zip(dims, t.shape)):
            if i in axes.get(t.name, {}):
                d.dim_param = axes[t.name][i]
            elif isinstance(s, int):
                d.dim_value = s
    onnx.save_model(model, str(path))


def _to_fp16(path: Path, keep: list[str], fp32_scopes: tuple[str, ...] = ()) -> None:
    """fp32 graph -> fp16 weights and compute (onnxruntime's converter; ops unsafe in fp16 stay fp32 behind
    casts). Tracing the module in fp16 on the CPU instead gives graphs with mixed types that onnxruntime rejects.

    Works above protobuf's 2 GB limit (the fp32 SD UNet is 3.4 GB): the converter gets the file's path, so its shape
    inference runs on the file (``infer_shapes_path``), and nothing serialises the whole model in memory; the result
    is saved with its weights in external data whenever they are large."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    blocked = None
    if fp32_scopes:  # names only: the weights stay on disk
        graph = onnx.load(str(path), load_external_data=False).graph
        blocked = [n.name for n in graph.node if n.name.startswith(fp32_scopes)]
    model = convert_float_to_float16(str(path), keep_io_types=keep, node_block_list=blocked)
    for p in path.parent.iterdir():
        p.unlink()
    _save(model, path)


def _weight_bytes(model: Any) -> int:
    """Bytes of a model's initializers (protobuf's ``ByteSize()`` fails on models over 2 GB)."""
    return sum(len(t.raw_data) or 4 * len(t.float_data) or 8 * len(t.int64_data) for t in model.graph.initializer)


def _save(model: Any, path: Path) -> None:
    """Save ``model`` to ``path``; graphs with large weights keep them in ONE external file ``NAME.onnx.data``."""
    import onnx

    external = _weight_bytes(model) >= EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def _consolidate(path: Path) -> None:
    """Store a large graph's weights in ONE external file ``NAME.onnx.data`` (the exporter may scatter them)."""
    import onnx

    folder = path.parent
    if path.stat().st_size < EXTERNAL_DATA_BYTES and not any(p for p in folder.iterdir() if p != path):
        return
    model = onnx.load(str(path), load_external_data=True)
    for p in folder.iterdir():
        p.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.onnx", description="Export a checkpoint to ONNX.")
    p.add_argument("--ckpt", required=True, help="alias, hub id or local diffusers folder")
    p.add_argument("-o", "--output", default=None,
                   help="output folder [the export cache, where Pipeline.from_pretrained finds it: "
                        "$INSTAFLOW_CACHE/onnx/NAME-FINGERPRINT]")
    p.add_argument("--fp16", action="store_true", help="fp16 weights and compute (for GPUs)")
    p.add_argument("--vae-fp32", action="store_true", help="with --fp16: keep the VAE decoder fp32")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset [{DEFAULT_OPSET}]")
    p.add_argument("--dynamic-hw", action="store_true", help="dynamic height/width (default: static)")
    p.add_argument("--fused", action="store_true", help="also export onestep.onnx: (embeddings, noise) -> image")
    p.add_argument("--force", action="store_true", help="replace an export of another checkpoint in the folder")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="export only these graphs (text_encoder, unet, vae_decoder, onestep)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison (not recommended)")
    p.add_argument("--vae", default=None, help="tiny decoder instead of the checkpoint's VAE: taesd, hub id, folder")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="fuse a LoRA (file, folder or hub id; scale 1 by default) into the exported weights; repeat "
                        "for several")
    return p


def settings_from_args(args: argparse.Namespace) -> ExportSettings:
    return ExportSettings(fp16=args.fp16, vae_fp32=args.vae_fp32, opset=args.opset,
                          dynamic_hw=args.dynamic_hw, fused=args.fused)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: export(args.ckpt, args.output, settings_from_args(args), force=args.force,
                                  verify=not args.no_verify, only=args.only, vae=args.vae, lora=args.lora))


if __name__ == "__main__":
    sys.exit(main())
