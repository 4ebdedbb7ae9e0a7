"""Benchmark subjects (models) and the baselines our pipeline is compared with, built without network.

Latency does not depend on weight values, so randomly initialised SD-shaped models are valid subjects.
"""

from __future__ import annotations

import copy
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from runtime import Pipeline
from runtime.models import Components
from runtime.builders import SD15_SPEC, SMALL_SD_SPEC, build_tiny_components

PROMPT = "a red circle at the top left"
#: Our pipelines run without the prompt-embedding cache, so that every call encodes its prompt (as a stream of
#: distinct prompts would) and "end to end" means prompt -> image, like diffusers' baselines.
OURS = dict(embedding_cache_size=0)


@dataclass
class Subject:
    name: str
    pipe: Pipeline
    description: str
    #: the modules diffusers' baselines run (default: the same as ours); on a GPU, a plain copy of the same weights,
    #: so that our in-place optimisations (channels-last, fused QKV) do not speed the baselines up
    baseline: Components | None = None
    #: the options ``pipe`` was made with (other pipelines of the same subject use them too)
    options: dict = field(default_factory=lambda: dict(OURS))

    @property
    def components(self) -> Components:
        return self.pipe.components

    @property
    def baseline_components(self) -> Components:
        return self.baseline if self.baseline is not None else self.components


def make_subject(name: str) -> Subject:
    """``tiny`` (bundled), ``small-sd`` (CPU, 256 px), ``sd15`` (GPU, fp16, 512 px)."""
    if name == "tiny":
        pipe = Pipeline.from_pretrained("tiny", device="cpu", backend="torch", **OURS)
        return Subject(name, pipe, "bundled tiny model, 32x32, fp32, CPU, torch eager")
    if name == "small-sd":
        comps = build_tiny_components(SMALL_SD_SPEC, seed=0)
        return Subject(name, Pipeline(comps, device="cpu", name=name, **OURS),
                       "SD-shaped UNet (64,128,256) x2 layers, 256x256, random weights, fp32, CPU")
    if name == "sd15":  # what from_pretrained(ckpt) runs on a GPU: auto's torch defaults (ours_1step_eager: without)
        from runtime.backends import torch_defaults

        comps = build_tiny_components(SD15_SPEC, seed=0).to("cuda", torch.float16)
        plain = copy.deepcopy(comps)  # diffusers' baselines as a diffusers user runs them: default memory format
        options = dict(**torch_defaults(torch.device("cuda")), **OURS)
        pipe = Pipeline(comps, device="cuda", dtype=torch.float16, name=name, **options)
        return Subject(name, pipe, "SD-1.5 shapes, 512x512, random weights, fp16, CUDA; ours: the default "
                                   "(from_pretrained with no options: CUDA graphs, channels-last, fused QKV); "
                                   "diffusers: the same weights as loaded", plain, options)
    raise ValueError(f"unknown subject {name!r}")


def sd_pipeline(components: Components, device: torch.device) -> Any:
    """diffusers' StableDiffusionPipeline over the same components, with the 25-step DPM-Solver of the paper."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            num_train_timesteps=1000, steps_offset=1)
    sd = StableDiffusionPipeline(vae=components.vae, text_encoder=components.text_encoder,
                                 tokenizer=components.tokenizer, unet=components.unet, scheduler=scheduler,
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    return sd.to(device)


def diffusers_one_step(sd: Any, prompt: str | list[str], height: int, width: int, seed: int = 0) -> list:
    """The fair baseline: diffusers' own pieces doing InstaFlow's single Euler step eagerly (the official
    RectifiedFlowPipeline's code path with N = 1, no guidance)."""
    device = sd._execution_device
    with torch.no_grad():
        emb, _ = sd.encode_prompt(prompt, device, 1, False)
        g = torch.Generator().manual_seed(seed)
        latents = sd.prepare_latents(emb.shape[0], sd.unet.config.in_channels, height, width, emb.dtype, device, g)
        t = torch.ones((latents.shape[0],), device=device) * 1000.0
        v = sd.unet(latents, t, encoder_hidden_states=emb).sample
        latents = latents + 1.0 * v
        image = sd.vae.decode(latents / sd.vae.config.scaling_factor, return_dict=False)[0]
        return sd.image_processor.postprocess(image, output_type="pil")


def diffusers_compiled(components: Components, device: torch.device) -> Any:
    """diffusers with the speed recipe its users apply: a copy of the modules in channels-last, fused QKV projections,
    and ``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA graphs inside) on the UNet and on
    ``vae.decode``; driven by :func:`diffusers_one_step` (the first call compiles)."""
    c = copy.deepcopy(components)
    for module in (c.unet, c.vae):
        module.to(memory_format=torch.channels_last)
        module.fuse_qkv_projections()
    sd = sd_pipeline(c, device)
    mode = "reduce-overhead" if device.type == "cuda" else "default"  # CUDA graphs need a GPU
    sd.unet = torch.compile(sd.unet, mode=mode, fullgraph=True)
    sd.vae.decode = torch.compile(sd.vae.decode, mode=mode, fullgraph=True)
    return sd


def busy_and_span(spans: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(busy, span) of device activity intervals: busy is their union (overlaps counted once), span from the first
    start to the last end. span - busy is the GPU idle between kernels (launch gaps inside CUDA graphs, waits on the
    host between graphs); a call's wall time - span is host work before the first kernel and after the last."""
    busy, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if a > end:
            busy, end = busy + (b - a), b
        elif b > end:
            busy, end = busy + (b - end), b
    return busy, (max(b for _, b in spans) - min(a for a, _ in spans)) if spans else 0.0


def gpu_activity(fn: Callable[[], Any]) -> dict[str, float] | None:
    """``{"gpu_busy_s", "gpu_span_s"}`` of one call of ``fn`` (see :func:`busy_and_span`), from the profiler's
    device activity (replayed CUDA graphs included); None on the CPU or when nothing was recorded."""
    if not torch.cuda.is_available():
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]
    if not spans:
        return None
    busy, span = busy_and_span(spans)  # microseconds
    return {"gpu_busy_s": busy * 1e-6, "gpu_span_s": span * 1e-6}


def sd_multistep(sd: Any, prompt: str, height: int, width: int, seed: int = 0, steps: int = 25,
                 guidance: float = 5.0) -> list:
    """Multi-step SD that InstaFlow replaces: DPM-Solver, 25 steps, CFG 5.0."""
    g = torch.Generator().manual_seed(seed)
    return sd(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
              generator=g).images


class RawStages:
    """The three networks called directly on prepared inputs: the floor the pipeline's overhead is measured on."""

    def __init__(self, pipe: Pipeline, batch: int = 1) -> None:
        c = pipe.components
        h, w = c.default_size
        self.c = c
        self.ids, _ = pipe.tokenize([PROMPT] * batch)
        self.latents = torch.randn((batch, c.latent_channels, h // c.vae_scale_factor, w // c.vae_scale_factor),
                                   device=pipe.device, dtype=pipe.dtype)
        self.t = torch.full((batch,), 1000.0, device=pipe.device)
        with torch.no_grad():
            self.emb = c.text_encoder(self.ids)[0]

    def encode(self) -> torch.Tensor:
        with torch.no_grad():
            return self.c.text_encoder(self.ids)[0]

    def unet(self) -> torch.Tensor:
        with torch.no_grad():
            return self.c.unet(self.latents, self.t, encoder_hidden_states=self.emb).sample

    def decode(self) -> torch.Tensor:
        with torch.no_grad():
            return self.c.vae.decode(self.latents / self.c.scaling_factor).sample

    def chain(self) -> torch.Tensor:
        """All three in a row (sum of the raw component calls)."""
        with torch.no_grad():
            emb = self.c.text_encoder(self.ids)[0]
            v = self.c.unet(self.latents, self.t, encoder_hidden_states=emb).sample
            return self.c.vae.decode((self.latents + v) / self.c.scaling_factor).sample


class PeakRSS:
    """Peak resident memory growth (bytes, :attr:`peak`) over the resident memory at the start (:attr:`base`)
    while the block runs, sampled every ``interval`` seconds on a thread."""

    def __init__(self, interval: float = 0.001) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = 0
        self.base = 0
        self.interval = interval

    def __enter__(self) -> "PeakRSS":
        self.base = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss - self.base)
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss - self.base)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[int, int]:
    """Memory of one call, as ``(peak, extra)``.

    On a GPU ``peak`` is the process's CUDA peak allocation during the call (resident weights of every subject
    in the process and captured graph pools included) and ``extra`` what the call allocated beyond what was
    allocated before it (activations; a replayed CUDA graph reuses its pool, so only its output copies). On the
    CPU both are the resident-set growth during the call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = int(torch.cuda.max_memory_allocated())
        return peak, peak - before
    with PeakRSS() as m:
        fn()
    return m.peak, m.peak


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine_info() -> dict[str, str]:
    import torch

    info = {"cpu": _cpu_name(), "cores": str(os.cpu_count()), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}
    for mod in ("diffusers", "transformers", "onnxruntime"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
