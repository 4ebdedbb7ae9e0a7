"""Verify an export folder again and record the outcome in its manifest (the one path that updates an existing
manifest): every graph runs on fresh random inputs at two batch sizes (and a second size when sizes are dynamic)
and is compared with PyTorch (:mod:`export.compare`).

    python -m export.verify DIR [--ckpt CKPT]

fp32 graphs must agree to a max relative error of 1e-4 and fp16 graphs to 1e-2 (max |graph - torch| / max |torch|);
NaN fails. A table is printed; any failure prints one ``error:`` line and exits with status 2. ONNX graphs run in
onnxruntime, AOTInductor packages in torch.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from runtime.cli import description, run_cli
from runtime.errors import ExportError
from runtime.manifest import Manifest, Verification, read_manifest, write_manifest
from runtime.models import Components, load_components, resolve_checkpoint

from .aoti import verify_aoti
from .compare import compare, onnx_runner


def verify_onnx(folder: Path, manifest: Manifest, components: Components, batches: Sequence[int] = (1, 2)
                ) -> Verification:
    """:func:`compare` for ONNX graphs, run in onnxruntime."""
    return compare(folder, manifest, components, lambda entry: onnx_runner(folder / entry.file), batches)


def export_checkpoint(manifest: Manifest) -> Any:
    """The checkpoint an export was made from, with the tiny decoder and the LoRAs it holds (if any)."""
    src = manifest.source
    return resolve_checkpoint(src.checkpoint.path, src.tiny_decoder_path, src.lora_refs)


def verify_export(folder: str | Path, components: Components | None = None, batches: Sequence[int] = (1, 2)
                  ) -> Manifest:
    """Verify the export in ``folder`` again (its own kind's way) and record the outcome in its manifest: the one
    path that updates an existing manifest. Returns the manifest written; a failure is recorded, then raised."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ExportError(f"{folder} has no manifest.json; run `python -m export.onnx` (or export.aoti) first")
    if components is None:
        components = load_components(export_checkpoint(manifest), device="cpu", dtype=torch.float32)
    if manifest.kind == "aoti":
        result = verify_aoti(folder, manifest, components, batches)
    else:
        result = verify_onnx(folder, manifest, components, batches)
    manifest = replace(manifest, verification=result)
    write_manifest(folder, manifest)
    if not result.passed:
        raise ExportError(result.error)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.verify", description=description(__doc__))
    p.add_argument("folder", help="export folder (with manifest.json)")
    p.add_argument("--ckpt", default=None, help="checkpoint to compare with [the one the manifest names]")
    args = p.parse_args(argv)

    def job() -> None:
        comps = (load_components(resolve_checkpoint(args.ckpt), device="cpu", dtype=torch.float32)
                 if args.ckpt else None)
        verify_export(args.folder, components=comps)
        print("all graphs verified (recorded in the manifest)")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
