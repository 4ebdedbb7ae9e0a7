"""The rectified-flow ODE: the ONE place for the time and sign conventions.

Convention (official InstaFlow / 2-Rectified-Flow code; ARCHITECTURE.md, "Conventions"):

* flow time ``t`` runs from 0 (noise ``X0 ~ N(0, I)``) to 1 (image latent ``X1``);
* the UNet is given the time ``1000 * (1 - t)``: 1000 at the noise end, like a diffusion model at its start;
* the UNet output is the velocity ``v ~ X1 - X0`` (points from noise to image: the opposite sign of SD3/FLUX and of
  diffusers' ``FlowMatchEulerDiscreteScheduler``);
* an N-step Euler sampler visits ``t_i = i / N`` and updates ``x <- x + (1/N) * v(x, 1000 * (1 - t_i))``;
* classifier-free guidance mixes velocities, ``v = v_uncond + w * (v_cond - v_uncond)``, and is on only when
  ``w > 1`` (as in the official pipeline).

Training uses the same convention: ``Xt = t * X1 + (1 - t) * X0``, target ``X1 - X0``, UNet time ``1000 * (1 - t)``.
"""

from __future__ import annotations

from typing import Callable

import torch

#: UNet time at the noise end of the trajectory (flow time t = 0).
T_MAX = 1000.0

#: ``(latents, UNet time in [0, 1000]) -> velocity`` (already guided): what :func:`sample` integrates.
UnetTimeVelocity = Callable[[torch.Tensor, float], torch.Tensor]
#: ``(latents [B, C, h, w], UNet times [B]) -> velocity``: a network call with its conditioning bound.
Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def unet_time(t: float | torch.Tensor) -> float | torch.Tensor:
    """UNet time input for flow time ``t`` (0 = noise, 1 = image): ``1000 * (1 - t)``."""
    return T_MAX * (1.0 - t)


def time_grid(num_steps: int) -> list[float]:
    """UNet times of an ``num_steps``-step Euler sampler: ``[(1 - i/N) * 1000 for i in range(N)]``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return [(1.0 - i / num_steps) * T_MAX for i in range(num_steps)]


def uses_cfg(guidance_scale: float) -> bool:
    """Classifier-free guidance is applied only when ``guidance_scale > 1`` (official pipeline behaviour)."""
    return guidance_scale > 1.0


def guided(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free-guided velocity ``v_uncond + w * (v_cond - v_uncond)``."""
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, dt: float) -> torch.Tensor:
    """One Euler step along the flow, from noise towards the image: ``x + dt * v``."""
    return latents + dt * velocity


#: a sampler's path: ``(flow time, latents)`` for each point visited, noise first
Trajectory = list[tuple[float, torch.Tensor]]


def sample(velocity: UnetTimeVelocity, latents: torch.Tensor, num_steps: int,
           trajectory: Trajectory | None = None) -> torch.Tensor:
    """Integrate the flow from noise ``latents`` (t = 0) to t = 1 with ``num_steps`` Euler steps.

    ``velocity(x, t_unet)`` returns the (already guided) velocity at ``x`` for UNet time ``t_unet``. A
    ``trajectory`` list receives the ``num_steps + 1`` points visited with their flow times, the start included.
    """
    dt = 1.0 / num_steps
    if trajectory is not None:
        trajectory.append((0.0, latents))
    for i, t in enumerate(time_grid(num_steps)):
        latents = euler_step(latents, velocity(latents, t), dt)
        if trajectory is not None:
            trajectory.append(((i + 1) / num_steps, latents))
    return latents


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Point ``Xt = t * X1 + (1 - t) * X0`` of the straight path; ``t`` broadcasts over the batch dimension."""
    t = t.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return t * x1 + (1.0 - t) * x0


def velocity_target(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Regression target of a rectified flow on the pair (X0, X1): ``X1 - X0``."""
    return x1 - x0


# ------------------------------------------------------------------------------------------- one step + decode
def one_step_latents(network: Network, noise: torch.Tensor, t_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """InstaFlow's one step: ``X0 + v(X0, 1000)``, a single Euler step over the whole flow (``dt = 1``)."""
    t = torch.full((noise.shape[0],), time_grid(1)[0], device=noise.device, dtype=t_dtype)
    return euler_step(noise, network(noise, t), 1.0)


def vae_input(latents: torch.Tensor, scaling_factor: float, shift_factor: float = 0.0) -> torch.Tensor:
    """Flow latents -> what the VAE decoder takes: ``latents / scaling_factor + shift_factor``."""
    return latents / scaling_factor + shift_factor


def to_unit_range(decoded: torch.Tensor) -> torch.Tensor:
    """VAE decoder output in about [-1, 1] -> image in [0, 1] (clamped)."""
    return (decoded / 2 + 0.5).clamp(0, 1)


def one_step_image(network: Network, decode: Callable[[torch.Tensor], torch.Tensor], noise: torch.Tensor,
                   scaling_factor: float, shift_factor: float = 0.0,
                   t_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole one-step hot path: noise -> one Euler step -> VAE decode -> image in [0, 1]. The fused CUDA graph
    of the torch backend and the exported ``onestep`` graph are this function."""
    latents = one_step_latents(network, noise, t_dtype)
    return to_unit_range(decode(vae_input(latents, scaling_factor, shift_factor)))
