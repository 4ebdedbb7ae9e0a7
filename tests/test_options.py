"""Every combination of the torch backend's options works or is refused in one line: the VAE decoder (the
checkpoint's or a tiny one), fused QKV projections, channels-last, LoRAs (at load and loaded later), CUDA graphs
(refused on the CPU) and torch.compile (one process compiles, the next loads Inductor's cache). The CUDA-graph
combinations run in tests/test_gpu.py."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime import BackendUnavailableError, Pipeline
from runtime.builders import TinySpec, write_tiny_checkpoint, write_tiny_decoder

ROOT = Path(__file__).resolve().parents[1]

#: small enough that torch.compile of UNet and decoder takes seconds to tens of seconds on the CPU
MICRO = TinySpec(sample_size=4, unet_channels=(8, 16), attention_head_dim=4, unet_groups=4, text_hidden=16,
                 text_layers=1, text_heads=2, vae_channels=(8, 8), vae_groups=4, max_length=8)


@pytest.fixture(scope="module")
def parts(tmp_path_factory, request):
    """A micro checkpoint, a tiny decoder that fits it, and a LoRA for it."""
    root = tmp_path_factory.mktemp("options")
    ckpt = write_tiny_checkpoint(root / "micro", MICRO, seed=3)
    decoder = write_tiny_decoder(root / "taesd", latent_channels=4, scale_factor=2, channels=8, seed=4)
    pytest.importorskip("peft", reason="LoRAs need peft (the lora extra; dev installs it)")
    from helpers import make_lora

    lora = make_lora(ckpt, root / "lora")
    return ckpt, decoder, lora


PROMPTS = ["a red circle", "a cat"]
CALLS = [dict(), dict(num_inference_steps=2, guidance_scale=1.5, negative_prompt="blurry")]


def _images(pipe: Pipeline) -> list[torch.Tensor]:
    return [pipe(PROMPTS, seed=1, output_type="pt", **kw).images for kw in CALLS]


@pytest.mark.parametrize("tiny_vae, fuse_qkv, channels_last, lora",
                         list(itertools.product([False, True], repeat=4)))
def test_every_cpu_combination_matches_eager(parts, tiny_vae, fuse_qkv, channels_last, lora):
    """16 combinations, each against the eager pipeline with the same decoder and LoRA; the LoRA given at load and
    the LoRA loaded later give the same images; cuda_graph=True is one line on the CPU."""
    ckpt, decoder, lora_file = parts
    vae = decoder if tiny_vae else None
    loras = [(lora_file, 0.8)] if lora else None
    reference = _images(Pipeline.from_pretrained(ckpt, vae=vae, lora=loras, backend="torch"))
    pipe = Pipeline.from_pretrained(ckpt, vae=vae, lora=loras, backend="torch", fuse_qkv=fuse_qkv,
                                    channels_last=channels_last)
    for a, b in zip(_images(pipe), reference):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if lora:  # the same LoRA loaded after the options were applied
        later = Pipeline.from_pretrained(ckpt, vae=vae, backend="torch", fuse_qkv=fuse_qkv,
                                         channels_last=channels_last)
        later.load_lora(lora_file, 0.8)
        for a, b in zip(_images(later), reference):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="^cuda_graph=True needs a CUDA device$"):
            Pipeline.from_pretrained(ckpt, vae=vae, lora=loras, backend="torch", fuse_qkv=fuse_qkv,
                                     channels_last=channels_last, cuda_graph=True)


_COMPILED = """
import json, sys, torch
from torch._dynamo.utils import counters
from runtime import Pipeline
ckpt, vae, lora = sys.argv[1:4]
pipe = Pipeline.from_pretrained(ckpt, vae=vae, lora=[(lora, 0.8)], backend="torch", compile=True, fuse_qkv=True,
                                channels_last=True)
image = pipe(["a red circle", "a cat"], seed=1, output_type="pt").images
torch.save(image, sys.argv[4])
print(json.dumps({"cache": str(pipe.backend.compile_cache), "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


def test_compile_with_every_option_compiles_once_per_machine(parts, tmp_path):
    """torch.compile with the tiny decoder, a LoRA, fused QKV and channels-last gives the eager image; the first
    process fills the compile cache in the project's cache folder (per torch version and device), and a second,
    fresh process finds everything there (no Inductor cache miss)."""
    ckpt, decoder, lora_file = parts
    env = {**os.environ, "INSTAFLOW_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    runs = []
    for i in range(2):
        r = subprocess.run([sys.executable, "-c", _COMPILED, str(ckpt), str(decoder), str(lora_file),
                            str(tmp_path / f"{i}.pt")], capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert Path(first["cache"]).parent == tmp_path / "cache" / "compile" and first["cache"] == second["cache"]
    assert first["misses"] > 0 and second["misses"] == 0 and second["hits"] >= first["misses"]
    reference = Pipeline.from_pretrained(ckpt, vae=decoder, lora=[(lora_file, 0.8)], backend="torch")
    expected = reference(PROMPTS, seed=1, output_type="pt").images
    for i in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"{i}.pt"), expected, atol=1e-4, rtol=1e-4)


def test_pipelines_sharing_fused_modules_keep_their_weights(parts):
    """A second pipeline over modules that are fused already (a benchmark's eager twin, a service's per-size
    pipelines) must not fuse them again: that replaces every fused projection with new tensors, and the CUDA graphs
    or compiled code of the first pipeline keep reading the old ones (on an H200 they read freed memory: NaN)."""
    ckpt, _, _ = parts
    first = Pipeline.from_pretrained(ckpt, device="cpu", backend="torch", fuse_qkv=True)
    comps = first.components
    fused = {n: p for n, p in comps.unet.named_parameters() if "to_qkv" in n or "to_kv" in n}
    assert fused  # the micro UNet has attention, so there is something to keep
    before = first(PROMPTS, seed=1, output_type="pt").images
    Pipeline(comps, device="cpu", fuse_qkv=True)
    after = {n: p for n, p in comps.unet.named_parameters() if "to_qkv" in n or "to_kv" in n}
    assert all(after[n] is p for n, p in fused.items())  # the same tensors, not copies
    assert torch.equal(first(PROMPTS, seed=1, output_type="pt").images, before)


def test_autotune_reaches_torch_compile_and_needs_it(parts, monkeypatch):
    """``autotune=True`` hands Inductor's autotuning settings (runtime.inductor, shared with export.aoti) to both
    compiled modules; without ``compile=True`` it is refused in one line, and ``auto`` passes it on to torch."""
    from runtime import InvalidInputError
    from runtime.inductor import autotune_settings

    ckpt, _, _ = parts
    with pytest.raises(InvalidInputError, match="^autotune=True tunes what torch.compile compiles: pass compile"):
        Pipeline.from_pretrained(ckpt, device="cpu", backend="torch", autotune=True)
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    pipe = Pipeline.from_pretrained(ckpt, device="cpu", compile=True, autotune=True)
    assert pipe.backend.name == "torch" and len(seen) == 2
    assert all(kw["options"] == autotune_settings(torch.device("cpu")) for kw in seen)
    seen.clear()
    Pipeline.from_pretrained(ckpt, device="cpu", backend="torch", compile=True)
    assert [kw["options"] for kw in seen] == [None, None]


@pytest.mark.parametrize("backend, options, message", [
    ("torch", {"compile": "false"}, "^compile must be True or False, got 'false'"),
    ("auto", {"fuse_qkv": 1}, "^fuse_qkv must be True or False, got 1"),
    ("auto", {"cuda_graph": "no"}, "^cuda_graph must be True or False, got 'no'"),
    ("torch", {"max_graphs": 0}, "^max_graphs must be a positive int, got 0 \\(None for the default\\)"),
    ("torch", {"max_graphs": True}, "^max_graphs must be an int, got True"),
    ("onnxruntime", {"threads": "4"}, "^threads must be an int, got '4'"),
])
def test_option_values_of_the_wrong_kind_are_one_line(parts, backend, options, message):
    """A flag is True or False (a config file's string "false" would otherwise switch compile on), a count a
    positive int: refused before anything is built, in one line."""
    from runtime import InstaFlowError

    ckpt, _, _ = parts
    with pytest.raises(InstaFlowError, match=message):
        Pipeline.from_pretrained(ckpt, device="cpu", backend=backend, **options)


def test_option_values_that_are_right_pass(parts):
    """numpy's ints and bools are ints and bools; None is every option's default (as if left out)."""
    import numpy as np

    ckpt, _, _ = parts
    pipe = Pipeline.from_pretrained(ckpt, device="cpu", backend="torch", fuse_qkv=np.bool_(True), channels_last=False,
                                    max_graphs=np.int64(4))
    assert pipe.backend.name == "torch" and pipe.backend.fuse_qkv
    default = Pipeline.from_pretrained(ckpt, device="cpu", cuda_graph=None, compile=None, channels_last=None)
    assert default.backend.name == "torch" and not default.backend.cuda_graph  # auto's CPU defaults
    assert default.components.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_autotune_settings_are_options_torch_compile_takes(device):
    """torch.compile checks the names and types of its Inductor options when called (no compilation): both devices'
    settings pass, and a misspelt one would not."""
    from runtime.inductor import autotune_settings

    assert torch.compile(torch.nn.Identity(), options=autotune_settings(torch.device(device))) is not None
    with pytest.raises(RuntimeError):
        torch.compile(torch.nn.Identity(), options={"max_autotun": True})
