"""The tiny VAE decoder (TAESD, diffusers' AutoencoderTiny): diffusers' latent convention, through torch, the ONNX
export, onnxruntime and the TensorRT stand-ins; exports record their decoder; every mismatch is one line."""

from __future__ import annotations

import json

import pytest
import torch

from runtime import CheckpointError, ExportError, Pipeline
from runtime.builders import write_tiny_decoder


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    """A random AutoencoderTiny for the tiny checkpoints (4 latent channels, 4x)."""
    return write_tiny_decoder(tmp_path_factory.mktemp("dec") / "taesd-tiny", latent_channels=4, scale_factor=4)


@pytest.fixture(scope="module")
def odd_decoder(tmp_path_factory):
    """An unusual one, for the odd checkpoint: 3 latent channels, 2x."""
    return write_tiny_decoder(tmp_path_factory.mktemp("dec") / "taesd-odd", latent_channels=3, scale_factor=2,
                              seed=1)


def reference(folder, decoder_folder, prompt, steps, guidance, noise):
    """InstaFlow's loop with the decoding of diffusers' own pipelines for an AutoencoderTiny:
    ``vae.decode(latents / vae.config.scaling_factor)``, output in [-1, 1]."""
    from diffusers import AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    te = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = AutoencoderTiny.from_pretrained(decoder_folder).eval()

    def encode(texts):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return te(ids)[0]

    with torch.no_grad():
        emb = torch.cat([encode([""]), encode([prompt])]) if guidance > 1 else encode([prompt])
        latents = noise.clone()
        for i in range(steps):
            x = torch.cat([latents] * 2) if guidance > 1 else latents
            v = unet(x, torch.full((x.shape[0],), (1 - i / steps) * 1000.0), encoder_hidden_states=emb).sample
            if guidance > 1:
                v = v[:1] + guidance * (v[1:] - v[:1])
            latents = latents + v / steps
        image = vae.decode(latents / vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("which", ["tiny", "odd"])
def test_tiny_decoder_matches_diffusers_convention(which, request):
    ckpt = request.getfixturevalue(f"{which}_ckpt")
    decoder = request.getfixturevalue(f"{which}_decoder")
    pipe = Pipeline.from_pretrained(ckpt, vae=decoder)
    assert pipe.components.scaling_factor == 1.0 and type(pipe.components.vae).__name__ == "AutoencoderTiny"
    c = pipe.components
    h, w = c.default_size
    noise = torch.randn(1, c.latent_channels, h // c.vae_scale_factor, w // c.vae_scale_factor,
                        generator=torch.Generator().manual_seed(3))
    for steps, guidance in ((1, 0.0), (3, 1.5)):
        ours = pipe("a red circle", latents=noise, num_inference_steps=steps, guidance_scale=guidance,
                    output_type="pt").images
        torch.testing.assert_close(ours, reference(ckpt, decoder, "a red circle", steps, guidance, noise),
                                   atol=1e-5, rtol=1e-5)
    plain = Pipeline.from_pretrained(ckpt)("a red circle", latents=noise, output_type="pt").images
    assert (plain - ours).abs().max() > 1e-2  # another decoder: another image


def test_decoder_mismatches_are_one_line(tiny_ckpt, odd_decoder, tmp_path):
    with pytest.raises(CheckpointError, match=r"takes 3 latent channels, .*UNet makes 4"):
        Pipeline.from_pretrained(tiny_ckpt, vae=odd_decoder)
    wide = write_tiny_decoder(tmp_path / "x8", latent_channels=4, scale_factor=8)
    with pytest.raises(CheckpointError, match=r"upsamples 8x, .*VAE 4x: images would change size"):
        Pipeline.from_pretrained(tiny_ckpt, vae=wide)
    with pytest.raises(CheckpointError, match=r"holds a AutoencoderKL, not an AutoencoderTiny"):
        Pipeline.from_pretrained(tiny_ckpt, vae=tiny_ckpt / "vae")
    with pytest.raises(CheckpointError, match=r"madebyollin/taesd.* not in the Hugging Face cache"):
        Pipeline.from_pretrained(tiny_ckpt, vae="taesd")  # offline here: one line naming the hub id
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    (tmp_path / "pickled" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="loads safetensors only"):
        Pipeline.from_pretrained(tiny_ckpt, vae=tmp_path / "pickled")


def test_export_with_the_tiny_decoder_and_onnxruntime(tiny_ckpt, tiny_decoder, tmp_path, capsys):
    """`export.onnx --vae` exports the decoder and the fused graph with it (verified), records it, and the
    onnxruntime backend runs it only for a pipeline asking for the same decoder; a re-export without it keeps the
    text encoder and UNet graphs."""
    from export.onnx import ExportSettings, export, main

    out = tmp_path / "e"
    doc = export(str(tiny_ckpt), out, ExportSettings(fused=True), vae=str(tiny_decoder))
    assert doc.verification.passed and doc.source.decoder["class"] == "AutoencoderTiny"
    assert doc.source.scaling_factor == 1.0
    ort = Pipeline.from_pretrained(tiny_ckpt, backend="onnxruntime", export_dir=out, vae=tiny_decoder)
    ref = Pipeline.from_pretrained(tiny_ckpt, vae=tiny_decoder)
    for kwargs in (dict(), dict(num_inference_steps=2, guidance_scale=1.5)):
        torch.testing.assert_close(ort("a cat", seed=1, output_type="pt", **kwargs).images,
                                   ref("a cat", seed=1, output_type="pt", **kwargs).images, atol=1e-4, rtol=1e-4)
    with pytest.raises(ExportError, match=r"was exported with .*taesd-tiny \(AutoencoderTiny\) as its decoder, not "
                                          r"the checkpoint's own VAE; re-export it without --vae") as info:
        Pipeline.from_pretrained(tiny_ckpt, backend="onnxruntime", export_dir=out)
    assert "\n" not in str(info.value)
    assert Pipeline.from_pretrained(tiny_ckpt, backend="auto", export_dir=out).backend.name == "torch"  # not ours
    capsys.readouterr()
    assert main(["--ckpt", str(tiny_ckpt), "-o", str(out), "--fused"]) == 0
    log = capsys.readouterr().out
    assert "text_encoder: cached" in log and "unet: cached" in log and "vae_decoder: vae_decoder.onnx" in log
    assert json.loads((out / "manifest.json").read_text())["decoder"]["class"] == "AutoencoderKL"
    assert Pipeline.from_pretrained(tiny_ckpt, backend="onnxruntime", export_dir=out).backend.name == "onnxruntime"


def test_cli_takes_the_tiny_decoder(tiny_ckpt, tiny_decoder, tmp_path):
    from PIL import Image

    from runtime.__main__ import main

    assert main(["a cat", "--ckpt", str(tiny_ckpt), "--vae", str(tiny_decoder), "-o", str(tmp_path / "a.png")]) == 0
    ref = Pipeline.from_pretrained(tiny_ckpt, vae=tiny_decoder)("a cat", seed=0).images[0]
    assert list(Image.open(tmp_path / "a.png").getdata()) == list(ref.getdata())


def test_engines_with_the_tiny_decoder_on_the_stand_ins(monkeypatch, tiny_ckpt, tiny_decoder, tmp_path):
    from helpers import install_fake_tensorrt

    from export.trt import build
    from runtime.backends.tensorrt_backend import TensorRTBackend
    from runtime.checkpoints import resolve
    from runtime.decoders import with_decoder
    from runtime.models import load_components

    fake = install_fake_tensorrt(monkeypatch, "11.1.0")
    try:
        engines = build(str(tiny_ckpt), tmp_path, min_batch=1, max_batch=1, static=True, vae=str(tiny_decoder))
        assert engines.source.decoder["class"] == "AutoencoderTiny"
        checkpoint = with_decoder(resolve(tiny_ckpt), tiny_decoder)
        backend = TensorRTBackend(checkpoint, tmp_path, device=torch.device("cpu"), dtype=torch.float32)
        pipe = Pipeline(load_components(checkpoint, weights=False), device="cpu", backend=backend)
        a = pipe("a cat", seed=2, output_type="pt").images
        ref = Pipeline.from_pretrained(tiny_ckpt, vae=tiny_decoder, device="cpu")
        b = ref("a cat", seed=2, output_type="pt").images
        assert (a - b).abs().max() < 3e-2
        with pytest.raises(ExportError, match="as its decoder, not the checkpoint's own VAE"):
            TensorRTBackend(resolve(tiny_ckpt), tmp_path, device=torch.device("cpu"), dtype=torch.float32)
    finally:
        fake.use("10.16.0")
