"""GPU-only checks (skipped without CUDA; nothing touches CUDA at import)."""

from __future__ import annotations

import pytest
import torch

from runtime import Pipeline

pytestmark = pytest.mark.gpu


def test_fp16_cuda_matches_fp32_cpu(tiny_ckpt):
    cpu = Pipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32, backend="torch")
    gpu = Pipeline.from_pretrained(tiny_ckpt, device="cuda", dtype=torch.float16)  # the default: the fast path
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


def test_cuda_graph_matches_eager(tiny_ckpt):
    # same options but the graphs, so that both run the same kernels (memory format changes cuDNN's choices)
    eager = Pipeline.from_pretrained(tiny_ckpt, device="cuda", dtype=torch.float16, channels_last=True)
    graphed = Pipeline.from_pretrained(tiny_ckpt, device="cuda", dtype=torch.float16, cuda_graph=True,
                                       channels_last=True)
    assert graphed.backend.has_one_step
    for batch in (1, 3):
        prompts = [f"a red circle {i}" for i in range(batch)]
        a = eager(prompts, seed=1, output_type="pt").images
        b = graphed(prompts, seed=1, output_type="pt").images
        c = graphed(prompts, seed=2, output_type="pt").images  # replay with new inputs, no aliasing of b
        torch.testing.assert_close(b, a, atol=2e-3, rtol=2e-3)
        assert (c - b).abs().max() > 1e-3
    assert len(graphed.backend._one_step_graphs) == 2  # one graph per (batch, size)
    assert len(graphed.backend._encode_graphs) == 2  # and one text-encoder graph per batch
    d = graphed("a red circle 0", height=64, width=32, seed=1, output_type="pt").images
    e = eager("a red circle 0", height=64, width=32, seed=1, output_type="pt").images
    torch.testing.assert_close(d, e, atol=2e-3, rtol=2e-3)


def test_the_default_on_a_gpu_is_the_fast_path(tiny_ckpt, tmp_path):
    """from_pretrained(ckpt) with no options: torch with CUDA graphs, channels-last and fused QKV; its PIL images
    (converted on the GPU, one pinned copy) are the float images rounded; NaN is still one line."""
    from runtime import NonFiniteOutputError

    pipe = Pipeline.from_pretrained(tiny_ckpt, device="cuda", export_dir=tmp_path)
    assert pipe.backend.name == "torch" and pipe.backend.cuda_graph and pipe.backend.fuse_qkv
    assert pipe.components.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    prompts = ["a red circle", "a cat", "a dog"]
    pil = pipe(prompts, seed=0).images
    pt = pipe(prompts, seed=0, output_type="pt").images
    expected = pt.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    import numpy as np

    assert [im.size for im in pil] == [(32, 32)] * 3
    assert all(np.array_equal(np.asarray(im), e) for im, e in zip(pil, expected))
    real = pipe.backend.one_step
    pipe.backend.one_step = lambda emb, noise: real(emb, noise) * float("nan")
    with pytest.raises(NonFiniteOutputError):
        pipe("a cat", seed=0)


def test_the_one_step_path_never_waits_on_the_host(tiny_ckpt):
    """From a new prompt's tokens to the image on the GPU (noise, text-encoder graph, embedding cache, one-step
    graph) nothing synchronises the host with the GPU: torch's sync debug mode raises at any implicit wait. Only the
    pinned copy of the uint8 image waits, once, after it (format_images)."""
    pipe = Pipeline.from_pretrained(tiny_ckpt, device="cuda")  # the default: CUDA graphs
    h, w = pipe.components.default_size
    pipe("a warm-up prompt", seed=0)  # captures the graphs of this shape (capturing synchronises)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        noise = pipe.prepare_latents(1, pipe.latent_shape(h, w), seed=1)
        context = pipe.encode_prompt(["a prompt the embedding cache has not seen"])
        images = pipe.one_step(context, noise)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert images.is_cuda and images.shape == (1, 3, h, w)
    ref = pipe("a prompt the embedding cache has not seen", seed=1, output_type="pt").images
    torch.testing.assert_close(images.float(), ref, atol=0, rtol=0)


@pytest.mark.parametrize("tiny_vae", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_every_cuda_graph_combination_matches_eager(tiny_ckpt, tmp_path, tiny_vae, lora):
    """CUDA graphs with every combination of the decoder, fused QKV, channels-last and a LoRA (at load, and loaded
    into the running graphs later), against the eager fp16 pipeline with the same decoder and LoRA."""
    from helpers import make_lora
    from runtime.builders import write_tiny_decoder

    vae = write_tiny_decoder(tmp_path / "taesd", scale_factor=4) if tiny_vae else None
    lora_file = make_lora(tiny_ckpt, tmp_path / "lora") if lora else None
    loras = [(lora_file, 0.8)] if lora else None
    kw = dict(device="cuda", dtype=torch.float16, vae=vae)
    ref = Pipeline.from_pretrained(tiny_ckpt, backend="torch", lora=loras, **kw)
    expected = ref(["a cat", "a dog"], seed=3, output_type="pt").images
    for fuse_qkv in (False, True):
        for channels_last in (False, True):
            options = dict(backend="torch", cuda_graph=True, fuse_qkv=fuse_qkv, channels_last=channels_last, **kw)
            pipe = Pipeline.from_pretrained(tiny_ckpt, lora=loras, **options)
            out = pipe(["a cat", "a dog"], seed=3, output_type="pt").images
            torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)
            if lora:
                later = Pipeline.from_pretrained(tiny_ckpt, **options)
                later(["a cat", "a dog"], seed=3)  # graphs captured before the LoRA: they must see the new weights
                later.load_lora(lora_file, 0.8)
                out = later(["a cat", "a dog"], seed=3, output_type="pt").images
                torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)


def test_compile_with_every_option_on_a_gpu(tiny_ckpt, tmp_path, monkeypatch):
    """The combination that crashed: torch.compile + CUDA graphs + channels-last + fused QKV + a tiny decoder (no
    attention to fuse) + a LoRA, against eager fp16."""
    from helpers import make_lora
    from runtime.builders import write_tiny_decoder

    monkeypatch.setenv("INSTAFLOW_CACHE", str(tmp_path / "cache"))
    vae = write_tiny_decoder(tmp_path / "taesd", scale_factor=4)
    loras = [(make_lora(tiny_ckpt, tmp_path / "lora"), 0.8)]
    kw = dict(device="cuda", dtype=torch.float16, vae=vae, lora=loras)
    expected = Pipeline.from_pretrained(tiny_ckpt, backend="torch", **kw)("a cat", seed=1, output_type="pt").images
    fast = Pipeline.from_pretrained(tiny_ckpt, compile=True, fuse_qkv=True, **kw)
    assert fast.backend.cuda_graph and fast.backend.compile_cache.parent == tmp_path / "cache" / "compile"
    torch.testing.assert_close(fast("a cat", seed=1, output_type="pt").images, expected, atol=1e-2, rtol=1e-2)


def test_aoti_packages_on_cuda(tmp_path):
    """export.aoti on the GPU: fp16 packages, verified, run by the aoti backend from CUDA graphs at two batch sizes
    and two sizes, against the torch backend in fp16; auto prefers them to torch."""
    from export.aoti import export_aoti
    from runtime.builders import TinySpec, write_tiny_checkpoint

    micro = TinySpec(sample_size=4, unet_channels=(8, 16), attention_head_dim=4, unet_groups=4, text_hidden=16,
                     text_layers=1, text_heads=2, vae_channels=(8, 8), vae_groups=4, max_length=8)
    ckpt = write_tiny_checkpoint(tmp_path / "micro", micro, seed=5)
    manifest = export_aoti(str(ckpt), tmp_path / "pkg", max_batch=2)
    assert manifest.settings.fp16 and manifest.target.device == "cuda" and manifest.verification.passed
    pipe = Pipeline.from_pretrained(ckpt, device="cuda", export_dir=tmp_path / "pkg")
    assert pipe.backend.name == "aoti" and pipe.backend.cuda_graph
    ref = Pipeline.from_pretrained(ckpt, device="cuda", backend="torch")
    for kwargs in (dict(prompt=["a cat"]), dict(prompt=["a cat", "a dog"]), dict(prompt=["a cat"], height=12, width=4),
                   dict(prompt=["a cat"], num_inference_steps=2, guidance_scale=1.5)):
        for seed in (0, 1):  # replays with new inputs
            a = pipe(seed=seed, output_type="pt", **kwargs).images
            b = ref(seed=seed, output_type="pt", **kwargs).images
            torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
    # without the fused package: the UNet and decoder packages replayed as one CUDA graph, the same images
    import dataclasses

    from runtime.manifest import read_manifest, write_manifest

    (tmp_path / "pkg" / "onestep.pt2").unlink()
    doc = read_manifest(tmp_path / "pkg")
    write_manifest(tmp_path / "pkg", dataclasses.replace(doc, components={k: v for k, v in doc.components.items()
                                                                          if k != "onestep"}))
    composed = Pipeline.from_pretrained(ckpt, device="cuda", export_dir=tmp_path / "pkg")
    assert composed.backend.name == "aoti" and "onestep" not in composed.backend.packages
    assert composed.backend.has_one_step
    for prompts in (["a cat"], ["a cat", "a dog"]):
        a = composed(prompts, seed=2, output_type="pt").images
        b = pipe(prompts, seed=2, output_type="pt").images  # the fused package: its Euler step in fp16
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


def test_threads_share_a_cuda_graph_pipeline(tiny_ckpt):
    from helpers import assert_threads_match_sequential

    pipe = Pipeline.from_pretrained(tiny_ckpt, device="cuda", dtype=torch.float16, cuda_graph=True)
    assert_threads_match_sequential(pipe, [dict(prompt=f"a cat {i}", seed=i, output_type="pt") for i in range(16)])


def test_fast_group_norm_on_a_gpu(tiny_ckpt):
    """fast_group_norm in fp16 on CUDA: a decoder-sized channels-last activation normalised as closely as PyTorch's
    kernel does, replayed inside a CUDA graph with new inputs; the graphed pipeline's images unchanged."""
    import torch.nn.functional as F

    from runtime.backends.group_norm import group_norm, uses_split_group_norm

    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(1, 128, 256, 256, device="cuda", generator=g) * 2 + 3).half()
    x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(128, device="cuda").half(), torch.randn(128, device="cuda").half()
    exact = F.group_norm(x.double(), 32, w.double(), b.double(), 1e-6)
    native = (F.group_norm(x, 32, w, b, 1e-6).double() - exact).abs().max()
    static = torch.zeros_like(x)  # captured on other values than it replays
    out = group_norm(static, 32, w, b, 1e-6)  # warm-up, then capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = group_norm(static, 32, w, b, 1e-6)
    static.copy_(x)
    graph.replay()
    assert (out.double() - exact).abs().max() <= 1.5 * native + 1e-3
    assert out.is_contiguous(memory_format=torch.channels_last)
    plain = Pipeline.from_pretrained(tiny_ckpt, device="cuda", dtype=torch.float16, cuda_graph=True,
                                     channels_last=True)
    fast = Pipeline.from_pretrained(tiny_ckpt, device="cuda", dtype=torch.float16, cuda_graph=True,
                                    channels_last=True, fast_group_norm=True)
    assert uses_split_group_norm(fast.components.vae) and not uses_split_group_norm(plain.components.vae)
    prompts = ["a red circle", "a cat", "a dog"]
    image, same = (p(prompts, seed=2, output_type="pt").images for p in (plain, fast))
    assert (image - same).abs().max() < 1e-2


def _ort_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not _ort_cuda(), reason="needs onnxruntime-gpu")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_onnxruntime_cuda_matches_torch(tiny_ckpt, tmp_path, cuda_graph):
    from export.onnx import ExportSettings, export

    export(str(tiny_ckpt), tmp_path, ExportSettings(fused=True), verify=False)
    ref = Pipeline.from_pretrained(tiny_ckpt, device="cpu", backend="torch")
    ort_pipe = Pipeline.from_pretrained(tiny_ckpt, device="cuda", backend="onnxruntime", export_dir=tmp_path,
                                        cuda_graph=cuda_graph, allow_unverified=True)  # compared here instead
    for kwargs in (dict(), dict(num_inference_steps=3, guidance_scale=1.5)):
        for seed in (0, 1):  # the second call replays the graph with new inputs
            a = ref(["a cat", "a dog"], seed=seed, output_type="pt", **kwargs).images
            b = ort_pipe(["a cat", "a dog"], seed=seed, output_type="pt", **kwargs).images.cpu()
            torch.testing.assert_close(b, a, atol=5e-3, rtol=5e-3)  # the CUDA provider may use TF32


def test_cuda_python_stream_graph_replays_new_inputs():
    """The cuda-python capture the TensorRT backend uses, checked on torch kernels (no TensorRT needed)."""
    pytest.importorskip("cuda.bindings")
    from runtime.backends.graphs import StreamGraph

    stream = torch.cuda.Stream()
    x = torch.randn(4096, device="cuda")
    y = torch.empty_like(x)

    def enqueue(raw_stream):
        assert raw_stream == stream.cuda_stream
        with torch.cuda.stream(stream):
            torch.mul(x, 2, out=y)
            y.add_(1)

    stream.wait_stream(torch.cuda.current_stream())
    enqueue(stream.cuda_stream)  # warm-up outside the capture
    graph = StreamGraph(enqueue, stream.cuda_stream)
    for _ in range(3):
        x.copy_(torch.randn(4096))
        y.zero_()
        stream.wait_stream(torch.cuda.current_stream())
        graph.launch()
        torch.cuda.current_stream().wait_stream(stream)
        torch.testing.assert_close(y, x * 2 + 1)


def test_fp16_verification_admits_real_fp16_kernels(tiny_ckpt, tmp_path):
    """What the CPU cannot show: real fp16 kernels. The torch backend in fp16 on this GPU (cuDNN/cuBLAS kernels,
    channels-last and fused QKV: other kernels than the reference's) stands in for an fp16 graph's; the
    verification every fp16 export gets (tolerance from PyTorch's fp16 error on this GPU) passes it, and fails the
    same outputs 2% off."""
    import numpy as np

    from export.compare import FP16_CEILING, compare
    from export.onnx import ExportSettings, export
    from runtime import resolve
    from runtime.models import load_components

    manifest = export(str(tiny_ckpt), tmp_path, ExportSettings(fp16=True), verify=False)
    components = load_components(resolve(tiny_ckpt), device="cpu", dtype=torch.float32)
    gpu = Pipeline.from_pretrained(tiny_ckpt, device="cuda", dtype=torch.float16, channels_last=True,
                                   fuse_qkv=True).backend
    calls = {"text_encoder": gpu.encode, "unet": gpu.velocity, "vae_decoder": gpu.decode}

    def kernels(scale):
        def runner(entry):
            call = calls[entry.file.removesuffix(".onnx")]
            return lambda inputs: call(*(x.cuda() for x in inputs)).float().cpu() * scale
        return runner

    result = compare(tmp_path, manifest, components, kernels(1.0))
    assert result.passed, result.error
    fp16 = [r["fp16_err"] for r in result.rows if "fp16_err" in r]
    assert fp16 and all(np.isfinite(e) and 0 < e < FP16_CEILING for e in fp16)  # genuine fp16 on this GPU
    assert not compare(tmp_path, manifest, components, kernels(1.02)).passed


@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_training_on_a_gpu_resumes_with_fp32_master_weights(sd_style_ckpt, tmp_path, precision):
    """The trainer on CUDA (issue 30's paths that the CPU cannot run): pairs made on the GPU, bf16 autocast by default
    (fp16 with the gradient scaler where asked), pinned-memory prefetch and cached embeddings, GPU memory logged; a run
    split at step 2 and resumed from its DCP state ends where the full run ends (to the GPU's non-deterministic
    reductions), with fp32 master weights that training moved."""
    import shutil

    from safetensors.torch import load_file

    from train.loop import Trainer, TrainConfig, reflow_loss, resolve_precision
    from train.pairs import generate

    root = tmp_path / "pairs-root"
    root.mkdir()
    (root / "prompts.txt").write_text("a red circle\na blue square at the top\na small green triangle\n")
    shutil.copytree(sd_style_ckpt, root / "teacher")
    generate(str(root / "teacher"), str(root / "prompts.txt"), root / "pairs", num_pairs=16, batch_size=8,
             shard_size=4, steps=3)
    assert resolve_precision("auto", torch.device("cuda")) == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")

    def run(out, steps):
        cfg = TrainConfig(pairs=str(root / "pairs"), out=str(out), max_steps=steps, batch_size=4, lr=3e-3,
                          save_every=2, ema=0.9, prefetch=2, text_embeddings="auto", mixed_precision=precision,
                          log_dir=str(out) + "-logs", log_every=1)
        t = Trainer(cfg, reflow_loss, "reflow")
        return t, load_file(t.run() / "unet" / "diffusion_pytorch_model.safetensors")

    _, full = run(tmp_path / "full", 4)
    run(tmp_path / "split", 2)
    t, split = run(tmp_path / "split", 4)
    start = load_file(root / "teacher" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in full.values())
    assert any(not torch.equal(full[k], start[k]) for k in full)  # training moved the weights
    for k in full:
        torch.testing.assert_close(split[k], full[k], rtol=1e-3, atol=1e-4)
    assert any((tmp_path / "full-logs").rglob("events.out.tfevents*"))
