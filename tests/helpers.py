"""Helpers shared by test modules (tests/ is on sys.path under pytest)."""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def assert_threads_match_sequential(pipe: Any, jobs: list[dict], threads: int = 4, tol: float = 0.0) -> None:
    """``pipe(**job)`` for every job from ``threads`` threads at once gives the images of sequential calls (the
    embedding cache is cleared before each pass so that both do the same work)."""
    pipe.clear_cache()
    with ThreadPoolExecutor(threads) as pool:
        parallel = list(pool.map(lambda kw: pipe(**kw).images, jobs))
    pipe.clear_cache()
    sequential = [pipe(**kw).images for kw in jobs]
    for a, b in zip(parallel, sequential):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def install_fake_tensorrt(monkeypatch: Any, version: str = "11.1.0") -> Any:
    """The TensorRT (API surface ``version``) and cuda-python stand-ins of tests/fake_tensorrt.py, plus
    torch.cuda's stream surface."""
    import sys

    import fake_tensorrt as fake

    import export.trt as export_trt
    from runtime.backends import graphs, tensorrt_backend

    if HAVE_TRT:
        pytest.skip("the real TensorRT is here")
    fake.use(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    for module in (graphs, tensorrt_backend):
        monkeypatch.setattr(module, "cudart", lambda: fake.cudart)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "Stream", fake.FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", fake.fake_stream_context)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: fake.DEFAULT_STREAM)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: fake.flush())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    monkeypatch.setattr(export_trt, "_engine_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(tensorrt_backend.TensorRTBackend, "runs_on", staticmethod(lambda device: True))
    fake.LOG.clear()
    fake.PENDING.clear()
    fake.CAPTURING.clear()
    fake.INVALIDATED.clear()
    return fake


def make_lora(ckpt, folder, text_encoder: bool = True, seed: int = 0):
    """A random LoRA for ``ckpt``'s UNet (attention projections) and text encoder, in diffusers' file layout."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from runtime.checkpoints import resolve
    from runtime.models import load_components

    c = load_components(resolve(ckpt))
    torch.manual_seed(seed)
    c.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                  target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = {"unet_lora_layers": get_peft_model_state_dict(c.unet),  # with its config: alpha 8 on rank 4
              "unet_lora_adapter_metadata": c.unet.peft_config["default"].to_dict()}
    if text_encoder:  # through peft itself (transformers' add_adapter asks for a newer peft than PyPI has here)
        from peft import inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                           target_modules=["q_proj", "v_proj"]), c.text_encoder)
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(c.text_encoder)
        layers["text_encoder_lora_adapter_metadata"] = c.text_encoder.peft_config["default"].to_dict()
    StableDiffusionLoraLoaderMixin.save_lora_weights(folder, **layers)
    return folder / "pytorch_lora_weights.safetensors"
