"""Stand-ins for the parts of the TensorRT Python API and of cuda-python's runtime that instaflow-rt calls, so
that the engine build, the TensorRT backend and its CUDA-graph capture run on the CPU in tests.

Three API surfaces, read from NVIDIA/TensorRT's python bindings, chosen with :func:`use`:

* ``10.8.0`` (10.0-10.11): weakly typed networks by default, ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
  on request, ``BuilderFlag.FP16`` for weakly typed networks;
* ``10.16.0`` (10.12+): the same, ``BuilderFlag.FP16`` deprecated (a DeprecationWarning here);
* ``11.1.0``: strong typing only (the STRONGLY_TYPED flag is kept but always on), no ``BuilderFlag.FP16``
  (AttributeError, as in the real module), and without what 11.0 removed from the Python API that a build touches
  (read from the bindings of 10.16 and 11.0/11.1, python/src/infer/pyCore.cpp and pyGraph.cpp):
  ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH``, the ``QuantizationFlag`` enum, the cuBLAS/cuDNN
  ``TacticSource`` values, ``PreviewFeature.PROFILE_SHARING_0806``, ``ILayer.precision``/``precision_is_set``,
  ``ICudaEngine.device_memory_size``. Polygraphy releases that touch them unguarded fail here as on a real 11.x.

On every surface, ``BuilderFlag.FP16`` on a strongly typed network fails the build (the real builder rejects it).

Activation memory is modelled as the engine's largest need over its profile (``device_memory_size_v2``) and a need
per set of input shapes: ``update_device_memory_size_for_shapes`` returns it when the engine was built with
``PreviewFeature.RUNTIME_ACTIVATION_RESIZE_10_10`` (10.10+; without it, the profile's maximum, an assumption: the
real size without the feature is not documented), and ``execute_async_v3`` fails (returns False, an error logged)
when the context's memory is smaller than what its shapes need. cuda-python's runtime calls return
``(err, ...)`` tuples as cuda-bindings does (``(err,)`` for calls without results, ``(err, None)`` for failed
calls with one); :func:`insufficient_driver` gives the runtime of cuda-bindings 13 on a CUDA 12 driver.

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
ACTIVATION_BYTES_PER_ELEMENT = 16
CAPTURING: dict[int, list] = {}  # stream handle -> operations recorded while capturing
PENDING: dict[int, list] = {}  # stream handle -> operations enqueued, not yet run
LOG: list[tuple[str, Any]] = []  # (event, detail): what ran, for assertions
INVALIDATED: set[int] = set()  # streams whose capture an uncapturable enqueue invalidated
#: ``UNCAPTURABLE(shapes) -> bool``: input shapes whose enqueue cannot be captured (as a plugin that allocates or
#: synchronises inside enqueue: the call fails and invalidates the capture, NVIDIA/TensorRT#802)
UNCAPTURABLE: Any = None
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

    def log(self, severity: int, msg: str) -> None:
        pass  # _report records errors


def _report(logger: Any, severity: int, msg: str) -> None:
    """What TensorRT does with an error: the message goes to the logger the object was created with (recorded in
    :data:`LOG` as ``trt_error`` too, whichever logger that is: polygraphy's prints it)."""
    LOG.append(("trt_error", msg))
    logger.log(severity, msg)


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


class _TacticSource10(enum.IntEnum):
    CUBLAS = 0
    CUBLAS_LT = 1
    CUDNN = 2
    EDGE_MASK_CONVOLUTIONS = 3
    JIT_CONVOLUTIONS = 4


class _TacticSource11(enum.IntEnum):  # 11.0 removed the cuBLAS/cuDNN tactic sources
    EDGE_MASK_CONVOLUTIONS = 3
    JIT_CONVOLUTIONS = 4


class _PreviewFeature108(enum.IntEnum):
    PROFILE_SHARING_0806 = 0
    ALIASED_PLUGIN_IO_10_03 = 1


class _PreviewFeature1016(enum.IntEnum):
    PROFILE_SHARING_0806 = 0
    ALIASED_PLUGIN_IO_10_03 = 1
    RUNTIME_ACTIVATION_RESIZE_10_10 = 2
    MULTIDEVICE_RUNTIME_10_16 = 3


class _PreviewFeature11(enum.IntEnum):
    ALIASED_PLUGIN_IO_10_03 = 1
    RUNTIME_ACTIVATION_RESIZE_10_10 = 2


class QuantizationFlag(enum.IntEnum):  # absent on 11.x (removed with implicit quantization)
    CALIBRATE_BEFORE_FUSION = 0


class _NetworkFlag10(enum.IntEnum):
    EXPLICIT_BATCH = 0  # deprecated and ignored in 10.x; gone in 11.0
    STRONGLY_TYPED = 1


class _NetworkFlag11(enum.IntEnum):
    STRONGLY_TYPED = 0  # deprecated: always on


class LayerType(enum.IntEnum):
    CONVOLUTION = 0
    SHAPE = 1
    QUANTIZE = 2
    DEQUANTIZE = 3


TacticSource: Any = _TacticSource10
PreviewFeature: Any = _PreviewFeature1016
NetworkDefinitionCreationFlag: Any = _NetworkFlag10
_QUANTIZATION_FLAG = QuantizationFlag


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
_MAJOR = 10


def use(version: str) -> None:
    """Switch this module to one of :data:`SURFACES`."""
    global __version__, BuilderFlag, _ALWAYS_STRONG, _MAJOR, TacticSource, PreviewFeature
    global NetworkDefinitionCreationFlag
    assert version in SURFACES, version
    __version__ = version
    major, minor = (int(x) for x in version.split(".")[:2])
    BuilderFlag = _BuilderFlag11 if major >= 11 else (_BuilderFlag1012 if minor >= 12 else _BuilderFlag10)
    _ALWAYS_STRONG = major >= 11
    _MAJOR = major
    TacticSource = _TacticSource11 if major >= 11 else _TacticSource10
    PreviewFeature = _PreviewFeature11 if major >= 11 else (_PreviewFeature1016 if minor >= 10
                                                             else _PreviewFeature108)
    NetworkDefinitionCreationFlag = _NetworkFlag11 if major >= 11 else _NetworkFlag10
    if major >= 11:
        globals().pop("QuantizationFlag", None)
    else:
        globals()["QuantizationFlag"] = _QUANTIZATION_FLAG


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


class _Layer:
    """A layer as a build reads it (name, type); 10.x layers also have ``precision``/``precision_is_set``."""

    def __init__(self, name: str) -> None:
        self.name, self.type = name, LayerType.CONVOLUTION


class _Layer10(_Layer):
    precision = float32
    precision_is_set = False


class _Network:
    def __init__(self, strongly_typed: bool) -> None:
        self.onnx: str | None = None
        self.strongly_typed = strongly_typed
        self.inputs: list[_Tensor] = []
        self.layers: list[_Layer] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> _Tensor:
        return self.inputs[i]

    def get_flag(self, flag: NetworkDefinitionCreationFlag) -> bool:
        return flag == NetworkDefinitionCreationFlag.STRONGLY_TYPED and self.strongly_typed

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, i: int) -> _Layer:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Any:
        return iter(self.layers)


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
        layer = _Layer10 if _MAJOR < 11 else _Layer
        self.network.layers = [layer(n.name or f"node{k}") for k, n in enumerate(graph.node[:4])]
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
        self.preview: set[str] = set()

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

    def set_preview_feature(self, feature: Any, enable: bool) -> None:
        assert feature in PreviewFeature.__members__.values(), feature
        (self.preview.add if enable else self.preview.discard)(feature.name)

    def get_preview_feature(self, feature: Any) -> bool:
        return feature.name in self.preview

    def __getattr__(self, name: str) -> Any:  # what 10.x has and 11.0 removed (implicit quantization)
        if name == "get_quantization_flag" and _MAJOR < 11:
            return lambda flag: False
        if name == "int8_calibrator" and _MAJOR < 11:
            return None
        raise AttributeError(name)

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
        known = 0
        for flag in NetworkDefinitionCreationFlag.__members__.values():
            known |= 1 << int(flag)
        assert isinstance(flags, int) and not flags & ~known, f"unknown network flags {flags:#x}"
        strong_bit = 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
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
                           "refittable": "refit" in config.flags,
                           "activation_resize": "RUNTIME_ACTIVATION_RESIZE_10_10" in config.preview}).encode()


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
    """Takes new weights for a refittable engine. For another, like the real binding (``py::init`` over
    ``createInferRefitter``, which gives nullptr), it reports an error to the logger and raises pybind11's
    TypeError for a factory that returned nullptr."""

    def __init__(self, engine: "_Engine", logger: ILogger) -> None:
        if not engine.doc.get("refittable"):
            _report(logger, Logger.ERROR, "IRefitter: the engine was not built refittable")
            raise TypeError("pybind11::init(): factory function returned nullptr")
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

    def serialize(self) -> bytes:
        return json.dumps(self.doc).encode()

    def activation_bytes(self, shapes: dict[str, Any]) -> int:
        """The activation memory these input shapes need (the stand-in's model: proportional to their size)."""
        return ACTIVATION_BYTES_PER_ELEMENT * sum(int(np.prod(shapes[n])) for n, (mode, _) in self.io.items()
                                                  if mode == TensorIOMode.INPUT)

    @property
    def device_memory_size_v2(self) -> int:
        """The most any context needs: the maximum over the (one) profile, i.e. at its max shapes."""
        return self.activation_bytes({n: hi for n, (_, _, hi) in self.doc["profile"].items()})

    def get_device_memory_size_for_profile_v2(self, profile_index: int) -> int:
        assert profile_index == 0
        return self.device_memory_size_v2

    @property
    def device_memory_size(self) -> int:
        if _MAJOR >= 11:  # removed in 11.0
            raise AttributeError("'tensorrt.ICudaEngine' object has no attribute 'device_memory_size'")
        return self.device_memory_size_v2

    @property
    def refittable(self) -> bool:
        return bool(self.doc.get("refittable"))

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
        static = strategy != ExecutionContextAllocationStrategy.USER_MANAGED
        self.memory: int | None = -1 if static else None
        self.memory_size = engine.device_memory_size_v2 if static else 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.sized_for: dict[str, tuple[int, ...]] | None = None  # shapes update_device_memory_size_for_shapes saw

    def set_device_memory(self, address: int, size: int) -> None:  # 10.1+
        self.memory, self.memory_size = address, int(size)

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        lo, _, hi = self.engine.doc["profile"][name]
        if any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = tuple(int(s) for s in shape)
        return True

    def _inputs(self) -> list[str]:
        return [n for n, (mode, _) in self.engine.io.items() if mode == TensorIOMode.INPUT]

    def update_device_memory_size_for_shapes(self) -> int:
        """What the current input shapes need (0, the documented error value, while an input has no shape); an
        engine built without RUNTIME_ACTIVATION_RESIZE_10_10 answers its profile's maximum."""
        if any(n not in self.shapes for n in self._inputs()):
            return 0
        self.sized_for = dict(self.shapes)
        if not self.engine.doc.get("activation_resize"):
            return self.engine.device_memory_size_v2
        return self.engine.activation_bytes(self.shapes)

    def needed_memory(self) -> int:
        """What a run with the current shapes needs: the per-shape size once it was computed for these shapes,
        else the engine's maximum."""
        if self.engine.doc.get("activation_resize") and self.sized_for == self.shapes:
            return self.engine.activation_bytes(self.shapes)
        return self.engine.device_memory_size_v2

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
        if self.memory_size < self.needed_memory():
            LOG.append(("error", f"activation memory of {self.memory_size} bytes, {self.needed_memory()} needed"))
            return False
        if stream_handle in CAPTURING and UNCAPTURABLE is not None and UNCAPTURABLE(self.shapes):
            INVALIDATED.add(stream_handle)
            LOG.append(("error", "enqueue failed during stream capture (cudaErrorStreamCaptureUnsupported)"))
            return False
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
    """cuda-bindings' ``cudaError_t`` (the values of the CUDA runtime)."""

    cudaSuccess = 0
    cudaErrorInsufficientDriver = 35
    cudaErrorIllegalState = 401
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


class _CaptureMode(enum.Enum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1


DRIVER_VERSION = 12080  # what cudaDriverGetVersion answers: the CUDA version the driver supports
RUNTIME_VERSION = 12080  # cudaRuntimeGetVersion: the CUDA runtime cuda-bindings is linked to


def _ok(*values: Any) -> tuple:
    return (_CudaError.cudaSuccess, *values)


def _begin(stream: int, mode: _CaptureMode) -> tuple:
    LOG.append(("begin_capture", stream))
    if stream in CAPTURING or stream == 0:
        return (_CudaError.cudaErrorIllegalState,)
    CAPTURING[stream] = []
    return _ok()


def _end(stream: int) -> tuple:
    if stream not in CAPTURING:
        return (_CudaError.cudaErrorIllegalState, None)  # cuda-bindings: (err, None) when a call with a result fails
    ops = CAPTURING.pop(stream)
    if stream in INVALIDATED:
        INVALIDATED.discard(stream)
        return (_CudaError.cudaErrorStreamCaptureInvalidated, None)
    return _ok(types.SimpleNamespace(ops=ops))


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


def _runtime(**overrides: Any) -> types.SimpleNamespace:
    calls = dict(
        cudaError_t=_CudaError, cudaStreamCaptureMode=_CaptureMode,
        cudaStreamBeginCapture=_begin, cudaStreamEndCapture=_end,
        cudaGraphInstantiate=lambda graph, flags: _ok(types.SimpleNamespace(ops=list(graph.ops))),
        cudaGraphLaunch=_launch, cudaGraphExecDestroy=lambda g: (_CudaError.cudaSuccess,),
        cudaGraphDestroy=lambda g: (_CudaError.cudaSuccess,),
        cudaGetErrorString=lambda err: _ok(err.name.encode()),  # a table look-up: works with any driver
        cudaDriverGetVersion=lambda: _ok(DRIVER_VERSION),
        cudaRuntimeGetVersion=lambda: _ok(RUNTIME_VERSION),
    )
    calls.update(overrides)
    return types.SimpleNamespace(**calls)


cudart = _runtime()


def insufficient_driver(runtime_version: int = 13000, driver_version: int = 12080) -> types.SimpleNamespace:
    """cuda-bindings 13.x (its runtime statically linked from CUDA 13) on a driver for CUDA 12: the version queries
    answer, everything that needs the runtime initialised answers ``cudaErrorInsufficientDriver``, as tuples."""
    bad = _CudaError.cudaErrorInsufficientDriver

    def begin(stream: int, mode: _CaptureMode) -> tuple:
        LOG.append(("begin_capture", stream))
        return (bad,)

    return _runtime(
        cudaStreamBeginCapture=begin, cudaStreamEndCapture=lambda stream: (bad, None),
        cudaGraphInstantiate=lambda graph, flags: (bad, None), cudaGraphLaunch=lambda graph_exec, stream: (bad,),
        cudaGraphExecDestroy=lambda g: (bad,), cudaGraphDestroy=lambda g: (bad,),
        cudaDriverGetVersion=lambda: _ok(driver_version), cudaRuntimeGetVersion=lambda: _ok(runtime_version))


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
