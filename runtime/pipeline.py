"""``Pipeline``: prompts -> tokens -> embeddings -> noise -> Euler step(s) -> decode -> images.

This is the one implementation of the sampling logic; backends only run the networks. It follows the official
InstaFlow ``RectifiedFlowPipeline`` exactly (see :mod:`runtime.flow` for the conventions). A call runs the steps
diffusers' pipelines run, each a public method: :meth:`Pipeline.check_inputs`, :meth:`~Pipeline.prepare_latents`,
:meth:`~Pipeline.encode_prompt`, :meth:`~Pipeline.denoise` (or the fused :meth:`~Pipeline.one_step`),
:meth:`~Pipeline.decode`, :meth:`~Pipeline.format_images`.
"""

from __future__ import annotations

import os
import threading
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import torch

from . import flow
from .backends import Backend, check_name, choose, create
from .checkpoints import Checkpoint, check_is_flow
from .embeddings import EmbeddingCache
from .errors import Cancelled, NonFiniteOutputError
from .inputs import (OUTPUT_TYPES, Limits, OutputType, Request, check_guidance, check_noise_source, check_output_type,
                     check_pixels, check_prompts, parse_device, parse_dtype, positive_int)
from .lora import Fuser
from .models import Components, load_components, resolve_checkpoint
from .timing import StageClock

Generator = Union[torch.Generator, Sequence[torch.Generator]]

__all__ = ["OUTPUT_TYPES", "Pipeline", "PipelineOutput", "check_is_flow", "parse_device", "parse_dtype"]


@dataclass
class PipelineOutput:
    """What a :class:`Pipeline` call returns.

    ``images`` is a list of PIL images (``"pil"``), a float32 NHWC array in [0, 1] (``"np"``), a float NCHW tensor in
    [0, 1] (``"pt"``) or the final latents (``"latent"``). ``timings`` holds seconds per stage as measured:
    ``encode`` (noise and text embeddings), then ``unet`` and ``decode`` (decode and image conversion), or
    ``unet+decode`` where the backend runs them fused, and ``total``; on a GPU they are exact only with
    ``Pipeline.profile = True``.
    """

    images: Any
    timings: dict[str, float] = field(default_factory=dict)


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
                 embedding_cache_size: int = 256, limits: Limits | None = None, **backend_options: Any) -> None:
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype, self.device)
        self.components = components
        self.name = name
        self.backend: Backend = (create(backend, components, self.device, self.dtype, checkpoint=checkpoint,
                                        export_dir=export_dir, **backend_options)
                                 if isinstance(backend, str) else backend)
        #: When True, stages are synchronised on the GPU so that ``timings`` are exact (costs a little speed).
        self.profile = False
        #: What one call may ask for (pixels per image, images per call, steps); see :class:`~runtime.inputs.Limits`.
        self.limits = limits or Limits()
        #: Prompt-embedding cache: text -> embedding row; repeated prompts skip the text encoder (0 disables).
        self._embeddings = EmbeddingCache(embedding_cache_size)
        # backends with shared mutable state (CUDA graphs, TensorRT contexts) run one call at a time
        self._run_lock = nullcontext() if self.backend.thread_safe else threading.Lock()

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, ckpt: str | os.PathLike[str] = "tiny", *, device: torch.device | str | None = None,
                        dtype: torch.dtype | str | None = None, backend: str = "auto",
                        treat_as_flow: bool = False, export_dir: str | os.PathLike[str] | None = None,
                        vae: str | os.PathLike[str] | None = None, lora: Any = None,
                        **backend_options: Any) -> "Pipeline":
        """Load a rectified-flow checkpoint: an alias (``instaflow-0.9b``, ``2rf-sd1.5``, ``tiny``), a hub id
        (from the Hugging Face cache) or a local diffusers folder.

        Diffusion checkpoints (e.g. ``sd1.5``, whose ``model_index.json`` names ``StableDiffusionPipeline``) are
        refused, since their UNet predicts noise, not a velocity; pass ``treat_as_flow=True`` to load one anyway
        (useful for randomly initialised test models).

        ``backend``: ``"auto"`` (the default: the fastest path here that needs no long compilation; see
        :func:`runtime.backends.choose`), ``"torch"``, ``"onnxruntime"`` (runs an export from ``python -m
        export.onnx``, found in ``export_dir`` or the export cache), ``"tensorrt"`` (``export.trt``) or ``"aoti"``
        (AOTInductor packages from ``export.aoti``). ``backend_options`` go to the backend (e.g. ``compile=True``,
        ``cuda_graph=False`` for torch).

        ``vae``: a tiny decoder used instead of the checkpoint's VAE: ``"taesd"`` (``madebyollin/taesd``), a hub id
        or a folder of an ``AutoencoderTiny`` (exports must have been made with the same ``--vae``).

        ``lora``: LoRAs fused into the weights, ``"file"``, ``("file", scale)`` or a list (files, folders or hub
        ids); with an exported backend, the export must hold the same ones (``--lora``).
        """
        device_ = parse_device(device)
        dtype_ = parse_dtype(dtype, device_)
        check_name(backend)
        checkpoint = resolve_checkpoint(ckpt, vae, lora)
        check_is_flow(checkpoint, treat_as_flow)
        backend, backend_options = choose(backend, device_, checkpoint, export_dir, backend_options)  # auto: once
        components = load_components(checkpoint, device=device_, dtype=dtype_, weights=backend == "torch")
        return cls(components, device=device_, dtype=dtype_, backend=backend, name=checkpoint.name,
                   checkpoint=checkpoint, export_dir=export_dir, **backend_options)

    # ------------------------------------------------------------------------------------------------ LoRA
    def load_lora(self, lora: str | os.PathLike[str], scale: float = 1.0) -> dict[str, Any]:
        """Fuse a LoRA (file, folder or hub id) into the weights at ``scale`` (torch backend; several add up; not
        while other threads call the pipeline). Returns what it changed."""
        info = self._fuser().load(lora, scale)
        if "text_encoder" in info["layers"]:
            self._embeddings.clear()
        return info

    def unload_lora(self) -> None:
        """Take every fused LoRA out again: the weights are restored bit for bit."""
        if self._fuser().unload():
            self._embeddings.clear()

    @property
    def loras(self) -> list[dict[str, Any]]:
        """The fused LoRAs (file, sha256, scale, layers changed), in loading order."""
        return list(self.components.lora.fused) if self.components.lora is not None else []

    def _fuser(self) -> Fuser:
        self.backend.check_lora_change()
        if self.components.lora is None:
            self.components.lora = Fuser(self.components)
        return self.components.lora

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
        cancel: Callable[[], bool] | None = None,
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
                multiples of the VAE scale factor (exported graphs may take fewer sizes; they say so).
            num_images_per_prompt: images per prompt; the prompt is encoded once and its embedding repeated.
            seed: makes results reproducible: image ``j`` of the call uses noise from ``seed + j`` alone, so the
                same image comes out whatever the batch size.
            generator: a ``torch.Generator`` for the whole batch, or a list with one per image (instead of seed).
            latents: explicit initial noise ``[num_images, C, h, w]`` (overrides seed/generator).
            output_type: ``"pil"`` (list of PIL images), ``"np"`` (float32 NHWC in [0, 1]), ``"pt"`` (float NCHW
                in [0, 1]) or ``"latent"`` (final latents).
            cancel: asked after encoding, between Euler steps and before decoding; when it returns True the call
                stops there with :class:`~runtime.errors.Cancelled` (a server uses it to drop abandoned work).
        """
        # 1. check every input before any work
        req = self.check_inputs(prompt, negative_prompt, num_inference_steps, guidance_scale, height, width,
                                num_images_per_prompt, output_type, seed=seed, generator=generator, latents=latents)
        clock = StageClock(sync=self.device if self.profile and self.device.type == "cuda" else None)
        # 2. initial noise
        x = self.prepare_latents(req.num_images, self.latent_shape(req.height, req.width), seed=seed,
                                 generator=generator, latents=latents, checked=True)
        # 3. text embeddings -> the guidance context
        context = self.encode_prompt(req.prompts, req.negatives if req.cfg else None, req.num_images_per_prompt)
        clock.lap("encode")
        check_cancel(cancel)
        # 4. + 5. denoise and decode: in one fused call where the backend has one, else step by step
        if self._fused(req):
            images = self.format_images(self.one_step(context, x), req.output_type)
            clock.lap("unet+decode")
        else:
            x = self.denoise(x, context, req.num_inference_steps, req.guidance_scale, cancel=cancel)
            clock.lap("unet")
            if req.output_type == "latent":
                images = self.check_finite(x, "latents")
            else:
                check_cancel(cancel)
                images = self.format_images(self.decode(x), req.output_type)
                clock.lap("decode")
        return PipelineOutput(images=images, timings=clock.finish())

    def _fused(self, req: Request) -> bool:
        return (req.num_inference_steps == 1 and not req.cfg and req.output_type != "latent"
                and self.backend.has_one_step)

    # ------------------------------------------------------------------------------------------------ steps
    def check_inputs(self, prompt: Any, negative_prompt: Any = None, num_inference_steps: Any = 1,
                     guidance_scale: Any = 0.0, height: Any = None, width: Any = None,
                     num_images_per_prompt: Any = 1, output_type: Any = "pil", *, seed: Any = None,
                     generator: Any = None, latents: Any = None) -> Request:
        """Check and normalise a call's arguments (one line for any mistake, before any work)."""
        prompts, negatives = check_prompts(prompt, negative_prompt)
        req = Request(prompts, negatives, positive_int(num_inference_steps, "num_inference_steps"),
                      check_guidance(guidance_scale), *self.check_size(height, width),
                      positive_int(num_images_per_prompt, "num_images_per_prompt"), check_output_type(output_type))
        self.limits.check(req)  # bounded work, before anything is allocated
        self.backend.check_batch(req.num_images)  # engines built for a largest batch
        check_noise_source(req.num_images, self.latent_shape(req.height, req.width), seed, generator, latents)
        return req

    @property
    def scale(self) -> int:
        """Pixels per latent cell (VAE scale factor)."""
        return self.components.vae_scale_factor

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Default and validate the image size in pixels (and ask the backend, whose graphs may take fewer)."""
        default_h, default_w = self.components.default_size
        h, w = check_pixels(default_h if height is None else height, default_w if width is None else width,
                            self.scale)
        self.backend.check_size(h, w)
        return h, w

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of one image's latents."""
        return (self.components.latent_channels, height // self.scale, width // self.scale)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask ``[B, L]``, padded to the tokenizer window; longer prompts are truncated
        with a warning."""
        tok = self.components.tokenizer
        n = self.components.max_length
        # one pass: truncating at n + 1 tokens tells which prompts are longer than the window without tokenizing
        # them twice; those are then cut as truncation at n cuts them (keeping a closing special token)
        ids = tok(list(texts), max_length=n + 1, truncation=True)["input_ids"]
        too_long = [t for t, x in zip(texts, ids) if len(x) > n]
        if too_long:
            warnings.warn(f"{len(too_long)} prompt(s) longer than the {n}-token window were cut to their first {n} "
                          f"tokens: {too_long[0][:80]!r}", UserWarning, stacklevel=3)
            special = set(tok.all_special_ids)
            ids = [(x[: n - 1] + x[-1:] if x[-1] in special else x[:n]) if len(x) > n else x for x in ids]
        enc = tok.pad({"input_ids": ids}, padding="max_length", max_length=n, return_attention_mask=True)
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        mask = torch.tensor(enc["attention_mask"], dtype=torch.long)
        return to_device(ids, self.device), to_device(mask, self.device)

    def encode(self, texts: Sequence[str], separately: bool = False) -> torch.Tensor:
        """Text embeddings ``[len(texts), L, D]``: each distinct text not in the LRU cache is encoded, all in one
        text-encoder call (``separately``: each in a call of its own, so that its embedding does not depend on
        which texts shared the batch, as batched matrix products may round differently); cached texts skip the
        encoder."""
        found = self._embeddings.get(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        batches = [[t] for t in missing] if separately else ([missing] if missing else [])
        for batch in batches:
            ids, mask = self.tokenize(batch)
            with self._run_lock:
                emb = self.backend.encode(ids, mask)
            new = dict(zip(batch, emb.unbind(0)))
            found.update(new)
            self._embeddings.put(new)
            if len(batch) == len(texts):
                return emb
        return torch.stack([found[t] for t in texts])

    def encode_prompt(self, prompts: Sequence[str], negatives: Sequence[str] | None = None,
                      num_images_per_prompt: int = 1, separately: bool = False) -> torch.Tensor:
        """The conditioning context of a call: prompt embeddings repeated per image, ``[n, L, D]``; with
        ``negatives`` (guidance) ``[uncond, cond]``, ``[2n, L, D]``, from one text-encoder call for all texts."""
        prompts = list(prompts)
        embeddings = self.encode(prompts + list(negatives or []), separately=separately)
        cond = embeddings[: len(prompts)].repeat_interleave(num_images_per_prompt, dim=0)
        if negatives is None:
            return cond
        uncond = embeddings[len(prompts):].repeat_interleave(num_images_per_prompt, dim=0)
        return torch.cat([uncond, cond])

    @property
    def embedding_cache_size(self) -> int:
        """How many prompt embeddings are cached (LRU); 0 disables the cache."""
        return self._embeddings.size

    @embedding_cache_size.setter
    def embedding_cache_size(self, size: int) -> None:
        self._embeddings.size = size

    def clear_cache(self) -> None:
        """Forget cached prompt embeddings."""
        self._embeddings.clear()

    def prepare_latents(self, n: int, shape: tuple[int, int, int], *, seed: int | None = None,
                        generator: Generator | None = None, latents: torch.Tensor | None = None,
                        checked: bool = False) -> torch.Tensor:
        """Initial noise ``[n, *shape]`` in float32 on the pipeline's device.

        Noise is drawn on the CPU (identical on every device): image ``j`` from ``seed + j`` when ``seed`` is
        given, else from ``generator`` (one, or one per image), else from torch's global generator. The arguments
        are checked first, unless ``checked`` says :meth:`check_inputs` did it already.
        """
        if not checked:
            check_noise_source(n, shape, seed, generator, latents)
        if latents is not None:
            return latents.to(device=self.device, dtype=torch.float32)
        if seed is not None:
            generator = [torch.Generator().manual_seed(int(seed) + j) for j in range(n)]
        if isinstance(generator, (list, tuple)):
            noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32, device=g.device)
                                 for g in generator])
        else:
            noise = torch.randn((n, *shape), generator=generator, dtype=torch.float32,
                                device=generator.device if generator is not None else "cpu")
        return to_device(noise, self.device)

    def velocity(self, latents: torch.Tensor, t: float, context: torch.Tensor,
                 guidance_scale: float = 0.0) -> torch.Tensor:
        """The (guided) velocity at ``latents`` for UNet time ``t``, in float32; ``context`` from
        :meth:`encode_prompt` (``[uncond, cond]`` when ``guidance_scale > 1``)."""
        cfg = flow.uses_cfg(guidance_scale)
        z = torch.cat([latents, latents]) if cfg else latents
        t_in = torch.full((z.shape[0],), t, device=self.device, dtype=torch.float32)
        with self._run_lock:
            v = self.backend.velocity(z, t_in, context).float()
        return flow.guided(*v.chunk(2), guidance_scale) if cfg else v

    def denoise(self, latents: torch.Tensor, context: torch.Tensor, num_inference_steps: int,
                guidance_scale: float = 0.0, trajectory: flow.Trajectory | None = None,
                cancel: Callable[[], bool] | None = None) -> torch.Tensor:
        """Integrate the flow from noise to image latents with ``num_inference_steps`` Euler steps (the points
        visited, with their flow times, appended to ``trajectory`` when given; ``cancel`` asked before each step,
        see :meth:`__call__`)."""

        def velocity(z: torch.Tensor, t: float) -> torch.Tensor:
            check_cancel(cancel)
            return self.velocity(z, t, context, guidance_scale)

        return flow.sample(velocity, latents, num_inference_steps, trajectory)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Image latents -> images in [0, 1], float32 NCHW."""
        c = self.components
        with self._run_lock:
            decoded = self.backend.decode(flow.vae_input(latents, c.scaling_factor, c.shift_factor))
        return flow.to_unit_range(decoded.float())

    def one_step(self, context: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The backend's fused hot path (one Euler step + decode) -> images in [0, 1]."""
        with self._run_lock:
            return self.backend.one_step(context, noise)

    def format_images(self, images: torch.Tensor, output_type: str) -> Any:
        """Images in [0, 1], NCHW -> ``"pt"`` (float32 tensor), ``"np"`` (NHWC float32) or ``"pil"``."""
        if output_type == "pil":
            from PIL import Image

            arr = self._uint8_on_host(images)
            return [Image.fromarray(a if a.shape[-1] != 1 else a[..., 0]) for a in arr]
        images = self.check_finite(images, "image").float()
        if output_type == "pt":
            return images
        return images.permute(0, 2, 3, 1).cpu().numpy()

    def _uint8_on_host(self, images: torch.Tensor) -> Any:
        """Images in [0, 1] -> uint8 NHWC numpy, checked finite. On a GPU the conversion runs there and the image
        (a quarter of float32's bytes) and the finiteness flag come back in one asynchronous copy each, into
        pinned memory, with one wait for both."""
        u8 = images.float().mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1)
        if images.device.type != "cuda":
            self.check_finite(images, "image")
            return u8.numpy()
        finite = torch.isfinite(images).all()
        host = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=True)
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(u8, non_blocking=True)
        flag.copy_(finite, non_blocking=True)
        torch.cuda.current_stream(images.device).synchronize()
        if not bool(flag):
            self.check_finite(images, "image")  # raises, with the cause
        return host.numpy()

    def check_finite(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """``x``, or one line when it holds NaN/inf, saying what is known of the cause."""
        if not bool(torch.isfinite(x).all()):
            hint = ("fp16 overflow is the usual cause: retry with dtype=torch.float32"
                    if self.dtype == torch.float16 else
                    f"in {str(self.dtype).replace('torch.', '')}: check the checkpoint's weights and the inputs")
            raise NonFiniteOutputError(f"the generated {what} contains NaN/inf ({hint})")
        return x

    def __repr__(self) -> str:
        h, w = self.components.default_size
        return (f"Pipeline({self.name or 'in-memory'!r}, backend={self.backend.name}, device={self.device}, "
                f"dtype={self.dtype}, default_size={h}x{w})")


# ---------------------------------------------------------------------------------------------------- checks
def check_cancel(cancel: Callable[[], bool] | None) -> None:
    """Raise :class:`~runtime.errors.Cancelled` when the ``cancel`` hook of a call says stop."""
    if cancel is not None and cancel():
        raise Cancelled("the call was cancelled before it finished")


# ------------------------------------------------------------------------------------------------- transfers
def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a CPU tensor goes to a GPU through pinned memory without the host waiting for the copy
    (stream order keeps it before the kernels that read it)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
