"""Shapes dataset, the recipe in smoke mode, and the bundled model following prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from runtime import Pipeline
from runtime.checkpoints import BUNDLED
from train.data import ATTRIBUTES, all_labels, make_dataset, draw_shape, parse_caption


def test_dataset_is_deterministic_and_follows_the_grammar():
    a, la = make_dataset(50, seed=3)
    b, lb = make_dataset(50, seed=3)
    assert np.array_equal(a, b) and la == lb and a.shape == (50, 32, 32, 3) and a.dtype == np.uint8
    assert len(all_labels()) == 2 * 4 * 3 * 5
    for lab in la:
        assert parse_caption(lab.caption) == lab
        assert lab.caption.startswith(f"a {lab.size} {lab.color} {lab.shape} at the ")


def test_every_grammar_word_is_one_token_and_every_caption_fits_the_window(tmp_path):
    """The tiny tokenizer gives each word one token under BPE's rank order (a chained merge list split ``green``,
    ``bottom`` and ``shape`` and pushed partial captions to 19 tokens, past the recipe's 16-token window)."""
    from runtime.testing import TINY_WORDS, write_tiny_tokenizer
    from train.data import all_captions, longest_caption_tokens
    from train.recipes.shapes import SPEC

    tok = write_tiny_tokenizer(tmp_path, TINY_WORDS, SPEC.max_length)
    assert {w: len(tok(w, add_special_tokens=False)["input_ids"]) for w in TINY_WORDS} == {w: 1 for w in TINY_WORDS}
    assert len(all_captions()) == 360 and longest_caption_tokens(tok) == 10  # 8 words + BOS/EOS <= 16
    bundled = Pipeline.from_pretrained("tiny").components.tokenizer  # trained before the fix: full captions fit
    assert max(len(ids) for ids in bundled([lb.caption for lb in all_labels()])["input_ids"]) <= SPEC.max_length


def test_shape_lands_in_its_quadrant_with_its_colour():
    rng = np.random.default_rng(0)
    for lab in all_labels():
        img = draw_shape(lab, rng).astype(float)
        mask = img.max(-1) > 60
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean(), ys.mean()
        if lab.position == "center":
            assert 11 < cx < 21 and 11 < cy < 21
        else:
            assert (cx < 16) == ("left" in lab.position) and (cy < 16) == ("top" in lab.position)
        dominant = {"red": 0, "green": 1, "blue": 2}.get(lab.color)
        if dominant is not None:
            assert img[mask].mean(0).argmax() == dominant


def test_recipe_smoke(tmp_path):
    from train.recipes.shapes import run

    report = run(tmp_path / "shapes", smoke=True)
    doc = json.loads((report / "results.json").read_text())
    assert [r["row"].split()[0] for r in doc["rows"]] == ["1-RF", "1-RF", "2-RF", "2-RF", "1-RF+distill",
                                                         "2-RF+distill"]
    assert set(doc["straightness"]) == {"rf1", "rf2"}
    assert all((report / r["grid"]).is_file() for r in doc["rows"])
    assert Pipeline.from_pretrained(tmp_path / "shapes" / "student2" / "model")("a red circle", seed=0).images


def test_bundled_model_follows_prompts():
    from train.recipes.shapes import CLASSIFIER, load_classifier

    index = json.loads((BUNDLED["tiny"] / "model_index.json").read_text())
    if index.get("_instaflow", {}).get("recipe") != "shapes" or not CLASSIFIER.is_file():
        pytest.skip("the bundled tiny model is the random placeholder")
    pipe = Pipeline.from_pretrained("tiny", device="cpu")
    labels = all_labels()[::3]  # 40 captions covering every attribute value
    images = pipe([lb.caption for lb in labels], seed=0, output_type="pt").images
    with torch.no_grad():
        _, logits = load_classifier()(images * 2 - 1)
    acc = {k: float((logits[k].argmax(1) == torch.tensor([lb.index()[k] for lb in labels])).float().mean())
           for k in ATTRIBUTES}
    assert acc["color"] >= 0.9 and acc["position"] >= 0.9, acc


def test_model_dims_at_sd_shape_and_manifest_round_trip():
    """SD 1.5's UNet downsamples 8x: exported graphs take latent sides in multiples of 8 (64 px); the profile range
    and the verification size follow, and a manifest gives back the same numbers."""
    import types

    from runtime import InvalidInputError
    from runtime.specs import ModelDims, specs_by_name

    c = types.SimpleNamespace(
        unet=types.SimpleNamespace(config=types.SimpleNamespace(block_out_channels=(320, 640, 1280, 1280))),
        text_encoder=types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=768, vocab_size=49408)),
        default_size=(512, 512), vae_scale_factor=8, max_length=77, latent_channels=4)
    dims = ModelDims.of(c)
    assert dims.latent_multiple == 8 and dims.latent_size == (64, 64)
    assert dims.size_range((64, 64)) == ((32, 32), (128, 128))
    assert dims.other_size() == (72, 56)  # every side a multiple of 8: the up-block concats line up
    assert ModelDims.from_manifest(dims.to_manifest()) == dims
    dims.check_latent_size(72, 56)
    with pytest.raises(InvalidInputError, match="multiples of 64 px"):
        dims.check_latent_size(65, 64)
    specs = specs_by_name(dims)
    assert specs["text_encoder"].profile(1, 1, 4, (64, 64))["input_ids"] == ((1, 77), (1, 77), (8, 77))
    assert specs["vae_decoder"].profile(1, 1, 4, (64, 64))["latents"][2] == (4, 4, 64, 64)
    x = specs["vae_decoder"].sample_inputs(2, 8, 16)["latents"]
    assert specs["vae_decoder"].output_shape([x]) == (2, 3, 64, 128)
    ids = specs["text_encoder"].sample_inputs(64, seed=3)["input_ids"]
    assert ids.max() >= 1000  # token ids over the whole vocabulary, not a small range
