"""LoRA adapters fused into the weights: the output of peft's unfused adapters, bit-exact unloading, exports that
record them, and one line for every misfit."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from runtime import CheckpointError, ExportError, InvalidInputError, Pipeline
from runtime.checkpoints import resolve
from runtime.models import load_components

peft = pytest.importorskip("peft", reason="LoRAs need peft (the lora extra; dev installs it)")

from helpers import make_lora  # noqa: E402


@pytest.fixture(scope="module")
def lora_file(tiny_ckpt, tmp_path_factory):
    return make_lora(tiny_ckpt, tmp_path_factory.mktemp("lora"))


def peft_reference(ckpt, lora, scale, prompt, **kwargs):
    """The same LoRA left unfused in peft's layers, scaled by peft."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader
    from diffusers.utils.peft_utils import scale_lora_layers

    c = load_components(resolve(ckpt))
    state, alphas, metadata = Loader.lora_state_dict(str(lora), return_lora_metadata=True)
    Loader.load_lora_into_unet({k: v for k, v in state.items() if k.startswith("unet.")}, alphas, c.unet,
                               adapter_name="ref", metadata=metadata)
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    te = {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")}
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]),  # make_lora's
                            c.text_encoder, adapter_name="ref")
    set_peft_model_state_dict(c.text_encoder, te, adapter_name="ref")
    scale_lora_layers(c.unet, scale)
    scale_lora_layers(c.text_encoder, scale)
    return Pipeline(c, device="cpu")(prompt, output_type="pt", **kwargs).images


def test_fused_lora_is_peft_output_and_unloads_bit_for_bit(tiny_ckpt, lora_file):
    base_pipe = Pipeline.from_pretrained(tiny_ckpt)
    base = base_pipe("a cat", seed=0, output_type="pt").images
    styled = Pipeline.from_pretrained(tiny_ckpt, lora=(lora_file, 0.7))
    assert [(x["scale"], x["layers"]) for x in styled.loras] == [(0.7, {"unet": 32, "text_encoder": 4})]
    for kwargs in (dict(seed=0), dict(seed=1, num_inference_steps=3, guidance_scale=1.5, negative_prompt="dog")):
        ours = styled("a cat", output_type="pt", **kwargs).images
        torch.testing.assert_close(ours, peft_reference(tiny_ckpt, lora_file, 0.7, "a cat", **kwargs),
                                   atol=1e-5, rtol=1e-5)
    assert (styled("a cat", seed=0, output_type="pt").images - base).abs().max() > 1e-3
    assert not any("lora" in type(m).__name__.lower() for m in styled.components.unet.modules())  # no peft left
    weights = {k: v.clone() for k, v in base_pipe.components.unet.state_dict().items()}
    base_pipe("a cat", seed=0)  # fills the embedding cache: the text encoder's LoRA must clear it
    addresses = {k: v.data_ptr() for k, v in base_pipe.components.unet.state_dict().items()}
    base_pipe.load_lora(lora_file, 0.7)
    torch.testing.assert_close(base_pipe("a cat", seed=0, output_type="pt").images,
                               styled("a cat", seed=0, output_type="pt").images, atol=1e-6, rtol=1e-6)
    # the same tensors, changed in place: captured CUDA graphs and compiled modules see the new weights
    assert addresses == {k: v.data_ptr() for k, v in base_pipe.components.unet.state_dict().items()}
    base_pipe.load_lora(str(lora_file.parent), 0.3)  # a folder; two LoRAs add up
    assert len(base_pipe.loras) == 2
    base_pipe.unload_lora()
    assert all(torch.equal(v, base_pipe.components.unet.state_dict()[k]) for k, v in weights.items())
    assert torch.equal(base_pipe("a cat", seed=0, output_type="pt").images, base) and base_pipe.loras == []


def test_lora_misfits_are_one_line(tiny_ckpt, odd_ckpt, lora_file, tmp_path):
    odd_lora = make_lora(odd_ckpt, tmp_path / "odd", text_encoder=False)
    pipe = Pipeline.from_pretrained(tiny_ckpt)
    before = pipe("a cat", seed=0, output_type="pt").images
    with pytest.raises(CheckpointError, match=r"does not fit this checkpoint's unet") as info:
        pipe.load_lora(odd_lora)
    assert "\n" not in str(info.value)
    assert torch.equal(pipe("a cat", seed=0, output_type="pt").images, before)  # nothing half-applied
    (tmp_path / "x.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="safetensors only"):
        pipe.load_lora(tmp_path / "x.bin")
    with pytest.raises(CheckpointError, match="LoRA not found"):
        pipe.load_lora(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="scale must be a finite number"):
        pipe.load_lora(lora_file, float("nan"))
    from safetensors.torch import save_file

    save_file({"some.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"other.safetensors"):
        pipe.load_lora(tmp_path / "other.safetensors")


def test_export_with_loras_fused(tiny_ckpt, lora_file, tmp_path, capsys):
    """`export.onnx --lora FILE:SCALE` exports fused weights, verified against the fused PyTorch model; the manifest
    records the LoRAs; onnxruntime runs it only for a pipeline asking for the same ones."""
    from export.onnx import main

    out = tmp_path / "e"
    assert main(["--ckpt", str(tiny_ckpt), "-o", str(out), "--fused", "--lora", f"{lora_file}:0.7"]) == 0
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["verification"]["passed"] and [x["scale"] for x in doc["loras"]] == [0.7]
    ort = Pipeline.from_pretrained(tiny_ckpt, backend="onnxruntime", export_dir=out, lora=(lora_file, 0.7))
    torch.testing.assert_close(ort("a cat", seed=2, output_type="pt").images,
                               Pipeline.from_pretrained(tiny_ckpt, lora=(lora_file, 0.7))(
                                   "a cat", seed=2, output_type="pt").images, atol=1e-4, rtol=1e-4)
    with pytest.raises(ExportError, match=r"holds the LoRAs \[pytorch_lora_weights.safetensors:0.7\], not \[\]; "
                                          r"re-export it without --lora"):
        Pipeline.from_pretrained(tiny_ckpt, backend="onnxruntime", export_dir=out)
    with pytest.raises(InvalidInputError, match="the onnxruntime backend runs an export: fuse LoRAs into it"):
        ort.load_lora(lora_file)


def test_cli_lora(tiny_ckpt, lora_file, tmp_path):
    from PIL import Image

    from runtime.__main__ import main

    assert main(["a cat", "--ckpt", str(tiny_ckpt), "--lora", f"{lora_file}:0.5", "-o", str(tmp_path / "a.png")]) == 0
    ref = Pipeline.from_pretrained(tiny_ckpt, lora=[(lora_file, 0.5)])("a cat", seed=0).images[0]
    assert list(Image.open(tmp_path / "a.png").getdata()) == list(ref.getdata())


def test_lora_after_fused_qkv_reaches_the_fused_projections(tiny_ckpt, lora_file):
    """fuse_qkv (part of the GPU default) concatenates query/key/value weights into to_qkv/to_kv and runs those: a
    LoRA loaded later is written into them too (in place), so the image is the unfused LoRA pipeline's, and
    unloading restores the base image bit for bit."""
    pipe = Pipeline(copy.deepcopy(load_components(resolve(tiny_ckpt))), device="cpu", fuse_qkv=True)
    base = pipe("a cat", seed=0, output_type="pt").images
    qkv = [m.to_qkv.weight for m in pipe.components.unet.modules() if getattr(m, "fused_projections", False)
           and hasattr(m, "to_qkv")]
    addresses = [w.data_ptr() for w in qkv]
    pipe.load_lora(lora_file, 0.7)
    styled = Pipeline.from_pretrained(tiny_ckpt, lora=(lora_file, 0.7), backend="torch")
    torch.testing.assert_close(pipe("a cat", seed=0, output_type="pt").images,
                               styled("a cat", seed=0, output_type="pt").images, atol=1e-5, rtol=1e-5)
    assert qkv and [w.data_ptr() for w in qkv] == addresses  # written in place: CUDA graphs stay valid
    pipe.unload_lora()
    assert torch.equal(pipe("a cat", seed=0, output_type="pt").images, base)


def test_refittable_engines_take_other_loras_without_a_rebuild(monkeypatch, tiny_ckpt, lora_file, tmp_path):
    """`export.trt --refittable`: a later run with other LoRAs refits the engines whose weights changed (text
    encoder, UNet, one-step) from the new ONNX graphs instead of rebuilding them, on the TensorRT 11 stand-ins
    (whose engines keep their build-time weights, as real ones do); an engine built without REFIT is one line."""
    from helpers import install_fake_tensorrt

    from export.trt import build, refit_engine
    from runtime.backends.tensorrt_backend import TensorRTBackend
    from runtime.lora import with_loras

    fake = install_fake_tensorrt(monkeypatch, "11.1.0")
    try:
        def run(scale, folder, refittable=True):
            fake.LOG.clear()
            engines = build(str(tiny_ckpt), folder, max_batch=1, static=True, refittable=refittable,
                            lora=[(lora_file, scale)])
            checkpoint = with_loras(resolve(tiny_ckpt), [(lora_file, scale)])
            backend = TensorRTBackend(checkpoint, folder, device=torch.device("cpu"), dtype=torch.float32)
            pipe = Pipeline(load_components(checkpoint, weights=False), device="cpu", backend=backend)
            ref = Pipeline.from_pretrained(tiny_ckpt, lora=(lora_file, scale), device="cpu", backend="torch")
            a, b = (p("a cat", seed=4, output_type="pt").images for p in (pipe, ref))
            assert (a - b).abs().max() < 3e-2, (scale, float((a - b).abs().max()))
            return engines, [e for e, _ in fake.LOG if e in ("build", "refit")]

        _, events = run(0.7, tmp_path / "r")
        assert events == ["build"] * 4
        engines, events = run(0.2, tmp_path / "r")
        assert sorted(events) == ["refit"] * 3  # the decoder's graph did not change: kept
        assert [x["scale"] for x in engines.source.loras] == [0.2] and all(e.refittable
                                                                           for e in engines.components.values())
        assert len(list((tmp_path / "r").glob("unet.*.plan"))) == 1  # the replaced engine is gone
        fixed, _ = run(0.7, tmp_path / "f", refittable=False)
        with pytest.raises(ExportError, match="was not built refittable; rebuild with --refittable"):
            refit_engine(fake, tmp_path / "f" / fixed.components["unet"].file, tmp_path / "f" / "unet.onnx",
                         tmp_path / "f" / "x.plan")
    finally:
        fake.use("10.16.0")


def test_kohya_layout_reads_as_the_same_lora(tiny_ckpt, tmp_path):
    """The same UNet LoRA written in kohya's layout (lora_unet_..., lora_down/lora_up, alpha) fuses to the same
    weights as diffusers' layout: diffusers' reader converts it."""
    from safetensors.torch import load_file, save_file

    peft_file = make_lora(tiny_ckpt, tmp_path / "d", text_encoder=False)
    kohya = {}
    for key, value in load_file(str(peft_file)).items():
        module, _, kind = key.removeprefix("unet.").rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(8.0)  # lora_alpha of make_lora
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    a = Pipeline.from_pretrained(tiny_ckpt, lora=(peft_file, 0.9))
    b = Pipeline.from_pretrained(tiny_ckpt, lora=(tmp_path / "kohya.safetensors", 0.9))
    assert b.loras[0]["layers"] == {"unet": 32}
    torch.testing.assert_close(b("a cat", seed=0, output_type="pt").images, a("a cat", seed=0, output_type="pt").images,
                               atol=1e-5, rtol=1e-5)
