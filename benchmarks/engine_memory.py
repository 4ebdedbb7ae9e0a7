"""What a TensorRT engine set of an SD-1.5-shaped checkpoint needs in activation memory, computed from the shapes
(no GPU, no TensorRT needed).

    python -m benchmarks.engine_memory [--max-batch 4] [--height 512 --width 512]

Each engine's graph (the modules ``export.onnx`` traces, :mod:`export.graphs`, over SD 1.5's shapes built on the
``meta`` device, in fp16) runs once per input shape under a ``TorchDispatchMode`` that sees every operation. Two
numbers per (engine, shape), weights excluded (an engine holds them apart from its activation memory):

* **layer I/O**: the largest sum of one operation's activation inputs and outputs. Whatever TensorRT fuses, a
  layer's inputs and outputs exist at once, so no engine needs less: a lower bound.
* **eager peak**: the most activation bytes alive at once when PyTorch runs the graph operation by operation
  (attention as one fused operation, as TensorRT runs it). A guide, not a bound: TensorRT fuses layers and plans
  its buffers, and usually needs less; its own number (``device_memory_size_v2``, or
  ``update_device_memory_size_for_shapes`` per shape) exists only on a GPU.

Shapes: the profiles ``python -m export.trt`` builds by default (:mod:`runtime.specs`: ``--max-batch`` images, text
encoder and UNet twice that with guidance, sizes half to twice ``--height/--width``), at their largest (what
``device_memory_size_v2`` is the maximum over, and what the backend allocated up front before) and at one
512x512 image, one step (what an engine set sized per shape needs for the common call). Computed, not measured.
"""

from __future__ import annotations

import argparse
import sys
import weakref
from typing import Any, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from runtime.cli import description

GiB, MiB = 2**30, 2**20


class _ActivationMeter(TorchDispatchMode):
    """Tracks activation storages (not parameters) alive across the operations it sees."""

    def __init__(self, params: set[int], inputs: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.params = params
        self.refs: dict[int, list[Any]] = {}  # storage -> [bytes, live tensor count]
        self.live = self.peak = self.layer_io = 0
        for t in inputs:
            self._track(t)

    def _key(self, t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata

    def _track(self, t: torch.Tensor) -> None:
        key = self._key(t)
        if key in self.params:
            return
        if key not in self.refs:
            self.refs[key] = [t.untyped_storage().nbytes(), 0]
            self.live += self.refs[key][0]
            self.peak = max(self.peak, self.live)
        self.refs[key][1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.live -= entry[0]
                del self.refs[key]

    def _bytes(self, tensors: Any) -> int:
        flat = tensors if isinstance(tensors, (list, tuple)) else [tensors]
        seen, total = set(), 0
        for t in flat:
            if isinstance(t, (list, tuple)):
                total += self._bytes(t)
            elif isinstance(t, torch.Tensor) and self._key(t) not in self.params and self._key(t) not in seen:
                seen.add(self._key(t))
                total += t.untyped_storage().nbytes()
        return total

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.layer_io = max(self.layer_io, self._bytes(list(args)) + self._bytes(out))
        for t in (out if isinstance(out, (list, tuple)) else [out]):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def measure(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(layer I/O, eager peak) activation bytes of one forward of ``module`` (on the meta device) on ``inputs``.
    Attention (``F.scaled_dot_product_attention``, which diffusers and transformers call) counts as one fused
    operation, q, k, v in and the output out, as TensorRT's fused attention runs it: on the meta device PyTorch
    would otherwise decompose it and materialise the full attention matrix."""
    import torch.nn.functional as F

    params = {p.untyped_storage()._cdata for p in module.parameters()}
    params |= {b.untyped_storage()._cdata for b in module.buffers()}
    meter = _ActivationMeter(params, inputs)
    real = F.scaled_dot_product_attention

    def fused(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
              ) -> torch.Tensor:
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        meter.layer_io = max(meter.layer_io, meter._bytes([query, key, value, out]))
        return out

    F.scaled_dot_product_attention = fused
    try:
        with torch.no_grad(), meter:
            module(*inputs)
    finally:
        F.scaled_dot_product_attention = real
    return meter.layer_io, meter.peak


def sd15_on_meta() -> Any:
    """SD 1.5's components (random architecture of the real shapes, :data:`runtime.builders.SD15_SPEC`) on the meta
    device, in fp16."""
    from runtime.builders import SD15_SPEC, build_tiny_components

    with torch.device("meta"):
        components = build_tiny_components(SD15_SPEC)
    for m in (components.text_encoder, components.unet, components.vae):
        m.half()
    return components


def engine_set(max_batch: int = 4, height: int = 512, width: int = 512) -> list[dict[str, Any]]:
    """Rows per engine of the default profile: shapes at the profile's largest and at one image of
    ``height x width``, with both numbers."""
    from export.graphs import module_for
    from runtime.specs import ModelDims, specs_by_name

    c = sd15_on_meta()
    dims = ModelDims.of(c)
    f = dims.vae_scale_factor
    hw = (height // f, width // f)
    specs = specs_by_name(dims)
    rows = []
    for name in ("text_encoder", "unet", "vae_decoder", "onestep"):
        spec, module = specs[name], module_for(name, c)
        profile = spec.profile(1, 1, max_batch, hw, dims.size_range(hw))
        for label, pick in (("profile max", 2), ("1 image", 1)):  # (min, opt, max): opt is one image at hw
            shapes = {n: s[pick] for n, s in profile.items()}
            inputs = [_meta_input(t, shapes[t.name]) for t in spec.inputs]
            layer_io, peak = measure(module, inputs)
            rows.append({"engine": name, "shapes": label, "inputs": {n: list(s) for n, s in shapes.items()},
                         "layer_io": layer_io, "eager_peak": peak})
    return rows


def _meta_input(tensor_spec: Any, shape: Sequence[int]) -> torch.Tensor:
    dtype = tensor_spec.torch_dtype(torch.float16)
    if dtype.is_floating_point:
        return torch.empty(tuple(shape), dtype=dtype, device="meta")
    return torch.zeros(tuple(shape), dtype=dtype, device="meta")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine_memory", description=description(__doc__))
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    args = p.parse_args(argv)
    rows = engine_set(args.max_batch, args.height, args.width)
    print(f"{'engine':<14}{'shapes':<13}{'layer I/O':>11}{'eager peak':>12}  inputs")
    for r in rows:
        shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in r["inputs"].items())
        print(f"{r['engine']:<14}{r['shapes']:<13}{r['layer_io'] / MiB:>9.0f} M{r['eager_peak'] / MiB:>10.0f} M  "
              f"{shapes}")
    worst = [r for r in rows if r["shapes"] == "profile max"]
    common = [r for r in rows if r["shapes"] == "1 image" and r["engine"] in ("text_encoder", "onestep")]
    print(f"one block for the set, sized for the largest profile shape: >= {max(r['layer_io'] for r in worst) / GiB:.2f}"
          f" GiB (eager peak {max(r['eager_peak'] for r in worst) / GiB:.2f} GiB); for one {args.height}x{args.width} "
          f"image, one step (text encoder + one-step engine): >= {max(r['layer_io'] for r in common) / MiB:.0f} MiB "
          f"(eager peak {max(r['eager_peak'] for r in common) / MiB:.0f} MiB). Computed from the shapes, not measured.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
