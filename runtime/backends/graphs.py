"""CUDA graphs, shared by the backends: per-shape static buffers, capture once, replay, copy the result out.

A captured graph replays fixed kernels on fixed addresses, so each distinct set of input shapes gets its own
capture with its own static input buffers and static output. :class:`GraphCache` holds that bookkeeping once for
every backend; a backend only says how to capture (torch's ``torch.cuda.graph``, TensorRT through cuda-python,
onnxruntime's ``gpu_graph_id``). Calls copy their inputs into the static buffers, replay, and return a *clone* of
the static output, so results of successive calls never alias each other. Capture and replay are serialised by
one lock: a cache is safe to share between threads.

Graphs are an optimisation, never a requirement: a capture that fails with :class:`CaptureError` (a shape whose
work cannot be captured, or a driver the CUDA runtime cannot use) makes the cache run that shape, or every shape,
through its ``fallback`` (the same work without a graph) from then on, and tell its owner once per failure
(``on_capture_error``), who warns.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import BackendUnavailableError, InvalidInputError

#: CUDA runtime errors after which no capture can work in this process (driver too old for the runtime, no device,
#: no usable driver): graphs are turned off everywhere, not just for one shape
DRIVER_ERRORS = frozenset({"cudaErrorInsufficientDriver", "cudaErrorNoDevice", "cudaErrorInitializationError",
                           "cudaErrorCallRequiresNewerDriver", "cudaErrorSystemDriverMismatch",
                           "cudaErrorCompatNotSupportedOnDevice", "cudaErrorStubLibrary",
                           "cudaErrorDevicesUnavailable"})


class CudaError(BackendUnavailableError):
    """A cuda-python runtime call answered an error code (one line naming the call and the code)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class CaptureError(BackendUnavailableError):
    """A CUDA graph could not be captured; the work itself can still run without one. ``everywhere``: no capture
    can work in this process (a driver error), not just this shape's."""

    def __init__(self, message: str, everywhere: bool = False) -> None:
        super().__init__(message)
        self.everywhere = everywhere


@dataclass
class Captured:
    """One captured graph: its static inputs (written before each replay), its static output and how to replay."""

    inputs: Sequence[torch.Tensor]
    output: torch.Tensor
    replay: Callable[[], Any]
    handle: Any = None  # whatever must stay alive as long as the graph (graph objects, sessions, bindings)


#: ``capture(static_inputs) -> Captured``: warm up, capture and return; ``static_inputs`` already hold real data.
Capture = Callable[[Sequence[torch.Tensor]], Captured]


class GraphCache:
    """Graphs keyed by the inputs' shapes and dtypes; see the module docstring.

    At most ``max_graphs`` are kept (each holds its own buffers): beyond that the least recently used one is
    dropped and recaptured if its shape comes back; with ``evict=False`` (graphs that cannot be freed) a new shape
    beyond the limit is refused in one line. With a ``fallback`` (``fallback(*inputs)`` runs the same work without
    a graph), a :class:`CaptureError` is not raised: that shape (or, for an error ``everywhere``, every shape) runs
    through the fallback from then on, and ``on_capture_error(error, key)`` is called once for it.
    """

    def __init__(self, capture: Capture, max_graphs: int = 16, evict: bool = True,
                 fallback: Callable[..., torch.Tensor] | None = None,
                 on_capture_error: Callable[[CaptureError, tuple[Any, ...]], None] | None = None) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.capture = capture
        self.max_graphs = max_graphs
        self.evict = evict  # False where a dropped graph cannot be freed (onnxruntime): refuse new shapes instead
        self.fallback = fallback
        self.on_capture_error = on_capture_error
        self.graphs: OrderedDict[tuple[Any, ...], Captured] = OrderedDict()
        self.uncapturable: set[tuple[Any, ...]] = set()  # shapes that run through the fallback
        self.disabled = False  # every shape runs through the fallback
        self.lock = threading.RLock()  # reentrant: clear() may be called from inside a capture
        self._last_stream: Any = None

    @staticmethod
    def key(inputs: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        return tuple((tuple(t.shape), t.dtype) for t in inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = self.key(inputs)
        if self.fallback is not None and (self.disabled or key in self.uncapturable):
            return self.fallback(*inputs)
        with self.lock:
            self._order_streams(inputs)
            entry = self.graphs.get(key)
            if entry is None:
                if not self.evict and len(self.graphs) >= self.max_graphs:
                    raise InvalidInputError(
                        f"this pipeline already holds CUDA graphs for {self.max_graphs} input shapes, the most "
                        "allowed (max_graphs), and cannot free one; reuse those shapes or create the pipeline with "
                        "a larger max_graphs")
                while len(self.graphs) >= self.max_graphs:
                    self.graphs.popitem(last=False)
                statics = [t.detach().clone(memory_format=torch.contiguous_format) for t in inputs]
                try:
                    entry = self.capture(statics)
                except CaptureError as e:
                    if self.fallback is None:
                        raise
                    if e.everywhere:
                        self.disabled = True
                    else:
                        self.uncapturable.add(key)
                    if self.on_capture_error is not None:
                        self.on_capture_error(e, key)
                    entry = None
                else:
                    self.graphs[key] = entry
            else:
                self.graphs.move_to_end(key)
                for static, t in zip(entry.inputs, inputs):
                    static.copy_(t)
            if entry is not None:
                entry.replay()  # also right after a capture: capturing records the kernels without running them
                return entry.output.clone()
        assert self.fallback is not None
        return self.fallback(*inputs)

    def clear(self) -> None:
        """Drop every captured graph (they are recaptured when their shapes come back): for an owner whose graphs
        captured addresses that are no longer valid."""
        with self.lock:
            self.graphs.clear()

    def _order_streams(self, inputs: Sequence[torch.Tensor]) -> None:
        """Threads on different CUDA streams share the static buffers: order this call after the previous one."""
        if not inputs or inputs[0].device.type != "cuda":
            return
        current = torch.cuda.current_stream(inputs[0].device)
        if self._last_stream is not None and self._last_stream != current:
            current.wait_stream(self._last_stream)
        self._last_stream = current

    def __len__(self) -> int:
        return len(self.graphs)


# --------------------------------------------------------------------------------------------- torch graphs
def capture_torch(fn: Callable[..., torch.Tensor], device: torch.device, warmup: int = 2) -> Capture:
    """A :data:`Capture` for a torch callable: warm-up on a side stream (cuDNN/cuBLAS choices and lazy allocations
    happen outside the capture), then ``torch.cuda.graph``."""

    def capture(statics: Sequence[torch.Tensor]) -> Captured:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*statics)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(*statics)
        return Captured(statics, out, graph.replay, graph)

    return capture


# ------------------------------------------------------------------------------------------------ cuda-python
def cudart() -> Any:
    """The CUDA runtime bindings of cuda-python (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # type: ignore[no-redef]
        except ImportError:
            raise BackendUnavailableError("CUDA graphs for TensorRT need cuda-python: pip install 'instaflow-rt[gpu]'"
                                          " (or pass cuda_graph=False)") from None
    return runtime


def check_cuda(result: Any, what: str) -> Any:
    """Unpack a cuda-python result tuple ``(err, *values)``; a non-success error becomes :class:`CudaError`, one
    line naming ``what`` and the error."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        name = err.name if hasattr(err, "name") else str(err)
        _, text = rt.cudaGetErrorString(err)
        raise CudaError(f"{what} failed: {name} ({text.decode() if isinstance(text, bytes) else text})", name)
    return values[0] if len(values) == 1 else (tuple(values) or None)


def graph_support() -> str | None:
    """Why cuda-python's runtime cannot capture graphs in this process, or None. cuda-bindings 13.x is linked to
    the CUDA 13 runtime, which answers ``cudaErrorInsufficientDriver`` to everything on a driver for CUDA 12: the
    version queries still answer, so a runtime of a newer CUDA major than the driver is told apart before any
    capture (within one major, CUDA's minor-version compatibility applies)."""
    rt = cudart()
    try:
        runtime = check_cuda(rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
        driver = check_cuda(rt.cudaDriverGetVersion(), "cudaDriverGetVersion")
    except CudaError as e:
        return str(e)
    if runtime // 1000 > driver // 1000:
        return (f"cuda-python's CUDA runtime is {runtime // 1000}.{runtime % 1000 // 10} but the driver supports "
                f"CUDA {driver // 1000}.{driver % 1000 // 10} (cudaErrorInsufficientDriver); install "
                f"'cuda-python<{runtime // 1000}' or a newer driver")
    return None


class StreamGraph:
    """A CUDA graph captured from whatever ``enqueue(stream)`` launches on ``stream`` (a raw ``cudaStream_t``), with
    cuda-python: begin capture (thread-local mode: other threads' CUDA work is not disturbed), enqueue, end capture,
    instantiate. :meth:`launch` replays it on the same stream."""

    def __init__(self, enqueue: Callable[[int], Any], stream: int) -> None:
        rt = cudart()
        self.stream = stream
        self.graph = self.exec = None
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check_cuda(rt.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
        try:
            enqueue(stream)
        except BaseException:  # leave capture mode (its error, if any, is a consequence) and raise the cause
            rt.cudaStreamEndCapture(stream)
            raise
        self.graph = check_cuda(rt.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
        self.exec = check_cuda(rt.cudaGraphInstantiate(self.graph, 0), "cudaGraphInstantiate")

    def launch(self) -> None:
        check_cuda(cudart().cudaGraphLaunch(self.exec, self.stream), "cudaGraphLaunch")

    def __del__(self) -> None:  # pragma: no cover - GPU only
        try:
            rt = cudart()
            if self.exec is not None:
                rt.cudaGraphExecDestroy(self.exec)
            if self.graph is not None:
                rt.cudaGraphDestroy(self.graph)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
