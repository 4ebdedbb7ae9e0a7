"""Comparing exported graphs with PyTorch: the reference, the tolerances, and the comparison every exporter's
verification runs (:func:`compare`), whatever runs the graph (onnxruntime, an AOTInductor package, a TensorRT
engine)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from runtime import flow
from runtime.backends.onnxruntime_backend import open_session
from runtime.manifest import GraphEntry, Manifest, Verification
from runtime.models import Components
from runtime.specs import DTYPES, ComponentSpec, specs_by_name

from .graphs import module_for

#: Max relative error (max |out - ref| / max |ref|) allowed for a graph of this precision.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2}

#: ``velocity(sample, timestep, text_embeddings) -> v`` in fp32, computed by an exported fp16 UNet (graph or engine)
Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: ``run(inputs) -> output`` of one exported graph (inputs already in the graph's types)
Runner = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def uses_unet_velocity(component: str, dtype: str) -> bool:
    """Whether :func:`reference` takes the exported UNet's velocity for this graph (the fp16 fused graph)."""
    return component == "onestep" and dtype == "float16"


def reference(module: torch.nn.Module, inputs: Sequence[torch.Tensor], velocity: Velocity | None = None
              ) -> np.ndarray:
    """PyTorch's fp32 output of ``module`` for ``inputs`` (an exported graph's inputs, already rounded to its types).

    For the fp16 fused graph, ``velocity`` is the export's own fp16 UNet (itself compared with PyTorch at 1e-2) and
    only the rest (Euler step, scaling, decode) runs in fp32 here: the VAE decoder amplifies the UNet's fp16 rounding
    about 8x at hard edges, so no end-to-end bound both passes good graphs and catches bad ones (README, Export)."""
    floats = [x.cpu().float() if x.is_floating_point() else x.cpu() for x in inputs]
    with torch.no_grad():
        if velocity is None:
            return module(*floats).double().numpy()
        embeddings, noise = floats
        image = flow.one_step_image(lambda x, t: velocity(x, t, embeddings).float(), module.vae_decoder, noise,
                                    module.scaling, module.shift)
        return image.double().numpy()


def runner_velocity(run: Runner, spec: ComponentSpec, dtype: torch.dtype) -> Velocity:
    """:data:`Velocity` of an exported UNet's runner (inputs cast to the graph's types)."""
    def velocity(sample: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        inputs = [x.to(t.torch_dtype(dtype)) for t, x in zip(spec.inputs, (sample, timestep, embeddings))]
        return run(inputs).float().cpu()
    return velocity


def onnx_runner(path: Path) -> Runner:
    """A :data:`Runner` of an ONNX graph in onnxruntime's CPU provider (the backend's session set-up)."""
    session = open_session(path)
    names = [i.name for i in session.get_inputs()]

    def run(inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {n: x.cpu().numpy() for n, x in zip(names, inputs)})[0])
    return run


def max_rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    if not np.isfinite(out).all():
        return float("nan")
    return float(np.abs(out.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))


def compare(folder: Path, manifest: Manifest, components: Components, runner: Callable[[GraphEntry], Runner],
            batches: Sequence[int] = (1, 2), seed: int = 1234) -> Verification:
    """Compare each graph of an export with PyTorch; the outcome (never raises for a mismatch).

    Each graph runs at ``batches`` (two batch sizes show the batch axis is dynamic) at the default size, and with
    dynamic sizes once more at batch 1 and a second, non-square size the UNet takes; ``runner`` makes a graph
    runnable (onnxruntime for ONNX, the loaded package for AOTInductor)."""
    dims = manifest.dims
    specs = specs_by_name(dims)
    shapes = [(b, *dims.latent_size) for b in batches]
    if manifest.settings.dynamic_hw:
        shapes.append((1, *dims.other_size()))  # another (non-square) size the UNet's downsamplings can take
    rows, failures = [], []
    runners: dict[str, Runner] = {}
    for name, entry in manifest.components.items():
        entry.check(folder, full=True)  # verification always hashes in full
        spec, dtype = specs[name], DTYPES[entry.dtype]
        run = runners[name] = runners.get(name) or runner(entry)
        module = module_for(name, components).to(torch.float32)
        velocity = None
        if uses_unet_velocity(name, entry.dtype):
            unet = manifest.components.get("unet")
            if unet is None:
                return Verification(False, tuple(rows), f"{folder}: the fp16 fused graph is verified with the "
                                    "export's own UNet graph, which is missing; export the unet too")
            velocity = runner_velocity(runners.get("unet") or runner(unet), specs["unet"], DTYPES[unet.dtype])
        for b, h, w in shapes:
            inputs = list(spec.sample_inputs(b, h, w, dtype=dtype, seed=seed + b).values())
            t = time.perf_counter()
            out = run(inputs).detach().float().cpu().numpy()
            run_s = time.perf_counter() - t
            ref = reference(module, inputs, velocity)  # fp32, from the same (rounded) inputs
            expected = spec.outputs[0].concrete(spec.symbols(b, h, w))
            err = max_rel_error(out, ref) if out.shape == ref.shape else float("inf")
            tol = TOLERANCE[entry.dtype]
            ok = tuple(out.shape) == expected and err <= tol
            rows.append({"component": name, "shape": f"B={b} {h}x{w}", "max_rel_err": err, "tol": tol,
                         "ok": ok, "run_ms": 1e3 * run_s, "out_shape": list(out.shape)})
            if not ok:
                failures.append(f"{name} at B={b} {h}x{w}: error {err:.2e} (tol {tol:.0e}), shape "
                                f"{list(out.shape)} (expected {list(expected)})")
    _print_table(rows)
    if failures:
        return Verification(False, tuple(rows), "verification failed: " + "; ".join(failures))
    return Verification(True, tuple(rows))



def _print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'component':<14}{'inputs':<16}{'max rel err':>12}{'tol':>8}{'run ms':>9}  result")
    for r in rows:
        print(f"{r['component']:<14}{r['shape']:<16}{r['max_rel_err']:>12.2e}{r['tol']:>8.0e}{r['run_ms']:>9.1f}  "
              f"{'ok' if r['ok'] else 'FAIL'}", flush=True)
