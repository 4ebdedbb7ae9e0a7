"""The torch backend's ``fast_group_norm``: the same function as ``F.group_norm`` up to rounding, in every memory
format, and the pipeline's images unchanged by it. Its speed is a GPU matter (benchmarks/test_latency.py's
``ours_1step_fast_group_norm``); its CUDA-graph run is in tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime import Pipeline
from runtime.backends.group_norm import group_norm, use_split_group_norm, uses_split_group_norm


def _input(shape: tuple[int, ...], offset: float, seed: int = 0) -> torch.Tensor:
    """Activations with a per-channel offset (GroupNorm's hard case: a mean well away from zero)."""
    g = torch.Generator().manual_seed(seed)
    channel = (shape[0], shape[1]) + (1,) * (len(shape) - 2)
    return torch.randn(shape, generator=g) * 2 + torch.randn(channel, generator=g) * offset


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("shape, groups", [((1, 64, 16, 16), 32), ((3, 24, 5, 7), 4), ((2, 8, 9, 9), 1),
                                           ((2, 6, 4, 4), 6)])
def test_float32_matches_group_norm(shape, groups, affine, channels_last):
    x = _input(shape, offset=5.0)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w, b = (torch.randn(c), torch.randn(c)) if affine else (None, None)
    y = group_norm(x, groups, w, b, 1e-6)
    ref = F.group_norm(x.double(), groups, None if w is None else w.double(), None if b is None else b.double(),
                       1e-6)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last  # the layout is kept
    assert (y.double() - ref).abs().max() < 2e-5


def test_three_dimensional_input_and_a_large_offset():
    x = _input((2, 16, 50), offset=100.0)  # mean / std about 50: E[x^2] - E[x]^2 in float32 still holds
    w, b = torch.randn(16), torch.randn(16)
    ref = F.group_norm(x.double(), 4, w.double(), b.double(), 1e-5)
    assert (group_norm(x, 4, w, b, 1e-5).double() - ref).abs().max() < 1e-3


def test_float64_and_autograd_are_handled():
    """float64 keeps its precision; with autograd recording (a GroupNorm's parameters require grad by default) the
    native function runs, so gradients flow."""
    x = _input((2, 8, 5, 5), offset=3.0).double()
    assert (group_norm(x, 4) - F.group_norm(x, 4)).abs().max() < 1e-12
    layer = torch.nn.GroupNorm(4, 8)
    group_norm(x.float(), 4, layer.weight, layer.bias).square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_bfloat16_is_as_close_as_the_native_kernel():
    """In 16 bits the error is the output's rounding, as for PyTorch's own kernel."""
    x = _input((2, 32, 12, 12), offset=5.0).to(torch.bfloat16).to(memory_format=torch.channels_last)
    w, b = torch.randn(32).to(torch.bfloat16), torch.randn(32).to(torch.bfloat16)
    exact = F.group_norm(x.double(), 8, w.double(), b.double(), 1e-5)
    ours = (group_norm(x, 8, w, b, 1e-5).double() - exact).abs().max()
    native = (F.group_norm(x, 8, w, b, 1e-5).double() - exact).abs().max()
    assert ours <= 1.5 * native + 1e-3, (ours, native)


def test_layers_switch_once_and_compute_the_same(tiny_ckpt, monkeypatch):
    from runtime.backends import group_norm as module
    from runtime.models import load_vae

    vae = load_vae(tiny_ckpt / "vae").eval()
    layers = sum(isinstance(m, torch.nn.GroupNorm) for m in vae.modules())
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = vae.decode(z, return_dict=False)[0]
    assert not uses_split_group_norm(vae)
    assert layers > 0 and use_split_group_norm(vae) == layers
    assert use_split_group_norm(vae) == 0 and uses_split_group_norm(vae)  # once
    calls = []
    monkeypatch.setattr(module, "group_norm", lambda *a, **k: calls.append(1) or group_norm(*a, **k))
    with torch.inference_mode():
        after = vae.decode(z, return_dict=False)[0]
    decoding = sum(isinstance(m, torch.nn.GroupNorm) for m in vae.decoder.modules())
    assert len(calls) == decoding > 0  # every layer decode runs takes the split version
    assert (after - before).abs().max() < 1e-4


@pytest.mark.parametrize("channels_last", [False, True])
def test_pipeline_option_keeps_the_images(tiny_ckpt, channels_last):
    plain = Pipeline.from_pretrained(tiny_ckpt, device="cpu", backend="torch")
    fast = Pipeline.from_pretrained(tiny_ckpt, device="cpu", backend="torch", fast_group_norm=True,
                                    channels_last=channels_last)
    assert uses_split_group_norm(fast.components.unet) and uses_split_group_norm(fast.components.vae)
    assert not uses_split_group_norm(plain.components.unet)  # separate modules: the other pipeline is untouched
    for kw in (dict(), dict(num_inference_steps=2, guidance_scale=1.5)):
        a = plain(["a red circle", "a cat"], seed=1, output_type="pt", **kw).images
        b = fast(["a red circle", "a cat"], seed=1, output_type="pt", **kw).images
        assert (a - b).abs().max() < 1e-4


def test_auto_takes_the_option(tiny_ckpt):
    pipe = Pipeline.from_pretrained(tiny_ckpt, device="cpu", fast_group_norm=True)
    assert pipe.backend.name == "torch" and uses_split_group_norm(pipe.components.vae)
