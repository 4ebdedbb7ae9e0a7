"""Pipeline: parity with an independent reference loop, seeds, output types, and every bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from runtime import (BackendUnavailableError, InstaFlowError, InvalidInputError, InvalidTypeError,
                     NonFiniteOutputError, Pipeline, flow)
from runtime.backends import Backend


# ------------------------------------------------------------------------------------------------ reference
def reference_images(folder, prompts, negatives, steps, guidance, noise):
    """The official InstaFlow sampling loop, written straight from diffusers/transformers components."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    te = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()

    def encode(texts):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return te(ids)[0]

    with torch.no_grad():
        do_cfg = guidance > 1.0
        emb = encode(prompts)
        if do_cfg:
            emb = torch.cat([encode(negatives), emb])
        latents = noise.clone()
        timesteps = [(1.0 - i / steps) * 1000.0 for i in range(steps)]
        dt = 1.0 / steps
        for t in timesteps:
            x_in = torch.cat([latents] * 2) if do_cfg else latents
            vec_t = torch.ones((x_in.shape[0],)) * t
            v = unet(x_in, vec_t, encoder_hidden_states=emb).sample
            if do_cfg:
                v_neg, v_text = v.chunk(2)
                v = v_neg + guidance * (v_text - v_neg)
            latents = latents + dt * v
        image = vae.decode(latents / vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)


def _noise(pipe, n, seed=0):
    c = pipe.components
    h, w = c.default_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, c.latent_channels, h // c.vae_scale_factor, w // c.vae_scale_factor), generator=g)


@pytest.mark.parametrize("which", ["tiny", "odd"])
def test_one_step_matches_reference(which, request):
    pipe = request.getfixturevalue(f"{which}_pipe")
    folder = request.getfixturevalue(f"{which}_ckpt")
    prompts = ["a red circle at the top left", "a small blue square"]
    noise = _noise(pipe, 2)
    ours = pipe(prompts, latents=noise, output_type="pt").images
    ref = reference_images(folder, prompts, None, steps=1, guidance=0.0, noise=noise)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("which", ["tiny", "odd"])
def test_four_steps_cfg_negative_matches_reference(which, request):
    pipe = request.getfixturevalue(f"{which}_pipe")
    folder = request.getfixturevalue(f"{which}_ckpt")
    prompts = ["a large green triangle", "a photo of a cat"]
    negatives = ["blurry", "a dog"]
    noise = _noise(pipe, 2, seed=3)
    ours = pipe(prompts, negative_prompt=negatives, num_inference_steps=4, guidance_scale=1.7, latents=noise,
                output_type="pt").images
    ref = reference_images(folder, prompts, negatives, steps=4, guidance=1.7, noise=noise)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    # guidance changes the result (the CFG branch really runs), and w <= 1 means no guidance at all
    plain = pipe(prompts, num_inference_steps=4, latents=noise, output_type="pt").images
    assert (plain - ours).abs().max() > 1e-3
    w1 = pipe(prompts, negative_prompt=negatives, num_inference_steps=4, guidance_scale=1.0, latents=noise,
              output_type="pt").images
    torch.testing.assert_close(w1, plain)


def test_odd_checkpoint_defaults(odd_pipe):
    c = odd_pipe.components
    assert c.default_size == (12, 20)  # sample_size (6, 10) x VAE scale factor 2
    assert c.max_length == 7 and c.scaling_factor == 0.5 and c.latent_channels == 3
    img = odd_pipe("a cat", seed=0, output_type="np").images
    assert img.shape == (1, 12, 20, 3)


def test_latent_output_is_the_final_latents(tiny_pipe, tiny_ckpt):
    noise = _noise(tiny_pipe, 1)
    lat = tiny_pipe("a fox", latents=noise, output_type="latent").images
    img = tiny_pipe("a fox", latents=noise, output_type="pt").images
    dec = tiny_pipe.components.vae.decode(lat / tiny_pipe.components.scaling_factor).sample
    torch.testing.assert_close((dec / 2 + 0.5).clamp(0, 1), img)
    assert lat.shape == noise.shape and not torch.equal(lat, noise)


def test_output_types_agree(tiny_pipe):
    kw = dict(prompt=["a red circle", "a blue square"], seed=11)
    pt = tiny_pipe(**kw, output_type="pt").images
    npy = tiny_pipe(**kw, output_type="np").images
    pil = tiny_pipe(**kw, output_type="pil").images
    assert isinstance(pt, torch.Tensor) and pt.dtype == torch.float32 and pt.shape == (2, 3, 32, 32)
    assert isinstance(npy, np.ndarray) and npy.dtype == np.float32 and npy.shape == (2, 32, 32, 3)
    assert 0.0 <= npy.min() and npy.max() <= 1.0
    np.testing.assert_allclose(npy, pt.permute(0, 2, 3, 1).numpy())
    assert len(pil) == 2 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in pil)
    np.testing.assert_array_equal(np.asarray(pil[1]), (npy[1] * 255).round().astype(np.uint8))


def test_seed_reproducible_across_calls_and_batch_sizes(tiny_pipe):
    a = tiny_pipe(["p0", "p1", "p2"], seed=5, output_type="pt").images
    again = tiny_pipe(["p0", "p1", "p2"], seed=5, output_type="pt").images
    assert torch.equal(a, again)
    alone = tiny_pipe("p2", seed=7, output_type="pt").images  # image 2 of the batch uses seed 5 + 2
    torch.testing.assert_close(alone[0], a[2], atol=1e-5, rtol=1e-5)
    other = tiny_pipe(["p0", "p1", "p2"], seed=6, output_type="pt").images
    assert (other - a).abs().max() > 1e-3


def test_num_images_per_prompt_order_and_seeds(tiny_pipe):
    out = tiny_pipe(["a cat", "a dog"], num_images_per_prompt=2, seed=0, output_type="pt").images
    assert out.shape[0] == 4
    # image order is prompt-major: (cat,0) (cat,1) (dog,0) (dog,1); image j uses seed j
    dog1 = tiny_pipe("a dog", seed=3, output_type="pt").images
    torch.testing.assert_close(out[3], dog1[0], atol=1e-5, rtol=1e-5)
    assert (out[0] - out[1]).abs().max() > 1e-3  # different noise per image


def test_generators(tiny_pipe):
    gens = [torch.Generator().manual_seed(s) for s in (4, 9)]
    out = tiny_pipe(["x", "y"], generator=gens, output_type="pt").images
    seeded = tiny_pipe(["y"], seed=9, output_type="pt").images
    torch.testing.assert_close(out[1], seeded[0], atol=1e-5, rtol=1e-5)
    one = tiny_pipe("x", generator=torch.Generator().manual_seed(1), output_type="pt").images
    same = tiny_pipe("x", generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert torch.equal(one, same)


def test_long_prompt_truncated_with_warning(tiny_pipe):
    long = " ".join(["red circle"] * 40)
    with pytest.warns(UserWarning, match="longer than the 16-token window were cut to their first 16 tokens"):
        out = tiny_pipe(long, seed=0, output_type="pt").images
    assert out.shape == (1, 3, 32, 32)


def test_tokenize_cuts_long_prompts_as_truncation_does(tiny_pipe):
    """One tokenizer pass: the ids and masks are those of the tokenizer's own truncation at the window, for prompts
    shorter than, exactly at and over it."""
    tok, n = tiny_pipe.components.tokenizer, tiny_pipe.components.max_length
    texts = ["a cat", "", "x " * (n - 3), "x " * (n - 2), "x " * (n - 1), " ".join(["red circle"] * 40)]
    with pytest.warns(UserWarning, match="2 prompt\\(s\\) longer than the 16-token window"):
        ids, mask = tiny_pipe.tokenize(texts)
    ref = tok(texts, padding="max_length", max_length=n, truncation=True, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])


def test_cancel_hook_stops_between_steps_and_before_decode(tiny_pipe, monkeypatch):
    """``cancel`` is asked after encoding, before every Euler step and before decoding; True stops the call there."""
    from runtime.errors import Cancelled

    asked, decoded = [], []
    monkeypatch.setattr(tiny_pipe, "decode", lambda x: decoded.append(1) or torch.zeros(x.shape[0], 3, 32, 32))
    tiny_pipe("a cat", seed=0, num_inference_steps=3, cancel=lambda: asked.append(1) or False, output_type="pt")
    assert len(asked) == 1 + 3 + 1 and decoded == [1]
    for stop_at in (1, 3, 5):  # after encoding, before the 2nd step, before decoding
        asked.clear()
        decoded.clear()
        with pytest.raises(Cancelled):
            tiny_pipe("a cat", seed=0, num_inference_steps=3, cancel=lambda: asked.append(1) or len(asked) >= stop_at)
        assert len(asked) == stop_at and decoded == []


class _FakeClock:
    """A perf_counter that moves only when told: timings become exact, whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _SlowBackend(Backend):
    """The torch backend where one stage takes one second of a fake clock; a fused path on request (a backend of
    the contract in runtime/backends/base.py)."""

    name = "slow"

    def __init__(self, inner, slow: str, clock: _FakeClock, fused: bool = False) -> None:
        self.inner, self.slow, self.clock, self.fused = inner, slow, clock, fused
        self.device, self.dtype = inner.device, inner.dtype

    @property
    def has_one_step(self) -> bool:
        return self.fused

    def _spend(self, stage: str) -> None:
        if stage == self.slow:
            self.clock.now += 1.0

    def encode(self, ids, mask=None):
        self._spend("encode")
        return self.inner.encode(ids, mask)

    def velocity(self, x, t, emb):
        self._spend("unet")
        return self.inner.velocity(x, t, emb)

    def decode(self, z):
        self._spend("decode")
        return self.inner.decode(z)

    def one_step(self, emb, noise):
        self._spend("one_step")
        c = self.inner.components
        return flow.one_step_image(lambda x, t: self.inner.velocity(x, t, emb).float(),
                                   lambda z: self.inner.decode(z).float(), noise, c.scaling_factor, c.shift_factor)


@pytest.fixture()
def fake_clock(monkeypatch):
    import runtime.timing

    clock = _FakeClock()
    monkeypatch.setattr(runtime.timing, "clock", clock)
    return clock


@pytest.mark.parametrize("slow", ["encode", "unet", "decode"])
def test_timings_put_the_time_where_it_was_spent(tiny_pipe, fake_clock, slow):
    pipe = Pipeline(tiny_pipe.components, device="cpu", backend=_SlowBackend(tiny_pipe.backend, slow, fake_clock),
                    embedding_cache_size=0)
    t = pipe("a cat", seed=0).timings
    assert t == {**{"encode": 0.0, "unet": 0.0, "decode": 0.0}, slow: 1.0, "total": 1.0}


def test_timings_of_the_fused_path_are_named_for_what_was_measured(tiny_pipe, fake_clock):
    pipe = Pipeline(tiny_pipe.components, device="cpu",
                    backend=_SlowBackend(tiny_pipe.backend, "one_step", fake_clock, fused=True), embedding_cache_size=0)
    assert pipe("a cat", seed=0).timings == {"encode": 0.0, "unet+decode": 1.0, "total": 1.0}
    ref = tiny_pipe("a cat", seed=0, output_type="pt").images
    torch.testing.assert_close(pipe("a cat", seed=0, output_type="pt").images, ref)
    guided = pipe("a cat", seed=0, guidance_scale=2.0).timings  # guidance: the step-by-step path
    assert set(guided) == {"encode", "unet", "decode", "total"}


def test_text_encoder_runs_once_per_distinct_text(tiny_pipe, monkeypatch):
    calls = []
    real = tiny_pipe.backend.encode

    def spy(ids, mask=None):
        calls.append(ids.shape[0])
        return real(ids, mask)

    monkeypatch.setattr(tiny_pipe.backend, "encode", spy)
    tiny_pipe.clear_cache()
    first = tiny_pipe(["a cat", "a dog", "a cat"], num_images_per_prompt=3, guidance_scale=2.0, seed=0,
                      output_type="pt").images
    assert calls == [3]  # "a cat", "a dog" and the empty negative, in one call
    again = tiny_pipe(["a dog", "a cat", "a dog", "a fox"], guidance_scale=2.0, seed=0, output_type="pt").images
    assert calls == [3, 1]  # only "a fox" is new: the cache served the rest
    assert first.shape[0] == 9
    tiny_pipe.clear_cache()
    fresh = tiny_pipe(["a dog", "a cat", "a dog", "a fox"], guidance_scale=2.0, seed=0, output_type="pt").images
    assert torch.equal(again, fresh)  # cached embeddings give the same images as encoding afresh


def test_embedding_cache_is_bounded(tiny_pipe, monkeypatch):
    """An LRU of embedding_cache_size prompts: the least recently used one is encoded again; 0 disables it."""
    encoded = []
    real = tiny_pipe.backend.encode
    monkeypatch.setattr(tiny_pipe.backend, "encode", lambda ids, mask=None: encoded.append(len(ids)) or real(ids, mask))
    monkeypatch.setattr(tiny_pipe, "embedding_cache_size", 2)
    tiny_pipe.clear_cache()
    for p in ("one", "two", "three", "two", "three"):
        tiny_pipe(p, seed=0)
    assert len(encoded) == 3  # "two" and "three" came from the cache the second time
    tiny_pipe("one", seed=0)
    assert len(encoded) == 4  # "one" was dropped (least recently used)
    monkeypatch.setattr(tiny_pipe, "embedding_cache_size", 0)
    tiny_pipe.clear_cache()
    tiny_pipe("four", seed=0)
    tiny_pipe("four", seed=0)
    assert len(encoded) == 6


def test_four_threads_match_sequential_calls(tiny_pipe):
    from helpers import assert_threads_match_sequential

    jobs = [dict(prompt=[f"a red circle {i}", "a cat"], seed=i, num_inference_steps=1 + i % 3,
                 guidance_scale=0.0 if i % 2 else 1.5, output_type="pt") for i in range(12)]
    assert_threads_match_sequential(tiny_pipe, jobs, tol=1e-6)



def test_unet_batch_equals_images_without_cfg(tiny_pipe, monkeypatch):
    seen = []
    real = tiny_pipe.backend.velocity

    def spy(x, t, e):
        seen.append((x.shape[0], e.shape[0], float(t[0])))
        return real(x, t, e)

    monkeypatch.setattr(tiny_pipe.backend, "velocity", spy)
    tiny_pipe(["a", "b"], num_images_per_prompt=2, seed=0)
    assert seen == [(4, 4, 1000.0)]
    seen.clear()
    tiny_pipe(["a"], num_inference_steps=2, guidance_scale=3.0, seed=0)
    assert seen == [(2, 2, 1000.0), (2, 2, 500.0)]


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(prompt=None), InvalidInputError, "prompt is required"),
    (dict(prompt=[]), InvalidInputError, "empty list"),
    (dict(prompt=["ok", 3]), InvalidTypeError, r"prompt\[1\] is a int"),
    (dict(prompt=42), InvalidTypeError, "string or a list"),
    (dict(prompt="x", num_inference_steps=0), InvalidInputError, "num_inference_steps must be >= 1"),
    (dict(prompt="x", num_inference_steps=1.5), InvalidTypeError, "num_inference_steps must be an int"),
    (dict(prompt="x", num_images_per_prompt=0), InvalidInputError, "num_images_per_prompt"),
    (dict(prompt="x", height=30), InvalidInputError, "height must be a positive multiple of the VAE scale factor 4"),
    (dict(prompt="x", width=0), InvalidInputError, "width must be a positive multiple"),
    (dict(prompt="x", height=-8), InvalidInputError, "height must be a positive multiple"),
    (dict(prompt="x", latents=torch.zeros(1, 4, 4, 4)), InvalidInputError, r"latents must have shape \[1, 4, 8, 8\]"),
    (dict(prompt=["a", "b"], latents=torch.zeros(1, 4, 8, 8)), InvalidInputError, "latents must have shape"),
    (dict(prompt=["a", "b"], negative_prompt=["n"], guidance_scale=2.0), InvalidInputError,
     "negative_prompt has 1 entries but there are 2 prompts"),
    (dict(prompt="x", output_type="jpeg"), InvalidInputError, "output_type must be one of"),
    (dict(prompt="x", seed=1, latents=torch.zeros(1, 4, 8, 8)), InvalidInputError, "only one of seed"),
    (dict(prompt="x", guidance_scale=float("nan")), InvalidInputError, "guidance_scale"),
    (dict(prompt=["a", "b"], generator=[torch.Generator()]), InvalidInputError, "1 generators for 2 images"),
])
def test_bad_input(tiny_pipe, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        tiny_pipe(**kwargs)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, InstaFlowError)


def test_nan_output_is_reported(tiny_pipe):
    components = copy.deepcopy(tiny_pipe.components)
    with torch.no_grad():
        components.vae.decoder.conv_out.bias.fill_(float("nan"))
    broken = Pipeline(components, device="cpu")
    with pytest.raises(NonFiniteOutputError, match=r"NaN/inf \(in float32: check the checkpoint's weights") as info:
        broken("a red circle", seed=0)
    assert "fp16" not in str(info.value)  # fp32 cannot overflow like fp16: the message says what is known


def test_diffusion_checkpoint_refused_unless_treated_as_flow(sd_style_ckpt):
    with pytest.raises(InvalidInputError, match="diffusion model .*StableDiffusionPipeline.*teacher"):
        Pipeline.from_pretrained(sd_style_ckpt)
    pipe = Pipeline.from_pretrained(sd_style_ckpt, treat_as_flow=True)
    assert len(pipe("x", seed=0).images) == 1


def test_backend_and_device_errors(tiny_ckpt):
    with pytest.raises(BackendUnavailableError, match="unknown backend 'jax'"):
        Pipeline.from_pretrained(tiny_ckpt, backend="jax")
    with pytest.raises(InvalidInputError, match="unknown dtype"):
        Pipeline.from_pretrained(tiny_ckpt, dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="CUDA is not available"):
            Pipeline.from_pretrained(tiny_ckpt, device="cuda")


def test_bundled_tiny_model_loads_and_generates():
    pipe = Pipeline.from_pretrained("tiny", device="cpu")
    assert pipe.name == "tiny"
    out = pipe("a red circle at the top left", seed=0)
    assert out.images[0].size == pipe.components.default_size[::-1]


def test_numpy_scalars_are_numbers(tiny_pipe):
    """guidance_scale=np.float32(1.5), steps and sizes as numpy ints: what a product passing numbers through numpy
    sends; equal to the Python numbers."""
    a = tiny_pipe("a cat", seed=0, guidance_scale=np.float32(1.5), num_inference_steps=np.int64(2),
                  height=np.int32(32), output_type="pt").images
    b = tiny_pipe("a cat", seed=0, guidance_scale=1.5, num_inference_steps=2, height=32, output_type="pt").images
    torch.testing.assert_close(a, b)
    with pytest.raises(InvalidTypeError, match="guidance_scale must be a number, got bool"):
        tiny_pipe("a cat", guidance_scale=True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=100000, width=100000), "a side over this pipeline's limit of 4096 px"),
    (dict(height=100000, width=32), "a side over this pipeline's limit"),
    (dict(height=4096, width=4096), "over this pipeline's limit of 4,194,304 pixels"),
    (dict(num_inference_steps=10**9), "num_inference_steps=1000000000 is over this pipeline's limit of 1000"),
    (dict(num_images_per_prompt=10**6), "1000000 images in one call is over this pipeline's limit of 64"),
    (dict(prompt=["a cat"] * 10**5), "100000 images in one call"),
    (dict(seed=2**64), r"seed must be in \[-2\*\*63, 2\*\*64 - 1\]"),
    (dict(seed=-(2**63) - 1), r"seed must be in"),
    (dict(seed=2**64 - 1, num_images_per_prompt=2), r"seed must be in \[-2\*\*63, 2\*\*64 - 2\] for 2 image"),
    (dict(generator="x"), "generator must be a torch.Generator"),
    (dict(latents=torch.empty(1, 4, 8, 8, device="meta")), "meta device"),
    (dict(prompt="a \udcff cat"), r"prompt\[0\] is not valid text: it holds a lone surrogate"),
    (dict(negative_prompt=["ok", "\ud800"], prompt=["a", "b"], guidance_scale=2.0), r"negative_prompt\[1\]"),
    (dict(negative_prompt="a \udcff", guidance_scale=2.0), r"negative_prompt is not valid text: .*lone surrogate"),
    (dict(negative_prompt="a \udcff"), r"negative_prompt is not valid text"),  # checked even without guidance
])
def test_hostile_input_is_one_line_before_any_work(tiny_pipe, monkeypatch, kwargs, match):
    """Unbounded or malformed requests are refused in one line before anything is allocated or any network runs."""
    ran = []
    monkeypatch.setattr(tiny_pipe, "prepare_latents", lambda *a, **k: ran.append("latents"))
    monkeypatch.setattr(tiny_pipe.backend, "encode", lambda *a, **k: ran.append("encode"))
    kwargs = {"prompt": "a cat", **kwargs}
    with pytest.raises(InstaFlowError, match=match) as info:
        tiny_pipe(**kwargs)
    assert "\n" not in str(info.value) and ran == []


def test_limits_can_be_raised(tiny_pipe):
    from runtime.inputs import Limits

    pipe = Pipeline(tiny_pipe.components, device="cpu", limits=Limits(max_images=2))
    with pytest.raises(InvalidInputError, match="3 images in one call is over this pipeline's limit of 2"):
        pipe(["a", "b", "c"], seed=0)
    pipe.limits.max_images = 3
    assert len(pipe(["a", "b", "c"], seed=0).images) == 3


def test_random_hostile_calls_return_or_raise_one_line(tiny_pipe):
    """Property-style: 150 calls with arguments drawn from hostile values (wrong types, huge and negative numbers,
    NaN, surrogates, bad tensors). Each call returns images or raises an InstaFlowError in one line; none raises
    anything else, and memory stays bounded (the limits are checked before any allocation)."""
    import random
    import resource

    values = {
        "prompt": ["a cat", "", ["a", "b"], [], None, 5, ["a", 3], "x" * 10_000, "\ud800", ["ok"] * 10**5, b"bytes"],
        "negative_prompt": [None, "blurry", ["a"], ["a", "b", "c"], 7, ["\udcff"]],
        "num_inference_steps": [1, 2, 0, -1, 10**9, 2.5, True, "3", np.int64(2), None],
        "guidance_scale": [0.0, 1.5, float("nan"), float("inf"), -3.0, np.float32(2.0), "1.5", None, True],
        "height": [None, 32, 0, -32, 31, 10**6, 4096, np.int32(32), 32.0, "32"],
        "width": [None, 32, 8, 33, 10**6, -8],
        "num_images_per_prompt": [1, 2, 0, 10**6, -1, 1.0, None],
        "seed": [None, 0, -1, 2**64, -(2**63) - 1, 2**64 - 1, "0", 1.5],
        "generator": [None, torch.Generator().manual_seed(0), "x", [torch.Generator()], [1, 2]],
        "latents": [None, torch.randn(1, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.zeros(1, 4, 8, 8, dtype=torch.long),
                    torch.empty(1, 4, 8, 8, device="meta"), "noise", torch.full((1, 4, 8, 8), float("nan"))],
        "output_type": ["pil", "np", "pt", "latent", "jpg", None, 3],
    }
    rng = random.Random(0)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(150):
        keys = rng.sample(sorted(values), rng.choice([0, 1, 1, 2, 3]))  # a few arguments at a time go wild
        kwargs = {"prompt": "a cat", **{k: rng.choice(values[k]) for k in keys}}
        try:
            tiny_pipe(**kwargs)
            outcomes["ok"] += 1
        except InstaFlowError as e:
            assert "\n" not in str(e), (kwargs, str(e))
            outcomes["refused"] += 1
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert outcomes["ok"] > 15 and outcomes["refused"] > 50, outcomes  # both paths were exercised
    assert grown_mb < 1024, f"peak RSS grew by {grown_mb:.0f} MB"
