"""Export text encoder, UNet and VAE decoder (and optionally the fused one-step graph) to ONNX, then verify.

    python -m export.onnx --ckpt CKPT -o DIR [--fp16 [--vae-fp32]] [--opset 17] [--dynamic-hw]
                          [--fused] [--force]

Graphs are exported with PyTorch's TorchScript-based exporter (``dynamo=False``) and explicit ``dynamic_axes``
(batch always, height/width on request); every exported shape is then checked by running the graph in
onnxruntime at two batch sizes (:mod:`export.verify`). Graphs over 2 GB (the fp32 SD UNet is 3.4 GB) are stored
with their weights in one ``NAME.onnx.data`` file beside them. A ``manifest.json`` records the checkpoint's content
hash, each file's hash, tensors, opset and tool versions; re-running with the same inputs reuses hash-checked files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from runtime.checkpoints import resolve
from runtime.decoders import with_decoder
from runtime.lora import with_loras
from runtime.cli import run_cli
from runtime.models import Components, load_components

from runtime import manifest as mf
from runtime.errors import ExportError
from runtime.specs import COMPONENTS, ComponentSpec, ModelDims, component_specs, dtype_name, specs_by_name

from .graphs import module_for

MIN_OPSET, MAX_OPSET = 14, 20
DEFAULT_OPSET = 17
EXPORTER = "torchscript"
#: graphs with more weight bytes than this keep them in external data (protobuf cannot serialise 2 GB)
EXTERNAL_DATA_BYTES = 2**31 - 2**26


@dataclass(frozen=True)
class ExportSettings:
    fp16: bool = False
    vae_fp32: bool = False  # with fp16: keep the VAE decoder in fp32 (fp16 overflow gives NaN/black images)
    opset: int = DEFAULT_OPSET
    dynamic_hw: bool = False
    fused: bool = False

    def dtype_of(self, component: str) -> torch.dtype:
        """The graph's precision (its model-dtype tensors). The fused graph stays fp16 with ``vae_fp32``: only its
        decoder nodes are kept in fp32 (:meth:`fp32_scopes`)."""
        if not self.fp16 or (self.vae_fp32 and component == "vae_decoder"):
            return torch.float32
        return torch.float16

    def fp32_scopes(self, component: str) -> tuple[str, ...]:
        """Node-name prefixes kept in fp32 inside an fp16 graph."""
        return ("/vae_decoder/",) if self.fp16 and self.vae_fp32 and component == "onestep" else ()

    def check(self) -> None:
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ExportError(f"unsupported opset {self.opset}; choose {MIN_OPSET}..{MAX_OPSET}")
        if self.vae_fp32 and not self.fp16:
            raise ExportError("--vae-fp32 only makes sense with --fp16")


def _log(msg: str) -> None:
    print(msg, flush=True)


def export_component(spec: ComponentSpec, components: Components, out: Path, settings: ExportSettings
                     ) -> dict[str, Any]:
    """Export one graph into ``out`` (through a temporary folder, renamed at the end) and return its manifest
    entry."""
    import onnx

    dtype = settings.dtype_of(spec.name)
    module = module_for(spec.name, components)
    _check_free_space(out, spec.name, module)
    inputs = spec.sample_inputs(1, dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=out))
    try:
        path = tmp / spec.file
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, tuple(inputs.values()), str(path), input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs], dynamic_axes=spec.dynamic_axes(settings.dynamic_hw),
                opset_version=settings.opset, do_constant_folding=True, dynamo=False,
            )
        _consolidate(path)
        if dtype == torch.float16:
            _to_fp16(path, keep=[t.name for t in (*spec.inputs, *spec.outputs) if t.dtype == "float32"],
                     fp32_scopes=settings.fp32_scopes(spec.name))
        _set_output_shapes(path, spec, settings.dynamic_hw)
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
        _consolidate(path)
        for f in mf.graph_files(tmp, spec.file):
            f.replace(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "file": spec.file,
        "sha256": mf.files_hash(out, spec.file),
        "stamp": mf.stamp(mf.graph_files(out, spec.file)),
        "external_data": (out / (spec.file + ".data")).exists(),
        "dtype": dtype_name(dtype),
        "inputs": [t.manifest(dtype) for t in spec.inputs],
        "outputs": [t.manifest(dtype) for t in spec.outputs],
    }


def _check_free_space(out: Path, name: str, module: torch.nn.Module) -> None:
    """The exporter writes the fp32 weights (3.4 GB for SD's UNet) before any conversion, and a full disk surfaces
    as "Could not open file" deep in torch: say it in one line before the work instead."""
    need = int(1.1 * sum(t.numel() * 4 for t in (*module.parameters(), *module.buffers()))) + 2**26
    free = shutil.disk_usage(out).free
    if free < need:
        raise ExportError(f"not enough disk space in {out} to export {name}: it needs about {need / 2**30:.1f} GiB "
                          f"free (its fp32 weights while converting), {free / 2**30:.1f} GiB left")


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


def export(ckpt: str, out: str | Path, settings: ExportSettings | None = None, force: bool = False,
           verify: bool = True, only: Sequence[str] | None = None, vae: str | None = None,
           lora: Any = None) -> dict[str, Any]:
    """Export (or reuse) the graphs of ``ckpt`` into ``out`` (all, or those named in ``only``), verify them, and
    return the manifest. A re-run whose graphs are all reused, hash-checked, keeps their earlier verification.
    ``vae``: a tiny decoder (``taesd``, hub id or folder) exported instead of the checkpoint's VAE decoder;
    ``lora``: LoRAs fused into the exported weights (as ``Pipeline.from_pretrained(lora=...)`` takes them)."""
    settings = settings or ExportSettings()
    settings.check()
    unknown = sorted(set(only or ()) - set(COMPONENTS))
    if unknown:
        raise ExportError(f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"output path is a file, not a folder: {out}")
    t0 = time.perf_counter()
    checkpoint = with_loras(with_decoder(resolve(ckpt), vae), lora)
    ckpt_hash = mf.checkpoint_hash(checkpoint)
    _log(f"[hash] {checkpoint.name}: {ckpt_hash[:12]} ({time.perf_counter() - t0:.1f} s)")
    _check_writable(out)
    old = _previous_export(out, ckpt_hash, force)
    components = load_components(checkpoint, device="cpu", dtype=torch.float32)
    dims = ModelDims.of(components)
    doc = {
        "format": mf.FORMAT,
        "checkpoint": {"name": checkpoint.name, "path": str(checkpoint.path), "sha256": ckpt_hash,
                       "fingerprint": mf.fingerprint(checkpoint), "class_name": checkpoint.class_name},
        "settings": asdict(settings),
        "exporter": {"name": EXPORTER, "opset": settings.opset, **_versions()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **dims.to_manifest(),
        "vae": {"scaling_factor": components.scaling_factor, "shift_factor": components.shift_factor},
        "decoder": mf.decoder_identity(checkpoint),
        "loras": list(checkpoint.loras),
        "components": dict((old or {}).get("components", {})),  # graphs of earlier runs stay listed
    }
    specs = [s for s in component_specs(dims, fused=True) if s.name in only] if only else \
        component_specs(dims, fused=settings.fused)
    reused = [_export_or_reuse(spec, components, out, settings, old, doc) for spec in specs]
    _drop_stale(out, doc, settings, keep={s.name for s in specs})
    mf.write(out, doc)
    doc["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    earlier = (old or {}).get("verification")
    if all(reused) and earlier and earlier.get("passed") and set(doc["components"]) == set(old["components"]):
        doc["verification"] = earlier  # the same files, hash-checked: verified already
        _log("[verify] every graph reused (hash ok): earlier verification kept")
    elif verify:
        from .verify import verify_and_record

        doc.pop("verification", None)
        mf.write(out, doc)
        doc = verify_and_record(out, components=components)  # a failure is recorded, then raised
    else:
        doc.pop("verification", None)  # --no-verify: the caller's explicit choice, recorded as no verification
    mf.write(out, doc)
    _log(f"[done] {out} in {time.perf_counter() - t0:.1f} s")
    return doc


def _check_writable(out: Path) -> None:
    """Create ``out`` and probe it with a real file, so that a read-only folder is one line before minutes of work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ExportError(f"cannot write into {out}: {e.strerror or e}") from None


def _previous_export(out: Path, ckpt_hash: str, force: bool) -> dict[str, Any] | None:
    """The manifest already in ``out`` (its graphs can be reused), or None; another checkpoint's export is refused,
    or with ``force`` removed. Temporary folders of an export that was killed are removed."""
    for name in COMPONENTS:
        for tmp in out.glob(f".{name}.*"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
    try:
        old = mf.read(out)
    except ExportError:
        if not force:
            raise
        (out / mf.MANIFEST).unlink()  # --force replaces a damaged or foreign manifest
        old = None
    if old and old["checkpoint"].get("sha256") != ckpt_hash:
        if not force:
            raise ExportError(f"{out} holds an export of another checkpoint ({old['checkpoint']['name']}); "
                              "choose another folder or pass --force to replace it")
        for entry in old["components"].values():
            for f in mf.graph_files(out, entry["file"]):
                f.unlink(missing_ok=True)
        (out / mf.MANIFEST).unlink()
        old = None
    return old


def _component_key(spec: ComponentSpec, settings: ExportSettings, decoder: dict[str, Any],
                   loras: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """What a graph was made with; a graph is reused only when this matches (the decoder for the graphs holding
    one)."""
    key = {"dtype": dtype_name(settings.dtype_of(spec.name)), "opset": settings.opset,
           "fp32_scopes": list(settings.fp32_scopes(spec.name)), "dynamic_hw": settings.dynamic_hw, **_versions()}
    if spec.name in ("vae_decoder", "onestep"):
        key["decoder"] = decoder.get("fingerprint", decoder["class"])
    if spec.name != "vae_decoder" and loras:
        key["loras"] = [(x["sha256"], x["scale"]) for x in loras]
    return key


def _drop_stale(out: Path, doc: dict[str, Any], settings: ExportSettings, keep: set[str]) -> None:
    """Graphs of earlier runs stay only if they were made with the current settings (another ``--only`` run);
    others (e.g. a static fused graph after a ``--dynamic-hw`` re-export without ``--fused``) are deleted, so the
    manifest describes exactly what the folder holds, all of one kind."""
    specs = specs_by_name(ModelDims.from_manifest(doc))
    for name in [n for n in doc["components"] if n not in keep]:
        entry = doc["components"][name]
        if name in specs and entry.get("key") == _component_key(specs[name], settings, doc["decoder"], doc["loras"]):
            continue
        for f in mf.graph_files(out, entry["file"]):
            f.unlink(missing_ok=True)
        del doc["components"][name]
        _log(f"[export] {name}: removed (made with other settings)")


def _export_or_reuse(spec: ComponentSpec, components: Components, out: Path, settings: ExportSettings,
                     old: dict[str, Any] | None, doc: dict[str, Any]) -> bool:
    """Export one graph into ``doc`` (and the manifest on disk: progress survives a crash), or reuse the earlier
    one when it was made with the same settings and its files are intact; True when reused."""
    key = _component_key(spec, settings, doc["decoder"], doc["loras"])
    prev = (old or {}).get("components", {}).get(spec.name)
    if prev and prev.get("key") == key:
        try:
            mf.check_files(out, prev)
            doc["components"][spec.name] = prev
            _log(f"[export] {spec.name}: cached ({spec.file}, hash ok)")
            return True
        except ExportError as e:
            _log(f"[export] {spec.name}: re-exporting ({e})")
    t = time.perf_counter()
    doc["components"][spec.name] = {**export_component(spec, components, out, settings), "key": key}
    size = sum(f.stat().st_size for f in mf.graph_files(out, spec.file)) / 2**20
    _log(f"[export] {spec.name}: {spec.file} {size:,.1f} MB in {time.perf_counter() - t:.1f} s")
    mf.write(out, doc)
    return False


def _versions() -> dict[str, str]:
    import onnx

    return {"torch": torch.__version__.split("+")[0], "onnx": onnx.__version__}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.onnx", description="Export a checkpoint to ONNX.")
    p.add_argument("--ckpt", required=True, help="alias, hub id or local diffusers folder")
    p.add_argument("-o", "--output", required=True, help="output folder")
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
