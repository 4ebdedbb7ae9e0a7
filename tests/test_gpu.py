"""GPU-only checks (skipped without CUDA; nothing touches CUDA at import)."""

from __future__ import annotations

import pytest
import torch

from runtime import Pipeline

pytestmark = pytest.mark.gpu


def test_fp16_cuda_matches_fp32_cpu(tiny_ckpt):
    cpu = Pipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)
    gpu = Pipeline.from_pretrained(tiny_ckpt, device="cuda", dtype=torch.float16)
    prompts = ["a red circle at the top left", "a small blue square"]
    ref = cpu(prompts, seed=0, output_type="pt").images
    out = gpu(prompts, seed=0, output_type="pt").images.cpu()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rel = (out - ref).norm() / ref.norm()
    assert rel < 1e-2, f"fp16 CUDA vs fp32 CPU relative error {rel:.2e}"


def test_cuda_seed_noise_equals_cpu_noise(tiny_ckpt):
    gpu = Pipeline.from_pretrained(tiny_ckpt, device="cuda")
    cpu = Pipeline.from_pretrained(tiny_ckpt, device="cpu")
    a = gpu.prepare_latents(3, (4, 8, 8), seed=5).cpu()
    b = cpu.prepare_latents(3, (4, 8, 8), seed=5)
    assert torch.equal(a, b)
