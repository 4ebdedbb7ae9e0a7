"""The ``fullsize`` tier: every main command at InstaFlow-0.9B's real size, on the CPU.

    pytest -m fullsize tests/test_fullsize.py       (about an hour on 2 cores, peak RSS up to 18 GB)
    pytest -m fullsize -k fp16_unet                  (the part CI runs: fp16 export of the full-size UNet, verified)

The checkpoint is an SD-1.5-shaped folder with random weights (UNet 860M, CLIP ViT-L/14 text encoder, AutoencoderKL,
512x512, 77 tokens, ``RectifiedFlowPipeline``) built once with ``runtime.builders`` and kept in
``$INSTAFLOW_FULLSIZE_DIR`` (default ``~/.cache/instaflow-rt/fullsize``). Each step's time and peak RSS go to
``benchmarks/.results/fullsize.json`` (``$BENCH_OUT``), which ``python -m benchmarks.report`` puts in RESULTS.md.
Bugs of this class (protobuf's 2 GB limit, sizes the UNet's three downsamplings cannot take) never show on tiny
models: run this tier before resolving any change to export or the runtime.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

from runtime import Pipeline

pytestmark = pytest.mark.fullsize

RESULTS = Path(os.environ.get("BENCH_OUT", Path(__file__).resolve().parents[1] / "benchmarks" / ".results"))
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def sd15_ckpt() -> Path:
    """The SD-1.5-shaped random-weight rectified flow, built once (atomic: a folder that exists is complete)."""
    from runtime.models import save_checkpoint
    from runtime.builders import SD15_SPEC, build_tiny_components

    root = Path(os.environ.get("INSTAFLOW_FULLSIZE_DIR") or Path.home() / ".cache" / "instaflow-rt" / "fullsize")
    folder = root / "sd15-random"
    if not (folder / "model_index.json").is_file():
        with step("build the SD-1.5-shaped checkpoint"):
            save_checkpoint(build_tiny_components(SD15_SPEC, seed=0), folder)
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Iterator[Path]:
    """The tier's exports (GBs each), removed when the module ends: pytest keeps its last three temp roots."""
    import shutil

    folder = tmp_path_factory.mktemp("fullsize")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def step(name: str):
    """Time ``name`` and sample its peak RSS; append both to the tier's results file as soon as it ends."""
    from benchmarks.subjects import PeakRSS, machine_info, now

    t0 = time.perf_counter()
    with PeakRSS(interval=0.01) as mem:
        yield
    path = RESULTS / "fullsize.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    if doc.get("platform") != platform.platform():  # a new machine: start afresh
        doc = {"platform": platform.platform(), "machine": machine_info(), "steps": {}}
    doc["date"] = now()
    doc["steps"][name] = {"seconds": time.perf_counter() - t0, "peak_rss_bytes": mem.base + mem.peak}
    from runtime.files import atomic_write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, doc)


def test_pipeline_one_step_and_guided_at_512(sd15_ckpt):
    with step("Pipeline.from_pretrained (torch fp32)"):
        pipe = Pipeline.from_pretrained(sd15_ckpt, device="cpu")
    with step("one step, 512x512"):
        one = pipe(PROMPT, seed=0, output_type="pt").images
    with step("4 steps, guidance 1.5, 512x512"):
        four = pipe(PROMPT, seed=0, num_inference_steps=4, guidance_scale=1.5, output_type="pt").images
    assert one.shape == four.shape == (1, 3, 512, 512)
    assert bool(one.isfinite().all() and four.isfinite().all()) and not torch.equal(one, four)


def test_fp16_unet_export_verified(sd15_ckpt, work):
    """The fast part (CI): the fp16 conversion of a 3.4 GB fp32 UNet (over protobuf's 2 GB), verified at batch 1."""
    from export.onnx import ExportSettings, export
    from export.verify import verify_export

    out = work / "fp16-unet"
    with step("export.onnx --fp16 --only unet"):
        export(str(sd15_ckpt), out, ExportSettings(fp16=True), only=["unet"], verify=False)
    with step("export.verify fp16 unet, batch 1"):
        report = verify_export(out, batches=(1,)).verification
    assert report.passed and {r["component"] for r in report.rows} == {"unet"}


def test_export_fp32_fused_and_onnxruntime(sd15_ckpt, work):
    from export.onnx import ExportSettings, export

    out = work / "fp32"
    with step("export.onnx fp32 --fused (verified)"):
        doc = export(str(sd15_ckpt), out, ExportSettings(fused=True))
    assert doc.verification.passed and doc.components["unet"].external_data
    ref = Pipeline.from_pretrained(sd15_ckpt, device="cpu", backend="torch")
    with step("onnxruntime backend, load"):
        ort_pipe = Pipeline.from_pretrained(sd15_ckpt, backend="onnxruntime", export_dir=out)
    with step("onnxruntime backend, one step 512x512"):
        b = ort_pipe(PROMPT, seed=1, output_type="pt").images
    a = ref(PROMPT, seed=1, output_type="pt").images
    assert (a - b).abs().max() < 1e-3


def test_export_fp16_dynamic_vae_fp32_then_trt(sd15_ckpt, work, monkeypatch, capsys):
    """The headline command's path: fp16 fused graphs with an fp32 decoder and dynamic sizes, verified (also at a
    second size the UNet's downsamplings take); without TensorRT it stops there in one line; against the
    TensorRT stand-ins, engines build and the backend draws the torch image within fp16 tolerance."""
    from export.trt import main

    out = work / "trt"
    with step("export.trt without TensorRT (fp16 + --vae-fp32 ONNX, dynamic, verified)"):
        code = main(["--ckpt", str(sd15_ckpt), "-o", str(out), "--vae-fp32", "--max-batch", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and ("TensorRT is not installed" in err or "no CUDA GPU" in err)
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["verification"]["passed"] and doc["latent"]["multiple"] == 8
    assert any(r["shape"] == "B=1 72x56" for r in doc["verification"]["rows"])

    from helpers import install_fake_tensorrt

    from export.trt import build
    from runtime.backends.tensorrt_backend import TensorRTBackend
    from runtime.checkpoints import resolve
    from runtime.models import load_components

    install_fake_tensorrt(monkeypatch, "11.1.0")
    with step("export.trt engines against the TensorRT 11 stand-ins"):
        engines = build(str(sd15_ckpt), out, min_batch=1, max_batch=1, vae_fp32=True)
    assert engines.components["unet"].precision == "float16"
    checkpoint = resolve(sd15_ckpt)
    backend = TensorRTBackend(checkpoint, out, device=torch.device("cpu"), dtype=torch.float32)
    pipe = Pipeline(load_components(checkpoint, weights=False), device="cpu", backend=backend)
    with step("tensorrt backend (stand-ins), one step 512x512"):
        b = pipe(PROMPT, seed=2, output_type="pt").images
    a = Pipeline.from_pretrained(sd15_ckpt, device="cpu", backend="torch")(PROMPT, seed=2, output_type="pt").images
    assert (a - b).abs().max() < 5e-2 and (a - b).abs().mean() < 5e-3


def test_train_reflow_then_distill_two_steps(sd15_ckpt, work):
    """train.reflow, then train.distill from its model, 2 steps each at batch 1 on 64x64 latents (512 px) with
    gradient checkpointing, AdamW, and the resumable state saved at the end (streamed to disk: ~10 GB at this size);
    time and peak RSS per stage go to the results file."""
    import math

    from runtime.checkpoints import resolve
    from train.loop import Trainer, TrainConfig, l2_loss, reflow_loss
    from train.pairs import write_pairs

    g = torch.Generator().manual_seed(0)
    teacher = {"name": str(sd15_ckpt), "path": str(sd15_ckpt), "fingerprint": resolve(sd15_ckpt).fingerprint(),
               "kind": "flow", "steps": 25, "guidance": 1.5}
    settings = {"teacher": teacher, "num_pairs": 2, "seed": 0, "shard_size": 2, "latent_shape": [4, 64, 64],
                "height": 512, "width": 512, "storage": "fp32", "prompts_sha256": ""}
    write_pairs(work / "pairs", torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 4, 64, 64, generator=g),
                torch.tensor([0, 0]), [PROMPT], settings, shard_size=2)
    init = None
    for stage, loss in (("reflow", reflow_loss), ("distill-l2", l2_loss)):
        cfg = TrainConfig(pairs=str(work / "pairs"), out=str(work / stage), init=init, max_steps=2, batch_size=1,
                          lr=1e-6, save_every=2, grad_checkpointing=True, text_dropout=0.0, ema=0.0)
        trainer = Trainer(cfg, loss, stage)
        with step(f"train.{stage.split('-')[0]}: 2 steps, batch 1, 64x64 latents, grad checkpointing"):
            model = trainer.run()
        assert len(trainer.losses) == 2 and all(math.isfinite(x) for x in trainer.losses)
        assert (model / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        state = work / stage / "state" / "step-00000002"
        assert sum(f.stat().st_size for f in state.iterdir()) > 3 * 2**30  # UNet, AdamW moments, EMA off: ~10 GB
        shutil.rmtree(state)  # disk: keep only the model
        init = str(model)
