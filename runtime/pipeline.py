"""``Pipeline``: prompts -> tokens -> embeddings -> noise -> Euler step(s) -> decode -> images.

This is the one implementation of the sampling logic; backends only run the networks. It follows the official
InstaFlow ``RectifiedFlowPipeline`` exactly (see :mod:`runtime.flow` for the conventions).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence, Union

import numpy as np
import torch

from . import flow
from .backends import Backend, create
from .checkpoints import Checkpoint, resolve
from .errors import BackendUnavailableError, InvalidInputError, InvalidTypeError, NonFiniteOutputError
from .models import Components, load_components

OutputType = Literal["pil", "np", "pt", "latent"]
OUTPUT_TYPES: tuple[str, ...] = ("pil", "np", "pt", "latent")
Generator = Union[torch.Generator, Sequence[torch.Generator]]

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


@dataclass
class PipelineOutput:
    """What a :class:`Pipeline` call returns.

    ``images`` is a list of PIL images (``"pil"``), a float32 NHWC array in [0, 1] (``"np"``), a float NCHW tensor in
    [0, 1] (``"pt"``) or the final latents (``"latent"``). ``timings`` holds seconds per stage (``encode``,
    ``unet``, ``decode``, ``total``); on a GPU they are exact only with ``Pipeline.profile = True``.
    """

    images: Any
    timings: dict[str, float] = field(default_factory=dict)


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


class Pipeline:
    """One-step (or N-step) text-to-image generation with a rectified flow.

    >>> pipe = Pipeline.from_pretrained("tiny")                       # doctest: +SKIP
    >>> pipe(["a red circle at the top left"], seed=0).images[0]     # doctest: +SKIP

    A ``Pipeline`` is built from loaded :class:`~runtime.models.Components` and a backend that runs them; the
    sampling itself (tokenisation, noise, Euler update, guidance, post-processing) is written once, here.
    """

    def __init__(self, components: Components, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | str | None = None, backend: str | Backend = "torch", name: str = "",
                 checkpoint: Checkpoint | None = None, export_dir: str | os.PathLike[str] | None = None,
                 embedding_cache_size: int = 256, **backend_options: Any) -> None:
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype, self.device)
        self.components = components
        self.name = name
        self.backend: Backend = (create(backend, components, self.device, self.dtype, checkpoint=checkpoint,
                                        export_dir=export_dir, **backend_options)
                                 if isinstance(backend, str) else backend)
        #: When True, stages are synchronised on the GPU so that ``timings`` are exact (costs a little speed).
        self.profile = False
        #: Prompt-embedding cache: text -> embedding row; repeated prompts skip the text encoder (0 disables).
        self.embedding_cache_size = embedding_cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_lock = threading.Lock()
        # backends with shared mutable state (CUDA graphs, TensorRT contexts) run one call at a time
        self._run_lock = nullcontext() if getattr(self.backend, "thread_safe", True) else threading.Lock()

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, ckpt: str | os.PathLike[str] = "tiny", *, device: torch.device | str | None = None,
                        dtype: torch.dtype | str | None = None, backend: str = "torch",
                        treat_as_flow: bool = False, export_dir: str | os.PathLike[str] | None = None,
                        **backend_options: Any) -> "Pipeline":
        """Load a rectified-flow checkpoint: an alias (``instaflow-0.9b``, ``2rf-sd1.5``, ``tiny``), a hub id
        (from the Hugging Face cache) or a local diffusers folder.

        Diffusion checkpoints (e.g. ``sd1.5``, whose ``model_index.json`` names ``StableDiffusionPipeline``) are
        refused, since their UNet predicts noise, not a velocity; pass ``treat_as_flow=True`` to load one anyway
        (useful for randomly initialised test models).

        ``backend``: ``"torch"``, ``"onnxruntime"`` (runs an export from ``python -m export.onnx``, found in
        ``export_dir`` or the export cache), ``"tensorrt"`` or ``"auto"`` (the fastest one available here).
        """
        from .backends import check_name, choose

        device_ = parse_device(device)
        dtype_ = parse_dtype(dtype, device_)
        check_name(backend)
        checkpoint = resolve(ckpt)
        check_is_flow(checkpoint, treat_as_flow)
        backend, backend_options = choose(backend, device_, checkpoint, export_dir, backend_options)  # auto: once
        components = load_components(checkpoint, device=device_, dtype=dtype_, weights=backend == "torch")
        return cls(components, device=device_, dtype=dtype_, backend=backend, name=checkpoint.name,
                   checkpoint=checkpoint, export_dir=export_dir, **backend_options)

    # ------------------------------------------------------------------------------------------------ call
    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 1,
        guidance_scale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: OutputType = "pil",
    ) -> PipelineOutput:
        """Generate images.

        Args:
            prompt: one prompt or a list of prompts (one batch). Prompts longer than the tokenizer's window are
                truncated with a warning.
            negative_prompt: used only with guidance (``guidance_scale > 1``): one string for all prompts, or one
                per prompt.
            num_inference_steps: Euler steps; 1 for InstaFlow, a few (2-25) for a 2-rectified flow.
            guidance_scale: classifier-free guidance weight ``w``; applied only when ``w > 1``
                (``v = v_uncond + w * (v_cond - v_uncond)``). InstaFlow one-step uses 0 (no guidance).
            height, width: pixels; default the UNet's ``sample_size`` times the VAE scale factor. Must be positive
                multiples of the VAE scale factor.
            num_images_per_prompt: images per prompt; the prompt is encoded once and its embedding repeated.
            seed: makes results reproducible: image ``j`` of the call uses noise from ``seed + j`` alone, so the
                same image comes out whatever the batch size.
            generator: a ``torch.Generator`` for the whole batch, or a list with one per image (instead of seed).
            latents: explicit initial noise ``[num_images, C, h, w]`` (overrides seed/generator).
            output_type: ``"pil"`` (list of PIL images), ``"np"`` (float32 NHWC in [0, 1]), ``"pt"`` (float NCHW
                in [0, 1]) or ``"latent"`` (final latents).
        """
        # 0. check inputs
        prompts, negatives = check_prompts(prompt, negative_prompt)
        steps = _positive_int(num_inference_steps, "num_inference_steps")
        per_prompt = _positive_int(num_images_per_prompt, "num_images_per_prompt")
        height, width = self.check_size(height, width)
        if output_type not in OUTPUT_TYPES:
            raise InvalidInputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if not isinstance(guidance_scale, (int, float)) or not np.isfinite(guidance_scale):
            raise InvalidInputError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        cfg = flow.uses_cfg(float(guidance_scale))
        n_images = len(prompts) * per_prompt
        check_batch = getattr(self.backend, "check_batch", None)  # engines built for a largest batch
        if check_batch is not None:
            check_batch(n_images)
        timings: dict[str, float] = {}
        start = time.perf_counter()

        # 1. initial noise (checked before any network runs)
        latent_shape = (self.components.latent_channels, height // self.scale, width // self.scale)
        x = self.prepare_latents(n_images, latent_shape, seed=seed, generator=generator, latents=latents)

        # 2. text embeddings: one encoder call for all distinct texts (prompts, plus negatives with guidance)
        embeddings = self.encode(prompts + negatives if cfg else prompts)
        cond = embeddings[: len(prompts)].repeat_interleave(per_prompt, dim=0)
        if cfg:
            uncond = embeddings[len(prompts):].repeat_interleave(per_prompt, dim=0)
            context = torch.cat([uncond, cond])
        else:
            context = cond
        timings["encode"] = self._lap(start)

        # 3+4. the fused one-step graph, where the backend has one: embeddings + noise -> images in [0, 1]
        if steps == 1 and not cfg and output_type != "latent" and getattr(self.backend, "has_one_step", False):
            with self._run_lock:
                unit = self.backend.one_step(context, x)
            timings["unet"] = self._lap(start) - timings["encode"]
            images = self.format_images(unit, output_type)
            return self._finish(images, timings, start)

        # 3. Euler steps along the flow
        def velocity(z: torch.Tensor, t: float) -> torch.Tensor:
            z_in = torch.cat([z, z]) if cfg else z
            t_in = torch.full((z_in.shape[0],), t, device=self.device, dtype=torch.float32)
            with self._run_lock:
                v = self.backend.velocity(z_in, t_in, context).float()
            if cfg:
                v_uncond, v_cond = v.chunk(2)
                v = flow.guided(v_uncond, v_cond, float(guidance_scale))
            return v

        x = flow.sample(velocity, x, steps)
        timings["unet"] = self._lap(start) - timings["encode"]

        # 4. decode and post-process
        if output_type == "latent":
            images = x
            _check_finite(images, "latents")
        else:
            with self._run_lock:
                decoded = self.backend.decode(flow.vae_input(x, self.components.scaling_factor,
                                                             self.components.shift_factor))
            images = self.postprocess(decoded, output_type)
        return self._finish(images, timings, start)

    def _finish(self, images: Any, timings: dict[str, float], start: float) -> PipelineOutput:
        timings["total"] = self._lap(start)
        timings["decode"] = timings["total"] - timings["encode"] - timings["unet"]
        return PipelineOutput(images=images, timings=timings)

    # ------------------------------------------------------------------------------------------------ stages
    @property
    def scale(self) -> int:
        """Pixels per latent cell (VAE scale factor)."""
        return self.components.vae_scale_factor

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Default and validate the image size in pixels."""
        default_h, default_w = self.components.default_size
        height = default_h if height is None else height
        width = default_w if width is None else width
        for label, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InvalidTypeError(f"{label} must be an int, got {type(v).__name__}")
            if v <= 0 or v % self.scale:
                raise InvalidInputError(
                    f"{label} must be a positive multiple of the VAE scale factor {self.scale}, got {v}")
        check = getattr(self.backend, "check_size", None)  # exported graphs take fewer sizes than the torch UNet
        if check is not None:
            check(int(height), int(width))
        return int(height), int(width)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask ``[B, L]``, padded to the tokenizer window; longer prompts are truncated
        with a warning."""
        tok = self.components.tokenizer
        n = self.components.max_length
        enc = tok(list(texts), padding="max_length", max_length=n, truncation=False)
        if any(len(ids) > n for ids in enc["input_ids"]):
            too_long = [t for t, ids in zip(texts, enc["input_ids"]) if len(ids) > n]
            warnings.warn(f"{len(too_long)} prompt(s) longer than the {n}-token window were truncated: "
                          f"{too_long[0][:80]!r}", UserWarning, stacklevel=3)
            enc = tok(list(texts), padding="max_length", max_length=n, truncation=True)
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        mask = torch.tensor(enc["attention_mask"], dtype=torch.long)
        return ids.to(self.device), mask.to(self.device)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings ``[len(texts), L, D]``: each distinct text not in the LRU cache is encoded, all in one
        text-encoder call; cached texts skip the encoder."""
        with self._cache_lock:
            found = {t: self._cache[t] for t in dict.fromkeys(texts) if t in self._cache}
            for t in found:
                self._cache.move_to_end(t)
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            ids, mask = self.tokenize(missing)
            with self._run_lock:
                emb = self.backend.encode(ids, mask)
            new = dict(zip(missing, emb.unbind(0)))
            found.update(new)
            if self.embedding_cache_size > 0:
                with self._cache_lock:
                    self._cache.update(new)
                    while len(self._cache) > self.embedding_cache_size:
                        self._cache.popitem(last=False)
            if len(missing) == len(texts):
                return emb
        return torch.stack([found[t] for t in texts])

    def clear_cache(self) -> None:
        """Forget cached prompt embeddings."""
        with self._cache_lock:
            self._cache.clear()

    def prepare_latents(self, n: int, shape: tuple[int, int, int], *, seed: int | None = None,
                        generator: Generator | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Initial noise ``[n, *shape]`` in float32 on the pipeline's device.

        Noise is drawn on the CPU (identical on every device): image ``j`` from ``seed + j`` when ``seed`` is
        given, else from ``generator`` (one, or one per image), else from torch's global generator.
        """
        full = (n, *shape)
        given = [k for k, v in (("seed", seed), ("generator", generator), ("latents", latents)) if v is not None]
        if len(given) > 1:
            raise InvalidInputError(f"give only one of seed, generator and latents (got {', '.join(given)})")
        if latents is not None:
            if not isinstance(latents, torch.Tensor):
                raise InvalidTypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
            if tuple(latents.shape) != full:
                raise InvalidInputError(f"latents must have shape {list(full)}, got {list(latents.shape)}")
            if not latents.is_floating_point():
                raise InvalidInputError(f"latents must be a floating-point tensor, got {latents.dtype}")
            return latents.to(device=self.device, dtype=torch.float32)
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
                raise InvalidTypeError(f"seed must be an int, got {type(seed).__name__}")
            gens = [torch.Generator().manual_seed(int(seed) + j) for j in range(n)]
        elif isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise InvalidInputError(f"got {len(generator)} generators for {n} images")
            gens = list(generator)
        else:
            gens = None
        if gens is None:
            noise = torch.randn(full, generator=generator, dtype=torch.float32,
                                device=generator.device if generator is not None else "cpu")
        else:
            noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32, device=g.device)
                                 for g in gens])
        return noise.to(self.device)

    def postprocess(self, decoded: torch.Tensor, output_type: str) -> Any:
        """VAE output in [-1, 1] -> the requested image type; NaN/inf (fp16 overflow) raises."""
        return self.format_images(flow.to_unit_range(decoded.float()), output_type)

    def format_images(self, images: torch.Tensor, output_type: str) -> Any:
        """Images in [0, 1], NCHW -> ``"pt"`` (float32 tensor), ``"np"`` (NHWC float32) or ``"pil"``."""
        _check_finite(images, "image")
        images = images.float()
        if output_type == "pt":
            return images
        if output_type == "np":
            return images.permute(0, 2, 3, 1).cpu().numpy()
        from PIL import Image

        arr = images.mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a if a.shape[-1] != 1 else a[..., 0]) for a in arr]

    def _lap(self, start: float) -> float:
        if self.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def __repr__(self) -> str:
        h, w = self.components.default_size
        return (f"Pipeline({self.name or 'in-memory'!r}, backend={self.backend.name}, device={self.device}, "
                f"dtype={self.dtype}, default_size={h}x{w})")


# ---------------------------------------------------------------------------------------------------- checks
def check_is_flow(checkpoint: Checkpoint, treat_as_flow: bool = False) -> None:
    """Refuse a diffusion checkpoint (its UNet predicts noise, not a velocity) unless told otherwise."""
    if not checkpoint.is_flow and not treat_as_flow:
        kind = checkpoint.class_name or "no _class_name"
        raise InvalidInputError(
            f"{checkpoint.name} is a diffusion model ({kind}), not a rectified flow: use it as a teacher in "
            "`train`, or pass treat_as_flow=True (e.g. for random test models)")


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
    if negative_prompt is None:
        negatives = [""] * len(prompts)
    elif isinstance(negative_prompt, str):
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


def _positive_int(value: Any, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidTypeError(f"{label} must be an int, got {type(value).__name__}")
    if value < 1:
        raise InvalidInputError(f"{label} must be >= 1, got {value}")
    return int(value)


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteOutputError(
            f"the generated {what} contains NaN/inf (fp16 overflow?); retry with dtype=torch.float32")
