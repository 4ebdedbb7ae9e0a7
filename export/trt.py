"""Build TensorRT FP16 engines from the ONNX export, per component and for the fused one-step graph.

    python -m export.trt --ckpt instaflow-0.9b [-o DIR] [--batch 1 | --min-batch 1 --max-batch 4]
                         [--height 512 --width 512] [--static] [--vae-fp32]

Exports fp16 ONNX first (cached by hash: :mod:`export.onnx`; ``--vae-fp32`` keeps the decoder, and only the decoder,
in fp32), then builds one engine per graph as a *strongly typed* network: the precision of every layer is the one
the ONNX graph says, which is how TensorRT 11 builds all networks (it has no FP16 builder flag) and how TensorRT
10.x builds them when asked (its ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``); no precision flag is set.
Optimisation profiles come from the component specs (:mod:`runtime.specs`), a timing cache is kept in DIR, engine
files are named by ONNX hash + TensorRT version + GPU, and ``engines.json`` is what the runtime's TensorRT backend
reads. After the build each engine is compared with the fp32 PyTorch reference on fresh random inputs. Without
TensorRT or a GPU the ONNX export still happens; then one line names what is missing and the exit status is 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtime.cache import default_export_dir
from runtime.cli import run_cli
from runtime.errors import BackendUnavailableError, ExportError
from runtime.files import atomic_write_bytes
from runtime.identity import sha256_file, stamp
from runtime.manifest import ENGINES, EngineEntry, EngineIndex, ExportSettings, read_engines, write_engines
from runtime.models import load_components, resolve_checkpoint
from runtime.specs import ComponentSpec, specs_by_name

from .compare import TOLERANCE, Velocity, fp16_tolerance, max_rel_error, reference, uses_unet_velocity
from .exporter import latent_size_of
from .graphs import module_for
from .onnx import export
from .verify import export_checkpoint


#: the oldest polygraphy that builds for TensorRT 10 and 11 (pyproject pins it): 0.49.0 sets the EXPLICIT_BATCH
#: flag TensorRT 11 removed, and up to 0.49.26 it reads ``ILayer.precision_is_set``, also removed in 11.0
POLYGRAPHY_MIN = "0.50.3"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()


def require_tensorrt() -> Any:
    """Import TensorRT and check for a GPU, or raise one line naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError("TensorRT is not installed (pip install 'instaflow-rt[trt]' on a machine "
                                      "with an NVIDIA GPU); the ONNX export is done") from None
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError("no CUDA GPU on this machine: TensorRT engines are built on the GPU they "
                                      "will run on; the ONNX export is done")
    if int(trt.__version__.split(".")[0]) < 10:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} is too old; instaflow-rt needs TensorRT 10+")
    return trt


def strongly_typed(trt: Any) -> bool:
    """Whether to ask for a strongly typed network, by feature: TensorRT 10.x has the STRONGLY_TYPED creation flag
    (weak typing is its default); TensorRT 11 keeps it deprecated (strong typing is its only mode), and a TensorRT
    without the flag is strongly typed already. Never the FP16 builder flag: the types come from the fp16 graph."""
    return hasattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED")


def build_engine(trt: Any, onnx_path: Path, engine_path: Path, profile: dict[str, tuple], timing_cache: Path,
                 workspace_gb: float = 8.0, refittable: bool = False) -> None:
    """Build ``onnx_path`` into a TensorRT engine through polygraphy (kept in step with every TensorRT release by
    NVIDIA): a strongly typed network parsed from the file (external data followed), one optimisation profile, the
    timing cache loaded when present (``refittable``: weights can be replaced later, see :func:`refit_engine`),
    activation memory sized per input shape where TensorRT can (:func:`enable_activation_resize`); engine and
    updated timing cache are written atomically here. Any failure inside polygraphy or TensorRT is one
    line naming both and their versions (a polygraphy older than the TensorRT touches what it removed: an
    AttributeError)."""
    try:
        import polygraphy
        from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path
        from polygraphy.backend.trt.util import get_trt_logger
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise BackendUnavailableError(f"building engines needs polygraphy (pip install 'polygraphy>={POLYGRAPHY_MIN}'"
                                      " or 'instaflow-rt[trt]'); the ONNX export is done") from None

    from runtime.backends.tensorrt_backend import set_logger

    G_LOGGER.colors = False  # plain log lines (and no warning about the optional 'colored' module)
    try:
        set_logger(trt, get_trt_logger())  # polygraphy's builder logger serves the engines loaded after it too
        shapes = Profile()
        for name, (lo, best, hi) in profile.items():
            shapes.add(name, min=lo, opt=best, max=hi)
        cache = str(timing_cache) if timing_cache.exists() else None  # a missing cache starts empty
        create_config = CreateConfig(profiles=[shapes], load_timing_cache=cache, refittable=refittable,
                                     memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_gb * 2**30)})
        builder, network, parser = network_from_onnx_path(str(onnx_path), strongly_typed=strongly_typed(trt))
        config = create_config(builder, network)
        enable_activation_resize(trt, config)
        serialized = engine_bytes_from_network((builder, network, parser), config=config)
        cache_bytes = bytes(config.get_timing_cache().serialize())
    except Exception as e:  # noqa: BLE001 - polygraphy's and TensorRT's own errors, and AttributeErrors of skew
        detail = (str(e).strip().splitlines() or [""])[-1][:300]
        hint = (f"this polygraphy does not know this TensorRT: pip install 'polygraphy>={POLYGRAPHY_MIN}'"
                if isinstance(e, AttributeError) else "see the log above")
        raise ExportError(f"TensorRT {getattr(trt, '__version__', '?')} with polygraphy "
                          f"{getattr(polygraphy, '__version__', '?')} failed to build an engine from "
                          f"{onnx_path.name}: {type(e).__name__}: {detail} ({hint})") from None
    atomic_write_bytes(engine_path, bytes(serialized))
    atomic_write_bytes(timing_cache, cache_bytes)


def enable_activation_resize(trt: Any, config: Any) -> bool:
    """Let ``IExecutionContext.update_device_memory_size_for_shapes`` size activation memory for the shapes in use
    rather than the profile's largest (``PreviewFeature.RUNTIME_ACTIVATION_RESIZE_10_10``, TensorRT 10.10+; by
    feature, not version). Set on the builder config directly: polygraphy's ``preview_features`` would also turn
    off every feature not listed. Returns whether it is on."""
    feature = getattr(getattr(trt, "PreviewFeature", None), "RUNTIME_ACTIVATION_RESIZE_10_10", None)
    if feature is None or not hasattr(config, "set_preview_feature"):
        return False
    config.set_preview_feature(feature, True)
    return True


def refit_engine(trt: Any, engine_path: Path, onnx_path: Path, new_path: Path) -> None:
    """Give the refittable engine ``engine_path`` the weights of ``onnx_path`` (the same graph with other weights,
    e.g. other LoRAs fused) and write it to ``new_path``: seconds instead of a rebuild."""
    from runtime.backends.tensorrt_backend import logger

    engine = trt.Runtime(logger(trt)).deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise ExportError(f"cannot load {engine_path.name} to refit it; rebuild with --force")
    if not engine.refittable:  # ICudaEngine.refittable (10.0-11.x): a Refitter of another engine is TensorRT's
        # nullptr (an error in its log, pybind11's TypeError here), so it is never created
        raise ExportError(f"{engine_path.name} was not built refittable; rebuild with --refittable")
    refitter = trt.Refitter(engine, logger(trt))
    parser = trt.OnnxParserRefitter(refitter, logger(trt))
    if not parser.refit_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"cannot refit {engine_path.name} from {onnx_path.name}: {errors[:300]}")
    missing = list(refitter.get_missing_weights())
    if missing or not refitter.refit_cuda_engine():
        raise ExportError(f"refitting {engine_path.name} failed ({len(missing)} weights missing, e.g. "
                          f"{missing[:3]}); rebuild with --force")
    atomic_write_bytes(new_path, bytes(engine.serialize()))


def _make_engine(trt: Any, name: str, onnx_path: Path, engine_path: Path, profile: dict[str, tuple],
                 timing_cache: Path, force: bool, refittable: bool, earlier: Path | None) -> None:
    """The engine of one graph: kept when built already, refitted from ``earlier`` (the same graph with other
    weights, e.g. other LoRAs), else built."""
    t = time.perf_counter()
    if engine_path.exists() and not force:
        print(f"[build] {name}: cached {engine_path.name}", flush=True)
    elif earlier is not None:
        refit_engine(trt, earlier, onnx_path, engine_path)
        earlier.unlink()
        print(f"[refit] {name}: {engine_path.name} from {earlier.name} in {time.perf_counter() - t:.1f} s", flush=True)
    else:
        build_engine(trt, onnx_path, engine_path, profile, timing_cache, refittable=refittable)
        print(f"[build] {name}: {engine_path.name} in {time.perf_counter() - t:.1f} s", flush=True)


def _refittable_predecessor(previous: EngineIndex | None, name: str, graph: Any, profile: dict[str, tuple],
                            out: Path) -> Path | None:
    """The earlier engine of this component that a refit can turn into the new one: built refittable, from a graph
    of the same kind (precision, fp32 parts) with other weights, for the same profile."""
    prev = previous.components.get(name) if previous else None
    same = prev is not None and prev.refittable and prev.precision == graph.dtype and \
        prev.fp32_scopes == graph.fp32_scopes and prev.onnx_sha256 != graph.sha256 and prev.profile == profile
    return out / prev.file if prev is not None and same and (out / prev.file).is_file() else None


def compare_engine(engine_path: Path, module: Any, spec: ComponentSpec, batch: int, hw: tuple[int, int],
                   seed: int = 0, velocity: Velocity | None = None, precision: str = "float32"
                   ) -> tuple[float, float]:
    """(max relative error, tolerance) of the engine vs the fp32 PyTorch ``module`` on the same fresh random inputs
    (rounded to the engine's input types first), at ``batch`` and latent size ``hw``; an fp16 engine's tolerance
    comes from PyTorch's own fp16 error there (:func:`export.compare.fp16_tolerance`, on this GPU); ``velocity``:
    see :func:`export.compare.reference` (the fp16 one-step engine)."""
    engine = _open_engine(engine_path)
    inputs = engine.cast(list(spec.sample_inputs(batch, *hw, seed=seed).values()))
    ref = reference(module, inputs, velocity)
    err = max_rel_error(_run_engine(engine, inputs).float().cpu().numpy(), ref)
    tol = fp16_tolerance(module, inputs, ref, velocity)[0] if precision == "float16" else TOLERANCE[precision]
    return err, tol


def _open_engine(path: Path) -> Any:
    from runtime.backends.tensorrt_backend import Engine

    return Engine(path, device=_engine_device())  # its activation memory grows to the shapes it runs


def _run_engine(engine: Any, inputs: list[Any]) -> Any:
    import torch

    stream = torch.cuda.Stream()  # TensorRT wants an explicit stream, not the legacy default one
    with torch.cuda.stream(stream):
        out = engine.run(inputs, stream.cuda_stream)
    stream.synchronize()
    return out


def engine_velocity(engine_path: Path) -> Velocity:
    """:data:`~export.verify.Velocity` of a built UNet engine."""
    engine = _open_engine(engine_path)
    return lambda *inputs: _run_engine(engine, engine.cast(list(inputs))).float().cpu()


def _engine_device() -> Any:
    import torch

    return torch.device("cuda", 0)


def build(ckpt: str, out: str | Path | None = None, min_batch: int = 1, max_batch: int = 4,
          opt_batch: int | None = None, height: int | None = None, width: int | None = None, static: bool = False,
          vae_fp32: bool = False, force: bool = False, vae: str | None = None, lora: Any = None,
          refittable: bool = False) -> dict[str, Any]:
    """fp16 ONNX export (cached), then TensorRT engines for every graph, each compared with PyTorch; returns the
    engines manifest. ``out`` defaults to the export cache, where ``Pipeline.from_pretrained`` finds the engines."""
    out = Path(out) if out is not None else default_export_dir(resolve_checkpoint(ckpt, vae, lora), "trt")
    if not 1 <= min_batch <= max_batch:
        raise ExportError(f"need 1 <= --min-batch <= --max-batch, got {min_batch} and {max_batch}")
    hw = latent_size_of(ckpt, height, width, static, vae)  # before the ONNX export: a mistake costs no minutes
    settings = ExportSettings(fp16=True, vae_fp32=vae_fp32, dynamic_hw=not static, fused=True)
    manifest = export(ckpt, out, settings, force=force, vae=vae, lora=lora)
    trt = require_tensorrt()
    import torch

    dims = manifest.dims
    gpu = torch.cuda.get_device_name(0)
    opt_batch = opt_batch or min_batch
    timing_cache = out / f"timing.{_slug(trt.__version__)}.{_slug(gpu)}.cache"
    specs = specs_by_name(dims)
    components = load_components(export_checkpoint(manifest), device="cpu", dtype=torch.float32)
    try:
        previous = read_engines(out) if (out / ENGINES).is_file() else None
    except ExportError:
        previous = None
    entries: dict[str, EngineEntry] = {}
    for name in sorted(manifest.components, key=lambda n: n == "onestep"):  # the UNet's engine first: reference()
        graph = manifest.components[name]
        profile = specs[name].profile(min_batch, opt_batch, max_batch, hw, None if static else dims.size_range(hw))
        file = f"{name}.{graph.sha256[:12]}.trt{_slug(trt.__version__)}.{_slug(gpu)}.plan"
        earlier = None if force or not refittable else _refittable_predecessor(previous, name, graph, profile, out)
        _make_engine(trt, name, out / graph.file, out / file, profile, timing_cache, force, refittable, earlier)
        velocity = None
        if uses_unet_velocity(name, graph.dtype):
            velocity = engine_velocity(out / entries["unet"].file)
        err, tol = compare_engine(out / file, module_for(name, components), specs[name], opt_batch, hw,
                                  velocity=velocity, precision=graph.dtype)
        ok = bool(np.isfinite(err) and err <= tol)
        print(f"[check] {name}: max rel err vs PyTorch fp32 {err:.2e} (tol {tol:.1e}: {'ok' if ok else 'FAIL'})",
              flush=True)
        if not ok:
            raise ExportError(f"engine {file} disagrees with PyTorch (max rel err {err:.2e} > {tol:.1e})")
        entries[name] = EngineEntry(file=file, sha256=sha256_file(out / file), stamp=stamp([out / file]),
                                    onnx_sha256=graph.sha256, precision=graph.dtype, fp32_scopes=graph.fp32_scopes,
                                    profile=profile, inputs=graph.inputs, outputs=graph.outputs, max_rel_err=err,
                                    refittable=refittable)
    index = EngineIndex(source=manifest.source, tensorrt=trt.__version__, gpu=gpu, components=entries)
    write_engines(out, index)
    return index


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.trt", description="Build TensorRT FP16 engines.")
    p.add_argument("--ckpt", required=True)
    p.add_argument("-o", "--output", default=None,
                   help="output folder [the export cache, where Pipeline.from_pretrained finds it: "
                        "$INSTAFLOW_CACHE/trt/NAME-FINGERPRINT]")
    p.add_argument("--batch", type=int, default=None, help="build for exactly this batch (min = opt = max)")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--height", type=int, default=None, help="pixels [the checkpoint's default]")
    p.add_argument("--width", type=int, default=None, help="pixels [the checkpoint's default]")
    p.add_argument("--static", action="store_true", help="static height/width (fastest, one size only)")
    p.add_argument("--vae-fp32", action="store_true", help="keep the VAE decoder in fp32 (fp16 overflow)")
    p.add_argument("--force", action="store_true", help="rebuild engines / replace another checkpoint's export")
    p.add_argument("--vae", default=None, help="tiny decoder instead of the checkpoint's VAE: taesd, hub id, folder")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="fuse a LoRA into the engines' weights; repeat for several")
    p.add_argument("--refittable", action="store_true",
                   help="build engines whose weights can be replaced: a later run with other --lora refits them")
    args = p.parse_args(argv)
    lo, hi = (args.batch, args.batch) if args.batch else (args.min_batch, args.max_batch)
    return run_cli(lambda: build(args.ckpt, args.output, min_batch=lo, max_batch=hi, height=args.height,
                                 width=args.width, static=args.static, vae_fp32=args.vae_fp32, force=args.force,
                                 vae=args.vae, lora=args.lora, refittable=args.refittable))


if __name__ == "__main__":
    sys.exit(main())
