"""Comparing exported graphs with PyTorch: the reference, the tolerances, and the comparison every exporter's
verification runs (:func:`compare`), whatever runs the graph (onnxruntime, an AOTInductor package, a TensorRT
engine).

fp16 graphs are held to what fp16 arithmetic itself explains (:func:`fp16_tolerance`): the same module run by
PyTorch in genuine fp16 (its fp16 kernels, on the GPU when there is one) is compared with fp32, and the graph may
differ from fp32 by a few times that, within fixed bounds. A fixed tolerance would be either too tight for real fp16
kernels (the VAE decoder amplifies fp16 rounding) or too loose for onnxruntime's CPU provider, which computes fp16
graphs in fp32 (it inserts casts) and so shows only the rounding of weights and inputs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from runtime import flow
from runtime.backends.onnxruntime_backend import open_session
from runtime.manifest import FAILURE_SEPARATOR, GraphEntry, Manifest, Verification
from runtime.models import Components
from runtime.specs import DTYPES, ComponentSpec, specs_by_name

from .graphs import module_for

#: Max relative error (max |out - ref| / max |ref|) allowed for a graph of this precision; for fp16 graphs only
#: where genuine fp16 arithmetic cannot be run here (an operation without fp16 kernels), see :func:`fp16_tolerance`.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2}
#: fp16 graphs: FP16_FACTOR times the error of genuine fp16 arithmetic, within [FP16_FLOOR, FP16_CEILING] (a model
#: whose own fp16 error is above the ceiling is not fit for fp16: ``--vae-fp32`` keeps the decoder in fp32)
FP16_FACTOR, FP16_FLOOR, FP16_CEILING = 3.0, 2e-3, 5e-2
#: graphs larger than this (parameters) get the fixed fp16 tolerance on a machine without a GPU: PyTorch's CPU fp16
#: kernels took over 15 minutes for one SD-1.5 UNet call on 2 cores (fp32: seconds)
FP16_CPU_MAX_PARAMS = 100_000_000

#: ``velocity(sample, timestep, text_embeddings) -> v`` in fp32, computed by an exported fp16 UNet (graph or engine)
Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: ``run(inputs) -> output`` of one exported graph (inputs already in the graph's types)
Runner = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def uses_unet_velocity(component: str, dtype: str) -> bool:
    """Whether :func:`reference` takes the exported UNet's velocity for this graph (the fp16 fused graph)."""
    return component == "onestep" and dtype == "float16"


def reference(module: torch.nn.Module, inputs: Sequence[torch.Tensor], velocity: Velocity | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> np.ndarray:
    """PyTorch's output of ``module`` for ``inputs`` (an exported graph's inputs, already rounded to its types), in
    ``dtype`` (fp32 by default; fp16: genuine fp16 arithmetic, weights and activations, see :func:`fp16_tolerance`)
    on ``device`` (default the CPU); the module itself is not changed.

    For the fp16 fused graph, ``velocity`` is the export's own fp16 UNet (itself compared with PyTorch) and only
    the rest (Euler step, scaling, decode) runs here: the VAE decoder amplifies the UNet's fp16 rounding about 8x at
    hard edges, so no end-to-end bound both passes good graphs and catches bad ones (docs/export.md)."""
    device = device or torch.device("cpu")
    run = _runner(dtype, device)
    cast = [x.to(device, dtype) if x.is_floating_point() else x.to(device) for x in inputs]
    with torch.no_grad():
        if velocity is None:
            return run(module, *cast).double().cpu().numpy()
        embeddings, noise = inputs

        def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # the exported UNet takes CPU fp32 tensors
            return velocity(x.cpu().float(), t.cpu().float(), embeddings.cpu().float()).to(device, dtype)

        image = flow.one_step_image(network, lambda z: run(module.vae_decoder, z), cast[1], module.scaling,
                                    module.shift, t_dtype=dtype)
        return image.double().cpu().numpy()


def _runner(dtype: torch.dtype, device: torch.device) -> Callable[..., torch.Tensor]:
    """``run(module, *args)``: ``module`` with its floating-point parameters and buffers in ``dtype`` on ``device``
    (``torch.func.functional_call``: the module keeps its fp32 weights, the copy lives for the call)."""
    def run(module: torch.nn.Module, *args: torch.Tensor) -> torch.Tensor:
        state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        if dtype == torch.float32 and device.type == "cpu":
            return module(*args)
        moved = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in state.items()}
        return torch.func.functional_call(module, moved, args)
    return run


def fp16_device() -> torch.device:
    """Where genuine fp16 arithmetic runs: the GPU when there is one (the kernels an fp16 engine's resemble), else
    PyTorch's CPU fp16 kernels (fp16 storage between operations, as on the GPU; slower than fp32)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def fp16_tolerance(module: torch.nn.Module, inputs: Sequence[torch.Tensor], ref: np.ndarray,
                   velocity: Velocity | None = None) -> tuple[float, float]:
    """(tolerance, fp16 error) for an fp16 graph on ``inputs``: the fp16 error is how far ``module`` run in genuine
    fp16 (:func:`fp16_device`) is from ``ref`` (fp32); the graph may be :data:`FP16_FACTOR` times that away, within
    [:data:`FP16_FLOOR`, :data:`FP16_CEILING`]. Where fp16 cannot run (an operation without fp16 kernels), the fixed
    :data:`TOLERANCE` and a NaN error; the same for a graph over :data:`FP16_CPU_MAX_PARAMS` without a GPU."""
    device = fp16_device()
    if device.type == "cpu" and sum(p.numel() for p in module.parameters()) > FP16_CPU_MAX_PARAMS:
        return TOLERANCE["float16"], float("nan")
    try:
        ref16 = reference(module, inputs, velocity, dtype=torch.float16, device=device)
    except (RuntimeError, NotImplementedError):  # e.g. "... not implemented for 'Half'"
        return TOLERANCE["float16"], float("nan")
    err16 = max_rel_error(ref16, ref)
    if not np.isfinite(err16):  # fp16 overflows in PyTorch too: the ceiling (the graph will show its own NaN)
        return FP16_CEILING, err16
    return min(max(FP16_FLOOR, FP16_FACTOR * err16), FP16_CEILING), err16


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


def built_size(manifest: Manifest) -> tuple[int, int]:
    """The latent size an export was built around: the optimal size of its graphs' profiles (AOTInductor packages
    compiled with ``--height``/``--width``), else the checkpoint's default."""
    specs = specs_by_name(manifest.dims)
    for name, entry in manifest.components.items():
        for t in specs[name].inputs:
            if "h" in t.shape and t.name in entry.profile:
                opt = entry.profile[t.name][1]
                return int(opt[2]), int(opt[3])
    return manifest.dims.latent_size


def compare(folder: Path, manifest: Manifest, components: Components, runner: Callable[[GraphEntry], Runner],
            batches: Sequence[int] = (1, 2), seed: int = 1234) -> Verification:
    """Compare each graph of an export with PyTorch; the outcome (never raises for a mismatch).

    Each graph runs at ``batches`` (two batch sizes show the batch axis is dynamic) at the size the export was
    built around (:func:`built_size`), and with dynamic sizes once more at batch 1 and a second, non-square size
    inside its range; ``runner`` makes a graph runnable (onnxruntime for ONNX, the loaded package for
    AOTInductor)."""
    dims = manifest.dims
    specs = specs_by_name(dims)
    hw = built_size(manifest)
    shapes = [(b, *hw) for b in batches]
    if manifest.settings.dynamic_hw:
        shapes.append((1, *dims.other_size(hw)))  # another (non-square) size the UNet's downsamplings can take
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
        tol, err16 = TOLERANCE[entry.dtype], None
        for b, h, w in shapes:
            inputs = list(spec.sample_inputs(b, h, w, dtype=dtype, seed=seed + b).values())
            t = time.perf_counter()
            out = run(inputs).detach().float().cpu().numpy()
            run_s = time.perf_counter() - t
            ref = reference(module, inputs, velocity)  # fp32, from the same (rounded) inputs
            if entry.dtype == "float16" and err16 is None:  # once per graph, at its first shape
                tol, err16 = fp16_tolerance(module, inputs, ref, velocity)
            expected = spec.outputs[0].concrete(spec.symbols(b, h, w))
            err = max_rel_error(out, ref) if out.shape == ref.shape else float("inf")
            ok = tuple(out.shape) == expected and err <= tol
            rows.append({"component": name, "shape": f"B={b} {h}x{w}", "max_rel_err": err, "tol": tol,
                         "ok": ok, "run_ms": 1e3 * run_s, "out_shape": list(out.shape),
                         **({"fp16_err": err16} if err16 is not None else {})})
            if not ok:
                failures.append(f"{name} at B={b} {h}x{w}: error {err:.2e} (tol {tol:.1e}), shape "
                                f"{list(out.shape)} (expected {list(expected)})")
    _print_table(rows)
    if failures:
        return Verification(False, tuple(rows), "verification failed: " + FAILURE_SEPARATOR.join(failures))
    return Verification(True, tuple(rows))



def _print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'component':<14}{'inputs':<16}{'max rel err':>12}{'tol':>9}{'fp16 err':>10}{'run ms':>9}  result")
    for r in rows:
        fp16 = f"{r['fp16_err']:>10.2e}" if "fp16_err" in r else f"{'':>10}"
        print(f"{r['component']:<14}{r['shape']:<16}{r['max_rel_err']:>12.2e}{r['tol']:>9.1e}{fp16}"
              f"{r['run_ms']:>9.1f}  {'ok' if r['ok'] else 'FAIL'}", flush=True)
