"""TensorRT: without TensorRT or a GPU the ONNX export still happens and one line says what is missing; with both,
engines are built, compared with onnxruntime and used by the runtime (those tests skip only where TensorRT or a
GPU is absent). On the CPU, the engine build, the TensorRT backend and its cuda-python CUDA-graph capture run
against the stand-ins of tests/fake_tensorrt.py (ONNX graphs run by onnxruntime behind the TensorRT 10 API)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from export.trt import main
from runtime import ExportError
from helpers import HAVE_TRT, install_fake_tensorrt


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT and a GPU are present")
def test_without_tensorrt_exports_onnx_then_exits_2(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "engines"
    assert main(["--ckpt", str(tiny_ckpt), "-o", str(out), "--max-batch", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert ("TensorRT is not installed" in err) or ("no CUDA GPU" in err)
    doc = json.loads((out / "manifest.json").read_text())
    assert set(doc["components"]) == {"text_encoder", "unet", "vae_decoder", "onestep"}
    assert doc["settings"]["dynamic_hw"] and doc["verification"]["passed"]


def test_bad_batch_range(tiny_ckpt, tmp_path, capsys):
    assert main(["--ckpt", str(tiny_ckpt), "-o", str(tmp_path), "--min-batch", "4", "--max-batch", "2"]) == 2
    assert "--min-batch <= --max-batch" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--height", "0"], "height must be a positive multiple of the VAE scale factor"),
    (["--width", "-16"], "width must be a positive multiple of the VAE scale factor"),
    (["--static", "--height", "64"], "drop --height/--width, or --static"),
])
def test_bad_size_is_one_line_before_the_onnx_export(tiny_ckpt, tmp_path, capsys, args, message):
    assert main(["--ckpt", str(tiny_ckpt), "-o", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()  # refused before minutes of export


def test_tensorrt_backend_unavailable_is_one_line(tiny_ckpt, tmp_path):
    from runtime import BackendUnavailableError, Pipeline

    if HAVE_TRT:
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(BackendUnavailableError) as info:
        Pipeline.from_pretrained(tiny_ckpt, backend="tensorrt", export_dir=tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT and a GPU")
def test_engines_build_and_match_torch(tiny_ckpt, tmp_path):
    from export.trt import build
    from runtime import ExportError, InvalidInputError, Pipeline

    engines = build(str(tiny_ckpt), tmp_path, min_batch=1, max_batch=2)
    assert all(e.max_rel_err <= 1e-2 for e in engines.components.values())
    ref = Pipeline.from_pretrained(tiny_ckpt, device="cpu", backend="torch")
    from runtime.backends.tensorrt_backend import _have_cuda_python

    graphs = [False] + ([True] if _have_cuda_python() else [])
    for cuda_graph in graphs:
        trt_pipe = Pipeline.from_pretrained(tiny_ckpt, device="cuda", backend="tensorrt", export_dir=tmp_path,
                                            cuda_graph=cuda_graph)
        assert trt_pipe.backend.cuda_graph == cuda_graph
        for kwargs in (dict(), dict(num_inference_steps=3, guidance_scale=1.5)):
            for prompts in (["a cat", "a dog"], ["a bird"], ["a fish", "a cow"]):  # graphs replay new inputs
                a = ref(prompts, seed=0, output_type="pt", **kwargs).images
                b = trt_pipe(prompts, seed=0, output_type="pt", **kwargs).images.cpu()
                assert (a - b).abs().max() < 3e-2, (cuda_graph, kwargs, prompts)
        with pytest.raises(InvalidInputError, match="3 images in one call"):
            trt_pipe(["a"] * 3, seed=0)
    doc = json.loads((tmp_path / "engines.json").read_text())
    doc["gpu"] = "another GPU"
    (tmp_path / "engines.json").write_text(json.dumps(doc))
    with pytest.raises(ExportError, match="built for another GPU"):
        Pipeline.from_pretrained(tiny_ckpt, device="cuda", backend="tensorrt", export_dir=tmp_path)


# ------------------------------------------------------------------------------------------ fake TensorRT (CPU)
@pytest.fixture(params=["10.8.0", "10.16.0", "11.1.0"])
def fake_gpu(monkeypatch, request):
    """The stand-ins, once per TensorRT API surface (10.0-10.11, 10.12+, 11.x)."""
    fake = install_fake_tensorrt(monkeypatch, request.param)
    yield fake
    fake.use("10.16.0")


@pytest.fixture()
def fake_gpu_latest(monkeypatch):
    """The stand-ins on one surface, for tests that do not depend on the TensorRT version."""
    fake = install_fake_tensorrt(monkeypatch, "11.1.0")
    yield fake
    fake.use("10.16.0")


def _fake_backend(ckpt, folder, **options):
    from runtime import Pipeline, resolve
    from runtime.backends.tensorrt_backend import TensorRTBackend
    from runtime.models import load_components

    checkpoint = resolve(ckpt)
    backend = TensorRTBackend(checkpoint, folder, device=torch.device("cpu"), dtype=torch.float32, **options)
    return Pipeline(load_components(checkpoint, weights=False), device="cpu", backend=backend)


def assert_fp16_close(b: torch.Tensor, a: torch.Tensor) -> None:
    """Images of fp16 engines vs the fp32 torch reference: within fp16 rounding of a UNet + decoder chain."""
    assert b.shape == a.shape and b.dtype == torch.float32
    diff = (b - a).abs()
    assert diff.max() < 3e-2 and diff.mean() < 3e-3, (float(diff.max()), float(diff.mean()))


def _build_strongly_typed(fake, *args, **kwargs):
    """export.trt.build, checking that every engine is a strongly typed fp16 build and that the deprecated FP16
    builder flag is never touched (a DeprecationWarning on 10.12+ is an error here)."""
    import warnings

    from export.trt import build

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        doc = build(*args, **kwargs)
    folder = Path(args[1])
    for name, entry in doc.components.items():
        plan = json.loads((folder / entry.file).read_bytes())
        assert plan["strongly_typed"] and plan["precision"] == "onnx", name
    assert doc.components["unet"].precision == "float16"
    return doc


def test_fake_tensorrt_build_then_backend_matches_torch(fake_gpu, tiny_ckpt, tiny_pipe, tmp_path):
    from export.trt import build
    from runtime import InvalidInputError

    doc = _build_strongly_typed(fake_gpu, str(tiny_ckpt), tmp_path, min_batch=1, max_batch=2)
    assert set(doc.components) == {"text_encoder", "unet", "vae_decoder", "onestep"}
    assert doc.gpu == "Fake GPU" and doc.tensorrt == fake_gpu.__version__
    assert all(e.max_rel_err <= 1e-2 for e in doc.components.values())  # fp16 engines vs PyTorch
    assert doc.components["unet"].profile["sample"][2][0] == 4  # guidance doubles the UNet batch
    assert len(list(tmp_path.glob("timing.*.cache"))) == 1
    assert json.loads((tmp_path / "engines.json").read_text()) == json.loads(json.dumps(doc.to_json()))
    builds = [e for e in fake_gpu.LOG if e[0] == "build"]
    build(str(tiny_ckpt), tmp_path, min_batch=1, max_batch=2)  # cached engines are not rebuilt
    assert [e for e in fake_gpu.LOG if e[0] == "build"] == builds

    # the guidance rule: engines built for 2 images take a first call of 2 prompts with guidance on a fresh pipeline
    # (empty embedding cache): prompts and negatives go through the text encoder in one call of 4
    assert doc.components["text_encoder"].profile["input_ids"][2] == (4, 16)
    assert doc.components["vae_decoder"].profile["latents"][2][0] == 2
    for cuda_graph in (False, True):
        kwargs = dict(num_inference_steps=4, guidance_scale=1.5, negative_prompt=["blurry", "dark"], seed=5,
                      output_type="pt")
        fresh = _fake_backend(tiny_ckpt, tmp_path, cuda_graph=cuda_graph)
        assert_fp16_close(fresh(["a cat", "a dog"], **kwargs).images, tiny_pipe(["a cat", "a dog"], **kwargs).images)

    for cuda_graph in (False, True):
        pipe = _fake_backend(tiny_ckpt, tmp_path, cuda_graph=cuda_graph)
        assert pipe.backend.cuda_graph is cuda_graph
        for kwargs in (dict(), dict(num_inference_steps=3, guidance_scale=1.5)):
            for prompts in (["a red circle", "a blue square"], ["a green star"], ["a cat", "a dog"]):
                a = tiny_pipe(prompts, seed=3, output_type="pt", **kwargs).images
                b = pipe(prompts, seed=3, output_type="pt", **kwargs).images
                assert_fp16_close(b, a)
        with pytest.raises(InvalidInputError, match=r"3 images in one call, but the engines in .* were built for at "
                                                    r"most 2; rebuild with `python -m export.trt --max-batch 3`"):
            pipe(["a", "b", "c"], seed=0)  # refused before the text encoder runs
        with pytest.raises(InvalidInputError, match="3 images in one call"):
            pipe("a", num_images_per_prompt=3, seed=0)  # one prompt, three images
        with pytest.raises(InvalidInputError, match="outside what the text_encoder engine"):
            pipe.backend.encode(torch.zeros(5, 16, dtype=torch.long))  # the per-engine check stays
    # with graphs: captures per (engine, shape), then launches; when the shared activation block grows (the guided
    # calls' UNet needs more than the one-step path) the graphs captured with the old block are dropped
    graphed = pipe.backend._graphs
    assert set(graphed) == {"text_encoder", "onestep"}
    assert sum(1 for e in fake_gpu.LOG if e[0] == "launch") >= 6
    for cache in graphed.values():
        assert all(c.handle[0].memory == pipe.backend.memory.block.data_ptr() for c in cache.graphs.values())


def test_fake_tensorrt_backend_refusals(fake_gpu_latest, tiny_ckpt, odd_ckpt, tmp_path, monkeypatch):
    from export.trt import build
    from runtime import BackendUnavailableError, ExportError

    with pytest.raises(BackendUnavailableError,
                       match="no TensorRT engines for .*; build them with `python -m export.trt --ckpt "):
        _fake_backend(tiny_ckpt, tmp_path)
    build(str(tiny_ckpt), tmp_path, min_batch=1, max_batch=1)
    with pytest.raises(ExportError, match="another checkpoint"):
        _fake_backend(odd_ckpt, tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Other GPU")
    with pytest.raises(ExportError, match="built for Fake GPU .* this is Other GPU"):
        _fake_backend(tiny_ckpt, tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    built = fake_gpu_latest.__version__
    monkeypatch.setattr(fake_gpu_latest, "__version__", built + ".1")
    with pytest.raises(ExportError, match=f"with TensorRT {built}, this is Fake GPU with TensorRT {built}.1"):
        _fake_backend(tiny_ckpt, tmp_path)
    monkeypatch.setattr(fake_gpu_latest, "__version__", built)
    plan = next(tmp_path.glob("unet.*.plan"))
    plan.write_bytes(plan.read_bytes()[:-3])
    with pytest.raises(ExportError, match="does not match its manifest hash"):
        _fake_backend(tiny_ckpt, tmp_path)
    monkeypatch.setattr(fake_gpu_latest, "__version__", "8.6.1")
    from export.trt import main

    assert main(["--ckpt", str(tiny_ckpt), "-o", str(tmp_path / "old")]) == 2


def test_fake_tensorrt_unusual_shapes(fake_gpu, odd_ckpt, tmp_path):
    """Non-square latents, 3 latent channels, a 7-token window, VAE factor 2: engines and profiles follow the
    checkpoint's configs, and the backend matches torch at the default size and at another size in the profile."""
    from runtime import Pipeline

    doc = _build_strongly_typed(fake_gpu, str(odd_ckpt), tmp_path, min_batch=1, max_batch=2)
    assert doc.components["text_encoder"].profile["input_ids"][0] == (1, 7)
    ref = Pipeline.from_pretrained(odd_ckpt, device="cpu", treat_as_flow=True, backend="torch")
    for cuda_graph in (False, True):
        pipe = _fake_backend(odd_ckpt, tmp_path, cuda_graph=cuda_graph)
        for kwargs in (dict(), dict(num_inference_steps=2, guidance_scale=2.0, negative_prompt="blurry"),
                       dict(height=16, width=24)):
            a = ref(["a cat", "a dog"], seed=1, output_type="pt", **kwargs).images
            b = pipe(["a cat", "a dog"], seed=1, output_type="pt", **kwargs).images
            assert_fp16_close(b, a)


def test_fake_tensorrt_engine_checks_set_input_shape(fake_gpu_latest, tiny_ckpt, tmp_path):
    """TensorRT's set_input_shape returns False outside the profile (it does not raise): the engine says so in one
    line instead of running with stale shapes."""
    from export.trt import build
    from runtime import InvalidInputError
    from runtime.backends.tensorrt_backend import Engine

    doc = build(str(tiny_ckpt), tmp_path, min_batch=1, max_batch=1)
    engine = Engine(tmp_path / doc.components["vae_decoder"].file, torch.device("cpu"))
    context = engine.new_context()
    ok = engine.bind(context, engine.cast([torch.randn(1, 4, 8, 8)]))
    assert ok.shape == (1, 3, 32, 32)
    with pytest.raises(InvalidInputError, match=r"latents shape \[2, 4, 8, 8\] is outside the optimisation profile"):
        engine.bind(context, engine.cast([torch.randn(2, 4, 8, 8)]))


def test_fake_tensorrt_auto_falls_back_from_unusable_engines(fake_gpu_latest, tiny_ckpt, tmp_path, monkeypatch):
    """backend="auto" uses engines built here, and falls back to torch with one warning for engines built for
    another GPU (an explicit backend="tensorrt" keeps the one-line error)."""
    from export.trt import build
    from runtime import resolve
    from runtime.backends import choose

    build(str(tiny_ckpt), tmp_path, min_batch=1, max_batch=1)
    ckpt = resolve(tiny_ckpt)
    cuda = torch.device("cuda")
    assert choose("auto", cuda, ckpt, tmp_path, {})[0] == "tensorrt"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Other GPU")
    with pytest.warns(RuntimeWarning, match=r"tensorrt not used \(the engines in .* were built for Fake GPU .* this "
                                            r"is Other GPU .*; rebuild with `python -m export.trt --ckpt .*\); trying"):
        assert choose("auto", cuda, ckpt, tmp_path, {}) == ("torch", {"cuda_graph": True, "channels_last": True,
                                                                      "fuse_qkv": True})
    (tmp_path / "engines.json").write_text("{not json")
    with pytest.warns(RuntimeWarning, match=r"unreadable .*engines.json: JSONDecodeError"):
        assert choose("auto", cuda, ckpt, tmp_path, {})[0] == "torch"


def test_fake_tensorrt_engines_built_without_output_folder_are_found(fake_gpu_latest, tiny_ckpt, tmp_path,
                                                                    monkeypatch):
    """``python -m export.trt --ckpt CKPT`` (no ``-o``, the mission's command) builds into the export cache, where
    ``auto`` finds the engines."""
    from runtime import resolve
    from runtime.backends import choose
    from runtime.cache import default_export_dir

    monkeypatch.setenv("INSTAFLOW_CACHE", str(tmp_path))
    assert main(["--ckpt", str(tiny_ckpt), "--batch", "1", "--static"]) == 0
    ckpt = resolve(tiny_ckpt)
    assert (default_export_dir(ckpt, "trt") / "engines.json").is_file()
    assert choose("auto", torch.device("cuda"), ckpt, None, {})[0] == "tensorrt"


def test_stream_graph_keeps_the_error_that_broke_the_capture(fake_gpu_latest, monkeypatch):
    """An enqueue that fails during capture invalidates it, so ending the capture fails too: the error raised is
    the enqueue's, not the consequence."""
    from runtime.backends import graphs

    def end_invalidated(stream):
        fake_gpu_latest.CAPTURING.pop(stream, None)
        return (fake_gpu_latest.cudart.cudaError_t.cudaErrorStreamCaptureInvalidated, None)

    monkeypatch.setattr(fake_gpu_latest.cudart, "cudaStreamEndCapture", end_invalidated)

    def enqueue(stream):
        raise ValueError("engine enqueue failed")

    with pytest.raises(ValueError, match="engine enqueue failed"):
        graphs.StreamGraph(enqueue, 77)
    assert 77 not in fake_gpu_latest.CAPTURING


def test_fake_streams_are_asynchronous(fake_gpu_latest, tiny_ckpt, tmp_path):
    """The stand-in is as strict as a GPU about ordering: an engine's output is written only once its stream is
    synchronised or waited on, so a backend that forgot the wait would read stale memory in these tests."""
    from export.trt import build
    from runtime.backends.tensorrt_backend import Engine

    doc = build(str(tiny_ckpt), tmp_path, min_batch=1, max_batch=1)
    engine = Engine(tmp_path / doc.components["vae_decoder"].file, torch.device("cpu"))
    stream = torch.cuda.Stream()
    out = engine.run(engine.cast([torch.randn(1, 4, 8, 8)]), stream.cuda_stream)
    out.fill_(7.0)
    assert bool((out == 7.0).all())  # enqueued, not run yet
    torch.cuda.current_stream().wait_stream(stream)
    assert not bool((out == 7.0).any())  # the wait ran it


def test_fake_tensorrt_builds_through_polygraphy(fake_gpu_latest, tiny_ckpt, tmp_path, monkeypatch):
    """Engines are built by polygraphy's loaders (network from the ONNX file, config with the profile and the timing
    cache, engine bytes), the timing cache of one build is loaded by the next, and a failed build is one line."""
    import polygraphy.backend.trt as poly

    from export.trt import build

    calls = []
    real = poly.engine_bytes_from_network
    monkeypatch.setattr(poly, "engine_bytes_from_network", lambda *a, **k: calls.append(1) or real(*a, **k))
    build(str(tiny_ckpt), tmp_path, static=True)
    assert len(calls) == 4
    assert [d for e, d in fake_gpu_latest.LOG if e == "timing_cache"][0] == b""  # no cache yet: an empty one
    fake_gpu_latest.LOG.clear()
    build(str(tiny_ckpt), tmp_path, static=True, force=True)
    cache = (next(tmp_path.glob("timing.*.cache"))).read_bytes()
    assert [d for e, d in fake_gpu_latest.LOG if e == "timing_cache"] == [cache] * 4  # loaded by every build
    monkeypatch.setattr(fake_gpu_latest.Builder, "build_serialized_network", lambda self, network, config: None)
    with pytest.raises(ExportError, match=r"^TensorRT 11.1.0 with polygraphy [0-9.]+ failed to build an engine from "
                                          r"text_encoder.onnx: PolygraphyException: .*\(see the log above\)$") as info:
        build(str(tiny_ckpt), tmp_path, static=True, force=True)
    assert "\n" not in str(info.value)


def test_fake_tensorrt_on_the_bundled_model(fake_gpu_latest, tmp_path):
    """The bundled model (hard-edged shapes: the decoder amplifies fp16 rounding most) through export.trt and the
    TensorRT backend, on a fresh pipeline: 1 step, and 4 steps with guidance and negatives, close to fp32 torch."""
    from export.trt import build
    from runtime import Pipeline

    build("tiny", tmp_path, min_batch=1, max_batch=2, static=True)
    reference = Pipeline.from_pretrained("tiny", device="cpu", backend="torch")
    prompts = ["a small red circle at the top left", "a large blue square at the center"]
    for kwargs in (dict(), dict(num_inference_steps=4, guidance_scale=1.5, negative_prompt=["green", "yellow"])):
        engines = _fake_backend("tiny", tmp_path)  # fresh: nothing cached
        b = engines(prompts, seed=7, output_type="pt", **kwargs).images
        assert_fp16_close(b, reference(prompts, seed=7, output_type="pt", **kwargs).images)


# ------------------------------------------------------------------------------- skew between the NVIDIA packages
def small_onnx(path: Path) -> Path:
    """A one-convolution fp16 graph with a dynamic batch: enough for the build path (no export needed)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float16), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["b", 2, 4, 4])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_polygraphy_that_predates_tensorrt_11_is_one_line(fake_gpu_latest, tmp_path, monkeypatch):
    """polygraphy 0.49.0 sets NetworkDefinitionCreationFlag.EXPLICIT_BATCH unconditionally; TensorRT 11 removed it,
    so its build ends in an AttributeError inside polygraphy. The build says so in one line naming both versions
    (its CreateNetwork, as released in 0.49.0, stands in for the old package)."""
    import polygraphy
    from polygraphy.backend.trt import loader, util as trt_util

    from export.trt import build_engine

    trt = fake_gpu_latest

    def create_network_0_49_0(self):  # polygraphy 0.49.0, backend/trt/loader.py CreateNetwork.call_impl
        builder = trt.Builder(trt_util.get_trt_logger())
        network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        if self.strongly_typed:
            network_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        return builder, builder.create_network(flags=network_flags)

    monkeypatch.setattr(loader.CreateNetwork, "call_impl", create_network_0_49_0)
    onnx_path = small_onnx(tmp_path / "m.onnx")
    profile = {"x": ((1, 3, 4, 4), (1, 3, 4, 4), (2, 3, 4, 4))}
    with pytest.raises(ExportError) as info:
        build_engine(trt, onnx_path, tmp_path / "m.plan", profile, tmp_path / "timing.cache")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"TensorRT 11.1.0 with polygraphy {polygraphy.__version__} failed to build an engine "
                              "from m.onnx: AttributeError: EXPLICIT_BATCH")
    assert "pip install 'polygraphy>=0.50.3'" in message
    assert not (tmp_path / "m.plan").exists()
    fake_gpu_latest.use("10.16.0")  # TensorRT 10 still has the (ignored) flag: the same old code builds
    build_engine(trt, onnx_path, tmp_path / "m.plan", profile, tmp_path / "timing.cache")
    assert (tmp_path / "m.plan").exists()


def test_pins_name_nvidia_packages_that_work_together():
    """pyproject's extras: a polygraphy that builds for TensorRT 10 and 11 (0.50.3: 0.49.0 sets EXPLICIT_BATCH,
    0.49.9-0.49.26 read ILayer.precision_is_set, both removed in TensorRT 11.0), and cuda-python below 13 (13.x is
    linked to the CUDA 13 runtime and fails on CUDA 12 drivers; 12.x runs on CUDA 12 and 13 drivers)."""
    import re
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    from export.trt import POLYGRAPHY_MIN

    doc = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = doc["project"]["optional-dependencies"]
    reqs = {(extra, Requirement(r).name): Requirement(r) for extra, rs in extras.items() for r in rs
            if not r.startswith("instaflow-rt")}
    for extra in ("trt", "dev"):
        spec = reqs[(extra, "polygraphy")].specifier
        assert not spec.contains("0.49.26") and spec.contains(POLYGRAPHY_MIN) and spec.contains("0.53.6"), extra
    assert Version(POLYGRAPHY_MIN) == Version("0.50.3")
    cuda = reqs[("gpu", "cuda-python")].specifier
    assert cuda.contains("12.9.4") and not cuda.contains("13.0.3"), cuda
    assert re.search(r"cuda-python 13\.x .*CUDA 13 driver", (Path(__file__).parents[1] / "pyproject.toml").read_text())


def test_refit_asks_the_engine_whether_it_is_refittable(fake_gpu_latest, tmp_path):
    """An engine built without REFIT is refused from ICudaEngine.refittable, before a Refitter exists: TensorRT
    would answer the Refitter with nullptr and an error in its log (pybind11 raises TypeError)."""
    from export.trt import build_engine, refit_engine

    onnx_path = small_onnx(tmp_path / "m.onnx")
    profile = {"x": ((1, 3, 4, 4), (1, 3, 4, 4), (2, 3, 4, 4))}
    build_engine(fake_gpu_latest, onnx_path, tmp_path / "fixed.plan", profile, tmp_path / "timing.cache")
    fake_gpu_latest.LOG.clear()
    with pytest.raises(ExportError, match=r"^fixed.plan was not built refittable; rebuild with --refittable$"):
        refit_engine(fake_gpu_latest, tmp_path / "fixed.plan", onnx_path, tmp_path / "new.plan")
    assert [e for e in fake_gpu_latest.LOG if e[0] == "trt_error"] == []  # TensorRT was never asked
    with pytest.raises(TypeError, match="nullptr"):  # the stand-in refuses as the binding does
        fake_gpu_latest.Refitter(fake_gpu_latest.Runtime(fake_gpu_latest.Logger()).deserialize_cuda_engine(
            (tmp_path / "fixed.plan").read_bytes()), fake_gpu_latest.Logger())
    build_engine(fake_gpu_latest, onnx_path, tmp_path / "refit.plan", profile, tmp_path / "timing.cache",
                 refittable=True)
    refit_engine(fake_gpu_latest, tmp_path / "refit.plan", onnx_path, tmp_path / "new.plan")
    assert (tmp_path / "new.plan").exists()


# ------------------------------------------------------------- graphs optional, activation memory for the shapes used
@pytest.fixture(scope="module")
def built_engines(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint's engines, built once on the 11.x surface (static size, 1-2 images), for tests that only
    run them."""
    import fake_tensorrt as fake

    from export.trt import build

    out = tmp_path_factory.mktemp("engines")
    with pytest.MonkeyPatch.context() as mp:
        install_fake_tensorrt(mp, "11.1.0")
        build(str(tiny_ckpt), out, min_batch=1, max_batch=2, static=True)
    fake.use("10.16.0")
    return out


def _ours(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


def test_cuda_python_13_on_a_cuda_12_driver_runs_without_graphs(fake_gpu_latest, tiny_ckpt, built_engines, tiny_pipe,
                                                                 monkeypatch):
    """cuda-bindings 13.x is linked to the CUDA 13 runtime: on a CUDA 12 driver every runtime call answers
    (cudaErrorInsufficientDriver,). Graphs switch on whenever cuda-python imports, so the backend must find out
    and run without them, with one warning, not fail every call."""
    import warnings

    fake = fake_gpu_latest
    prompts, kwargs = ["a red circle", "a blue square"], dict(seed=3, output_type="pt")
    ref = tiny_pipe(prompts, **kwargs).images
    monkeypatch.setattr(fake, "cudart", fake.insufficient_driver())  # runtime 13.0, driver 12.8
    with pytest.warns(RuntimeWarning) as record:
        pipe = _fake_backend(tiny_ckpt, built_engines)  # cuda_graph=None: graphs when cuda-python imports
    assert len(_ours(record)) == 1
    assert _ours(record)[0].startswith("CUDA graphs are off for the tensorrt backend: cuda-python's CUDA runtime is "
                                       "13.0 but the driver supports CUDA 12.8 (cudaErrorInsufficientDriver); "
                                       "install 'cuda-python<13' or a newer driver")
    assert not pipe.backend.cuda_graph and not pipe.backend._graphs
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert_fp16_close(pipe(prompts, **kwargs).images, ref)
    assert not any(e[0] in ("begin_capture", "launch") for e in fake.LOG)

    # a driver whose version queries pass but which refuses the capture itself: off at the first capture, once
    monkeypatch.setattr(fake, "cudart", fake.insufficient_driver(runtime_version=12080))
    pipe = _fake_backend(tiny_ckpt, built_engines, cuda_graph=True)
    assert pipe.backend.cuda_graph
    fake.LOG.clear()
    with pytest.warns(RuntimeWarning) as record:
        assert_fp16_close(pipe(prompts, **kwargs).images, ref)
    assert len(_ours(record)) == 1
    assert _ours(record)[0].startswith("CUDA graphs are off for the tensorrt backend (cudaStreamBeginCapture failed: "
                                       "cudaErrorInsufficientDriver")
    assert not pipe.backend.cuda_graph
    assert sum(e[0] == "begin_capture" for e in fake.LOG) == 1  # the one-step engine never tried
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert_fp16_close(pipe(prompts, **kwargs).images, ref)
        assert_fp16_close(pipe(["a cat"], **kwargs).images, tiny_pipe(["a cat"], **kwargs).images)
    assert sum(e[0] == "begin_capture" for e in fake.LOG) == 1


def test_a_shape_that_cannot_be_captured_runs_without_a_graph(fake_gpu_latest, tiny_ckpt, built_engines, tiny_pipe,
                                                              monkeypatch):
    """An enqueue that cannot be captured (here: every engine at batch 2; on a GPU, a plugin that allocates in
    enqueue) fails the capture; that shape then runs without a graph from the first call on, with one warning for
    the backend, and other shapes keep their graphs."""
    import warnings

    fake = fake_gpu_latest
    monkeypatch.setattr(fake, "UNCAPTURABLE", lambda shapes: any(s[0] == 2 for s in shapes.values()))
    pipe = _fake_backend(tiny_ckpt, built_engines, cuda_graph=True)
    kwargs = dict(seed=3, output_type="pt")
    with pytest.warns(RuntimeWarning) as record:
        b = pipe(["a red circle", "a blue square"], **kwargs).images
    assert_fp16_close(b, tiny_pipe(["a red circle", "a blue square"], **kwargs).images)
    assert len(_ours(record)) == 1  # the one-step engine failed too: still one warning
    assert _ours(record)[0].startswith("the text_encoder engine cannot be captured as a CUDA graph for inputs 2x16 "
                                       "(execute_async_v3 of text_encoder.")
    assert _ours(record)[0].endswith("; those shapes run without a graph")
    graphs = pipe.backend._graphs
    assert all(len(g.uncapturable) == 1 and len(g) == 0 and not g.disabled for g in graphs.values())
    fake.LOG.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for prompts in (["a cat"], ["a dog", "a fish"], ["a bird"]):
            assert_fp16_close(pipe(prompts, **kwargs).images, tiny_pipe(prompts, **kwargs).images)
    assert sum(e[0] == "begin_capture" for e in fake.LOG) == 2  # batch 1, once per engine; batch 2 never again
    assert sum(e[0] == "launch" for e in fake.LOG) == 4
    assert {k: len(g) for k, g in graphs.items()} == {"text_encoder": 1, "onestep": 1}


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_activation_memory_is_sized_for_the_shapes_used(fake_gpu_latest, tiny_ckpt, built_engines, tiny_pipe,
                                                        cuda_graph):
    """Nothing is allocated up front; the shared block grows to what the shapes run so far need, as
    update_device_memory_size_for_shapes reports it (engines built with RUNTIME_ACTIVATION_RESIZE_10_10), far
    below device_memory_size_v2 (the maximum over the profile, what was allocated at start-up before). A larger
    block moves it, so graphs captured with the old one are recaptured."""
    pipe = _fake_backend(tiny_ckpt, built_engines, cuda_graph=cuda_graph)
    backend = pipe.backend
    assert backend.memory.size == 0
    worst = max(e.device_memory_size for e in backend.engines.values())

    def need(batch: int) -> int:  # what the stand-in's engines of the one-step path need at this batch
        return max(backend.engines[n].engine.activation_bytes({i: (batch, *lo[1:]) for i, (lo, _, _) in
                                                               backend.profiles[n].items()})
                   for n in ("text_encoder", "onestep"))

    kwargs = dict(seed=3, output_type="pt")
    for prompts, size in ((["a cat"], need(1)), (["a red circle", "a blue square"], need(2)), (["a dog"], need(2))):
        assert_fp16_close(pipe(prompts, **kwargs).images, tiny_pipe(prompts, **kwargs).images)
        assert backend.memory.size == size
        for cache in backend._graphs.values():  # every graph kept runs in the current block, none in a freed one
            assert all(c.handle[0].memory == backend.memory.block.data_ptr() for c in cache.graphs.values())
    assert need(1) < need(2) < worst
    plan = json.loads((built_engines / backend.index.components["unet"].file).read_bytes())
    assert plan["activation_resize"]  # the build asked TensorRT for per-shape sizes (10.10+)
    if cuda_graph:
        assert sum(len(g) for g in backend._graphs.values()) >= 2


def test_engine_memory_is_computed_from_the_shapes():
    """benchmarks.engine_memory (the README's cost of an engine set): a layer's activation inputs and outputs count
    (weights not), and attention counts as one fused operation (q, k, v, output), never as its full matrix."""
    from benchmarks.engine_memory import measure

    with torch.device("meta"):
        conv = torch.nn.Conv2d(8, 16, 3, padding=1).half()
    x = torch.empty(2, 8, 32, 32, dtype=torch.float16, device="meta")
    layer_io, peak = measure(conv, [x])
    assert layer_io == 2 * (8 + 16) * 32 * 32 * 2 and peak == layer_io

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = (torch.empty(1, 8, 4096, 40, dtype=torch.float16, device="meta") for _ in range(3))
    layer_io, _ = measure(Attention(), [q, k, v])
    assert layer_io == 4 * q.numel() * 2  # q, k, v and the output, not 8 x 4096 x 4096 scores
