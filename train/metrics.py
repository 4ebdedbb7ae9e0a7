"""Flow metrics: straightness S(Z), one-step vs N-step distance, and FID/CLIP hooks.

    python -m train.metrics --ckpt CKPT --prompts FILE [--num 64] [--steps 25] [--seed 0]

Straightness (ARCHITECTURE.md, "Conventions"): S(Z) = int_0^1 E ||(Z1 - Z0) - v(Zt, t)||^2 dt, estimated on the
K-step Euler trajectory from Z0 ~ N(0, I) (mean over elements): 0 for perfectly straight trajectories.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

import torch

from runtime import Pipeline, flow
from runtime.cli import description, run_cli

from .common import TrainError, load_prompts

#: ``(z, flow time t in [0, 1]) -> v``: flow time, unlike :data:`runtime.flow.UnetTimeVelocity`
FlowTimeVelocity = Callable[[torch.Tensor, float], torch.Tensor]


def straightness(velocity: FlowTimeVelocity, z0: torch.Tensor, steps: int = 25) -> float:
    """S(Z) on the ``steps``-step Euler trajectory of ``velocity`` from ``z0``."""
    path: flow.Trajectory = []
    flow.sample(lambda z, t_unet: velocity(z, 1.0 - t_unet / flow.T_MAX), z0, steps, path)
    return float(path_straightness(path).mean())


def path_straightness(path: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """S per sample of a sampler's discrete path of ``(flow time, latents)`` points (noise first), time rescaled to
    [0, 1]: ``sum_k dt_k mean ||(z_K - z_0) - (z_{k+1} - z_k) / dt_k||^2``. For an Euler sampler this is S(Z) of
    the velocity field; a diffusion model's DPM-Solver path, given in flow coordinates (``train.teacher``), is
    measured the same way, whatever its step sizes."""
    if len(path) < 2:
        raise ValueError("a path needs at least two points")
    times = [t for t, _ in path]
    span = times[-1] - times[0]
    direction = path[-1][1] - path[0][1]
    total = torch.zeros(direction.shape[0], dtype=torch.float64, device=direction.device)
    for (ta, a), (tb, b) in zip(path, path[1:]):
        dt = (tb - ta) / span
        total += dt * ((direction - (b - a) / dt) ** 2).flatten(1).mean(1).double()
    return total.cpu()


def pipeline_velocity(pipe: Pipeline, prompts: Sequence[str]) -> FlowTimeVelocity:
    """The conditional velocity field of a pipeline's UNet (no guidance), in flow time."""
    context = pipe.encode_prompt(list(prompts))

    def v(z: torch.Tensor, t: float) -> torch.Tensor:
        return pipe.velocity(z, float(flow.unet_time(t)), context)

    return v


@torch.inference_mode()
def evaluate(pipe: Pipeline, prompts: Sequence[str], num: int = 64, steps: int = 25, seed: int = 0
             ) -> dict[str, float]:
    """Straightness and the mean squared latent distance between 1-step and ``steps``-step samples."""
    if num < 1 or steps < 1:
        raise TrainError(f"--num and --steps must be >= 1, got {num} and {steps}")
    pipe.limits.check_images(num)  # before anything is allocated
    if steps > pipe.limits.max_steps:
        raise TrainError(f"--steps {steps} is over the pipeline's limit of {pipe.limits.max_steps}")
    prompts = [prompts[i % len(prompts)] for i in range(num)]
    c = pipe.components
    h, w = c.default_size
    shape = (c.latent_channels, h // c.vae_scale_factor, w // c.vae_scale_factor)
    z0 = pipe.prepare_latents(num, shape, seed=seed)
    s = straightness(pipeline_velocity(pipe, prompts), z0, steps)
    one = pipe(prompts, latents=z0, num_inference_steps=1, output_type="latent").images
    many = pipe(prompts, latents=z0, num_inference_steps=steps, output_type="latent").images
    return {"straightness": s, f"one_vs_{steps}_step_mse": float(((one - many) ** 2).mean()),
            "num": num, "steps": steps}


def fid_hook(real: torch.Tensor, fake: torch.Tensor) -> float | None:
    """FID with torchmetrics' Inception features when installed and its weights are available, else None (with
    a message). ``real``/``fake``: uint8 NCHW images."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=2048)
    except Exception as e:  # noqa: BLE001 - missing package or weights (downloaded on first use)
        print(f"FID skipped: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__} "
              "(pip install 'torchmetrics[image]' and cache its Inception weights)", file=sys.stderr)
        return None
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


def clip_score_hook(images: torch.Tensor, prompts: Sequence[str],
                    model: str = "openai/clip-vit-large-patch14") -> float | None:
    """CLIP score with torchmetrics when installed and the CLIP weights are in the Hugging Face cache, else None
    (with a message). ``images``: uint8 NCHW."""
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore

        metric = CLIPScore(model_name_or_path=model)
    except Exception as e:  # noqa: BLE001 - missing package or weights
        print(f"CLIP score skipped: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__} "
              f"(pip install 'torchmetrics[multimodal]' and cache {model})", file=sys.stderr)
        return None
    return float(metric(images, list(prompts)))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.metrics", description=description(__doc__))
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--treat-as-flow", action="store_true")
    a = p.parse_args(argv)

    def job() -> None:
        if a.num < 1 or a.steps < 1:  # before any model is loaded
            raise TrainError(f"--num and --steps must be >= 1, got {a.num} and {a.steps}")
        pipe = Pipeline.from_pretrained(a.ckpt, treat_as_flow=a.treat_as_flow)
        print(json.dumps(evaluate(pipe, load_prompts(a.prompts), a.num, a.steps, a.seed), indent=2))

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
