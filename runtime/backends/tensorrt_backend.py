"""TensorRT backend: runs the engines ``python -m export.trt`` builds (TensorRT 10 API: named tensors,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``).

One explicit CUDA stream, one activation-memory block shared by all engines (they run one after another), fresh
output tensors per call (engine buffers are never handed out), and a refusal, in one line, of engines built for
another GPU or TensorRT version or of shapes outside the engines' optimisation profiles.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import BackendUnavailableError, ExportError, InvalidInputError

if TYPE_CHECKING:
    from ..checkpoints import Checkpoint

ENGINES = "engines.json"


def _trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError("the tensorrt backend needs TensorRT 10+: pip install 'instaflow-rt[trt]'"
                                      ) from None
    return trt


class Engine:
    """A deserialized engine and its execution context."""

    def __init__(self, path: Path, device: torch.device, user_memory: bool = False) -> None:
        trt = _trt()
        self.path, self.device = path, device
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ExportError(f"TensorRT cannot load {path} (built by another TensorRT version or GPU?); rebuild "
                              "it with `python -m export.trt --force`")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED if user_memory else \
            trt.ExecutionContextAllocationStrategy.STATIC
        self.context = self.engine.create_execution_context(strategy)

    @property
    def device_memory_size(self) -> int:
        e = self.engine
        return int(e.device_memory_size_v2 if hasattr(e, "device_memory_size_v2") else e.device_memory_size)

    def use_memory(self, block: torch.Tensor) -> None:
        if hasattr(self.context, "set_device_memory"):
            self.context.set_device_memory(block.data_ptr(), block.numel())
        else:
            self.context.device_memory = block.data_ptr()

    def run(self, feeds: dict[str, torch.Tensor], stream: int) -> torch.Tensor:
        """Enqueue one inference on ``stream``; returns a freshly allocated output tensor."""
        keep = []
        for name in self.inputs:
            t = feeds[name].to(device=self.device, dtype=self.dtypes[name]).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        out_name = self.outputs[0]
        out = torch.empty(tuple(self.context.get_tensor_shape(out_name)), dtype=self.dtypes[out_name],
                          device=self.device)
        self.context.set_tensor_address(out_name, out.data_ptr())
        if not self.context.execute_async_v3(stream):
            raise ExportError(f"TensorRT execution failed for {self.path.name}")
        self._keep = keep  # inputs stay alive until the next call on this (serialised) engine
        return out


def _torch_dtype(trt: Any, dt: Any) -> torch.dtype:
    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
            trt.int32: torch.int32, trt.bfloat16: torch.bfloat16}[dt]


class TensorRTBackend:
    """Runs text encoder, UNet, VAE decoder and fused one-step engines on one stream."""

    name = "tensorrt"
    thread_safe = False  # execution contexts and the shared activation memory: one call at a time

    def __init__(self, checkpoint: "Checkpoint", export_dir: str | os.PathLike[str] | None, device: torch.device,
                 dtype: torch.dtype) -> None:
        from .. import manifest as mf

        trt = _trt()
        if device.type != "cuda":
            raise BackendUnavailableError("the tensorrt backend needs a CUDA device")
        folder = Path(export_dir) if export_dir is not None else mf.default_export_dir(checkpoint, "trt")
        path = folder / ENGINES
        if not path.is_file():
            raise BackendUnavailableError(f"no TensorRT engines for {checkpoint.name} in {folder}; build them with "
                                          f"`python -m export.trt --ckpt {checkpoint.name} -o {folder}`")
        doc = json.loads(path.read_text())
        mf.check_export_matches(doc, checkpoint, folder)
        gpu = torch.cuda.get_device_name(device)
        if doc["tensorrt"] != trt.__version__ or doc["gpu"] != gpu:
            raise ExportError(f"engines in {folder} were built for {doc['gpu']} with TensorRT {doc['tensorrt']}, "
                              f"this is {gpu} with TensorRT {trt.__version__}; rebuild with `python -m export.trt`")
        self.device, self.dtype, self.folder = device, dtype, folder
        self.meta = doc["components"]
        self.engines: dict[str, Engine] = {}
        for name, entry in self.meta.items():
            if mf.sha256_file(folder / entry["file"]) != entry["sha256"]:
                raise ExportError(f"{folder / entry['file']} does not match its manifest hash (corrupted); rebuild")
            self.engines[name] = Engine(folder / entry["file"], device, user_memory=True)
        size = max(e.device_memory_size for e in self.engines.values())
        self._memory = torch.empty(size, dtype=torch.uint8, device=device)  # shared: engines run in sequence
        for e in self.engines.values():
            e.use_memory(self._memory)
        self.stream = torch.cuda.Stream(device)
        self._lock = threading.Lock()

    def _check(self, name: str, feeds: dict[str, torch.Tensor]) -> None:
        for tensor_name, (lo, _, hi) in self.meta[name]["profile"].items():
            shape = tuple(feeds[tensor_name].shape)
            if any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
                raise InvalidInputError(f"{tensor_name} shape {list(shape)} is outside what the {name} engine was "
                                        f"built for ({lo} .. {hi}); rebuild with other --max-batch/--height/--width")

    def _run(self, name: str, *tensors: torch.Tensor) -> torch.Tensor:
        feeds = dict(zip(self.engines[name].inputs, tensors))
        self._check(name, feeds)
        current = torch.cuda.current_stream(self.device)
        with self._lock:
            self.stream.wait_stream(current)  # inputs written on the caller's stream are ready
            with torch.cuda.stream(self.stream):
                out = self.engines[name].run(feeds, self.stream.cuda_stream)
            current.wait_stream(self.stream)
            out.record_stream(current)
        return out

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
