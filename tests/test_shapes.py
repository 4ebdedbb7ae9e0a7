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
    from runtime.builders import TINY_WORDS, write_tiny_tokenizer
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
    """The paper's chain end to end at smoke size: a diffusion teacher (SD's role) trained, its pairs through
    train.pairs with DPM-Solver and guidance 5, the 2-RF from its weights, both students with two training seeds
    (the control with its own step budget), the report on full and partial captions."""
    from train.recipes.shapes import budget, run

    b = budget(True, ["student_seeds=2", "control_steps=3"])
    report = run(tmp_path / "shapes", smoke=True, b=b)
    out = tmp_path / "shapes"
    doc = json.loads((report / "results.json").read_text())
    keys = ["teacher-multi", "teacher-1", "rf2-multi", "rf2-1", "student_teacher", "student", "student_teacher-s1",
            "student-s1", "before"]
    assert [r["key"] for r in doc["rows"]] == keys
    assert [r["nfe"] for r in doc["rows"]] == [2 * b.ode_steps, 2, 2 * b.ode_steps, 2, 1, 1, 1, 1, 1]
    teacher = json.loads((out / "pairs_teacher" / "manifest.json").read_text())["settings"]["teacher"]
    assert teacher["kind"] == "diffusion" and teacher["guidance"] == 5.0 and teacher["steps"] == b.ode_steps
    assert json.loads((out / "teacher" / "model" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionPipeline"
    rf2 = json.loads((out / "pairs_rf2" / "manifest.json").read_text())["settings"]["teacher"]
    assert rf2["kind"] == "flow" and rf2["guidance"] == 1.5
    assert json.loads((out / "rf2" / "model" / "model_index.json").read_text())["_instaflow"]["init"].endswith(
        "teacher/model")
    want = {"teacher": (b.teacher_steps, 0), "rf2": (b.rf2_steps, 0), "student": (b.distill_steps, 0),
            "student_teacher": (3, 0), "student-s1": (b.distill_steps, 1), "student_teacher-s1": (3, 1)}
    for stage, (steps, seed) in want.items():  # EMA weights in every stage, students included
        info = json.loads((out / stage / "model" / "model_index.json").read_text())["_instaflow"]
        assert info["config"]["ema"] == 0.999 and (info["steps"], info["config"]["seed"]) == (steps, seed), stage
    assert set(doc["straightness"]) == {"teacher/sampling", "teacher/conditional", "rf2/sampling", "rf2/conditional"}
    # the sampling paths are recorded while the multi-step rows sample: the same S as a path of their own
    from train.recipes.shapes_eval import path_s

    n = b.straightness_n
    z0 = torch.randn((b.eval_n, 4, 8, 8), generator=torch.Generator().manual_seed(123))[:n]
    captions = [all_labels()[i % 120].caption for i in range(n)]
    for name, guidance in (("teacher", 5.0), ("rf2", 1.5)):
        want_s = path_s(out / name / "model", b.ode_steps, guidance, captions, z0)
        got = np.load(report / "rows" / f"straightness-{name}-sampling.npy")
        assert got.shape == (n,) and np.allclose(got, want_s, rtol=1e-4, atol=1e-7)
        assert doc["straightness"][f"{name}/sampling"]["value"] == pytest.approx(float(want_s.mean()), rel=1e-4)
    # every row scored on the partial captions too, with the reference rows; claims judged on both seeds
    part = doc["partial"]
    assert set(part["fid"]) == set(keys) | {"real-2", "real-vae"} and part["n"] == b.eval_n
    assert part["tv_teacher"]["teacher-multi"]["mean"] == 0.0 and part["unclean"]["real-2"] == 0.0
    assert [c["id"] for c in doc["claims"]] == ["1", "2", "3", "3a", "3b", "3c", "3d", "4", "5"]
    assert all(c["verdict"] in ("met", "not met", "not resolvable at this scale") for c in doc["claims"])
    assert all(len(c["cis"]) == 2 for c in doc["claims"] if c["id"].startswith(("3", "4")))
    assert len(doc["spread"]["diff"]["values"]) == 2 and doc["seeds"]["student"] == ["student", "student-s1"]
    assert all((report / r["grid"]).is_file() and (report / r["grid_partial"]).is_file() for r in doc["rows"])
    text = (report / "SHAPES.md").read_text()
    assert "## The paper's claims" in text and "### Partial captions" in text and "### Training noise" in text
    assert set(part["unclean_by_free"]) == set(part["fid"]) and "No clean shape by how many attributes" in text
    assert "--smoke --budget student_seeds=2 --budget control_steps=3" in text  # how to regenerate it
    assert Pipeline.from_pretrained(out / "student" / "model")("a red circle", seed=0).images
    # a killed report continues row by row: the cached rows are read back, not sampled again
    cached = {p.name: p.stat().st_mtime_ns for p in (report / "rows").glob("*.np?")}
    assert len(cached) == 9 * 2 + 4  # 9 rows on two caption sets, 4 straightness paths
    (report / "results.json").unlink()
    run(out, smoke=True, b=b)
    assert {p.name: p.stat().st_mtime_ns for p in (report / "rows").glob("*.np?")} == cached
    # a finished stage of another budget (a control of 3 steps, asked for 5) is refused, not silently reused
    from train.common import TrainError

    with pytest.raises(TrainError, match="student_teacher was trained with other settings") as e:
        run(out, smoke=True, b=budget(True, ["control_steps=5"]))
    assert "\n" not in str(e.value)
    # every stage's wall time: trained stages from their DONE, the others from timings.json
    times = doc["times"]
    assert set(times) == set(want) | {"teacher", "vae", "pairs_teacher", "pairs_rf2", "classifier", "report"}
    assert not any(t.get("pending") for t in times.values()) and "| pending |" not in text
    assert times["student_teacher"]["total"] == 3 and times["pairs_rf2"] == pytest.approx(
        {**times["pairs_rf2"], "total": b.pairs, "done": b.pairs, "unit": "pair"})
    assert times["report"]["done"] == 9 * 2 and times["teacher"]["estimate_s"] > 0
    assert (times["student"]["done"], times["student"]["resumed_from"]) == (b.distill_steps, 0)
    assert "### Wall time of each stage" in text

    # --report-only while stages are still training: their rows and the claims that need them are pending, the rest
    # is scored (the 2-RF and the second seed "still training": their DONE markers removed)
    for stage in ("rf2", "student-s1", "student_teacher-s1"):
        (out / stage / "DONE").unlink()
    doc = json.loads((run(out, smoke=True, b=b, report_only=True) / "results.json").read_text())
    assert doc["pending"] == ["rf2", "student_teacher-s1", "student-s1"]
    assert {r["key"] for r in doc["rows"] if r["pending"]} == {"rf2-multi", "rf2-1", "student_teacher-s1", "student-s1"}
    assert set(doc["fid"]) == set(keys) - {"rf2-multi", "rf2-1", "student_teacher-s1", "student-s1"}
    assert set(doc["straightness"]) == {"teacher/sampling", "teacher/conditional"}
    c = {x["id"]: x for x in doc["claims"]}
    assert (c["1"]["verdict"], c["1"]["reason"]) == ("pending", "waits for rf2")
    assert c["3"]["verdict"] == "pending" and c["3"]["so_far"] in ("met", "not met", "not resolvable at this scale")
    assert "1 of 2 seeds finished (seed 1 pending)" in c["3"]["reason"] and len(c["3"]["cis"]) == 1
    assert c["3b"]["verdict"] == "pending" and "so_far" not in c["3b"]  # needs the 2-RF's row
    assert c["5"]["verdict"] in ("met", "not met")
    assert doc["spread"]["diff"]["values"][1] is None and doc["spread"]["diff"]["values"][0] is not None
    assert doc["times"]["rf2"] == {"pending": True} and doc["ship"]["key"] is None
    text = (report / "SHAPES.md").read_text()
    assert "**A partial report: rf2, student_teacher-s1, student-s1 still training.**" in text
    assert "--budget control_steps=3 --report-only`" in text and "| 2-RF, 1-step | 2 | pending | pending |" in text
    assert "| pending (so far: " in text
    with pytest.raises(TrainError, match="--ship needs every stage"):
        run(out, smoke=True, ship=True, b=b, report_only=True)
    with pytest.raises(TrainError, match="pairs_rf2 holds pairs of other settings"):  # made at guidance 1.5
        run(out, smoke=True, b=budget(True, ["guidance=1.0"]), report_only=True)
    with pytest.raises(TrainError, match="nothing to report in"):
        run(tmp_path / "empty", smoke=True, b=b, report_only=True)


def test_frechet_distance_matches_the_matrix_square_root():
    from scipy import linalg

    from train.recipes.shapes_eval import frechet

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet(a, b) == pytest.approx(want, rel=1e-6)
    assert frechet(a, a) == pytest.approx(0.0, abs=1e-6)


def _claims_inputs(seeds: int = 1, rng=None):
    """A results doc and paired bootstrap replicates built from chosen means: what claims() and ship_decision() read."""
    from train.recipes.shapes_eval import ATTRIBUTES, centred_interval, interval

    rng = rng or np.random.default_rng(0)
    reps = lambda mean, spread: mean + spread * rng.normal(size=200)  # noqa: E731
    students = ["student"] + [f"student-s{k}" for k in range(1, seeds)]
    controls = ["student_teacher"] + [f"student_teacher-s{k}" for k in range(1, seeds)]
    fid = {"teacher-multi": 10.0, "teacher-1": 100.0, "rf2-multi": 11.0, "rf2-1": 30.0, "before": 13.0,
           **{k: 12.0 for k in students}, **{k: 14.0 for k in controls}}
    boot = {"fid": {k: reps(v, 0.3) for k, v in fid.items()},
            "s": {"rf2/sampling": reps(0.01, 0.001), "teacher/sampling": reps(0.1, 0.01)},
            "acc": {k: {a: reps(0.97, 0.005) for a in ATTRIBUTES} for k in fid}}
    boot["fid"]["before"] = boot["fid"]["student"] + 1 + 0.2 * rng.normal(size=200)  # clearly worse than student
    # partial captions: the controls average modes (higher FID, TV and no-clean-shape share than the students)
    p_fid = {**fid, **{k: 30.0 for k in controls}}
    tv = {k: 0.05 if k in controls else 0.01 for k in fid}
    unclean = {k: 0.2 if k in controls else 0.02 for k in fid}
    boot["partial"] = {"fid": {k: reps(v, 0.3) for k, v in p_fid.items()},
                       "tv_teacher": {k: reps(v, 0.002) for k, v in tv.items()},
                       "unclean": {k: reps(v, 0.01) for k, v in unclean.items()}}
    doc = {"budget": {"seed": 0}, "fid": fid, "seeds": {"student": students, "student_teacher": controls},
           "fid_ci": {k: centred_interval(v, boot["fid"][k]) for k, v in fid.items()},
           "straightness": {"rf2/sampling": {"value": 0.01}, "teacher/sampling": {"value": 0.1}},
           "acc": {k: {a: 0.97 for a in ATTRIBUTES} for k in fid},
           "acc_ci": {k: {a: interval(v) for a, v in boot["acc"][k].items()} for k in fid},
           "partial": {"fid": p_fid, "fid_ci": {k: centred_interval(v, boot["partial"]["fid"][k])
                                                 for k, v in p_fid.items()},
                       "tv_teacher": {k: {"mean": v} for k, v in tv.items()}, "unclean": unclean}}
    return doc, boot, reps


def test_claims_and_shipping_need_the_whole_interval():
    """A row is shipped, and a claim met, only when the paired bootstrap interval clears the bar, not the point."""
    from train.recipes.shapes_eval import claims, ship_decision

    doc, boot, reps = _claims_inputs()
    assert ship_decision(doc, boot)["key"] == "student"
    got = claims(doc, boot, "student")
    assert [c["id"] for c in got] == ["1", "2", "3", "3a", "3b", "3c", "3d", "4", "5"]
    assert [c["verdict"] for c in got] == ["met"] * 9
    # the partial-caption contrast: [FID(student) - FID(2-RF)] - [FID(control) - FID(teacher)] = 1 - 20
    assert got[4]["value"] == "contrast -19.0"
    boot["fid"]["before"] = boot["fid"]["student"] + 1 + 3 * np.random.default_rng(1).normal(size=200)  # not surely
    assert ship_decision(doc, boot)["key"] is None
    boot["acc"]["student"]["shape"] = reps(0.86, 0.02)  # the point clears 85%, the interval does not
    assert claims(doc, boot, "student")[-1]["verdict"] == "not met"
    doc["fid"]["student"] = 16.0  # worse than the control surely: claim 3 refuted
    assert claims(doc, boot, "student")[2]["verdict"] == "not met"


def test_claims_are_judged_on_every_seed():
    """Three student seeds: a claim is met only when every seed's interval clears the bar; seeds that disagree make
    it not resolvable at this scale, and say which seed did what."""
    from train.recipes.shapes_eval import claims, seeded_quantities, verdict

    doc, boot, _ = _claims_inputs(seeds=3)
    assert [c["verdict"] for c in claims(doc, boot, "student")][2:8] == ["met"] * 6
    doc["fid"]["student-s2"] = 14.0  # seed 2's student no better than its control
    c3 = claims(doc, boot, "student")[2]
    assert c3["verdict"] == "not resolvable at this scale" and len(c3["cis"]) == 3
    assert "seed 2: the interval holds the bar" in c3["reason"]
    assert "seed 0, seed 1: the interval clears" in c3["reason"]
    q = seeded_quantities(doc, boot)["diff"]
    assert q["values"] == pytest.approx([-2.0, -2.0, 0.0]) and q["sd"] == pytest.approx(np.std([-2, -2, 0], ddof=1))
    # seed 2 still training (its rows not there yet): the claims that need it are pending, judged so far on 0 and 1
    for k in ("student-s2", "student_teacher-s2"):
        del doc["fid"][k]
    got = {c["id"]: c for c in claims(doc, boot, "student")}
    assert got["3"]["verdict"] == "pending" and got["3"]["so_far"] == "met" and len(got["3"]["cis"]) == 2
    assert got["3"]["reason"].startswith("2 of 3 seeds finished (seed 2 pending); so far met")
    assert got["1"]["verdict"] == got["2"]["verdict"] == "met"
    q = seeded_quantities(doc, boot)["diff"]
    assert q["values"][2] is None and q["mean"] == pytest.approx(-2.0) and q["sd"] == pytest.approx(0.0)
    for k in ("student", "student-s1"):  # no student at all: waits for the students
        del doc["fid"][k]
    assert claims(doc, boot, "before")[2]["reason"] == "waits for student, student_teacher"
    assert verdict([[1, 2], [3, 4]], below=True) == ("not met", "every seed's 95% interval lies on the other side "
                                                               "(2 seeds)")
    assert verdict([[-1, 2]], below=True)[0] == "not resolvable at this scale"
    assert verdict([[0.0, 2]], below=False)[0] == "met"  # ">= 0": a lower bound of 0 clears it


def test_partial_captions_scoring():
    """Partial captions: each of the 15 leave-out patterns equally often, targets that say what a caption fixes;
    accuracy counts only fixed attributes; coverage is the TV distance of the free attributes' label histograms."""
    from train.data import ATTRIBUTES, PARTIAL_KEEPS, matching_label
    from train.recipes.shapes_eval import Scored, coverage_tv, fixed_accuracy, partial_set

    s = partial_set(300)
    assert len(s) == 300 and len(PARTIAL_KEEPS) == 15 and s.captions[0] == "a shape"
    patterns = [tuple(bool(s.targets[a][i] >= 0) for a in ATTRIBUTES) for i in range(len(s))]
    assert sorted(set(patterns)) == sorted({tuple(k.values()) for k in PARTIAL_KEEPS})
    assert all(patterns.count(p) == 20 for p in set(patterns))
    for i, caption in enumerate(s.captions):
        words = caption.split()
        for a, values in ATTRIBUTES.items():
            named = [v for v in values if (v in caption if " " in v else v in words)]
            t = s.targets[a][i]
            assert named == ([values[t]] if t >= 0 else []), (caption, a)
    assert partial_set(300).captions == s.captions and partial_set(300, seed=8).captions != s.captions
    rng = np.random.default_rng(0)
    drawn = [matching_label({"color": "red"}, rng) for _ in range(400)]
    assert {lb.color for lb in drawn} == {"red"} and {lb.shape for lb in drawn} == set(ATTRIBUTES["shape"])

    truth = {a: np.where(t >= 0, t, 0) for a, t in s.targets.items()}
    spread = {a: t.copy() for a, t in s.targets.items()}  # the free attributes' values in turn: uniform
    for a, t in spread.items():
        t[t < 0] = np.arange((t < 0).sum()) % len(ATTRIBUTES[a])
    teacher = Scored(np.zeros((300, 2)), spread, np.ones(300, bool))
    collapsed = Scored(np.zeros((300, 2)), truth, np.ones(300, bool))  # every free attribute: its first value
    wrong = Scored(np.zeros((300, 2)), {a: np.where(t >= 0, (t + 1) % len(ATTRIBUTES[a]), 0)
                                        for a, t in s.targets.items()}, np.ones(300, bool))
    assert fixed_accuracy(teacher, s.targets)["all"] == 1.0 == fixed_accuracy(collapsed, s.targets)["all"]
    assert fixed_accuracy(wrong, s.targets) == {a: 0.0 for a in (*ATTRIBUTES, "all")}
    assert coverage_tv(teacher, s.targets, teacher)["mean"] == 0.0
    assert coverage_tv(teacher, s.targets, None)["mean"] < 0.01  # spread evenly: the data's uniform
    tv = coverage_tv(collapsed, s.targets, None)
    assert tv["color"] == pytest.approx(0.75) and tv["size"] == pytest.approx(0.5)  # 1 - 1/K: all on one value
    assert coverage_tv(collapsed, s.targets, teacher)["shape"] > 0.6
    # the no-clean-shape share by the number of attributes left free (4 / 6 / 4 / 1 of the 15 patterns)
    from train.recipes.shapes_eval import unclean_by_free

    free = sum((t < 0).astype(int) for t in s.targets.values())
    averaging = Scored(np.zeros((300, 2)), truth, free <= 1)  # clean only where one attribute is free
    assert unclean_by_free(averaging, s.targets) == {"1": {"share": 0.0, "n": 80}, "2": {"share": 1.0, "n": 120},
                                                     "3": {"share": 1.0, "n": 80}, "4": {"share": 1.0, "n": 20}}


def test_partial_bootstrap_is_paired_and_scores_each_row():
    """The partial-caption replicates: one index draw for every row (identical rows give identical replicates, so
    differences are paired), the reference's TV to itself is 0 in every replicate, a collapsed row's TV to the data
    stays near its value, the no-clean-shape share is resampled like a mean."""
    from train.data import ATTRIBUTES
    from train.recipes.shapes_eval import Scored, bootstrap, full_set, partial_set

    rng = np.random.default_rng(0)
    full, part = full_set(120), partial_set(150)
    feats = lambda n, shift=0.0: rng.normal(size=(n, 4)) + shift  # noqa: E731
    spread = {a: np.where(t >= 0, t, rng.integers(len(ATTRIBUTES[a]), size=len(t))) for a, t in part.targets.items()}
    collapsed = {a: np.where(t >= 0, t, 0) for a, t in part.targets.items()}
    f = feats(150, 1.0)
    rows = {"teacher-multi": Scored(f, spread, np.ones(150, bool)),
            "twin": Scored(f.copy(), spread, np.ones(150, bool)),
            "collapsed": Scored(feats(150), collapsed, np.arange(150) % 2 == 0)}
    full_rows = {"a": Scored(feats(120), full.targets, np.ones(120, bool))}
    boot = bootstrap(feats(120), full_rows, {"x/y": rng.normal(size=20)}, 40, full.targets,
                     partial={"real": feats(150), "rows": rows, "targets": part.targets, "reference": "teacher-multi"})
    pb = boot["partial"]
    assert np.array_equal(pb["fid"]["teacher-multi"], pb["fid"]["twin"])
    assert not np.array_equal(pb["fid"]["teacher-multi"], pb["fid"]["collapsed"])
    assert (pb["tv_teacher"]["teacher-multi"] == 0).all() and (pb["tv_teacher"]["collapsed"] > 0.3).all()
    assert 0.55 < pb["tv_data"]["collapsed"].mean() < 0.75  # 1 - 1/K averaged over K = 2, 4, 3, 5: 0.64
    assert 0.35 < pb["unclean"]["collapsed"].mean() < 0.65 and (pb["unclean"]["twin"] == 0).all()
    assert (pb["acc"]["collapsed"] == 1).all() and set(boot["acc"]["a"]) == set(ATTRIBUTES)


def test_clean_shapes_accepts_real_images_and_refuses_averaged_ones():
    """The clean-shape test passes every real image (and a decoder-like soft edge) and refuses what mode averaging
    makes: two images averaged, two shapes in one image, a blur wider than an edge, a colour between the palette's."""
    from scipy import ndimage

    from train.data import Label, draw_shape
    from train.recipes.shapes_eval import clean_shapes

    images, labels = make_dataset(240, seed=5)
    assert clean_shapes(images).all()
    soft = ndimage.gaussian_filter(images.astype(np.float32), sigma=(0, 0.5, 0.5, 0)).round().astype(np.uint8)
    assert clean_shapes(soft).all()
    a, b = images[:120], images[120:]
    assert clean_shapes(((a.astype(np.float32) + b) / 2).astype(np.uint8)).mean() < 0.05
    blurred = ndimage.gaussian_filter(images.astype(np.float32), sigma=(0, 1.5, 1.5, 0)).astype(np.uint8)
    assert not clean_shapes(blurred).any()
    rng = np.random.default_rng(0)
    two = np.maximum(draw_shape(Label("small", "red", "circle", "top left"), rng),
                     draw_shape(Label("small", "blue", "square", "bottom right"), rng))
    purple = draw_shape(Label("large", "red", "circle", "center"), rng)
    purple[..., 2] = purple[..., 0]  # red + blue in every shape pixel: no palette colour
    assert clean_shapes(np.stack([two, purple])).tolist() == [False, False]
    assert clean_shapes(np.zeros((1, 32, 32, 3), np.uint8)).tolist() == [False]  # no shape at all


def test_scoring_real_images_with_the_shipped_classifier():
    """End to end on real images: the shipped classifier scores caption-matched real images as right on every fixed
    attribute, spread over the free ones like the data, and clean."""
    from train.recipes.shapes import CLASSIFIER, load_classifier
    from train.recipes.shapes_eval import coverage_tv, fixed_accuracy, matching_real, partial_set, score

    if not CLASSIFIER.is_file():
        pytest.skip("no shipped classifier")
    s = partial_set(450)
    real = score(load_classifier(), matching_real(s, seed=30))
    assert real.feats.shape == (450, 128) and real.clean.all()
    assert fixed_accuracy(real, s.targets)["all"] > 0.97
    assert coverage_tv(real, s.targets, None)["mean"] < 0.1


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
    assert ModelDims.from_json(dims.to_json()) == dims
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


def test_recipe_budget_overrides_and_bad_ones(tmp_path, capsys):
    from train.recipes.shapes import budget, main

    assert budget(False, ["pairs=6000", "teacher_guidance=4"]).pairs == 6000
    assert budget(True, ["pairs=6000"]).rf2_steps == 2  # overrides apply to the smoke budget too
    for bad, says in (("pears=1", "no such setting"), ("pairs=many", "pairs takes a int")):
        assert main(["-o", str(tmp_path / "r"), "--budget", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and "\n" not in err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_recipe_stages_compute_in_fp32_with_the_budget_seed_on_any_device(tmp_path, monkeypatch):
    """A GPU run of the recipe computes what the CPU run does: the pairs' teacher and every training stage in fp32
    (no fp16 sampling, no bf16 autocast), and ``--budget seed=N`` reaches every trained stage."""
    import train.recipes.shapes as shapes

    seen: dict[str, object] = {}

    class FakeTrainer:
        def __init__(self, cfg, loss, name, **kw):
            seen["cfg"], self.losses, self.steps_per_s, self.resumed_from = cfg, [], 0.0, 0

        def run(self):
            return tmp_path / "model"

    monkeypatch.setattr(shapes, "Trainer", FakeTrainer)
    monkeypatch.setattr(shapes, "generate", lambda *a, **kw: seen.update(generate=kw) or {"new_pairs": 0})
    monkeypatch.setattr(shapes, "pairs_identity", lambda pairs: {"num_pairs": 16})
    b = shapes.budget(True, ["seed=3"])
    shapes.train_stage(tmp_path, "rf2", tmp_path / "pairs", tmp_path / "init", 2, b, "reflow")
    shapes.stage_pairs(tmp_path, "pairs_rf2", tmp_path / "rf2", 1.5, b)
    cfg = seen["cfg"]
    assert cfg.seed == 3 and cfg.mixed_precision == "no"
    shapes.train_stage(tmp_path, "student-s1", tmp_path / "pairs", tmp_path / "init", 2, b, "l2", seed=4)
    assert seen["cfg"].seed == 4  # a student's own training seed
    assert seen["generate"]["dtype"] == "fp32"
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with shapes.strict_fp32():  # run() wraps the recipe in it: no TF32 convolutions or matmuls on a GPU
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
    monkeypatch.setattr(shapes, "_run", lambda *a: seen.update(tf32=torch.backends.cudnn.allow_tf32))
    shapes.run(tmp_path / "r", smoke=True)
    assert seen["tf32"] is False


def test_recipe_sets_every_training_setting_itself(tmp_path, monkeypatch):
    """The recipe's numbers must not move when TrainConfig's defaults do (issue 30 moved EMA to 0.9999 and lr to
    1e-6): every setting that changes what a stage computes is passed explicitly, with the recipe's values."""
    import dataclasses

    import train.recipes.shapes as shapes
    from train.loop import TrainConfig

    passed: dict[str, object] = {}

    def config(**kw):
        passed.update(kw)
        return TrainConfig(**kw)

    class FakeTrainer:
        def __init__(self, cfg, loss, name, **kw):
            self.losses, self.steps_per_s, self.resumed_from = [], 0.0, 0

        def run(self):
            return tmp_path / "model"

    monkeypatch.setattr(shapes, "TrainConfig", config)
    monkeypatch.setattr(shapes, "Trainer", FakeTrainer)
    monkeypatch.setattr(shapes, "pairs_identity", lambda pairs: {})
    shapes.train_stage(tmp_path, "rf2", tmp_path / "pairs", tmp_path / "init", 250, shapes.budget(), "reflow")
    bookkeeping = {"out", "save_every", "keep", "force", "prefetch", "grad_checkpointing", "log_dir", "log_every",
                   "validate_every", "validation_prompts", "validation_num", "validation_steps", "validation_guidance",
                   "recipe", "lpips_net", "lpips_random_backbone"}  # (LPIPS: the recipe's losses are latent L2)
    numeric = {f.name for f in dataclasses.fields(TrainConfig)} - bookkeeping
    assert numeric <= set(passed), sorted(numeric - set(passed))
    want = {"lr": 1e-3, "ema": 0.999, "weight_decay": 1e-2, "lr_schedule": "constant-with-warmup",
            "warmup_steps": 100, "max_grad_norm": 1.0, "batch_size": 64, "grad_accum": 1, "global_batch": None,
            "mixed_precision": "no", "text_embeddings": "encode", "text_dropout": 0.1, "seed": 0, "max_steps": 250}
    assert {k: passed[k] for k in want} == want


def test_path_straightness_returns_host_float64():
    from train.metrics import path_straightness

    z0, z1 = torch.zeros(2, 4), torch.ones(2, 4)
    straight = [(0.0, z0), (0.5, 0.5 * z1), (1.0, z1)]
    bent = [(0.0, z0), (0.5, z1), (1.0, z1)]
    s = path_straightness(straight)
    assert s.dtype == torch.float64 and s.device.type == "cpu"
    assert torch.allclose(s, torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(path_straightness(bent), torch.ones(2, dtype=torch.float64))


def test_publishing_keeps_the_hand_written_discussion(tmp_path):
    """--publish replaces the generated part of SHAPES.md and its grids, keeps everything from the discussion marker
    on, and leaves the report's cached rows behind."""
    from train.recipes.shapes import publish_report
    from train.recipes.shapes_eval import DISCUSSION

    report = tmp_path / "run" / "report"
    (report / "rows").mkdir(parents=True)
    (report / "rows" / "teacher-multi.full.npz").write_bytes(b"x")
    (report / "grid-student.png").write_bytes(b"png")
    (report / "results.json").write_text("{}")
    (report / "SHAPES.md").write_text("# new report\n\n| student | [grid](grid-student.png) |\n")
    into = tmp_path / "recipes"
    (into / "shapes_report").mkdir(parents=True)
    (into / "shapes_report" / "grid-old.png").write_bytes(b"old")
    (into / "SHAPES.md").write_text(f"# old report\n\nold numbers\n\n{DISCUSSION}\n## Discussion\n\nby hand\n")
    text = publish_report(report, into).read_text()
    assert text == (f"# new report\n\n| student | [grid](shapes_report/grid-student.png) |\n\n{DISCUSSION}\n"
                    "## Discussion\n\nby hand\n")
    assert sorted(p.name for p in (into / "shapes_report").iterdir()) == ["grid-student.png", "results.json"]
