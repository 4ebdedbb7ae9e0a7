"""The project's cache folder: exports made for a checkpoint (ONNX, TensorRT engines, AOTInductor packages) and
``torch.compile``'s caches, under ``$INSTAFLOW_CACHE`` (default ``~/.cache/instaflow-rt``).

Compiled code is tied to the torch version and the device it was compiled for (a GPU's architecture, or the CPU's
vector instruction set: Inductor compiles C++ with ``-march=native``): :func:`device_target` says which, and both the
AOTInductor packages and the compile cache are kept per target.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from .checkpoints import Checkpoint
from .manifest import Target


def cache_root() -> Path:
    """``$INSTAFLOW_CACHE`` or ``~/.cache/instaflow-rt``."""
    return Path(os.environ.get("INSTAFLOW_CACHE") or Path.home() / ".cache" / "instaflow-rt")


def default_export_dir(ckpt: Checkpoint, kind: str = "onnx", device: str | None = None) -> Path:
    """Default folder of a checkpoint's exports of one ``kind`` (``onnx``, ``trt``, ``aoti``):
    ``<cache>/<kind>/<name>-<fingerprint[:12]>``, with ``-<device>`` for exports compiled for one kind of device
    (AOTInductor packages: a machine's CUDA and CPU packages are kept apart)."""
    suffix = f"-{device}" if device else ""
    return cache_root() / kind / f"{_slug(Path(ckpt.name).name or 'ckpt')}-{ckpt.fingerprint()[:12]}{suffix}"


def device_target(device: torch.device) -> Target:
    """What code compiled here is tied to: the torch version and the device (a GPU's architecture, or the CPU's
    machine type and vector instruction set)."""
    version = torch.__version__.split("+")[0]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return Target(version, "cuda", f"sm_{major}{minor}", torch.cuda.get_device_name(device))
    return Target(version, device.type, f"{platform.machine()}-{torch.backends.cpu.get_cpu_capability().lower()}")


def compile_cache_dir(device: torch.device) -> Path:
    """``<cache>/compile/torch-<version>-<device>-<arch>``: where ``torch.compile`` keeps what it compiled for
    this torch and device (see :func:`use_compile_cache`)."""
    t = device_target(device)
    return cache_root() / "compile" / _slug(f"torch-{t.torch}-{t.device}-{t.arch}")


def use_compile_cache(device: torch.device) -> Path:
    """Point Inductor's on-disk caches (the FX graph cache, the AOTAutograd cache, compiled kernels) at
    :func:`compile_cache_dir`, so that a second process (or a service replica sharing the folder) loads what the
    first compiled instead of compiling again. A ``TORCHINDUCTOR_CACHE_DIR`` set by the user wins; Inductor's own
    default (a temporary folder) does not. Returns the folder in use.

    The setting is the process's (Inductor reads one environment variable): a process that compiles for two
    devices keeps both in the first one's folder, which stays correct (Inductor's own keys name the device) but
    leaves the second device's folder empty for the next process."""
    from torch._inductor.runtime.runtime_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current and os.path.abspath(current) != os.path.abspath(default_cache_dir()):
        return Path(current)
    folder = compile_cache_dir(device)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder.resolve())
    return folder


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
