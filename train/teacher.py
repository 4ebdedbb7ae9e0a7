"""Teachers: X1 = ODE[teacher](X0 | prompt), batched, with classifier-free guidance.

* A rectified flow (``model_index.json`` names ``RectifiedFlowPipeline``: InstaFlow's 2-RF, or ours) is solved with
  the runtime's N-step Euler sampler (default 25 steps, guidance alpha = 1.5, the paper's distillation setting).
* A diffusion model (SD-style, epsilon or v prediction, scheduler config in its ``scheduler/`` folder) is solved with
  diffusers' DPMSolverMultistepScheduler (default 25 steps, guidance 5.0, the paper's SD setting).

Both return latents in the same (scaled) space the flow works in, so the pairs feed ``train.reflow`` directly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from runtime import Pipeline, flow
from runtime.checkpoints import PIPELINE_COMPONENTS, Checkpoint, resolve
from runtime.errors import CheckpointError
from runtime.models import load_components

from .common import TrainError

FLOW_DEFAULTS = (25, 1.5)
DIFFUSION_DEFAULTS = (25, 5.0)


@dataclass
class Teacher:
    checkpoint: Checkpoint
    pipe: Pipeline
    kind: str  # "flow" | "diffusion"
    steps: int
    guidance: float
    scheduler_config: dict | None = None

    @property
    def identity(self) -> dict:
        return {"name": self.checkpoint.name, "path": str(Path(self.checkpoint.path).resolve()),
                "fingerprint": self.checkpoint.fingerprint(), "kind": self.kind,
                "steps": self.steps, "guidance": self.guidance}

    @torch.inference_mode()
    def solve(self, noise: torch.Tensor, prompts: Sequence[str],
              trajectory: flow.Trajectory | None = None) -> torch.Tensor:
        """X1 for a batch of noise ``[n, C, h, w]`` (float32) and n prompts; no host syncs inside the ODE loop.
        ``trajectory`` (a list) receives the ``steps + 1`` points the solver visits, noise first, X1 last, with their
        flow times; a diffusion model's points are mapped to the rectified flow's coordinates
        (:func:`diffusion_as_flow`), so both kinds of path are measured alike."""
        noise = noise.to(self.pipe.device, torch.float32)
        prompts = list(prompts)
        if len(prompts) != noise.shape[0]:
            raise TrainError(f"{len(prompts)} prompts for {noise.shape[0]} noise samples: one prompt per sample")
        cfg = flow.uses_cfg(self.guidance)
        # each text encoded in a call of its own: on the CPU a batched matrix product can round differently with
        # the batch's other rows, and pair i must not depend on which prompts shared its batch, rank or run
        context = self.pipe.encode_prompt(prompts, [""] * len(prompts) if cfg else None, separately=True)
        if self.kind == "flow":
            x = self.pipe.denoise(noise, context, self.steps, self.guidance, trajectory)
            return self.pipe.check_finite(x, "latents")
        return self._solve_diffusion(noise, context, cfg, trajectory)

    def _solve_diffusion(self, noise: torch.Tensor, context: torch.Tensor, cfg: bool,
                         trajectory: flow.Trajectory | None) -> torch.Tensor:
        from diffusers import DPMSolverMultistepScheduler

        scheduler = DPMSolverMultistepScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(self.steps, device=self.pipe.device)
        unet, dtype = self.pipe.components.unet, self.pipe.dtype
        x = noise * scheduler.init_noise_sigma
        if trajectory is not None:
            trajectory.append(diffusion_as_flow(x, float(scheduler.sigmas[0])))
        for k, t in enumerate(scheduler.timesteps):
            x_in = scheduler.scale_model_input(torch.cat([x, x]) if cfg else x, t)
            out = unet(x_in.to(dtype), t, encoder_hidden_states=context.to(dtype), return_dict=False)[0].float()
            if cfg:
                uncond, cond = out.chunk(2)
                out = flow.guided(uncond, cond, self.guidance)
            x = scheduler.step(out, t, x, return_dict=False)[0]
            if trajectory is not None:
                trajectory.append(diffusion_as_flow(x, float(scheduler.sigmas[k + 1])))
        return self.pipe.check_finite(x, "latents")


def diffusion_as_flow(x: torch.Tensor, sigma: float) -> tuple[float, torch.Tensor]:
    """A point ``x = sqrt(a) X1 + sqrt(1 - a) eps`` of a variance-preserving diffusion path (``sigma`` =
    sqrt((1 - a) / a)) as a point of the straight interpolation ``t X1 + (1 - t) eps``: ``t = 1 / (1 + sigma)``,
    ``z = x sqrt(1 + sigma^2) / (1 + sigma)``. A diffusion model's PF-ODE is an ODE in (t, z) like a rectified
    flow's, so its straightness is measured in the same coordinates."""
    return 1.0 / (1.0 + sigma), x * (math.sqrt(1.0 + sigma * sigma) / (1.0 + sigma))


def load_teacher(ckpt: str, device: torch.device, dtype: torch.dtype = torch.float32, steps: int | None = None,
                 guidance: float | None = None) -> Teacher:
    """Load any checkpoint the runtime can load as a teacher; diffusion teachers need their ``scheduler/``."""
    checkpoint = resolve(ckpt)
    if checkpoint.is_flow:
        kind, (d_steps, d_guidance), sched = "flow", FLOW_DEFAULTS, None
    else:
        try:
            folder = resolve(ckpt, (*PIPELINE_COMPONENTS, "scheduler")).component("scheduler")
            sched = json.loads((folder / "scheduler_config.json").read_text())
        except (CheckpointError, OSError, json.JSONDecodeError):
            raise TrainError(f"teacher {checkpoint.name} is a diffusion model ({checkpoint.class_name}) without a "
                             "readable scheduler/scheduler_config.json: its noise schedule is needed to solve it"
                             ) from None
        kind, (d_steps, d_guidance) = "diffusion", DIFFUSION_DEFAULTS
    steps = d_steps if steps is None else steps
    if steps < 1:
        raise TrainError(f"--steps must be >= 1, got {steps}")
    components = load_components(checkpoint, device=device, dtype=dtype)
    pipe = Pipeline(components, device=device, dtype=dtype, name=checkpoint.name)
    return Teacher(checkpoint, pipe, kind, steps, d_guidance if guidance is None else guidance, sched)
