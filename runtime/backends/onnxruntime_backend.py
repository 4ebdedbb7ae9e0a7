"""onnxruntime backend: runs the graphs of an ONNX export (``python -m export.onnx``).

CPU execution provider with tuned session options here; on a GPU the CUDA provider (IO binding on torch's
buffers, so nothing round-trips through the host), optionally with onnxruntime's own CUDA graphs
(``cuda_graph=True``), or the TensorRT provider. The fused ``onestep`` graph, when exported, runs the whole
one-step hot path in one call.

onnxruntime lists the providers built into the wheel, not those that load (a CUDA provider without its cuDNN logs a
warning and the session runs on the CPU), and retries a session without the provider options it was given when a
provider fails to start: every session is checked to run on the provider asked for, with the options asked for.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch

from ..checkpoints import Checkpoint
from ..errors import BackendUnavailableError, ExportError, InvalidInputError
from ..manifest import GraphEntry, Manifest, read_manifest
from ..specs import DTYPES, ComponentSpec, specs_by_name
from .base import ExportedBackend
from .graphs import Captured, GraphCache

PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}

#: providers that run on a CUDA device and take ``device_id`` and ``user_compute_stream`` (CUDA: onnxruntime
#: 1.17+, TensorRT: 1.18+, both reported back by ``get_provider_options``; TensorRT RTX: its provider options)
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider")


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailableError("the onnxruntime backend needs onnxruntime: pip install onnxruntime "
                                      "(onnxruntime-gpu for CUDA)") from None
    return ort


def open_session(path: Path | bytes, providers: Sequence[Any] = ("CPUExecutionProvider",),
                 threads: int | None = None, hint: str = "") -> Any:
    """An ``onnxruntime.InferenceSession`` of the graph at ``path`` (or serialized model bytes) with the project's
    session options (all graph optimisations, sequential execution, no spin-waiting between calls, ``threads``
    intra-op threads: by default one per physical core), checked to run as asked (:func:`check_session`); a graph
    onnxruntime cannot load is one line (ending in ``hint``)."""
    ort = _import_ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or 0  # 0: one per physical core
    # no spin-waiting between calls: several sessions run one after another and would steal each other's cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    name = path if isinstance(path, Path) else "a model"
    try:
        # enable_fallback=0: a provider that fails to start is an error, not a silent retry on the fallback
        # providers without our options (onnxruntime 1.19+; older ones ignore the keyword and the check below
        # refuses what their retry gives)
        session = ort.InferenceSession(str(path) if isinstance(path, Path) else path, sess_options=opts,
                                       providers=list(providers), enable_fallback=0)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
        raise ExportError(f"onnxruntime cannot load {name}: {str(e).strip().splitlines()[0][:200]}{hint}") from None
    check_session(session, providers)
    if hasattr(session, "disable_fallback"):
        session.disable_fallback()  # run() must not retry on the CPU either
    return session


def check_session(session: Any, providers: Sequence[Any]) -> None:
    """One line when ``session`` does not run on the first provider asked for, or lost the options it was given
    for it: onnxruntime's provider list names the providers built into the wheel, not those that load (a CUDA
    provider whose CUDA or cuDNN libraries are missing only logs a warning, and the session runs on the next
    provider), and its session creation retries without provider options after some errors."""
    wanted, options = (providers[0], {}) if isinstance(providers[0], str) else (providers[0][0], providers[0][1])
    got = list(session.get_providers())
    if not got or got[0] != wanted:
        raise BackendUnavailableError(
            f"onnxruntime did not load {wanted} (the session runs on {', '.join(got) or 'nothing'}): its CUDA, "
            f"cuDNN or TensorRT libraries are missing or of another version (onnxruntime's log says which); "
            f"install the ones onnxruntime {_import_ort().__version__} needs, or pass providers='cpu'")
    given = session.get_provider_options().get(wanted, {})  # onnxruntime reports every option as a string
    dropped = sorted(k for k, v in options.items()
                     if k not in given or (k in _OWN_OPTIONS and str(given[k]) != str(v)))
    if dropped:
        raise BackendUnavailableError(f"onnxruntime runs {wanted} without the options {', '.join(dropped)} it was "
                                      "given (this onnxruntime does not take them?); upgrade onnxruntime-gpu")


#: the provider options the backend sets itself, whose values are checked too (a caller's may be normalised, e.g.
#: True reported as "1": those only have to be there)
_OWN_OPTIONS = ("device_id", "user_compute_stream", "enable_cuda_graph")

_PROBED: dict[tuple[Any, ...], BackendUnavailableError | None] = {}


def probe_providers(providers: Sequence[Any]) -> None:
    """Whether onnxruntime loads ``providers`` (names and options, checked as :func:`check_session` does) here, on
    a one-node model: the answer a session of the export would give, without loading the export. Once per
    process and provider list."""
    key = tuple(p if isinstance(p, str) else (p[0], tuple(sorted(p[1].items()))) for p in providers)
    if key not in _PROBED:
        from onnx import TensorProto, helper

        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = min(model.ir_version, 9)
        try:
            open_session(model.SerializeToString(), providers, threads=1)
            _PROBED[key] = None
        except (BackendUnavailableError, ExportError) as e:
            _PROBED[key] = BackendUnavailableError(str(e))
    if _PROBED[key] is not None:
        raise _PROBED[key]


class Session:
    """One onnxruntime session of an exported graph; tensor names and shapes from its spec, dtypes from the
    manifest.

    On the CPU, inputs and outputs go through numpy (``io_binding=False``, the default there); on a GPU, torch's
    buffers are bound in place (IO binding), and with ``max_graphs`` onnxruntime's CUDA graphs are replayed, one per
    input shape. The bound path runs on the CPU too (``io_binding=True``), which is how it is tested here.

    onnxruntime keeps captured CUDA graphs per thread and does not support ``Run()`` of one session from several
    threads with CUDA graphs (CUDA provider docs, "Using CUDA Graphs"): with ``max_graphs`` every run of the session
    happens on one thread of its own (:attr:`graph_thread`), whichever thread calls.
    """

    def __init__(self, path: Path, spec: ComponentSpec, entry: GraphEntry, providers: Sequence[Any],
                 device: torch.device, threads: int | None = None, max_graphs: int | None = None,
                 io_binding: bool | None = None, stream: Any = None) -> None:
        hint = "; try cuda_graph=False" if max_graphs else ""  # graphs need every node on the CUDA provider
        self.session = open_session(path, providers, threads, hint)
        self.device, self.spec, self.stream = device, spec, stream  # stream: onnxruntime's user_compute_stream
        model_dtype = DTYPES[entry.dtype]
        self.inputs = {t.name: t.torch_dtype(model_dtype) for t in spec.inputs}
        self.outputs = [t.name for t in spec.outputs]
        self.out_dtype = spec.outputs[0].torch_dtype(model_dtype)
        self.io_binding = device.type != "cpu" if io_binding is None else io_binding
        # onnxruntime's CUDA graphs: one per input shape, told apart by the run option gpu_graph_id (1, 2, ...);
        # onnxruntime never frees a captured graph, so shapes beyond max_graphs are refused, not evicted
        self.graphs = GraphCache(self._capture, max_graphs, evict=False) if max_graphs else None
        self.graph_thread = (ThreadPoolExecutor(1, thread_name_prefix=f"onnxruntime-{spec.name}-graphs")
                             if max_graphs else None)
        self._graph_ids = 0

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        feeds = {name: t.to(dt).contiguous() for (name, dt), t in zip(self.inputs.items(), args)}
        if not self.io_binding:  # through host memory (on a GPU too, if asked: slower, but correct)
            out = self.session.run(self.outputs, {k: v.cpu().numpy() for k, v in feeds.items()})[0]
            return torch.from_numpy(out).to(self.device)
        if self.graphs is not None:
            return self.graphs(*feeds.values())
        binding, out = self._bind(list(feeds.values()))
        self._run_ordered(lambda: self.session.run_with_iobinding(binding))
        return out

    def _run_ordered(self, run: Any) -> None:
        """On a GPU onnxruntime runs on :attr:`stream` (its ``user_compute_stream``): order that stream after the
        caller's writes to the inputs, and the caller's stream after the outputs, without blocking the host. With
        graphs, the run itself happens on :attr:`graph_thread`."""
        if self.graph_thread is not None:
            run = self._on_graph_thread(run)
        if self.stream is None:
            run()
            return
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        run()
        current.wait_stream(self.stream)

    def _on_graph_thread(self, run: Any) -> Any:
        return lambda: self.graph_thread.submit(run).result()

    def _bind(self, inputs: Sequence[torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """GPU: bind torch's device buffers for the inputs and a freshly allocated output (so calls never alias
        each other); nothing round-trips through the host."""
        binding = self.session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        for name, t in zip(self.inputs, inputs):
            binding.bind_input(name, kind, index, _numpy_dtype(t.dtype), list(t.shape), t.data_ptr())
        out = torch.empty(self.spec.output_shape(inputs), dtype=self.out_dtype, device=self.device)
        binding.bind_output(self.outputs[0], kind, index, _numpy_dtype(out.dtype), list(out.shape), out.data_ptr())
        return binding, out

    def _capture(self, statics: Sequence[torch.Tensor]) -> Captured:
        """For :class:`GraphCache`: the static buffers stay bound; onnxruntime runs the first call normally and
        captures (then replays) its CUDA graph from the second on, under this shape's ``gpu_graph_id``."""
        ort = _import_ort()
        binding, out = self._bind(statics)
        self._graph_ids += 1
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(self._graph_ids))

        def run() -> None:
            self._run_ordered(lambda: self.session.run_with_iobinding(binding, options))

        run()  # warm-up: onnxruntime allocates and picks kernels on a regular run before it captures
        return Captured(statics, out, run, handle=(binding, options))


def provider_list(providers: str | Sequence[Any] | None, device: torch.device, cuda_graph: bool = False,
                  stream: int | None = None) -> list[Any]:
    """onnxruntime's provider list for a backend: ``providers`` as given (a name of :data:`PROVIDERS` or
    onnxruntime's own list), default CUDA on a CUDA device and CPU elsewhere. On a CUDA device every GPU provider
    (:data:`GPU_PROVIDERS`) gets the device id and torch's stream as its ``user_compute_stream`` (``stream``, a
    ``cudaStream_t``: without it the TensorRT provider runs on a stream of its own and could read IO-bound inputs
    before torch wrote them); with ``cuda_graph`` the CUDA provider gets ``enable_cuda_graph`` (which needs it
    first and alone: every node on it)."""
    if cuda_graph and device.type != "cuda":
        raise BackendUnavailableError("cuda_graph=True needs a CUDA device")
    if isinstance(providers, str):
        if providers not in PROVIDERS:
            raise BackendUnavailableError(f"unknown providers {providers!r}; choose one of {', '.join(PROVIDERS)} "
                                          "or give onnxruntime's provider list")
        providers = PROVIDERS[providers]
    if providers is None:
        providers = PROVIDERS["cuda" if device.type == "cuda" else "cpu"]
    out: list[Any] = []
    for p in providers:
        name, options = (p, {}) if isinstance(p, str) else (p[0], dict(p[1]))
        if name in GPU_PROVIDERS and device.type == "cuda":
            options.setdefault("device_id", device.index or 0)
            if stream is not None:
                options.setdefault("user_compute_stream", str(stream))
            if cuda_graph and name == "CUDAExecutionProvider":
                options["enable_cuda_graph"] = "1"
        out.append((name, options) if options else name)
    first = out[0] if isinstance(out[0], str) else out[0][0]
    if cuda_graph:
        if first != "CUDAExecutionProvider":
            raise BackendUnavailableError(f"cuda_graph=True runs onnxruntime's CUDA graphs, which need the CUDA "
                                          f"provider first; got {first}")
        out = out[:1]  # no fallback provider: onnxruntime captures only when every node runs on CUDA
    return out


def _numpy_dtype(dtype: torch.dtype) -> Any:
    return torch.empty(0, dtype=dtype).numpy().dtype


class OnnxRuntimeBackend(ExportedBackend):
    """Runs text encoder, UNet and VAE decoder graphs (and the fused one-step graph if exported).

    ``providers``: onnxruntime's provider list, or one of the names in :data:`PROVIDERS` (``"cpu"``, ``"cuda"``,
    ``"tensorrt"``); default: CUDA on a CUDA device, else CPU. ``cuda_graph=True`` (CUDA only) replays
    onnxruntime's CUDA graphs, one per input shape. ``threads``: intra-op threads on the CPU (default: one per
    physical core). ``io_binding``: bind torch's buffers in place (default: on a GPU only). ``allow_unverified``:
    run an export that was never verified (``--no-verify``); by default only a verified export is run.
    """

    name = "onnxruntime"
    kind = "onnx"
    command = "python -m export.onnx"

    #: False while CUDA graphs are on (see :attr:`thread_safe`)
    @property
    def thread_safe(self) -> bool:  # type: ignore[override]
        """onnxruntime's CUDA graphs are per thread and one session's graphed runs must not come from several
        threads: with graphs the pipeline runs one call at a time (and each session runs on its own thread)."""
        return not any(s.graphs is not None for s in getattr(self, "sessions", {}).values())

    @classmethod
    def open_export(cls, checkpoint: Checkpoint, folder: Path, device: torch.device, allow_unverified: bool = False,
                    providers: str | Sequence[Any] | None = None, cuda_graph: bool = False, **options: Any
                    ) -> Manifest:
        ort = _import_ort()
        manifest = read_manifest(folder) if folder.is_dir() else None
        if manifest is None or manifest.kind != "onnx":
            raise BackendUnavailableError(
                f"no ONNX export of {checkpoint.name} in {folder}; make one with "
                f"`{cls.command} --ckpt {checkpoint.name} -o {folder} --fused`")
        manifest.source.check_matches(checkpoint, folder, cls.command)
        problem = manifest.unusable_reason(folder, ("text_encoder", "unet", "vae_decoder"), allow_unverified)
        if problem:
            raise ExportError(problem)
        wanted = provider_list(providers, device, cuda_graph)  # the sessions' providers, but torch's stream
        first = wanted[0] if isinstance(wanted[0], str) else wanted[0][0]
        available = set(ort.get_available_providers())
        if first not in available:
            raise BackendUnavailableError(f"onnxruntime here has no {first} (available: "
                                          f"{', '.join(sorted(available))}); pip install onnxruntime-gpu for CUDA")
        if first != "CPUExecutionProvider":
            try:
                probe_providers(wanted)  # listed is not loaded: a CUDA provider without cuDNN is listed too
            except BackendUnavailableError as e:
                raise ExportError(str(e)) from None  # an export that cannot run here: auto warns and moves on
        return manifest

    def __init__(self, checkpoint: Checkpoint, export_dir: str | os.PathLike[str] | None, device: torch.device,
                 dtype: torch.dtype, providers: str | Sequence[Any] | None = None, threads: int | None = None,
                 cuda_graph: bool = False, max_graphs: int = 16, io_binding: bool | None = None,
                 allow_unverified: bool = False) -> None:
        folder = self.folder(checkpoint, export_dir, device)
        manifest = self.open_export(checkpoint, folder, device, allow_unverified=allow_unverified,
                                    providers=providers, cuda_graph=cuda_graph)
        self.export_dir, self.device = folder, device
        self.dtype = DTYPES[manifest.components["unet"].dtype]
        self.dims = manifest.dims
        self.dynamic_hw = manifest.settings.dynamic_hw
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        providers = provider_list(providers, device, cuda_graph, self.stream.cuda_stream if self.stream else None)
        specs = specs_by_name(self.dims)
        sessions = {}
        for name, entry in manifest.components.items():
            entry.check(folder)
            sessions[name] = Session(folder / entry.file, specs[name], entry, providers, device, threads,
                                     max_graphs if cuda_graph else None, io_binding, self.stream)
        self.sessions = sessions

    def check_size(self, height: int, width: int) -> None:
        """One line for an image size the exported graphs cannot take (before any of them runs)."""
        f = self.dims.vae_scale_factor
        if not self.dynamic_hw and (height // f, width // f) != self.dims.latent_size:
            h, w = self.dims.latent_size
            raise InvalidInputError(f"the export in {self.export_dir} has a fixed size of {h * f}x{w * f} px, got "
                                    f"{height}x{width}; re-export with --dynamic-hw for other sizes")
        self.dims.check_latent_size(height // f, width // f, what=f"the export in {self.export_dir}")

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.sessions["text_encoder"](input_ids)

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self.sessions["unet"](latents, t, embeddings)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.sessions["vae_decoder"](latents)

    @property
    def has_one_step(self) -> bool:
        return "onestep" in self.sessions

    def one_step(self, embeddings: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The fused hot path: (embeddings, noise) -> images in [0, 1]."""
        return self.sessions["onestep"](embeddings, noise)
