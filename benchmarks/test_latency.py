"""Latency of our one-step pipeline vs. the raw networks, diffusers' own single step, and 25-step CFG SD.

Every subject runs all cases in one session, so the ratios (the gate) compare numbers measured side by side.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from runtime import Pipeline

from .subjects import (OURS, PROMPT, RawStages, diffusers_one_step, make_subject, sd_multistep,
                       sd_pipeline)

#: rounds per case: (networks and our pipeline, 25-step SD)
ROUNDS = {"tiny": (30, 5), "small-sd": (10, 3), "sd15": (30, 5)}


@pytest.fixture(scope="module", params=["tiny", "small-sd", pytest.param("sd15", marks=pytest.mark.gpu)])
def subject(request):
    return make_subject(request.param)


@pytest.fixture(scope="module")
def raw(subject):
    return RawStages(subject.pipe)


@pytest.fixture(scope="module")
def sd(subject):
    return sd_pipeline(subject.baseline_components, subject.pipe.device)


def _size(subject):
    return subject.components.default_size


@pytest.mark.parametrize("stage", ["encode", "unet", "decode"])
def test_stage(measure, subject, raw, stage):
    measure(subject, f"stage_{stage}", getattr(raw, stage), ROUNDS[subject.name][0])


def test_raw_chain(measure, subject, raw):
    measure(subject, "raw_chain", raw.chain, ROUNDS[subject.name][0])


def test_ours_1step(measure, subject):
    out = subject.pipe(PROMPT, seed=0)
    assert len(out.images) == 1 and out.images[0].size == _size(subject)[::-1]
    measure(subject, "ours_1step", lambda: subject.pipe(PROMPT, seed=0), ROUNDS[subject.name][0])


def test_ours_1step_taesd(measure, subject):
    """The same pipeline with a tiny decoder of TAESD's real architecture (random weights) instead of the VAE."""
    from dataclasses import replace

    from runtime.builders import build_tiny_decoder

    c = subject.components
    taesd = build_tiny_decoder(c.latent_channels, c.vae_scale_factor, channels=None).to(c.unet.device, c.unet.dtype)
    pipe = Pipeline(replace(c, vae=taesd), device=subject.pipe.device, dtype=subject.pipe.dtype, name=subject.name,
                    **subject.options)
    assert pipe(PROMPT, seed=0).images[0].size == _size(subject)[::-1]
    measure(subject, "ours_1step_taesd", lambda: pipe(PROMPT, seed=0), ROUNDS[subject.name][0])


@pytest.mark.parametrize("decoder", ["sd_vae", "taesd", "sd_vae_split_gn"])
def test_decode(measure, subject, decoder):
    """The decoder alone at the subject's latent size: SD 1.5's real VAE decoder architecture vs TAESD's (random
    weights), since a subject's own VAE may be scaled down (small-sd's is). Where the VAE upsamples 8x only.
    ``sd_vae_split_gn``: the VAE with ``fast_group_norm``'s GroupNorm (GPU only)."""
    from diffusers import AutoencoderKL

    from runtime.backends.group_norm import use_split_group_norm
    from runtime.builders import SD15_SPEC, build_tiny_decoder

    c = subject.components
    if c.vae_scale_factor != 8:
        pytest.skip("SD's decoders upsample 8x")
    if decoder == "sd_vae_split_gn" and subject.pipe.device.type != "cuda":
        pytest.skip("fast_group_norm is a GPU option")
    if decoder == "taesd":
        module = build_tiny_decoder(c.latent_channels, 8, channels=None)
    else:
        torch.manual_seed(0)
        n = len(SD15_SPEC.vae_channels)
        module = AutoencoderKL(latent_channels=c.latent_channels, block_out_channels=SD15_SPEC.vae_channels,
                               down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                               layers_per_block=SD15_SPEC.vae_layers, norm_num_groups=SD15_SPEC.vae_groups).eval()
        if decoder == "sd_vae_split_gn":
            use_split_group_norm(module)
    module = module.to(subject.pipe.device, subject.pipe.dtype)
    h, w = c.default_size
    z = torch.randn(1, c.latent_channels, h // 8, w // 8, device=subject.pipe.device, dtype=subject.pipe.dtype)

    def decode():
        with torch.inference_mode():
            return module.decode(z, return_dict=False)[0]

    assert decode().shape == (1, 3, h, w)
    measure(subject, f"decode_{decoder}", decode, ROUNDS[subject.name][1])


def test_ours_1step_eager(measure, subject):
    """On a GPU the subject's pipeline replays CUDA graphs; the same pipeline without them, for reference."""
    if not getattr(subject.pipe.backend, "cuda_graph", False):
        pytest.skip("ours_1step already runs eagerly")
    eager = Pipeline(subject.components, device=subject.pipe.device, dtype=subject.pipe.dtype, name=subject.name,
                     **OURS)
    a = eager(PROMPT, seed=0, output_type="pt").images
    b = subject.pipe(PROMPT, seed=0, output_type="pt").images
    assert (a - b).abs().max() < 1e-2  # the graphed path draws the same image
    measure(subject, "ours_1step_eager", lambda: eager(PROMPT, seed=0), ROUNDS[subject.name][0])


def test_ours_1step_fast_group_norm(measure, subject):
    """GPU: the subject's pipeline (the default options) plus ``fast_group_norm``, on a copy of the weights as
    loaded; the ratio to ``ours_1step`` says whether the option should join the defaults."""
    if subject.pipe.device.type != "cuda":
        pytest.skip("fast_group_norm is a GPU option")
    p = subject.pipe
    fast = Pipeline(copy.deepcopy(subject.baseline_components), device=p.device, dtype=p.dtype, name=subject.name,
                    **{**subject.options, "fast_group_norm": True})
    a = fast(PROMPT, seed=0, output_type="pt").images
    assert (a - p(PROMPT, seed=0, output_type="pt").images).abs().max() < 1e-2
    measure(subject, "ours_1step_fast_group_norm", lambda: fast(PROMPT, seed=0), ROUNDS[subject.name][0])
    FAST_GN[subject.name] = fast


FAST_GN: dict = {}  # subject -> the pipeline of test_ours_1step_fast_group_norm


def test_ours_batch8_fast_group_norm(measure, subject):
    """GPU: the same at batch 8 (the default path's batch 8 is GPU-bound: 50.7 images/s on the H200)."""
    fast = FAST_GN.get(subject.name)
    if fast is None:
        pytest.skip("needs test_ours_1step_fast_group_norm's pipeline (GPU)")
    assert len(fast(PROMPTS8, seed=0).images) == 8
    measure(subject, "ours_batch8_fast_group_norm", lambda: fast(PROMPTS8, seed=0), _batch8_rounds(subject))


def test_ours_1step_channels_last(measure, subject):
    """CPU: the torch backend with channels-last (what ``backend="auto"`` uses when it falls back to torch), on a
    copy of the modules so that the other cases keep the default memory format."""
    if subject.pipe.device.type != "cpu":
        pytest.skip("on the GPU the subject already runs channels-last")
    cl = Pipeline(copy.deepcopy(subject.components), device="cpu", name=subject.name, channels_last=True, **OURS)
    a = cl(PROMPT, seed=0, output_type="pt").images
    assert (a - subject.pipe(PROMPT, seed=0, output_type="pt").images).abs().max() < 1e-4
    measure(subject, "ours_1step_channels_last", lambda: cl(PROMPT, seed=0), ROUNDS[subject.name][0])


def _fastest_options(subject) -> dict:
    """The options of the fastest path: what ``from_pretrained(ckpt, compile=True)`` runs, i.e. auto's torch
    defaults (on a GPU CUDA graphs, channels-last, fused QKV) plus torch.compile (so that its compile cache serves
    benchmarks/cold_start.py's warm start)."""
    from runtime.backends import torch_defaults

    return dict(**torch_defaults(subject.pipe.device), compile=True, **OURS)


def _need(request, flag: str, why: str) -> None:
    if not request.config.getoption(flag):
        pytest.skip(f"{why}; pass {flag}")


def _time_one_step(measure, subject, case: str, pipe: Pipeline, note: str | None = None) -> None:
    """One prompt -> image on ``pipe`` (its first call compiles and captures whatever it compiles), checked against
    the subject's default pipeline, then timed as ``case``."""
    a = pipe(PROMPT, seed=0, output_type="pt").images
    b = subject.pipe(PROMPT, seed=0, output_type="pt").images
    assert (a - b).abs().max() < 1e-2  # the same images as the default path
    measure(subject, case, lambda: pipe(PROMPT, seed=0), ROUNDS[subject.name][0], note=note)


def _compiled(subject, **extra) -> Pipeline:
    """The fastest path on a copy of the weights as loaded (the subject's own modules are already fused and
    captured)."""
    p = subject.pipe
    return Pipeline(copy.deepcopy(subject.baseline_components), device=p.device, dtype=p.dtype, name=subject.name,
                    **_fastest_options(subject), **extra)


def test_ours_1step_compiled(measure, subject, request):
    """--bench-compile: the fastest path, torch.compile on top of the defaults (inside the CUDA graphs)."""
    _need(request, "--bench-compile", "torch.compile costs minutes")
    compiled = _compiled(subject)
    _time_one_step(measure, subject, "ours_1step_compiled", compiled)
    COMPILED[subject.name] = compiled


COMPILED: dict = {}  # subject -> the compiled pipeline of test_ours_1step_compiled


def test_ours_1step_compiled_autotune(measure, subject, request):
    """--bench-compile --bench-autotune: the fastest path compiled with Inductor's autotuning (``autotune=True``,
    runtime/inductor.py): whether its minutes of extra compilation buy anything (ratio ``autotuned/compiled``)."""
    _need(request, "--bench-compile", "torch.compile costs minutes")
    _need(request, "--bench-autotune", "autotuned compilation costs more")
    _time_one_step(measure, subject, "ours_1step_compiled_autotune", _compiled(subject, autotune=True))


def test_ours_batch8_compiled(measure, subject, request):
    """--bench-compile: the fastest path at batch 8 (compiles batch 8's shapes: minutes on a GPU)."""
    _need(request, "--bench-compile", "torch.compile costs minutes")
    compiled = COMPILED.get(subject.name)
    if compiled is None:
        pytest.skip("test_ours_1step_compiled did not run")
    assert len(compiled(PROMPTS8, seed=0).images) == 8
    measure(subject, "ours_batch8_compiled", lambda: compiled(PROMPTS8, seed=0), _batch8_rounds(subject))


def test_ours_1step_compiled_taesd(measure, subject, request):
    """--bench-compile: the fastest path with a tiny decoder of TAESD's architecture (fused QKV where the modules
    have it: the tiny decoder has no attention)."""
    from dataclasses import replace

    from runtime.builders import build_tiny_decoder

    _need(request, "--bench-compile", "torch.compile costs minutes")
    p = subject.pipe
    c = copy.deepcopy(subject.baseline_components)
    taesd = build_tiny_decoder(c.latent_channels, c.vae_scale_factor, channels=None).to(p.device, p.dtype)
    compiled = Pipeline(replace(c, vae=taesd), device=p.device, dtype=p.dtype, name=subject.name,
                        **_fastest_options(subject))
    assert compiled(PROMPT, seed=0).images[0].size == _size(subject)[::-1]
    measure(subject, "ours_1step_compiled_taesd", lambda: compiled(PROMPT, seed=0), ROUNDS[subject.name][0])


def test_diffusers_compiled_1step(measure, subject, sd, request):
    """--bench-compile: the baseline users would pick instead: diffusers with channels-last, fused QKV and
    torch.compile(mode="reduce-overhead", fullgraph=True) on the UNet and vae.decode, the same single step."""
    from .subjects import diffusers_compiled

    _need(request, "--bench-compile", "torch.compile costs minutes")
    h, w = _size(subject)
    fast = diffusers_compiled(subject.baseline_components, subject.pipe.device)
    assert len(diffusers_one_step(fast, PROMPT, h, w)) == 1  # compiles here
    measure(subject, "diffusers_compiled_1step", lambda: diffusers_one_step(fast, PROMPT, h, w),
            ROUNDS[subject.name][0])


@pytest.fixture(scope="module")
def aoti_pipe(subject, request):
    """Our pipeline on the AOTInductor backend over the subject's packages (benchmarks/cold_start.py makes them in
    --bench-work; with --bench-aoti they are compiled here when missing: minutes)."""
    return _aoti_pipeline(subject, request, autotune=False)


@pytest.fixture(scope="module")
def aoti_autotune_pipe(subject, request):
    """The same over packages compiled with ``--autotune`` (``cold_start --aoti --aoti-autotune`` makes them; with
    --bench-aoti --bench-autotune they are compiled here when missing: many minutes)."""
    return _aoti_pipeline(subject, request, autotune=True)


def _aoti_pipeline(subject, request, autotune: bool) -> Pipeline:
    from .cold_start import aoti_dir, export_aoti_packages, subject_checkpoint

    work = Path(request.config.getoption("--bench-work"))
    folder = aoti_dir(subject.name, work, autotune)
    if not (folder / "manifest.json").is_file():
        _need(request, "--bench-aoti", f"no AOTInductor packages in {folder}")
        if autotune:
            _need(request, "--bench-autotune", f"no autotuned AOTInductor packages in {folder}")
        export_aoti_packages(subject.name, work, autotune=autotune)
    return Pipeline.from_pretrained(subject_checkpoint(subject.name, work), backend="aoti", export_dir=folder,
                                    device=subject.pipe.device, **OURS)


def aoti_note(pipe: Pipeline) -> str:
    """How an aoti pipeline runs one step: the fused package, the UNet and decoder packages as one CUDA graph (an
    export without the fused package, on a GPU), or step by step."""
    backend = pipe.backend
    if "onestep" in backend.packages:
        how = "the fused one-step package" + (", replayed from a CUDA graph" if backend.cuda_graph else "")
    elif backend.has_one_step:
        how = "the UNet and decoder packages replayed as one CUDA graph (packages exported without the fused one)"
    else:
        how = "the UNet and decoder packages called in turn (no fused package, no CUDA graphs)"
    return f"one step = {how}; packages in {backend.export_dir.name}/"


def test_ours_1step_aoti(measure, subject, aoti_pipe):
    _time_one_step(measure, subject, "ours_1step_aoti", aoti_pipe, note=aoti_note(aoti_pipe))


def test_ours_1step_aoti_autotune(measure, subject, aoti_autotune_pipe):
    """The packages compiled with ``--autotune`` (ratio ``aoti autotuned/aoti`` when both are in one run)."""
    _time_one_step(measure, subject, "ours_1step_aoti_autotune", aoti_autotune_pipe,
                   note=aoti_note(aoti_autotune_pipe))


def test_ours_batch8_aoti(measure, subject, aoti_pipe):
    assert len(aoti_pipe(PROMPTS8, seed=0).images) == 8
    measure(subject, "ours_batch8_aoti", lambda: aoti_pipe(PROMPTS8, seed=0), _batch8_rounds(subject),
            note=aoti_note(aoti_pipe))


def test_ours_2rf_4step_cfg(measure, subject):
    """The 2-rectified-flow path: 4 Euler steps with guidance 1.5 (the UNet batch doubled: uncond + cond)."""
    kwargs = dict(num_inference_steps=4, guidance_scale=1.5, seed=0)
    out = subject.pipe(PROMPT, output_type="pt", **kwargs).images
    assert out.shape[0] == 1 and bool(out.isfinite().all())
    measure(subject, "ours_2rf_4step_cfg", lambda: subject.pipe(PROMPT, **kwargs), ROUNDS[subject.name][0] // 2)


def _batch8_rounds(subject) -> int:
    return max(3, ROUNDS[subject.name][0] // 4)


PROMPTS8 = [f"{PROMPT} {i}" for i in range(8)]


def test_ours_batch8(measure, subject):
    assert len(subject.pipe(PROMPTS8, seed=0).images) == 8
    measure(subject, "ours_batch8", lambda: subject.pipe(PROMPTS8, seed=0), _batch8_rounds(subject))


def test_diffusers_batch8(measure, subject, sd):
    h, w = _size(subject)
    assert len(diffusers_one_step(sd, PROMPTS8, h, w)) == 8
    measure(subject, "diffusers_batch8", lambda: diffusers_one_step(sd, PROMPTS8, h, w), _batch8_rounds(subject))


@pytest.fixture(scope="module")
def ort_pipe(subject, tmp_path_factory):
    """Our pipeline on the onnxruntime backend (CPU), over a fused fp32 export of the same weights."""
    if subject.pipe.device.type != "cpu":
        pytest.skip("onnxruntime is benchmarked on the CPU")
    from export.onnx import ExportSettings, export
    from runtime.models import save_checkpoint

    root = tmp_path_factory.mktemp(f"ort-{subject.name}")
    ckpt = save_checkpoint(subject.components, root / "ckpt")
    export(str(ckpt), root / "onnx", ExportSettings(fused=True), verify=False)
    return Pipeline.from_pretrained(ckpt, backend="onnxruntime", export_dir=root / "onnx", allow_unverified=True,
                                    **OURS)  # compared with the torch backend's images below instead


def test_ours_1step_onnxruntime(measure, subject, ort_pipe):
    a = ort_pipe(PROMPT, seed=0, output_type="pt").images
    b = subject.pipe(PROMPT, seed=0, output_type="pt").images
    assert (a - b).abs().max() < 1e-3  # same images as the torch backend
    measure(subject, "ours_1step_onnxruntime", lambda: ort_pipe(PROMPT, seed=0), ROUNDS[subject.name][0])


def test_diffusers_1step(measure, subject, sd):
    h, w = _size(subject)
    assert len(diffusers_one_step(sd, PROMPT, h, w)) == 1
    measure(subject, "diffusers_1step", lambda: diffusers_one_step(sd, PROMPT, h, w), ROUNDS[subject.name][0])


def test_sd_25step_cfg(measure, subject, sd):
    h, w = _size(subject)
    measure(subject, "sd_25step_cfg", lambda: sd_multistep(sd, PROMPT, h, w), ROUNDS[subject.name][1])


def test_gate(gate, subject, request):
    """Ratios of this run against the stored baseline (see conftest); runs after the cases of its subject."""
    ratios = gate(subject.name)
    if not request.config.getoption("keyword"):  # the whole suite ran (no -k): every main ratio was measured
        assert {"ours/raw_chain", "ours/diffusers_1step", "ours/sd_25step_cfg"} <= set(ratios)
