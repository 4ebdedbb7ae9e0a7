"""CUDA graphs, shared by the backends: per-shape static buffers, capture once, replay, copy the result out.

A captured graph replays fixed kernels on fixed addresses, so each distinct set of input shapes gets its own
capture with its own static input buffers and static output. :class:`GraphCache` holds that bookkeeping once for
every backend; a backend only says how to capture (torch's ``torch.cuda.graph``, TensorRT through cuda-python,
onnxruntime's ``gpu_graph_id``). Calls copy their inputs into the static buffers, replay, and return a *clone* of
the static output, so results of successive calls never alias each other. Capture and replay are serialised by
one lock: a cache is safe to share between threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import BackendUnavailableError, InvalidInputError


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
    beyond the limit is refused in one line.
    """

    def __init__(self, capture: Capture, max_graphs: int = 16, evict: bool = True) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.capture = capture
        self.max_graphs = max_graphs
        self.evict = evict  # False where a dropped graph cannot be freed (onnxruntime): refuse new shapes instead
        self.graphs: OrderedDict[tuple[Any, ...], Captured] = OrderedDict()
        self.lock = threading.Lock()
        self._last_stream: Any = None

    @staticmethod
    def key(inputs: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        return tuple((tuple(t.shape), t.dtype) for t in inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = self.key(inputs)
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
                entry = self.graphs[key] = self.capture(statics)
            else:
                self.graphs.move_to_end(key)
                for static, t in zip(entry.inputs, inputs):
                    static.copy_(t)
            entry.replay()  # also right after a capture: capturing records the kernels without running them
            return entry.output.clone()

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
    """Unpack a cuda-python result tuple ``(err, *values)``; a non-success error becomes one line naming ``what``."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        _, text = rt.cudaGetErrorString(err)
        raise RuntimeError(f"{what} failed: {err.name if hasattr(err, 'name') else err} "
                           f"({text.decode() if isinstance(text, bytes) else text})")
    return values[0] if len(values) == 1 else (tuple(values) or None)


class StreamGraph:
    """A CUDA graph captured from whatever ``enqueue(stream)`` launches on ``stream`` (a raw ``cudaStream_t``), with
    cuda-python: begin capture (thread-local mode: other threads' CUDA work is not disturbed), enqueue, end capture,
    instantiate. :meth:`launch` replays it on the same stream."""

    def __init__(self, enqueue: Callable[[int], Any], stream: int) -> None:
        rt = cudart()
        self.stream = stream
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
            rt.cudaGraphExecDestroy(self.exec)
            rt.cudaGraphDestroy(self.graph)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
