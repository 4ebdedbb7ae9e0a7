"""train at scale (issue 30): mixed precision and the gradient scaler, DCP checkpoints (atomic, kept, resharded),
logging and validation, LR schedules and the recipe file, LPIPS memory, prefetching and cached text embeddings, the
evaluation harness. Every option that must not change the result is checked against one reference run, bit for
bit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from train.common import TrainError
from train.loop import Trainer, TrainConfig, lr_factor, reflow_loss
from train.pairs import generate

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "train" / "recipes" / "instaflow_sd15.toml"
PROMPTS = ["a red circle at the top left", "a small blue square", "a large green triangle at the center",
           "a yellow circle", "a blue triangle at the bottom right"]


@pytest.fixture(scope="module")
def pairs(sd_style_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    shutil.copytree(sd_style_ckpt, root / "teacher")  # ROOT/teacher: the initial weights, next to ROOT/pairs
    generate(str(root / "teacher"), str(root / "prompts.txt"), root / "pairs", num_pairs=16, batch_size=8,
             shard_size=4, steps=3)
    return root / "pairs"


def _cfg(pairs: Path, out: Path, **kw) -> TrainConfig:
    base = {"max_steps": 4, "batch_size": 4, "lr": 3e-3, "save_every": 2, "ema": 0.9, "prefetch": 0,
            "text_embeddings": "encode"}
    return TrainConfig(pairs=str(pairs), out=str(out), **{**base, **kw})


def _weights(model: Path) -> dict[str, torch.Tensor]:
    return load_file(model / "unet" / "diffusion_pytorch_model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(pairs, tmp_path_factory):
    """4 steps, nothing optional: what every variant below must reproduce exactly."""
    return _weights(Trainer(_cfg(pairs, tmp_path_factory.mktemp("ref") / "run"), reflow_loss, "reflow").run())


def _env(tmp: Path):
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}


def _one_line_exit_2(capsys, main, argv, match: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------------------ 4: schedules, clipping, recipe
def test_lr_schedules():
    assert [lr_factor("constant", s, 0, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [lr_factor("constant-with-warmup", s, 4, 10) for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]
    cos = [lr_factor("cosine", s, 2, 12) for s in range(12)]
    assert cos[:2] == [0.5, 1.0] and cos[2] == 1.0 and cos[7] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(cos[2:], cos[3:])) and cos[-1] == pytest.approx(0.0245, abs=1e-3)


def test_recipe_file_states_the_paper_and_flags_override_it(capsys, tmp_path):
    """The shipped recipe is valid for every command it names; a flag beats the recipe; mistakes are one line."""
    from train import distill, pairs, reflow
    from train.common import parse_args

    parsers = {"pairs": pairs.build_parser, "reflow": reflow.build_parser, "distill": distill.build_parser}
    tables = ("pairs-sd", "reflow-1", "reflow-2", "pairs-2rf", "distill-l2", "distill-lpips")
    for table in tables:
        build = parsers[table.split("-")[0]]
        extra = ["--prompts", "p.txt"] if table.startswith("pairs") else ["--pairs", "p"]
        a = parse_args(build(), ["--recipe", f"{RECIPE}:{table}", *extra, "-o", "o"])
        assert a.recipe == f"{RECIPE}:{table}"
    a = parse_args(reflow.build_parser(), ["--recipe", f"{RECIPE}:reflow-1", "--pairs", "p", "-o", "o", "--lr", "2e-6"])
    assert (a.lr, a.ema, a.global_batch, a.max_steps, a.mixed_precision) == (2e-6, 0.9999, 64, 70000, "auto")
    a = parse_args(distill.build_parser(), ["--recipe", f"{RECIPE}:distill-lpips", "--pairs", "p", "-o", "o"])
    assert (a.loss, a.global_batch, a.max_steps, a.grad_checkpointing, a.text_dropout) == ("lpips", 1024, 18000,
                                                                                          True, 0.0)
    bad = tmp_path / "bad.toml"
    bad.write_text('[reflow]\nlearning-rate = 1e-6\n[typed]\nmax-steps = "many"\n')
    base = ["--pairs", "p", "-o", str(tmp_path / "o")]
    _one_line_exit_2(capsys, reflow.main, ["--recipe", f"{bad}:reflow", *base], "has no --learning-rate")
    _one_line_exit_2(capsys, reflow.main, ["--recipe", f"{bad}:typed", *base],
                     "max-steps = 'many' is not a valid value")
    _one_line_exit_2(capsys, reflow.main, ["--recipe", f"{bad}:nope", *base], "has no table [nope]")
    _one_line_exit_2(capsys, reflow.main, ["--recipe", str(bad), *base], "--recipe takes FILE:TABLE")


def test_new_settings_are_one_line(pairs, tmp_path, capsys):
    from train import reflow

    base = ["--pairs", str(pairs), "-o", str(tmp_path / "run")]
    _one_line_exit_2(capsys, reflow.main, base + ["--lr-schedule", "constant", "--warmup-steps", "5"],
                     "constant has no warm-up")
    _one_line_exit_2(capsys, reflow.main, base + ["--max-grad-norm", "-1"], "--max-grad-norm must be >= 0")
    _one_line_exit_2(capsys, reflow.main, base + ["--keep", "0"], "--keep must be >= 1")
    _one_line_exit_2(capsys, reflow.main, base + ["--global-batch", "10", "--batch-size", "4"],
                     "--global-batch 10 is not a multiple of --batch-size 4 x 1 rank(s)")
    _one_line_exit_2(capsys, reflow.main, base + ["--global-batch", "8", "--batch-size", "4", "--grad-accum", "3"],
                     "--grad-accum 3 contradicts --global-batch 8")
    assert not (tmp_path / "run").exists()


def test_global_batch_sets_accumulation_and_clipping_and_cosine_change_the_run(pairs, tmp_path, reference):
    """--global-batch 8 at --batch-size 4 is --grad-accum 2 (same result); clipping and the schedule act."""
    kw = {"batch_size": 2, "max_steps": 2}
    accum = _weights(Trainer(_cfg(pairs, tmp_path / "a", grad_accum=2, **kw), reflow_loss, "reflow").run())
    glob = _weights(Trainer(_cfg(pairs, tmp_path / "g", global_batch=4, **kw), reflow_loss, "reflow").run())
    assert _same(accum, glob)
    # AdamW's step does not depend on the gradient's scale, except through eps: clipped to 1e-12, eps dominates and
    # the weights barely move
    t = Trainer(_cfg(pairs, tmp_path / "c", max_grad_norm=1e-12, ema=0.0, max_steps=2), reflow_loss, "reflow")
    clipped, init = _weights(t.run()), _weights(Path(pairs.parent) / "teacher")
    moved = max(float((clipped[k] - init[k]).abs().max()) for k in init)
    assert 0 < moved < 1e-4  # lr 3e-3 x (1e-12-sized gradient / 1e-8): unclipped, steps are ~lr
    t = Trainer(_cfg(pairs, tmp_path / "cos", lr_schedule="cosine", warmup_steps=1), reflow_loss, "reflow")
    t.run()
    meta = json.loads((tmp_path / "cos" / "state" / "step-00000004" / "meta.json").read_text())
    assert meta["run"]["max_steps"] == 4 and meta["optimizer"][0]["lr"] == pytest.approx(0.0)  # decayed to 0
    with pytest.raises(TrainError, match="max_steps 4 -> 6"):  # cosine depends on the length: another run
        Trainer(_cfg(pairs, tmp_path / "cos", lr_schedule="cosine", warmup_steps=1, max_steps=6), reflow_loss,
                "reflow").run()


# ------------------------------------------------------------------------------ 1: mixed precision
def test_bf16_autocast_on_cpu_keeps_fp32_master_weights_and_resumes_exactly(pairs, tmp_path, reference):
    full = Trainer(_cfg(pairs, tmp_path / "full", mixed_precision="bf16"), reflow_loss, "reflow")
    a = _weights(full.run())
    assert all(v.dtype == torch.float32 for v in a.values())  # master weights (and the model written) stay fp32
    assert not _same(a, reference)  # autocast really ran in bf16
    Trainer(_cfg(pairs, tmp_path / "split", mixed_precision="bf16", max_steps=2), reflow_loss, "reflow").run()
    b = _weights(Trainer(_cfg(pairs, tmp_path / "split", mixed_precision="bf16"), reflow_loss, "reflow").run())
    assert _same(a, b)
    with pytest.raises(TrainError, match="mixed_precision 'bf16' -> 'no'"):
        Trainer(_cfg(pairs, tmp_path / "split", max_steps=6), reflow_loss, "reflow").run()


def test_fp16_gradient_scaler_skips_overflowing_steps_and_resumes_with_its_scale(pairs, tmp_path):
    """A stand-in loss overflows on chosen optimizer steps: the scaler skips them (weights, LR schedule and EMA
    stay), halves its scale, and its state is part of the resumable state (a resumed run equals the full run). The
    scale starts at 65536, so the first steps may overflow by themselves too."""
    class Overflow:
        def __init__(self, bad: set[int], accum: int = 1) -> None:
            self.calls, self.bad, self.accum = 0, bad, accum

        def __call__(self, b):
            step = self.calls // self.accum + 1
            self.calls += 1
            loss = reflow_loss(b)
            return loss * float("inf") if step in self.bad else loss

    def run(out, steps, bad, start=0):
        t = Trainer(_cfg(pairs, out, mixed_precision="fp16", max_steps=steps, ema=0.0), Overflow(bad), "reflow")
        t.loss_fn.calls = start
        return t, _weights(t.run())

    t1, one = run(tmp_path / "one", 1, {1})
    assert t1.skipped_steps == 1
    assert _same(one, _weights(Path(pairs.parent) / "teacher"))  # the skipped step left the initial weights
    meta = json.loads((tmp_path / "one" / "state" / "step-00000001" / "meta.json").read_text())
    assert meta["scaler"]["scale"] == 65536.0 / 2 and meta["scheduler"]["last_epoch"] == 0
    assert meta["skipped_steps"] == 1 and meta["optimizer"][0]["lr"] == 3e-3
    tf, full = run(tmp_path / "full", 4, {2})
    assert 1 <= tf.skipped_steps < 4 and not _same(full, one)  # the steps that did not overflow moved the weights
    run(tmp_path / "split", 2, {2})
    ts, split = run(tmp_path / "split", 4, {2}, start=2)
    assert _same(full, split) and tf.skipped_steps == ts.skipped_steps


# ------------------------------------------------------------------------------ 2: checkpoints
KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import torch.distributed.checkpoint as dcp
    from train.loop import Trainer, TrainConfig, reflow_loss

    real = dcp.FileSystemWriter.write_data
    def write_then_die(self, plan, planner):
        out = real(self, plan, planner)
        if "step-00000004" in str(self.path):  # data of the step-4 state written, not yet finished and renamed
            out.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    dcp.FileSystemWriter.write_data = write_then_die
    cfg = TrainConfig(pairs=sys.argv[1], out=sys.argv[2], max_steps=4, batch_size=4, lr=3e-3, save_every=2, ema=0.9,
                      prefetch=0, text_embeddings="encode")
    Trainer(cfg, reflow_loss, "reflow").run()
""")


def test_a_save_killed_by_sigkill_leaves_the_previous_state_and_the_resume_is_exact(pairs, tmp_path, reference):
    out = tmp_path / "run"
    env = {**_env(tmp_path), "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the reference's arithmetic
    r = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(pairs), str(out)], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    state = out / "state"
    assert sorted(p.name for p in state.iterdir()) == [".tmp-step-00000004", "step-00000002"]
    assert list((state / ".tmp-step-00000004").glob("*.distcp")) and not (state / ".tmp-step-00000004" /
                                                                        "meta.json").exists()
    resumed = Trainer(_cfg(pairs, out, keep=1), reflow_loss, "reflow")
    assert _same(_weights(resumed.run()), reference)
    assert sorted(p.name for p in state.iterdir()) == ["step-00000004"]  # --keep 1; the broken save cleared


def test_damaged_or_old_states_are_one_line(pairs, tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(pairs, out, max_steps=2), reflow_loss, "reflow").run()
    (out / "state" / "step-00000002" / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(TrainError, match=r"step-00000002 is damaged \(.*\); delete it") as info:
        Trainer(_cfg(pairs, out, max_steps=3), reflow_loss, "reflow").run()
    assert "\n" not in str(info.value)
    old = tmp_path / "old"
    (old / "state").mkdir(parents=True)
    (old / "state" / "step-00000500.pt").write_bytes(b"")
    with pytest.raises(TrainError, match="earlier version of the trainer \\(step-00000500.pt\\)"):
        Trainer(_cfg(pairs, old, max_steps=3), reflow_loss, "reflow").run()


def test_state_metadata_is_read_without_unpickling_other_classes(tmp_path):
    import pickle

    from train.checkpoint import _Reader

    (tmp_path / ".metadata").write_bytes(pickle.dumps(os.system))
    with pytest.raises(TrainError, match="is damaged \\(UnpicklingError\\)"):
        _Reader(tmp_path).read_metadata()


# ------------------------------------------------------------------------------ 6: data
def test_prefetch_and_cached_embeddings_change_nothing(pairs, tmp_path, reference, capsys):
    from train.embed import embed

    folder = embed(pairs)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 4
    t = Trainer(_cfg(pairs, tmp_path / "fast", prefetch=3, text_embeddings="auto"), reflow_loss, "reflow")
    assert _same(_weights(t.run()), reference)  # bit-identical: same pairs, same order, same embeddings
    meta = json.loads((tmp_path / "fast" / "state" / "step-00000004" / "meta.json").read_text())
    assert meta["run"]["text_embeddings"] == f"cached:{folder.name}"
    side = folder / "shard-00002.safetensors"
    side.write_bytes(side.read_bytes()[:-8] + b"\0" * 8)  # damaged: the loader thread's error reaches the step
    with pytest.raises(TrainError, match="shard-00002.safetensors is missing or does not match its checksum"):
        Trainer(_cfg(pairs, tmp_path / "bad", prefetch=2, text_embeddings="cached", max_steps=8), reflow_loss,
                "reflow").run()
    (folder / "manifest.json").unlink()
    with pytest.raises(TrainError, match="has no text-embedding cache for this model's text encoder"):
        Trainer(_cfg(pairs, tmp_path / "none", text_embeddings="cached"), reflow_loss, "reflow").run()


def test_the_loader_reads_the_next_shard_group_ahead_on_another_thread(pairs):
    """Groups of one shard (cache_shards=1): the first shard is read by the prefetch thread when its batch is
    assembled, every later one by the read-ahead thread, before a batch needs it, each exactly once."""
    import threading

    from train.pairset import Loader, PairSet, PairStream

    ps = PairSet(pairs, cache_shards=1)
    reads, real = [], ps._read
    ps._read = lambda k: reads.append((k, threading.current_thread().name)) or real(k)
    loader = Loader(ps, PairStream(ps, 2, seed=0), prefetch=2)
    batches = [next(loader) for _ in range(8)]  # one epoch: 16 pairs
    loader.close()
    first = int(PairStream(ps, 2, seed=0).shards(0)[0])
    assert sorted(k for k, _ in reads[:4]) == [0, 1, 2, 3], reads  # each once (the list is in order of starts)
    assert [k for k, n in reads[:4] if not n.startswith("shard-read")] == [first], reads
    sync = Loader(PairSet(pairs, cache_shards=1), PairStream(ps, 2, seed=0), prefetch=0)
    assert all(torch.equal(a[1], next(sync)[1]) for a in batches)


# ------------------------------------------------------------------------------ 3: logging and validation
def test_logging_and_validation_are_written_and_change_nothing(pairs, tmp_path, reference, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, logs = tmp_path / "run", tmp_path / "tb"
    t = Trainer(_cfg(pairs, out, log_dir=str(logs), log_every=2, validate_every=2, validation_num=3,
                     validation_steps=2, prefetch=2), reflow_loss, "reflow")
    assert _same(_weights(t.run()), reference)
    shots = out / "validation" / "step-00000004"
    assert sorted(p.name for p in shots.iterdir()) == ["00.png", "01.png", "02.png", "grid.png"]
    assert "straightness" in capsys.readouterr().out
    acc = EventAccumulator(str(logs), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/pairs_per_s", "perf/pairs_per_s_per_rank",
            "validation/straightness"} <= set(tags["scalars"]) and "validation/samples" in tags["images"]
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]
    assert acc.Scalars("train/lr")[0].value == pytest.approx(3e-3)


# ------------------------------------------------------------------------------ 5: LPIPS memory
def test_lpips_decoder_checkpointing_same_gradient_far_less_memory(tiny_ckpt):
    from diffusers import UNet2DConditionModel

    from benchmarks.train_memory import lpips_distill_activation_bytes
    from runtime.checkpoints import resolve
    from runtime.models import load_components
    from train.distill import lpips_model, make_lpips_loss
    from train.loop import Batch

    comps = load_components(resolve(str(tiny_ckpt)))
    net = lpips_model("alex", random_backbone=True)
    g = torch.Generator().manual_seed(0)
    c, s = comps.latent_channels, comps.unet.config.sample_size
    x0, x1 = torch.randn(2, c, s, s, generator=g), torch.randn(2, c, s, s, generator=g)
    emb = torch.randn(2, comps.max_length, comps.text_encoder.config.hidden_size, generator=g)
    grads = []
    for on in (False, True):
        comps.unet.train().requires_grad_(True).zero_grad()
        comps.vae.requires_grad_(False)
        (comps.vae.enable_gradient_checkpointing if on else comps.vae.disable_gradient_checkpointing)()
        make_lpips_loss(net, checkpointing=on)(Batch(comps.unet, x0, x1, emb, g, comps)).backward()
        grads.append([p.grad.clone() for p in comps.unet.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(comps.unet.config)
        vae = type(comps.vae).from_config(comps.vae.config)
    meta_net = lpips_model("alex", random_backbone=True).to("meta")
    full, kept = (lpips_distill_activation_bytes(unet, vae, meta_net, 2, s, comps.max_length,
                                                 comps.text_encoder.config.hidden_size, ck) for ck in (False, True))
    assert kept < 0.5 * full


# ------------------------------------------------------------------------------ 7: evaluation harness
class StandIn(torch.nn.Module):
    """A small deterministic feature extractor in the Inception role (uint8 images -> 8 features)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.float() / 127.5 - 1).relu().mean((2, 3)).double()


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A tiny COCO-2017-style set: val2017/*.jpg and annotations/captions_val2017.json (two captions per image)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("coco")
    (root / "val2017").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(6):
        name = f"{i + 1:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "val2017" / name)
        images.append({"id": i + 1, "file_name": name})
        annotations += [{"image_id": i + 1, "caption": PROMPTS[i % 5] + " "}, {"image_id": i + 1, "caption": "x"}]
    (root / "captions.json").write_text(json.dumps({"images": images[::-1], "annotations": annotations}))
    return root


def test_evaluate_fid_and_clip_with_stand_ins_resumes_and_matches_torchmetrics(tiny_ckpt, coco, tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from train.evaluate import Extractors, evaluate, load_captions, reference_images

    rows = load_captions(coco / "captions.json", coco / "val2017", None)
    assert [p.name for p, _ in rows][:2] == ["000000000001.jpg", "000000000002.jpg"] and rows[0][1] == PROMPTS[0]
    fid_net, calls = StandIn(), []
    proj = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))

    def fid(images):
        calls.append(len(images))
        return fid_net(images)

    ex = Extractors(fid, lambda im: im.float().mean((2, 3)) @ proj, lambda t: torch.tensor([[len(x), 1.0, 2.0, 3.0]
                                                                                            for x in t]),
                    {"fid": "stand-in", "clip": "stand-in"})
    out = tmp_path / "eval"
    m = evaluate(str(tiny_ckpt), coco / "captions.json", coco / "val2017", out, batch_size=4, extractors=ex)
    assert m["num"] == 6 and np.isfinite(m["fid"]) and -1 <= m["clip_score"] <= 1 and calls == [4, 4, 2, 2]
    assert json.loads((out / "metrics.json").read_text())["fid"] == m["fid"]
    assert len(list((out / "images").glob("*.png"))) == 6
    # torchmetrics' FID over the same images with the same feature network gives the same number
    from PIL import Image

    fake = torch.stack([torch.from_numpy(np.asarray(Image.open(out / "images" / f"{i:05d}.png")).copy())
                        .permute(2, 0, 1) for i in range(6)])
    tm = FrechetInceptionDistance(feature=fid_net)
    tm.update(reference_images([p for p, _ in rows], (32, 32)), real=True)
    tm.update(fake, real=False)
    assert float(tm.compute()) == pytest.approx(m["fid"], rel=1e-6)
    # resumable: a lost batch is the only work done again, and the numbers do not move
    (out / "features" / "batch-00001.safetensors").unlink()
    calls.clear()
    assert evaluate(str(tiny_ckpt), coco / "captions.json", coco / "val2017", out, batch_size=4,
                    extractors=ex)["fid"] == m["fid"] and calls == [2, 2]
    with pytest.raises(TrainError, match=r"other settings \(num_inference_steps differ\)"):
        evaluate(str(tiny_ckpt), coco / "captions.json", coco / "val2017", out, batch_size=4, steps=2, extractors=ex)


def test_evaluate_without_weights_is_one_line(tiny_ckpt, coco, tmp_path, capsys, monkeypatch):
    from train import evaluate as ev

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    base = ["--ckpt", str(tiny_ckpt), "--captions", str(coco / "captions.json"), "--images", str(coco / "val2017"),
            "-o", str(tmp_path / "e")]
    _one_line_exit_2(capsys, ev.main, base, f"put {ev.INCEPTION_FILE} into {tmp_path / 'hub' / 'checkpoints'}")
    _one_line_exit_2(capsys, ev.main, base + ["--num", "7"], "--num 7 but")
    fake = tmp_path / "inception.pth"
    fake.write_bytes(b"not weights")
    _one_line_exit_2(capsys, ev.main, base + ["--inception", str(fake)], "cannot load the Inception weights")


def test_results_sections_render_from_the_measured_json():
    """RESULTS.md's training sections come from benchmarks/results/*.json through benchmarks.report."""
    from benchmarks.report import OTHER_SECTIONS

    texts = []
    for f in sorted((ROOT / "benchmarks" / "results").glob("train-*.json")):
        doc = json.loads(f.read_text())
        render = next(r for key, r in OTHER_SECTIONS if key in doc)
        texts.append("\n".join(render(doc)))
    text = "\n".join(texts)
    assert "| after: DCP |" in text and "| before: one torch.save file |" in text
    assert "| 250 | cached (read with the pairs) |" in text and "| LPIPS distillation | 8 | yes |" in text
