"""Stand-ins for the parts of the TensorRT Python API and of cuda-python's runtime that instaflow-rt calls, so
that the engine build, the TensorRT backend and its CUDA-graph capture run on the CPU in tests.

Three API surfaces, read from NVIDIA/TensorRT's python bindings, chosen with :func:`use`:

* ``10.8.0`` (10.0-10.11): weakly typed networks by default, ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
  on request, ``BuilderFlag.FP16`` for weakly typed networks;
* ``10.16.0`` (10.12+): the same, ``BuilderFlag.FP16`` deprecated (a DeprecationWarning here);
* ``11.1.0``: strong typing only (the STRONGLY_TYPED flag is kept but always on), no ``BuilderFlag.FP16``
  (AttributeError, as in the real module).

On every surface, ``BuilderFlag.FP16`` on a strongly typed network fails the build (the real builder rejects it).

What polygraphy's build loaders call is here too (``ILogger``, ``init_libnvinfer_plugins``, the network's inputs
read from the ONNX file with -1 for dynamic dimensions, the config getters its log summary reads, enumerable flag
types); the builder refuses a profile that misses an input or changes a fixed dimension, as the real one does.

They keep the semantics that matter: an "engine" is the ONNX graph it was built from, run by onnxruntime, in the
precision the build gave it (strongly typed: the ONNX graph's types; weakly typed with FP16: outputs rounded to
fp16; weakly typed without: fp32); ``set_input_shape`` returns False outside the profile; tensors are bound by raw
address and read/written through those addresses when the work runs (as TensorRT does with device pointers), so a
stale or freed buffer gives wrong results; a context needs its activation memory before it runs; work is
asynchronous: ``execute_async_v3`` and ``cudaGraphLaunch`` only enqueue on their stream, which runs when the stream
is synchronised or another stream waits on it (so a missing wait reads stale outputs); and ``execute_async_v3`` on
a stream being captured is recorded, not enqueued, and runs at each launch of the graph.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
import warnings
from contextlib import contextmanager
from typing import Any

import numpy as np

__version__ = "10.16.0"

float32, float16, int64, int32, bfloat16 = "float32", "float16", "int64", "int32", "bfloat16"
_ONNX_TYPES = {"tensor(float)": float32, "tensor(float16)": float16, "tensor(int64)": int64,
               "tensor(int32)": int32}
_NP = {float32: np.float32, float16: np.float16, int64: np.int64, int32: np.int32}
ACTIVATION_BYTES = 4096
CAPTURING: dict[int, list] = {}  # stream handle -> operations recorded while capturing
PENDING: dict[int, list] = {}  # stream handle -> operations enqueued, not yet run
LOG: list[tuple[str, Any]] = []  # (event, detail): what ran, for assertions
SURFACES = ("10.8.0", "10.16.0", "11.1.0")


class ILogger:
    """Base of loggers (polygraphy subclasses it and calls ``ILogger.__init__``)."""

    def __init__(self) -> None:
        pass


class Logger(ILogger):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4

    def __init__(self, severity: int = 2) -> None:
        super().__init__()
        self.severity = severity


def init_libnvinfer_plugins(logger: ILogger, namespace: str) -> bool:
    assert isinstance(logger, ILogger)
    return True


class MemoryPoolType(enum.Enum):
    WORKSPACE = "workspace"


class DeviceType(enum.Enum):
    GPU = 0
    DLA = 1


class ProfilingVerbosity(enum.Enum):
    LAYER_NAMES_ONLY = 0
    NONE = 1
    DETAILED = 2


class TacticSource(enum.IntEnum):
    CUBLAS = 0


class PreviewFeature(enum.IntEnum):
    PROFILE_SHARING_0806 = 0


class QuantizationFlag(enum.IntEnum):
    CALIBRATE_BEFORE_FUSION = 0


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 0


class _FlagsWithFP16(type):
    """``BuilderFlag`` of TensorRT 10.12+: FP16 still there, deprecated."""

    @property
    def FP16(cls) -> str:  # noqa: N802 - the real name
        warnings.warn("BuilderFlag.FP16 is deprecated: use strongly typed networks", DeprecationWarning, 2)
        return "fp16"


class _BuilderFlag10:
    FP16 = "fp16"
    TF32 = "tf32"
    REFIT = "refit"
    __members__ = {"FP16": "fp16", "TF32": "tf32", "REFIT": "refit"}


class _BuilderFlag1012(metaclass=_FlagsWithFP16):
    TF32 = "tf32"
    REFIT = "refit"
    __members__ = {"FP16": "fp16", "TF32": "tf32", "REFIT": "refit"}  # enumerating does not warn: naming FP16 does


class _BuilderFlag11:
    TF32 = "tf32"
    REFIT = "refit"
    __members__ = {"TF32": "tf32", "REFIT": "refit"}


BuilderFlag: Any = _BuilderFlag1012
_ALWAYS_STRONG = False


def use(version: str) -> None:
    """Switch this module to one of :data:`SURFACES`."""
    global __version__, BuilderFlag, _ALWAYS_STRONG
    assert version in SURFACES, version
    __version__ = version
    major, minor = (int(x) for x in version.split(".")[:2])
    BuilderFlag = _BuilderFlag11 if major >= 11 else (_BuilderFlag1012 if minor >= 12 else _BuilderFlag10)
    _ALWAYS_STRONG = major >= 11


class TensorIOMode:
    INPUT = "INPUT"
    OUTPUT = "OUTPUT"


class ExecutionContextAllocationStrategy:
    STATIC = "static"
    USER_MANAGED = "user_managed"


# ----------------------------------------------------------------------------------------------------- build
class _Tensor:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: str) -> None:
        self.name, self.shape, self.dtype, self.is_shape_tensor = name, shape, dtype, False


class _Network:
    def __init__(self, strongly_typed: bool) -> None:
        self.onnx: str | None = None
        self.strongly_typed = strongly_typed
        self.inputs: list[_Tensor] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> _Tensor:
        return self.inputs[i]

    def get_flag(self, flag: NetworkDefinitionCreationFlag) -> bool:
        return flag == NetworkDefinitionCreationFlag.STRONGLY_TYPED and self.strongly_typed

    def __len__(self) -> int:  # layers: the stand-in keeps none
        return 0

    def __iter__(self) -> Any:
        return iter(())


class OnnxParser:
    def __init__(self, network: _Network, logger: ILogger) -> None:
        assert isinstance(logger, ILogger)
        self.network, self.num_errors, self.flags = network, 0, 0

    def parse_from_file(self, path: str) -> bool:
        """Reads the graph's inputs (names, dtypes, -1 for dynamic dimensions), as the real parser defines them."""
        import onnx

        graph = onnx.load(path, load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}
        types = {1: float32, 10: float16, 7: int64, 6: int32}
        for i in graph.input:
            if i.name in initializers:
                continue
            t = i.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            self.network.inputs.append(_Tensor(i.name, shape, types[t.elem_type]))
        self.network.onnx = path
        return True

    def get_error(self, i: int) -> str:  # pragma: no cover - the fake parser never fails
        return ""


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, list] = {}

    def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
        assert all(len(lo) == len(x) for x in (opt, hi)), "min/opt/max of one input have one rank"
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), f"{name}: need min <= opt <= max"
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class _TimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = bytes(data) or b"fake-timing-cache"

    def serialize(self) -> memoryview:
        return memoryview(self.data)


class _Config:
    DLA_core = -1
    default_device_type = DeviceType.GPU
    engine_capability = "STANDARD"

    def __init__(self) -> None:
        self.flags: set[str] = set()
        self.profiles: list[_Profile] = []
        self.pools: dict[MemoryPoolType, int] = {}
        self.cache: _TimingCache | None = None
        self.profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        assert isinstance(pool, MemoryPoolType), pool
        self.pools[pool] = int(size)

    def get_memory_pool_limit(self, pool: MemoryPoolType) -> int:
        return self.pools.get(pool, 1 << 40)

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def get_flag(self, flag: str) -> bool:
        return flag in self.flags

    def get_tactic_sources(self) -> int:
        return 1

    def get_preview_feature(self, feature: PreviewFeature) -> bool:
        return False

    def get_quantization_flag(self, flag: QuantizationFlag) -> bool:
        return False

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def add_optimization_profile(self, profile: _Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        LOG.append(("timing_cache", bytes(data)))
        return _TimingCache(data)

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> _TimingCache:
        assert self.cache is not None
        return self.cache


class Builder:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> _Network:
        strong_bit = 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        assert isinstance(flags, int) and not flags & ~strong_bit, f"unknown network flags {flags:#x}"
        return _Network(strongly_typed=_ALWAYS_STRONG or bool(flags & strong_bit))

    def create_builder_config(self) -> _Config:
        return _Config()

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes | None:
        assert network.onnx and len(config.profiles) == 1
        shapes = config.profiles[0].shapes
        for t in network.inputs:  # as the real builder: every input in the profile, fixed dimensions kept
            if t.name not in shapes:
                LOG.append(("error", f"{t.name} has no shapes in the optimization profile"))
                return None
            if any(len(x) != len(t.shape) or any(d != -1 and d != v for d, v in zip(t.shape, x))
                   for x in shapes[t.name]):
                LOG.append(("error", f"{t.name}: profile {shapes[t.name]} does not fit dimensions {t.shape}"))
                return None
        fp16_flag = "fp16" in config.flags
        if network.strongly_typed and fp16_flag:
            LOG.append(("error", "FP16 builder flag on a strongly typed network"))
            return None  # the real builder logs an API usage error and returns None
        LOG.append(("build", network.onnx))
        precision = "onnx" if network.strongly_typed else ("fp16" if fp16_flag else "fp32")
        return json.dumps({"onnx": _snapshot(network.onnx), "profile": config.profiles[0].shapes,
                           "strongly_typed": network.strongly_typed, "precision": precision,
                           "refittable": "refit" in config.flags}).encode()


SNAPSHOTS: str | None = None  # where engines keep the graph (and weights) they were built from


def _snapshot(onnx_path: str) -> str:
    """A copy of the graph and its external data, as the engine's own: like a real engine, it keeps the weights of
    build time whatever happens to the ONNX files afterwards (only a refit changes them)."""
    import hashlib
    import shutil
    import tempfile
    from pathlib import Path

    global SNAPSHOTS
    if SNAPSHOTS is None:  # one folder for the test process, removed when it exits
        import atexit

        SNAPSHOTS = tempfile.mkdtemp(prefix="fake-trt-")
        atexit.register(shutil.rmtree, SNAPSHOTS, ignore_errors=True)
    src = Path(onnx_path)
    files = [f for f in (src, src.with_name(src.name + ".data")) if f.exists()]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
    folder = Path(SNAPSHOTS) / digest
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for f in files:
            shutil.copy(f, folder / f.name)
    return str(folder / src.name)


def _initializers(onnx_path: str) -> dict[str, tuple]:
    import onnx

    graph = onnx.load(onnx_path, load_external_data=False).graph
    return {t.name: (tuple(t.dims), t.data_type) for t in graph.initializer}


class Refitter:
    """Takes new weights for a refittable engine; raises TypeError for another (pybind11's nullptr, as the real
    constructor does)."""

    def __init__(self, engine: "_Engine", logger: ILogger) -> None:
        if not engine.doc.get("refittable"):
            raise TypeError("Refitter(): incompatible constructor arguments (engine built without REFIT)")
        self.engine, self.pending = engine, None
        self.weights = _initializers(engine.doc["onnx"])
        self.missing = set(self.weights)

    def get_all_weights(self) -> list[str]:
        return sorted(self.weights)

    def get_missing_weights(self) -> list[str]:
        return sorted(self.missing)

    def refit_cuda_engine(self) -> bool:
        if self.missing or self.pending is None:
            return False
        self.engine.reload(self.pending)
        LOG.append(("refit", self.pending))
        self.missing = set(self.weights)
        return True


class OnnxParserRefitter:
    def __init__(self, refitter: Refitter, logger: ILogger) -> None:
        self.refitter, self.errors = refitter, []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]

    def refit_from_file(self, path: str) -> bool:
        """The new graph's weights by name: the same names, shapes and types as the engine's, or errors."""
        new = _initializers(path)
        old = self.refitter.weights
        self.errors = [f"weight {n} missing or of another shape/type" for n in old if new.get(n) != old[n]]
        if self.errors:
            return False
        self.refitter.missing.clear()
        self.refitter.pending = _snapshot(path)
        return True


# ------------------------------------------------------------------------------------------------------ run
class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes) -> "_Engine | None":
        try:
            doc = json.loads(bytes(data))
        except ValueError:
            return None
        return _Engine(doc)


class _Engine:
    def __init__(self, doc: dict) -> None:
        self.doc = doc
        self.reload(doc["onnx"])

    def reload(self, onnx_path: str) -> None:
        import onnxruntime as ort

        self.doc["onnx"] = onnx_path
        self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        self.io = {a.name: (TensorIOMode.INPUT, _ONNX_TYPES[a.type]) for a in self.session.get_inputs()}
        self.io.update({a.name: (TensorIOMode.OUTPUT, _ONNX_TYPES[a.type]) for a in self.session.get_outputs()})
        self.names = list(self.io)
        self.device_memory_size_v2 = ACTIVATION_BYTES

    def serialize(self) -> bytes:
        return json.dumps(self.doc).encode()

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return self.io[name][0]

    def get_tensor_dtype(self, name: str) -> str:
        return self.io[name][1]

    def create_execution_context(self, strategy: str = ExecutionContextAllocationStrategy.STATIC) -> "_Context":
        return _Context(self, strategy)


def _view(address: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The array at a raw (CPU) address, as TensorRT sees a device pointer."""
    n = int(np.prod(shape)) * np.dtype(_NP[dtype]).itemsize
    raw = (ctypes.c_char * n).from_address(address)
    return np.frombuffer(raw, dtype=_NP[dtype]).reshape(shape)


class _Context:
    def __init__(self, engine: _Engine, strategy: str) -> None:
        self.engine, self.strategy = engine, strategy
        self.memory: int | None = None if strategy == ExecutionContextAllocationStrategy.USER_MANAGED else -1
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_device_memory(self, address: int, size: int) -> None:
        assert size >= self.engine.device_memory_size_v2, "activation block smaller than the engine needs"
        self.memory = address

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        lo, _, hi = self.engine.doc["profile"][name]
        if any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = tuple(int(s) for s in shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = int(address)
        return True

    def _feeds(self) -> dict[str, np.ndarray]:
        return {n: _view(self.addresses[n], self.shapes[n], self.engine.io[n][1]).copy()
                for n, (mode, _) in self.engine.io.items() if mode == TensorIOMode.INPUT}

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.engine.io[name][0] == TensorIOMode.INPUT:
            return self.shapes[name]
        zeros = {n: np.zeros(self.shapes[n], _NP[self.engine.io[n][1]]) for n, (mode, _) in self.engine.io.items()
                 if mode == TensorIOMode.INPUT}
        return tuple(self.engine.session.run([name], zeros)[0].shape)

    def execute_async_v3(self, stream_handle: int) -> bool:
        assert self.memory is not None, "a USER_MANAGED context needs set_device_memory before it runs"
        assert stream_handle != 0, "use an explicit stream, not the legacy default stream"
        outputs = [n for n, (mode, _) in self.engine.io.items() if mode == TensorIOMode.OUTPUT]

        def run() -> None:
            results = self.engine.session.run(outputs, self._feeds())
            if self.engine.doc["precision"] == "fp16":  # a weakly typed fp16 engine computes in fp16
                results = [r.astype(np.float16).astype(r.dtype) if r.dtype.kind == "f" else r for r in results]
            for name, value in zip(outputs, results):
                out = _view(self.addresses[name], value.shape, self.engine.io[name][1])
                np.copyto(out, value.astype(out.dtype))
            LOG.append(("execute", self.engine.doc["onnx"]))

        if stream_handle in CAPTURING:
            CAPTURING[stream_handle].append(run)
        else:
            PENDING.setdefault(stream_handle, []).append(run)  # runs when the stream is synchronised or waited on
        return True


# ------------------------------------------------------------------------------------------------ cuda-python
class _CudaError(enum.Enum):
    cudaSuccess = 0
    cudaErrorIllegalState = 401


class _CaptureMode(enum.Enum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1


def _ok(*values: Any) -> tuple:
    return (_CudaError.cudaSuccess, *values)


def _begin(stream: int, mode: _CaptureMode) -> tuple:
    if stream in CAPTURING or stream == 0:
        return (_CudaError.cudaErrorIllegalState,)
    CAPTURING[stream] = []
    return _ok()


def _end(stream: int) -> tuple:
    return _ok(types.SimpleNamespace(ops=CAPTURING.pop(stream)))


def _launch(graph_exec: Any, stream: int) -> tuple:
    LOG.append(("launch", len(graph_exec.ops)))
    PENDING.setdefault(stream, []).extend(graph_exec.ops)  # asynchronous, like any work on a stream
    return _ok()


def flush(handle: int | None = None) -> None:
    """Run what is enqueued on stream ``handle`` (all streams if None), in order."""
    for h in ([handle] if handle is not None else list(PENDING)):
        ops = PENDING.pop(h, [])
        for op in ops:
            op()


cudart = types.SimpleNamespace(
    cudaError_t=_CudaError, cudaStreamCaptureMode=_CaptureMode,
    cudaStreamBeginCapture=_begin, cudaStreamEndCapture=_end,
    cudaGraphInstantiate=lambda graph, flags: _ok(types.SimpleNamespace(ops=list(graph.ops))),
    cudaGraphLaunch=_launch, cudaGraphExecDestroy=lambda g: _ok(), cudaGraphDestroy=lambda g: _ok(),
    cudaGetErrorString=lambda err: _ok(err.name.encode()),
)


# ------------------------------------------------------------------------------------------------ torch.cuda
class FakeStream:
    """torch.cuda.Stream's surface as the backends use it; work is synchronous on the CPU."""

    _next = 1

    def __init__(self, device: Any = None, handle: int | None = None) -> None:
        if handle is None:
            handle, FakeStream._next = FakeStream._next + 1000, FakeStream._next + 1
        self.cuda_stream = handle

    def wait_stream(self, other: "FakeStream") -> None:
        flush(other.cuda_stream)  # work queued after this point sees other's results

    def synchronize(self) -> None:
        flush(self.cuda_stream)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FakeStream) and other.cuda_stream == self.cuda_stream

    def __hash__(self) -> int:
        return self.cuda_stream


DEFAULT_STREAM = FakeStream(handle=0)


@contextmanager
def fake_stream_context(stream: FakeStream):
    yield stream
