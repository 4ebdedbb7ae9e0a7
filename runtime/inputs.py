"""Checking what a caller passes to :class:`~runtime.pipeline.Pipeline`: every mistake is one line
(:class:`InvalidInputError` / :class:`InvalidTypeError`, also ``ValueError`` / ``TypeError``), found before any
work is done."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch

from .errors import BackendUnavailableError, InvalidInputError, InvalidTypeError
from .flow import uses_cfg

OutputType = Literal["pil", "np", "pt", "latent"]
OUTPUT_TYPES: tuple[str, ...] = ("pil", "np", "pt", "latent")

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


@dataclass
class Limits:
    """What one call may ask for, checked before anything is allocated: a product embedding the pipeline (or the
    HTTP service) must survive any request. Raise them for bigger jobs (``pipe.limits.max_images = 256``)."""

    max_pixels: int = 2048 * 2048  # per image: SD 1.5 works at 512x512; this is 16 times that
    max_side: int = 4096  # pixels, either side
    max_images: int = 64  # per call: prompts x num_images_per_prompt
    max_steps: int = 1000  # Euler steps (a 2-rectified flow needs 2-25)

    def check_images(self, n: int) -> None:
        if n > self.max_images:
            raise InvalidInputError(f"{n} images in one call is over this pipeline's limit of {self.max_images} "
                                    "(split the call, or raise pipe.limits.max_images)")

    def check(self, req: "Request") -> None:
        if req.num_inference_steps > self.max_steps:
            raise InvalidInputError(f"num_inference_steps={req.num_inference_steps} is over this pipeline's limit "
                                    f"of {self.max_steps} (raise pipe.limits.max_steps to allow it)")
        self.check_images(req.num_images)
        if max(req.height, req.width) > self.max_side:
            raise InvalidInputError(f"{req.height}x{req.width} px: a side over this pipeline's limit of "
                                    f"{self.max_side} px (raise pipe.limits.max_side)")
        if req.height * req.width > self.max_pixels:
            raise InvalidInputError(f"{req.height}x{req.width} px is over this pipeline's limit of "
                                    f"{self.max_pixels:,} pixels per image (raise pipe.limits.max_pixels)")


@dataclass(frozen=True)
class Request:
    """A checked call: prompts as lists, sizes defaulted, numbers normalised."""

    prompts: list[str]
    negatives: list[str]  # one per prompt ("" by default); used only with guidance
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    num_images_per_prompt: int
    output_type: str

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance is on (``guidance_scale > 1``, as in the official pipeline)."""
        return uses_cfg(self.guidance_scale)

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt


def parse_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """``None`` -> float16 on CUDA, float32 elsewhere; strings like ``"fp16"``/``"bf16"`` are accepted."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise InvalidInputError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise InvalidInputError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")


def parse_device(device: torch.device | str | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU. Asking for CUDA without a GPU is a one-line error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidInputError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return dev


def check_prompts(prompt: Any, negative_prompt: Any) -> tuple[list[str], list[str]]:
    """Normalise prompts to lists; negatives default to "" and a single string applies to every prompt."""
    if prompt is None:
        raise InvalidInputError("prompt is required (a string or a list of strings), got None")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)):
        raise InvalidTypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompts:
        raise InvalidInputError("prompt is an empty list; give at least one prompt")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise InvalidTypeError(f"prompt[{bad[0]}] is a {type(prompts[bad[0]]).__name__}, not a string")
    for label, texts in (("prompt", prompts), ("negative_prompt", negative_prompt)):
        if isinstance(texts, (list, tuple)):
            _check_text(label, texts)
    if negative_prompt is None:
        negatives = [""] * len(prompts)
    elif isinstance(negative_prompt, str):
        _check_text("negative_prompt", [negative_prompt], indexed=False)  # checked even when guidance is off
        negatives = [negative_prompt] * len(prompts)
    elif isinstance(negative_prompt, (list, tuple)):
        if len(negative_prompt) != len(prompts):
            raise InvalidInputError(
                f"negative_prompt has {len(negative_prompt)} entries but there are {len(prompts)} prompts")
        if not all(isinstance(p, str) for p in negative_prompt):
            raise InvalidTypeError("negative_prompt must hold strings only")
        negatives = list(negative_prompt)
    else:
        raise InvalidTypeError(
            f"negative_prompt must be a string or a list of strings, got {type(negative_prompt).__name__}")
    return list(prompts), negatives


def _check_text(label: str, texts: Sequence[Any], indexed: bool = True) -> None:
    """Text the tokenizer can take: a lone surrogate (what Python makes of invalid UTF-8) cannot be encoded."""
    for i, t in enumerate(texts):
        try:
            if isinstance(t, str):
                t.encode("utf-8")
        except UnicodeEncodeError as e:
            where = f"{label}[{i}]" if indexed else label
            raise InvalidInputError(f"{where} is not valid text: it holds a lone surrogate ({t[e.start]!r} at "
                                    f"position {e.start}; invalid UTF-8 input?)") from None


def positive_int(value: Any, label: str) -> int:
    """An int (numpy ints too, never a bool) >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidTypeError(f"{label} must be an int, got {type(value).__name__}")
    if value < 1:
        raise InvalidInputError(f"{label} must be >= 1, got {value}")
    return int(value)


def check_guidance(guidance_scale: Any) -> float:
    """A finite real number (Python or numpy scalar, never a bool)."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.integer, np.floating)):
        raise InvalidTypeError(f"guidance_scale must be a number, got {type(guidance_scale).__name__}")
    if not np.isfinite(guidance_scale):
        raise InvalidInputError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    return float(guidance_scale)


def check_output_type(output_type: Any) -> str:
    if output_type not in OUTPUT_TYPES:
        raise InvalidInputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    return str(output_type)


def check_pixels(height: Any, width: Any, scale: int) -> tuple[int, int]:
    """Ints, positive multiples of the VAE scale factor."""
    for label, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InvalidTypeError(f"{label} must be an int, got {type(v).__name__}")
        if v <= 0 or v % scale:
            raise InvalidInputError(f"{label} must be a positive multiple of the VAE scale factor {scale}, got {v}")
    return int(height), int(width)


def check_noise_source(n: int, shape: Sequence[int], seed: Any, generator: Any, latents: Any) -> None:
    """At most one of seed / generator / latents, each of the right type and shape for ``n`` images."""
    given = [k for k, v in (("seed", seed), ("generator", generator), ("latents", latents)) if v is not None]
    if len(given) > 1:
        raise InvalidInputError(f"give only one of seed, generator and latents (got {', '.join(given)})")
    if latents is not None:
        full = (n, *shape)
        if not isinstance(latents, torch.Tensor):
            raise InvalidTypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if tuple(latents.shape) != full:
            raise InvalidInputError(f"latents must have shape {list(full)}, got {list(latents.shape)}")
        if not latents.is_floating_point():
            raise InvalidInputError(f"latents must be a floating-point tensor, got {latents.dtype}")
        if latents.device.type == "meta":
            raise InvalidInputError("latents are on the meta device: they hold no values")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise InvalidTypeError(f"seed must be an int, got {type(seed).__name__}")
        if not -(2**63) <= int(seed) <= 2**64 - n:  # image j uses seed + j: every one must be a 64-bit seed
            raise InvalidInputError(f"seed must be in [-2**63, 2**64 - {n}] for {n} image(s), got {seed}")
    if generator is not None:
        gens = generator if isinstance(generator, (list, tuple)) else [generator]
        if not all(isinstance(g, torch.Generator) for g in gens):
            raise InvalidTypeError("generator must be a torch.Generator or a list of them, one per image")
        if isinstance(generator, (list, tuple)) and len(generator) != n:
            raise InvalidInputError(f"got {len(generator)} generators for {n} images")
