"""Inductor's slow autotuning, one definition for ``torch.compile(..., autotune=True)`` (the torch backend) and
``python -m export.aoti --autotune``.

On CUDA: ``max_autotune`` (matrix-multiply and convolution templates benchmarked against cuBLAS/cuDNN while
compiling), ``coordinate_descent_tuning`` (each generated kernel's launch configuration tuned), 1x1 convolutions as
matrix multiplies and no epilogue fusion: the settings diffusers documents for compiling convolutional UNets and the
ones Hugging Face's ahead-of-time (ZeroGPU) recipe passes to AOTInductor, without their ``triton.cudagraphs`` (the
backends capture their own graphs). On the CPU: ``max_autotune``, which lets Inductor choose its C++ GEMM templates
over oneDNN for linear layers whose weights are constants: AOTInductor packages (compiled with freezing) have that
choice; ``torch.compile`` of the torch backend (weights stay parameters, so that LoRAs can be fused in place) has
none, so there it changes nothing. More compile time (not measured at SD size yet), kept like any compiled code
(:mod:`runtime.cache`); whether it is faster is for the benchmarks to say.
"""

from __future__ import annotations

from typing import Any

import torch

AUTOTUNE_CUDA: dict[str, Any] = {"max_autotune": True, "coordinate_descent_tuning": True,
                                 "coordinate_descent_check_all_directions": True, "conv_1x1_as_mm": True,
                                 "epilogue_fusion": False}
AUTOTUNE_CPU: dict[str, Any] = {"max_autotune": True}


def autotune_settings(device: torch.device) -> dict[str, Any]:
    """The Inductor settings of autotuned compilation for ``device`` (a copy: callers may add to it)."""
    return dict(AUTOTUNE_CUDA if device.type == "cuda" else AUTOTUNE_CPU)
