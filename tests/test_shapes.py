"""Shapes dataset, the recipe in smoke mode, and the bundled model following prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from runtime import Pipeline
from runtime.checkpoints import BUNDLED
from train.data import ATTRIBUTES, all_labels, make_dataset, parse_caption, render


def test_dataset_is_deterministic_and_follows_the_grammar():
    a, la = make_dataset(50, seed=3)
    b, lb = make_dataset(50, seed=3)
    assert np.array_equal(a, b) and la == lb and a.shape == (50, 32, 32, 3) and a.dtype == np.uint8
    assert len(all_labels()) == 2 * 4 * 3 * 5
    for lab in la:
        assert parse_caption(lab.caption) == lab
        assert lab.caption.startswith(f"a {lab.size} {lab.color} {lab.shape} at the ")


def test_shape_lands_in_its_quadrant_with_its_colour():
    rng = np.random.default_rng(0)
    for lab in all_labels():
        img = render(lab, rng).astype(float)
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
