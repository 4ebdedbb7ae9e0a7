"""TensorRT backend: runs the engines ``python -m export.trt`` builds (TensorRT 10 API: named tensors,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``).

One explicit CUDA stream, one activation-memory block shared by all engines (they run one after another) and sized
for the shapes in use (:class:`ActivationMemory`), fresh output tensors per call (engine buffers are never handed
out), and a refusal, in one line, of engines built for another GPU or TensorRT version or of shapes outside the
engines' optimisation profiles. CUDA graphs are an optimisation: a driver that cannot capture, or a shape whose
work cannot be captured, runs without them after one warning.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..checkpoints import Checkpoint
from ..errors import BackendUnavailableError, ExportError, InvalidInputError
from ..manifest import ENGINES, EngineIndex, read_engines
from ..specs import DTYPES
from .base import ProfiledBackend
from .graphs import DRIVER_ERRORS, CaptureError, Captured, CudaError, GraphCache, StreamGraph, cudart, graph_support

_LOGGERS: dict[int, Any] = {}


def _trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError("the tensorrt backend needs TensorRT 10+: pip install 'instaflow-rt[trt]'"
                                      ) from None
    return trt


def logger(trt: Any) -> Any:
    """The one TensorRT logger of the process (TensorRT keeps the first logger it is given and warns when a later
    builder or runtime brings another): ``trt.Logger(WARNING)`` unless :func:`set_logger` chose one first."""
    key = id(trt)  # one per TensorRT module (tests swap in stand-ins)
    if key not in _LOGGERS:
        _LOGGERS[key] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[key]


def set_logger(trt: Any, trt_logger: Any) -> None:
    """Use ``trt_logger`` (a ``trt.ILogger``: a product's own, or polygraphy's in ``export.trt``) for every engine
    this process loads; call it before the first engine is built or loaded."""
    _LOGGERS[id(trt)] = trt_logger


class ActivationMemory:
    """The activation block of one or more engines' execution contexts, grown on demand to the largest need of the
    shapes run so far (never allocated for the profiles' maximum up front: ``device_memory_size_v2`` is the
    maximum over every profile and shape, for the VAE decoder at twice the size times the largest batch).

    ``stream``: allocate on it (the stream the engines run on, so a replaced block is reused only by work ordered
    after them). ``on_grow()`` runs after the block was replaced: contexts captured into CUDA graphs hold its old
    address."""

    def __init__(self, device: torch.device, stream: Any = None) -> None:
        self.device, self.stream = device, stream
        self.block: torch.Tensor | None = None
        self.on_grow: Callable[[], None] | None = None

    @property
    def size(self) -> int:
        return 0 if self.block is None else self.block.numel()

    def ensure(self, size: int) -> torch.Tensor:
        """The block, at least ``size`` bytes (replaced by a larger one when needed)."""
        if self.block is None or self.block.numel() < size:
            if self.block is not None and self.stream is not None:
                self.stream.synchronize()  # work enqueued with the old block finishes before it is freed
            self.block = None  # freed before the larger one is allocated: never both at once
            if self.stream is not None and self.device.type == "cuda":
                with torch.cuda.stream(self.stream):
                    self.block = torch.empty(size, dtype=torch.uint8, device=self.device)
            else:
                self.block = torch.empty(size, dtype=torch.uint8, device=self.device)
            if self.on_grow is not None:
                self.on_grow()
        return self.block


class Engine:
    """A deserialized engine; its execution contexts run in :attr:`memory` (an :class:`ActivationMemory`, which the
    backend shares between all engines)."""

    def __init__(self, path: Path, device: torch.device) -> None:
        trt = _trt()
        self.path, self.device = path, device
        self.engine = trt.Runtime(logger(trt)).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ExportError(f"TensorRT cannot load {path} (built by another TensorRT version or GPU?); rebuild "
                              "it with `python -m export.trt --force`")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.memory = ActivationMemory(device)
        self._context: Any = None

    @property
    def device_memory_size(self) -> int:
        """The most activation memory any shape of the engine's profile needs (10.1+: ``device_memory_size_v2``;
        10.0 has only ``device_memory_size``, which 11.0 removed)."""
        e = self.engine
        return int(e.device_memory_size_v2 if hasattr(e, "device_memory_size_v2") else e.device_memory_size)

    def needed_memory(self, context: Any) -> int:
        """What ``context`` needs for the input shapes set on it: ``update_device_memory_size_for_shapes`` (10.0+;
        smaller than the maximum for engines built with ``RUNTIME_ACTIVATION_RESIZE_10_10``), or the maximum where
        it answers 0 (its error value)."""
        update = getattr(context, "update_device_memory_size_for_shapes", None)
        size = int(update()) if update is not None else 0
        return size if size > 0 else self.device_memory_size

    def new_context(self) -> Any:
        """An execution context whose activation memory is given per run (:meth:`use_memory`)."""
        trt = _trt()
        return self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)

    def use_memory(self, context: Any) -> None:
        """Give ``context`` the activation block, grown to what its current input shapes need."""
        block = self.memory.ensure(self.needed_memory(context))
        if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1
            context.set_device_memory(block.data_ptr(), block.numel())
        else:
            context.device_memory = block.data_ptr()

    def cast(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Inputs in the engine's dtypes, contiguous, on its device."""
        return [t.to(device=self.device, dtype=self.dtypes[n]).contiguous() for n, t in zip(self.inputs, tensors)]

    def bind(self, context: Any, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Set shapes and addresses of ``inputs`` (already cast) on ``context`` and bind a fresh tensor to every
        output (TensorRT writes them all); returns the first output."""
        for name, t in zip(self.inputs, inputs):
            if not context.set_input_shape(name, tuple(t.shape)):
                raise InvalidInputError(f"{name} shape {list(t.shape)} is outside the optimisation profile of "
                                        f"{self.path.name}; rebuild with other --max-batch/--height/--width")
            context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.outputs:
            out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
            context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        self._outputs = outs  # the outputs not handed out stay alive as long as the engine may write them
        return outs[0]

    def execute(self, context: Any, stream: int) -> None:
        if not context.execute_async_v3(stream):
            raise ExportError(f"TensorRT execution failed for {self.path.name}")

    def run(self, inputs: Sequence[torch.Tensor], stream: int) -> torch.Tensor:
        """Enqueue one inference on ``stream`` (a ``cudaStream_t``); returns a freshly allocated output tensor."""
        if self._context is None:
            self._context = self.new_context()
        out = self.bind(self._context, inputs)
        self.use_memory(self._context)
        self.execute(self._context, stream)
        self._keep = inputs  # inputs stay alive until the next call on this (serialised) engine
        return out


def _torch_dtype(trt: Any, dt: Any) -> torch.dtype:
    """A TensorRT data type as a torch dtype, through the names both share (``trt.float16``, ...) and the one map of
    :data:`runtime.specs.DTYPES`."""
    for name, torch_dtype in DTYPES.items():
        if getattr(trt, name, None) == dt:
            return torch_dtype
    raise ExportError(f"an engine tensor has the TensorRT type {dt}, which instaflow-rt does not bind")


class TensorRTBackend(ProfiledBackend):
    """Runs text encoder, UNet, VAE decoder and fused one-step engines on one stream.

    ``cuda_graph``: replay the text-encoder and fused one-step engines from CUDA graphs captured per input shape
    with cuda-python (one execution context per captured shape, all in the shared activation block). ``None`` (the
    default) uses graphs when cuda-python is installed; ``True`` requires it. Graphs are never required to run: a
    cuda-python whose CUDA runtime is newer than the driver, or any capture the driver refuses, turns them off; a
    shape whose work cannot be captured runs without a graph; each with one warning per backend.
    """

    name = "tensorrt"
    kind = "trt"
    command = "python -m export.trt"
    noun = "engines"
    thread_safe = False  # execution contexts and the shared activation memory: one call at a time

    @staticmethod
    def runs_on(device: torch.device) -> bool:
        """Engines run on CUDA devices (the tests' TensorRT stand-ins run them on the CPU)."""
        return device.type == "cuda"

    @classmethod
    def open_export(cls, checkpoint: Checkpoint, folder: Path, device: torch.device, **options: Any
                    ) -> EngineIndex:
        if not cls.runs_on(device):
            raise BackendUnavailableError("the tensorrt backend needs a CUDA device")
        trt = _trt()
        if not (folder / ENGINES).is_file():
            raise BackendUnavailableError(f"no TensorRT engines for {checkpoint.name} in {folder}; build them with "
                                          f"`{cls.command} --ckpt {checkpoint.name} -o {folder}`")
        index = read_engines(folder)
        index.source.check_matches(checkpoint, folder, cls.command)
        mismatch = index.mismatch(trt.__version__, torch.cuda.get_device_name(device))
        if mismatch:
            raise ExportError(f"the engines in {folder} were {mismatch}; rebuild with `{cls.command} --ckpt "
                              f"{checkpoint.name} -o {folder} --force`")
        missing = [n for n in ("text_encoder", "unet", "vae_decoder") if n not in index.components]
        if missing:
            raise ExportError(f"the engines in {folder} lack {', '.join(missing)} (interrupted?); rebuild with "
                              f"`{cls.command} --ckpt {checkpoint.name} -o {folder}`")
        return index

    def __init__(self, checkpoint: Checkpoint, export_dir: str | os.PathLike[str] | None, device: torch.device,
                 dtype: torch.dtype, cuda_graph: bool | None = None, max_graphs: int = 16) -> None:
        folder = self.folder(checkpoint, export_dir, device)
        index = self.open_export(checkpoint, folder, device)
        if cuda_graph is None:
            cuda_graph = _have_cuda_python()
        elif cuda_graph:
            cudart()  # one line naming what to install when cuda-python is missing
        self.device, self.export_dir = device, folder
        self.dtype = DTYPES[index.components["unet"].precision]
        self.index = index
        self.dims = index.dims
        self.profiles = {name: entry.profile for name, entry in index.components.items()}
        self.stream = torch.cuda.Stream(device)
        # one block for every engine (they run in sequence), grown to the shapes used; a larger block moves it, so
        # the graphs captured with the old one are dropped (recaptured at their next call)
        self.memory = ActivationMemory(device, self.stream)
        self.memory.on_grow = self._drop_graphs
        self.engines: dict[str, Engine] = {}
        for name, entry in index.components.items():
            entry.check(folder)
            self.engines[name] = Engine(folder / entry.file, device)
            self.engines[name].memory = self.memory
        self._lock = threading.RLock()  # the graph fallback runs the plain path from inside a graph cache
        self._graph_warning_given = False
        if cuda_graph:
            problem = graph_support()
            if problem:
                self._graph_warning(f"CUDA graphs are off for the tensorrt backend: {problem}")
                cuda_graph = False
        self.cuda_graph = bool(cuda_graph)
        self._graphs = {name: GraphCache(self._capture_fn(self.engines[name]), max_graphs,
                                         fallback=self._plain_fn(self.engines[name]),
                                         on_capture_error=self._capture_failed(name))
                        for name in ("text_encoder", "onestep") if self.cuda_graph and name in self.engines}

    def _run(self, name: str, *tensors: torch.Tensor) -> torch.Tensor:
        engine = self.engines[name]
        self.check_inputs(name, engine.inputs, tensors)
        inputs = engine.cast(tensors)
        with self._lock:
            if name in self._graphs:
                return self._graphs[name](*inputs)
            return self._run_plain(engine, inputs)

    def _run_plain(self, engine: Engine, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """One inference without a graph, on :attr:`stream`, ordered after the caller's stream and before it."""
        current = torch.cuda.current_stream(self.device)
        with self._lock:
            self.stream.wait_stream(current)  # inputs written on the caller's stream are ready
            with torch.cuda.stream(self.stream):
                out = engine.run(inputs, self.stream.cuda_stream)
            current.wait_stream(self.stream)
            out.record_stream(current)
        return out

    def _plain_fn(self, engine: Engine) -> Callable[..., torch.Tensor]:
        return lambda *inputs: self._run_plain(engine, inputs)

    def _drop_graphs(self) -> None:
        for cache in getattr(self, "_graphs", {}).values():
            cache.clear()

    def _graph_warning(self, message: str) -> None:
        """One warning per backend about graphs: the first failure is the one worth reading."""
        if not self._graph_warning_given:
            self._graph_warning_given = True
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _capture_failed(self, name: str) -> Callable[[CaptureError, tuple[Any, ...]], None]:
        def failed(error: CaptureError, key: tuple[Any, ...]) -> None:
            if error.everywhere:  # the driver cannot capture at all: no graph for any engine
                for cache in self._graphs.values():
                    cache.disabled = True
                self.cuda_graph = False
                self._graph_warning(f"CUDA graphs are off for the tensorrt backend ({error}); it runs without them")
            else:
                shapes = ", ".join("x".join(map(str, shape)) for shape, _ in key)
                self._graph_warning(f"the {name} engine cannot be captured as a CUDA graph for inputs {shapes} "
                                    f"({error}); those shapes run without a graph")
        return failed

    def _capture_fn(self, engine: Engine):
        """Capture for :class:`GraphCache`: a context of its own bound to the static buffers and given the activation
        block its shapes need, one warm-up ``execute_async_v3`` (TensorRT finishes shape-dependent set-up there),
        then stream capture of a second one. A capture the CUDA runtime or TensorRT refuses is a
        :class:`CaptureError` (the cache then runs that shape, or with a driver error every shape, without a
        graph)."""

        def launch_after(current: torch.cuda.Stream, fn) -> None:
            self.stream.wait_stream(current)  # static inputs were written on the caller's stream
            fn()
            current.wait_stream(self.stream)  # the caller's clone of the output waits for the engine

        def capture(statics: Sequence[torch.Tensor]) -> Captured:
            context = engine.new_context()
            out = engine.bind(context, statics)
            engine.use_memory(context)  # before capture: a larger block replaces the old one (and drops graphs)
            stream = self.stream.cuda_stream
            launch_after(torch.cuda.current_stream(self.device), lambda: engine.execute(context, stream))
            try:
                graph = StreamGraph(lambda s: engine.execute(context, s), stream)
            except CudaError as e:
                raise CaptureError(str(e), everywhere=e.code in DRIVER_ERRORS) from None
            except ExportError:  # execute_async_v3 failed while capturing: this work cannot be captured
                raise CaptureError(f"execute_async_v3 of {engine.path.name} failed while capturing") from None
            return Captured(statics, out, lambda: launch_after(torch.cuda.current_stream(self.device), graph.launch),
                            handle=(context, graph))

        return capture

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._run("text_encoder", input_ids)

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self._run("unet", latents, t, embeddings)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run("vae_decoder", latents)

    @property
    def has_one_step(self) -> bool:
        return "onestep" in self.engines

    def one_step(self, embeddings: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._run("onestep", embeddings, noise)


def _have_cuda_python() -> bool:
    try:
        cudart()
    except BackendUnavailableError:
        return False
    return True
