"""Backends: onnxruntime matches the fp32 torch reference; `auto` selection; backend errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from export.onnx import ExportSettings, export
from runtime import BackendUnavailableError, ExportError, InvalidInputError, Pipeline
from runtime.backends import choose
from runtime.manifest import read_manifest


@pytest.fixture(scope="module")
def tiny_onnx(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    export(str(tiny_ckpt), out, ExportSettings(fused=True))  # verified: only verified exports are run
    return out


@pytest.fixture(scope="module")
def odd_onnx(odd_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "odd"
    export(str(odd_ckpt), out, ExportSettings())  # verified; no fused graph: the step runs in the pipeline
    return out


@pytest.mark.parametrize("which", ["tiny", "odd"])
def test_onnxruntime_matches_torch(which, request):
    ckpt, folder = request.getfixturevalue(f"{which}_ckpt"), request.getfixturevalue(f"{which}_onnx")
    ref = request.getfixturevalue(f"{which}_pipe")
    pipe = Pipeline.from_pretrained(ckpt, backend="onnxruntime", export_dir=folder)
    assert pipe.backend.name == "onnxruntime"
    assert pipe.backend.has_one_step == (which == "tiny")
    prompts = ["a red circle at the top left", "a photo of a cat"]
    c = ref.components
    h, w = c.default_size
    noise = torch.randn(2, c.latent_channels, h // c.vae_scale_factor, w // c.vae_scale_factor,
                        generator=torch.Generator().manual_seed(1))
    for kwargs in (dict(), dict(num_inference_steps=4, guidance_scale=1.5, negative_prompt="blurry")):
        a = ref(prompts, latents=noise, output_type="pt", **kwargs).images
        b = pipe(prompts, latents=noise, output_type="pt", **kwargs).images
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    pil = pipe(prompts, seed=0).images
    assert len(pil) == 2 and pil[0].size == (w, h)


def test_onnxruntime_io_binding_path(odd_ckpt, odd_onnx, tiny_ckpt, tiny_onnx):
    """The bound path the GPU uses (torch buffers bound in place), run on the CPU, equals the numpy path."""
    for ckpt, folder in ((tiny_ckpt, tiny_onnx), (odd_ckpt, odd_onnx)):
        plain = Pipeline.from_pretrained(ckpt, backend="onnxruntime", export_dir=folder)
        bound = Pipeline.from_pretrained(ckpt, backend="onnxruntime", export_dir=folder, io_binding=True)
        assert all(g.io_binding for g in bound.backend.sessions.values())
        for kwargs in (dict(), dict(num_inference_steps=2, guidance_scale=1.5), dict(num_images_per_prompt=3)):
            a = plain(["a cat", "a dog"], seed=2, output_type="pt", **kwargs).images
            b = bound(["a cat", "a dog"], seed=2, output_type="pt", **kwargs).images
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


def test_onnxruntime_graph_cache_with_graph_ids(tiny_onnx):
    """onnxruntime's CUDA-graph bookkeeping (static bound buffers, one gpu_graph_id per shape), on the CPU provider,
    which ignores the graph id: results follow the new inputs of every call, and since onnxruntime cannot free a
    captured graph, a shape beyond max_graphs is refused in one line rather than evicted."""
    from runtime.backends.onnxruntime_backend import Session
    from runtime.specs import specs_by_name

    manifest = read_manifest(tiny_onnx)
    entry, spec = manifest.components["unet"], specs_by_name(manifest.dims)["unet"]
    plain = Session(tiny_onnx / entry.file, spec, entry, ["CPUExecutionProvider"], torch.device("cpu"))
    graphed = Session(tiny_onnx / entry.file, spec, entry, ["CPUExecutionProvider"], torch.device("cpu"),
                      max_graphs=2, io_binding=True)
    g = torch.Generator().manual_seed(0)
    for batch in (1, 2, 1, 2):
        x, emb = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 16, 32, generator=g)
        t = torch.full((batch,), 1000.0)
        torch.testing.assert_close(graphed(x, t, emb), plain(x, t, emb))
    with pytest.raises(InvalidInputError, match="already holds CUDA graphs for 2 input shapes"):
        graphed(torch.randn(3, 4, 8, 8), torch.full((3,), 1000.0), torch.randn(3, 16, 32))


def test_onnxruntime_provider_options():
    """The CUDA provider gets the device, torch's stream as its compute stream and, with cuda_graph, graph capture
    (whether providers were named or defaulted); graphs with another provider first are refused."""
    from runtime.backends.onnxruntime_backend import provider_list

    cuda = torch.device("cuda", 1)
    want = ("CUDAExecutionProvider", {"device_id": 1, "user_compute_stream": "1234", "enable_cuda_graph": "1"})
    for providers in (None, "cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]):
        assert provider_list(providers, cuda, cuda_graph=True, stream=1234) == [want]
    plain = provider_list("cuda", cuda, stream=1234)
    assert plain == [("CUDAExecutionProvider", {"device_id": 1, "user_compute_stream": "1234"}), "CPUExecutionProvider"]
    assert provider_list(None, torch.device("cpu")) == ["CPUExecutionProvider"]
    with pytest.raises(BackendUnavailableError, match="need the CUDA provider first; got TensorrtExecutionProvider"):
        provider_list("tensorrt", cuda, cuda_graph=True)
    with pytest.raises(BackendUnavailableError, match="cuda_graph=True needs a CUDA device"):
        provider_list(None, torch.device("cpu"), cuda_graph=True)


def test_onnxruntime_loads_no_torch_weights(tiny_ckpt, tiny_onnx):
    pipe = Pipeline.from_pretrained(tiny_ckpt, backend="onnxruntime", export_dir=tiny_onnx)
    assert not isinstance(pipe.components.unet, torch.nn.Module)  # configs only: the graphs do the work


def test_auto_picks_onnxruntime_on_cpu_when_an_export_exists(tiny_ckpt, tiny_onnx, tmp_path):
    ckpt = __import__("runtime").resolve(tiny_ckpt)
    assert choose("auto", torch.device("cpu"), ckpt, tiny_onnx, {})[0] == "onnxruntime"
    assert choose("auto", torch.device("cpu"), ckpt, None, {})[0] == "torch"  # nothing in the export cache
    with pytest.warns(RuntimeWarning, match="auto runs torch: .*onnxruntime takes no compile; aoti takes no compile"):
        assert choose("auto", torch.device("cpu"), ckpt, tiny_onnx, {"compile": True})[0] == "torch"
    assert Pipeline.from_pretrained(tiny_ckpt, backend="auto", export_dir=tiny_onnx).backend.name == "onnxruntime"
    with pytest.warns(RuntimeWarning, match="auto runs torch: nothing in export_dir .* runs here .*no ONNX export"):
        fallback = Pipeline.from_pretrained(tiny_ckpt, backend="auto", export_dir=tmp_path)
    assert fallback.backend.name == "torch" and not fallback.backend.cuda_graph
    assert fallback.components.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_auto_order_on_a_gpu(tiny_ckpt, monkeypatch):
    """On CUDA ``auto`` takes TensorRT engines built for this GPU first, then AOTInductor packages built for this
    GPU and torch, then torch with CUDA graphs (what can run is each backend's open_export's to say)."""
    from runtime import backends

    tried, runnable = [], set()

    def opener(name):
        def open_export(cls, checkpoint, folder, device, **options):
            tried.append(name)
            if name not in runnable:
                raise BackendUnavailableError(f"no {name} export")
        return classmethod(open_export)

    for name in ("tensorrt", "aoti", "onnxruntime"):
        monkeypatch.setattr(backends.backend_class(name), "open_export", opener(name))
    ckpt, cuda = __import__("runtime").resolve(tiny_ckpt), torch.device("cuda")
    assert choose("auto", cuda, ckpt, None, {}) == ("torch", {"cuda_graph": True, "channels_last": True,
                                                              "fuse_qkv": True})
    assert tried == ["tensorrt", "aoti"]
    runnable.add("aoti")
    assert choose("auto", cuda, ckpt, None, {})[0] == "aoti"
    runnable.add("tensorrt")
    tried.clear()
    assert choose("auto", cuda, ckpt, None, {})[0] == "tensorrt" and tried == ["tensorrt"]


def test_default_export_dir_is_found(tiny_ckpt, tiny_onnx, tmp_path, monkeypatch):
    from runtime.cache import default_export_dir

    monkeypatch.setenv("INSTAFLOW_CACHE", str(tmp_path))
    folder = default_export_dir(__import__("runtime").resolve(tiny_ckpt))
    assert folder.parent == tmp_path / "onnx"
    shutil.copytree(tiny_onnx, folder)
    assert Pipeline.from_pretrained(tiny_ckpt, backend="onnxruntime").backend.export_dir == folder
    assert Pipeline.from_pretrained(tiny_ckpt).backend.name == "onnxruntime"  # the default, auto, finds it too


def test_export_dir_that_is_not_a_folder_is_one_line(tiny_ckpt, tmp_path):
    for backend in ("auto", "onnxruntime", "torch"):
        with pytest.raises(InvalidInputError, match="export_dir '.*typo' is not a folder"):
            Pipeline.from_pretrained(tiny_ckpt, backend=backend, export_dir=tmp_path / "typo")


def test_export_without_output_folder_goes_where_pipelines_look(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """``python -m export.onnx --ckpt CKPT`` (no ``-o``) writes into the export cache, where the default finds it."""
    from export.onnx import main
    from runtime.cache import default_export_dir

    monkeypatch.setenv("INSTAFLOW_CACHE", str(tmp_path))
    assert main(["--ckpt", str(tiny_ckpt), "--fused", "--only", "text_encoder"]) == 0
    folder = default_export_dir(__import__("runtime").resolve(tiny_ckpt), "onnx")
    assert read_manifest(folder).components.keys() == {"text_encoder"}
    assert str(folder) in capsys.readouterr().out


def test_backend_errors(tiny_ckpt, odd_ckpt, odd_onnx, tmp_path, tiny_pipe):
    with pytest.raises(BackendUnavailableError, match="no ONNX export of .*python -m export.onnx"):
        Pipeline.from_pretrained(tiny_ckpt, backend="onnxruntime", export_dir=tmp_path)
    with pytest.raises(ExportError, match="exported from another checkpoint"):
        Pipeline.from_pretrained(tiny_ckpt, backend="onnxruntime", export_dir=odd_onnx)
    with pytest.raises(BackendUnavailableError, match="runs an export of a checkpoint folder"):
        Pipeline(tiny_pipe.components, backend="onnxruntime")
    with pytest.raises(BackendUnavailableError, match="has no CUDAExecutionProvider"):
        Pipeline.from_pretrained(odd_ckpt, backend="onnxruntime", export_dir=odd_onnx,
                                 providers=["CUDAExecutionProvider"])
    with pytest.raises(BackendUnavailableError, match="has no TensorrtExecutionProvider"):
        Pipeline.from_pretrained(odd_ckpt, backend="onnxruntime", export_dir=odd_onnx, providers="tensorrt")
    with pytest.raises(BackendUnavailableError, match="unknown providers 'rocm'"):
        Pipeline.from_pretrained(odd_ckpt, backend="onnxruntime", export_dir=odd_onnx, providers="rocm")
    with pytest.raises(InvalidInputError, match=r"unknown option\(s\) 'chanels_last' for the torch backend; it "
                                                r"takes channels_last, compile, cuda_graph"):
        Pipeline.from_pretrained(tiny_ckpt, chanels_last=True)
    with pytest.raises(InvalidInputError, match="'channels_last' for the onnxruntime backend"):
        Pipeline.from_pretrained(odd_ckpt, backend="onnxruntime", export_dir=odd_onnx, channels_last=True)
    pipe = Pipeline.from_pretrained(odd_ckpt, backend="onnxruntime", export_dir=odd_onnx, providers="cpu")
    assert pipe("a cat", seed=0, output_type="np").images.shape[0] == 1


def test_torch_channels_last_matches_eager(tiny_ckpt, tiny_pipe):
    cl = Pipeline.from_pretrained(tiny_ckpt, channels_last=True)
    a = tiny_pipe(["a cat", "a dog"], seed=4, output_type="pt").images
    b = cl(["a cat", "a dog"], seed=4, output_type="pt").images
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_torch_fused_qkv_matches_eager(tiny_ckpt, tiny_pipe):
    fused = Pipeline.from_pretrained(tiny_ckpt, fuse_qkv=True)
    attn = [m for m in fused.components.unet.modules() if type(m).__name__ == "Attention"]
    assert attn and all(getattr(m, "fused_projections", False) for m in attn)
    kwargs = dict(seed=4, output_type="pt")
    a = tiny_pipe(["a cat", "a dog"], **kwargs).images
    torch.testing.assert_close(fused(["a cat", "a dog"], **kwargs).images, a, atol=1e-5, rtol=1e-5)
    a = tiny_pipe("a cat", num_inference_steps=3, guidance_scale=1.5, **kwargs).images
    b = fused("a cat", num_inference_steps=3, guidance_scale=1.5, **kwargs).images
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_cuda_graph_needs_cuda(tiny_ckpt, tiny_onnx):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendUnavailableError, match="cuda_graph=True needs a CUDA device"):
        Pipeline.from_pretrained(tiny_ckpt, cuda_graph=True)
    with pytest.raises(BackendUnavailableError, match="cuda_graph=True needs a CUDA device"):
        Pipeline.from_pretrained(tiny_ckpt, backend="onnxruntime", export_dir=tiny_onnx, cuda_graph=True)


@pytest.mark.slow
def test_torch_compile_matches_eager(tiny_ckpt, tiny_pipe):
    compiled = Pipeline.from_pretrained(tiny_ckpt, compile=True)
    a = tiny_pipe("a cat", seed=4, output_type="pt").images
    b = compiled("a cat", seed=4, output_type="pt").images
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_onnxruntime_refuses_sizes_its_graphs_cannot_take(tiny_ckpt, tiny_onnx, tmp_path):
    """A static export takes its own size only; a dynamic one multiples of the UNet's downsampling, both refused in
    one line before any graph runs."""
    static = Pipeline.from_pretrained(tiny_ckpt, backend="onnxruntime", export_dir=tiny_onnx)
    with pytest.raises(InvalidInputError, match=r"fixed size of 32x32 px, got 48x32; re-export with --dynamic-hw"):
        static("a cat", height=48, width=32)
    export(str(tiny_ckpt), tmp_path, ExportSettings(dynamic_hw=True), verify=False)
    dynamic = Pipeline.from_pretrained(tiny_ckpt, backend="onnxruntime", export_dir=tmp_path, allow_unverified=True)
    assert dynamic("a cat", height=48, width=16, seed=0, output_type="pt").images.shape == (1, 3, 48, 16)
    with pytest.raises(InvalidInputError, match=r"multiples of 8 px \(its UNet downsamples 2x\), got 44x32"):
        dynamic("a cat", height=44, width=32)


def test_loading_an_export_trusts_untouched_files_and_hashes_changed_ones(tiny_ckpt, tmp_path, monkeypatch):
    """Loads do not hash gigabytes: a graph whose (size, mtime, inode) stamp is unchanged is trusted; one modified in
    place, size kept, is hashed and refused."""
    from runtime import identity

    export(str(tiny_ckpt), tmp_path, ExportSettings(), verify=False)
    hashed = []
    real = identity.sha256_file
    monkeypatch.setattr(identity, "sha256_file", lambda p, *a: hashed.append(p.name) or real(p, *a))
    Pipeline.from_pretrained(tiny_ckpt, backend="onnxruntime", export_dir=tmp_path, allow_unverified=True)
    assert hashed == []
    unet = tmp_path / "unet.onnx"
    data = bytearray(unet.read_bytes())
    data[-10] ^= 0xFF  # same size, other content
    unet.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="unet.onnx does not match its manifest hash"):
        Pipeline.from_pretrained(tiny_ckpt, backend="onnxruntime", export_dir=tmp_path, allow_unverified=True)
    assert "unet.onnx" in hashed


def test_only_verified_exports_run_unless_the_caller_allows_it(tiny_ckpt, tmp_path):
    """An export never verified (--no-verify, or a verification that was killed) is refused in one line by
    onnxruntime, skipped with one warning by auto, and run only with allow_unverified=True; export.verify then
    makes it usable."""
    from export.verify import verify_export

    export(str(tiny_ckpt), tmp_path, ExportSettings(), verify=False)
    with pytest.raises(ExportError, match=r"was never verified .*python -m export.verify .*allow_unverified=True"):
        Pipeline.from_pretrained(tiny_ckpt, backend="onnxruntime", export_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="onnxruntime not used .*never verified"):
        assert Pipeline.from_pretrained(tiny_ckpt, backend="auto", export_dir=tmp_path).backend.name == "torch"
    allowed = Pipeline.from_pretrained(tiny_ckpt, backend="auto", export_dir=tmp_path, allow_unverified=True)
    assert allowed.backend.name == "onnxruntime"
    assert allowed("a cat", seed=0, output_type="pt").images.shape == (1, 3, 32, 32)
    verify_export(tmp_path)
    assert Pipeline.from_pretrained(tiny_ckpt, backend="onnxruntime", export_dir=tmp_path).backend.name == "onnxruntime"


# ------------------------------------------------------------------------ onnxruntime-gpu: what a GPU machine adds
def test_onnxruntime_gives_every_gpu_provider_torchs_stream():
    """The TensorRT provider runs on a stream of its own unless given user_compute_stream (onnxruntime 1.18+, as the
    CUDA provider): every GPU provider gets the device and torch's stream; the CPU provider nothing."""
    from runtime.backends.onnxruntime_backend import provider_list

    cuda = torch.device("cuda", 1)
    gpu = {"device_id": 1, "user_compute_stream": "1234"}
    assert provider_list("tensorrt", cuda, stream=1234) == [("TensorrtExecutionProvider", gpu),
                                                            ("CUDAExecutionProvider", gpu), "CPUExecutionProvider"]
    given = [("TensorrtExecutionProvider", {"trt_fp16_enable": "1"}), "CPUExecutionProvider"]
    assert provider_list(given, cuda, stream=1234) == [("TensorrtExecutionProvider", {"trt_fp16_enable": "1", **gpu}),
                                                       "CPUExecutionProvider"]
    assert provider_list("tensorrt", torch.device("cpu"), stream=None)[0] == "TensorrtExecutionProvider"


def test_onnxruntime_refuses_a_cuda_provider_that_did_not_load(tiny_ckpt, tiny_onnx, monkeypatch):
    """onnxruntime-gpu lists its CUDA provider whether or not it loads; without cuDNN the provider only logs a
    warning and the session runs on the CPU (microsoft/onnxruntime#13414). Here a CPU onnxruntime whose provider
    list is made to name CUDA does exactly that: the export is refused in one line, before any graph is loaded,
    and `auto` (were it to consider onnxruntime on a GPU) passes over it with one warning."""
    import onnxruntime as ort

    from runtime import resolve
    from runtime.backends import AUTO_ORDER, onnxruntime_backend
    from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime_backend, "_PROBED", {})
    cuda, ckpt = torch.device("cuda"), __import__("runtime").resolve(tiny_ckpt)
    message = (r"^onnxruntime did not load CUDAExecutionProvider \(the session runs on CPUExecutionProvider\): its "
               r"CUDA, cuDNN or TensorRT libraries are missing .*or pass providers='cpu'$")
    with pytest.raises(ExportError, match=message):
        OnnxRuntimeBackend.open_export(ckpt, tiny_onnx, cuda)
    with pytest.raises(ExportError, match=message):
        OnnxRuntimeBackend(resolve(tiny_ckpt), tiny_onnx, device=cuda, dtype=torch.float16)
    monkeypatch.setitem(AUTO_ORDER, "cuda", ("onnxruntime",))
    with pytest.warns(RuntimeWarning) as record:
        assert choose("auto", cuda, ckpt, tiny_onnx, {})[0] == "torch"
    ours = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(ours) == 1 and ours[0].startswith("onnxruntime not used (onnxruntime did not load CUDAExecution")


def test_onnxruntime_never_runs_a_session_that_lost_its_provider_options(tiny_onnx, monkeypatch):
    """When a provider fails to start (CUDA_PATH set but CUDA not loadable, microsoft/onnxruntime#21424),
    InferenceSession retries on its fallback providers without the options it was given (the real retry of
    onnxruntime_inference_collection.py runs here; only the failure is staged). Sessions are opened with
    enable_fallback=0, so the failure is one line; an onnxruntime that ignores that keyword (before 1.19) retries,
    and the session it returns, without our options, is refused."""
    import onnxruntime as ort

    from runtime.backends.onnxruntime_backend import open_session

    real = ort.InferenceSession

    class ProviderFailsToStart(real):
        def _create_inference_session(self, providers, provider_options, disabled_optimizers=None):
            if any(isinstance(p, tuple) and p[1] for p in providers or []):
                self._fallback_providers = ["CPUExecutionProvider"]
                raise RuntimeError("CUDA_PATH is set but CUDA wasnt able to be loaded (staged)")
            return super()._create_inference_session(providers, provider_options, disabled_optimizers)

    monkeypatch.setattr(ort, "InferenceSession", ProviderFailsToStart)
    asked = [("CPUExecutionProvider", {"staged_option": "1"})]
    with pytest.raises(ExportError, match=r"^onnxruntime cannot load .*unet.onnx: CUDA_PATH is set but CUDA wasnt "
                                          r"able to be loaded \(staged\)$"):
        open_session(tiny_onnx / "unet.onnx", asked)

    class IgnoresEnableFallback(ProviderFailsToStart):
        def __init__(self, *args, enable_fallback=1, **kwargs):
            super().__init__(*args, **kwargs)  # as onnxruntime 1.18: the keyword is not read, the retry happens

    monkeypatch.setattr(ort, "InferenceSession", IgnoresEnableFallback)
    with pytest.raises(BackendUnavailableError, match=r"^onnxruntime runs CPUExecutionProvider without the options "
                                                      r"staged_option it was given"):
        open_session(tiny_onnx / "unet.onnx", asked)


class _PerThreadGraphs:
    """onnxruntime's CUDA graphs as seen from Python: a gpu_graph_id is captured on the thread that first runs it
    (the CUDA provider keeps graphs per thread) and running it from another thread is not supported (the CUDA
    provider docs; onnxruntime#17355: other threads crashed): here that raises. Wraps a real (CPU) session."""

    def __init__(self, session):
        import threading

        self.session, self.owner, self.threads, self._ident = session, {}, set(), threading.get_ident

    def run_with_iobinding(self, binding, run_options=None):
        me = self._ident()
        self.threads.add(me)
        graph = run_options.get_run_config_entry("gpu_graph_id") if run_options is not None else None
        if graph is not None and self.owner.setdefault(graph, me) != me:
            raise RuntimeError(f"CUDA graph {graph} was captured on another thread")
        return self.session.run_with_iobinding(binding, run_options)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_onnxruntime_cuda_graph_runs_stay_on_one_thread(tiny_ckpt, tiny_onnx, tiny_pipe):
    """With onnxruntime's CUDA graphs the backend is not thread-safe (the pipeline serialises) and every run of a
    session happens on one thread of its own, whichever thread calls: a pipeline called from four threads gives
    the sequential images, and each session saw one thread. (The CPU provider ignores gpu_graph_id; the bound
    buffers and graph ids are the GPU path's.)"""
    from helpers import assert_threads_match_sequential

    from runtime import resolve
    from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend, Session
    from runtime.models import load_components
    from runtime.specs import specs_by_name

    ckpt, cpu = resolve(tiny_ckpt), torch.device("cpu")
    backend = OnnxRuntimeBackend(ckpt, tiny_onnx, device=cpu, dtype=torch.float32, io_binding=True)
    assert backend.thread_safe  # no graphs: sessions run concurrently
    manifest = read_manifest(tiny_onnx)
    specs = specs_by_name(manifest.dims)
    for name, entry in manifest.components.items():  # what cuda_graph=True makes, on the CPU provider
        session = Session(tiny_onnx / entry.file, specs[name], entry, ["CPUExecutionProvider"], cpu, max_graphs=4,
                          io_binding=True)
        session.session = _PerThreadGraphs(session.session)
        backend.sessions[name] = session
    assert not backend.thread_safe
    pipe = Pipeline(load_components(ckpt, weights=False), device="cpu", backend=backend)
    jobs = [dict(prompt=f"a cat {i % 3}", seed=i, output_type="pt") for i in range(8)]
    assert_threads_match_sequential(pipe, jobs)
    torch.testing.assert_close(pipe("a cat 1", seed=1, output_type="pt").images,
                               tiny_pipe("a cat 1", seed=1, output_type="pt").images, atol=1e-4, rtol=1e-4)
    threads = {name: len(s.session.threads) for name, s in backend.sessions.items()}
    assert threads == {"text_encoder": 1, "onestep": 1, "unet": 0, "vae_decoder": 0}  # the one-step path
