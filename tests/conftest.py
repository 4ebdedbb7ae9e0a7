"""Shared fixtures: tiny checkpoints built offline, no network, GPU tests skipped without CUDA."""

from __future__ import annotations

import os

import pytest

# No test may reach the network: the hub is offline for the whole session.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from runtime.builders import TinySpec, write_tiny_checkpoint  # noqa: E402

#: Deliberately unusual shapes: non-square latents, 3 latent channels, a 7-token window, hidden size 24,
#: VAE scale factor 2 and a non-default scaling factor. Nothing in the runtime may assume SD's numbers.
ODD_SPEC = TinySpec(sample_size=(6, 10), latent_channels=3, unet_channels=(16, 32), attention_head_dim=4,
                    text_hidden=24, text_heads=3, max_length=7, vae_channels=(8, 16), scaling_factor=0.5)


def pytest_collection_modifyitems(config, items):
    import torch

    gpu = torch.cuda.is_available()
    selected = config.getoption("-m") or ""
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        for tier in ("slow", "fullsize"):  # opt-in tiers: minutes (slow) to an hour (fullsize) of CPU time
            if tier in item.keywords and tier not in selected:
                item.add_marker(pytest.mark.skip(reason=f"{tier}: run with -m {tier}"))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A random tiny rectified-flow checkpoint (default TinySpec: 32x32 px, 16 tokens)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=1)


@pytest.fixture(scope="session")
def odd_ckpt(tmp_path_factory):
    """A rectified flow with unusual shapes (see ODD_SPEC)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "odd", ODD_SPEC, seed=2)


@pytest.fixture(scope="session")
def sd_style_ckpt(tmp_path_factory):
    """A diffusion-type checkpoint (model_index names StableDiffusionPipeline)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "sd", seed=3,
                                 class_name="StableDiffusionPipeline")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_ckpt):
    from runtime import Pipeline

    return Pipeline.from_pretrained(tiny_ckpt, device="cpu", backend="torch")  # the eager reference


@pytest.fixture(scope="session")
def odd_pipe(odd_ckpt):
    from runtime import Pipeline

    return Pipeline.from_pretrained(odd_ckpt, device="cpu", backend="torch")  # the eager reference
