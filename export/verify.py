"""Run every exported graph in onnxruntime on fresh random inputs at two batch sizes and compare with PyTorch.

    python -m export.verify DIR [--ckpt CKPT]

fp32 graphs must agree to a max relative error of 1e-4, fp16 graphs to 1e-2 and the fp16 fused graph (UNet and
decoder chained) to 3e-2 (max |ort - torch| / max |torch|); NaN fails. A table is printed; any failure prints one
``error:`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from runtime.checkpoints import resolve
from runtime.cli import run_cli
from runtime.models import Components, load_components

from runtime import manifest as mf
from runtime.errors import ExportError
from runtime.specs import DTYPES, ModelDims, specs_by_name

from .graphs import module_for

TOLERANCE = {"float32": 1e-4, "float16": 1e-2}
#: The fused graph ends in an image, and its worst pixel is where fp16 rounding moves an edge by a fraction of a
#: pixel: on the bundled model (hard-edged shapes) 6e-4 to 2e-2 (5/255) depending on the sample, whichever part is
#: kept in fp32 (the time embedding, the norms, softmax, the whole UNet or the whole decoder: measured, none brings
#: the worst sample under 1e-2), while the UNet graph alone stays under 3e-3. So images get their own bound.
FUSED_FP16_TOLERANCE = 3e-2


def tolerance(component: str, dtype: str) -> float:
    """Max relative error (max |out - ref| / max |ref|) allowed for a graph of this precision."""
    return FUSED_FP16_TOLERANCE if component == "onestep" and dtype == "float16" else TOLERANCE[dtype]


def ort_session(path: Path, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0][:200]}") from None


def max_rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    if not np.isfinite(out).all():
        return float("nan")
    return float(np.abs(out.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))


def verify_export(folder: str | Path, components: Components | None = None, batches: Sequence[int] = (1, 2),
                  seed: int = 1234) -> dict[str, Any]:
    """Compare each graph of an export folder with PyTorch; raise :class:`ExportError` on any failure.

    Each graph runs at ``batches`` (two batch sizes show the batch axis is dynamic) at the default size, and with
    dynamic sizes once more at batch 1 and a second, non-square size the UNet takes. At SD-1.5 size on 2 CPU cores
    that is a few minutes for the fp32 graphs (the fp16 ones run slower in onnxruntime on a CPU)."""
    folder = Path(folder)
    doc = mf.read(folder)
    if doc is None:
        raise ExportError(f"{folder} has no {mf.MANIFEST}; run `python -m export.onnx` first")
    if components is None:
        components = load_components(resolve(doc["checkpoint"]["path"]), device="cpu", dtype=torch.float32)
    dims = ModelDims.from_manifest(doc)
    specs = specs_by_name(dims)
    shapes = [(b, *dims.latent_size) for b in batches]
    if doc["settings"]["dynamic_hw"]:
        shapes.append((1, *dims.other_size()))  # another (non-square) size the UNet's downsamplings can take
    rows, failures = [], []
    for name, entry in doc["components"].items():
        mf.check_files(folder, entry, full=True)  # verification always hashes in full
        spec = specs[name]
        dtype = DTYPES[entry["dtype"]]
        session = ort_session(folder / entry["file"])
        module = module_for(name, components).to(torch.float32)
        for b, h, w in shapes:
            inputs = spec.sample_inputs(b, h, w, dtype=dtype, seed=seed + b)
            t = time.perf_counter()
            out = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
            ort_s = time.perf_counter() - t
            with torch.no_grad():  # reference in fp32 from the same (possibly fp16-rounded) inputs
                ref = module(*[v.float() if v.is_floating_point() else v for v in inputs.values()]).numpy()
            expected = spec.outputs[0].concrete(spec.symbols(b, h, w))
            err = max_rel_error(out, ref) if out.shape == ref.shape else float("inf")
            tol = tolerance(name, entry["dtype"])
            ok = tuple(out.shape) == expected and err <= tol
            rows.append({"component": name, "shape": f"B={b} {h}x{w}", "max_rel_err": err, "tol": tol,
                         "ok": ok, "ort_ms": 1e3 * ort_s, "out_shape": list(out.shape)})
            if not ok:
                failures.append(f"{name} at B={b} {h}x{w}: error {err:.2e} (tol {tol:.0e}), shape "
                                f"{list(out.shape)} (expected {list(expected)})")
    _print_table(rows)
    if failures:
        raise ExportError("verification failed: " + "; ".join(failures))
    return {"passed": True, "rows": rows}


def verify_and_record(folder: str | Path, components: Components | None = None) -> dict[str, Any]:
    """:func:`verify_export`, with the outcome written into the folder's manifest (the backends refuse an export
    that failed); the manifest returned."""
    folder = Path(folder)
    try:
        result = verify_export(folder, components=components)
    except ExportError as e:
        doc = mf.read(folder)
        if doc is not None:
            doc["verification"] = {"passed": False, "error": str(e)}
            mf.write(folder, doc)
        raise
    doc = mf.read(folder)
    doc["verification"] = result
    mf.write(folder, doc)
    return doc


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'component':<14}{'inputs':<16}{'max rel err':>12}{'tol':>8}{'ort ms':>9}  result")
    for r in rows:
        print(f"{r['component']:<14}{r['shape']:<16}{r['max_rel_err']:>12.2e}{r['tol']:>8.0e}{r['ort_ms']:>9.1f}  "
              f"{'ok' if r['ok'] else 'FAIL'}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.verify", description=__doc__.splitlines()[0])
    p.add_argument("folder", help="export folder (with manifest.json)")
    p.add_argument("--ckpt", default=None, help="checkpoint to compare with [the one the manifest names]")
    args = p.parse_args(argv)
    def job() -> None:
        comps = load_components(resolve(args.ckpt), device="cpu", dtype=torch.float32) if args.ckpt else None
        verify_and_record(args.folder, components=comps)
        print("all graphs verified (recorded in the manifest)")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
