"""train: pairs (deterministic, resumable, multi-process), reflow/distill (loss decreases, exact resume), metrics,
bad input, and the whole chain on a tiny SD-style teacher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from runtime import Pipeline
from train.common import TrainError, load_prompts
from train.loop import Batch, Trainer, TrainConfig, epsilon_loss, l2_loss, reflow_loss
from train.metrics import evaluate, path_straightness, straightness
from train.pairs import generate
from train.pairset import PairSet, PairStream

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle at the top left", "a small blue square", "a large green triangle at the center",
           "a yellow circle", "a blue triangle at the bottom right"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


class one_thread:
    """Pairs are bit-identical for the same number of intra-op threads per process (CPU kernels split their sums
    by thread); torchrun runs each rank with one, so the single-process references here use one as well."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


@pytest.fixture(scope="module")
def sd_pairs(sd_style_ckpt, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "sd"
    with one_thread():
        generate(str(sd_style_ckpt), str(prompts_file), out, num_pairs=20, batch_size=4, shard_size=8, steps=6)
    return out


def _env(tmp: Path | None = None):
    """The subprocesses' environment; with ``tmp``, their temporary files (torchrun's log folders) go there."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return {**env, "TMPDIR": str(tmp)} if tmp else env


def _pairs_cmd(teacher, prompts, out, n=20):
    return ["-m", "train.pairs", "--teacher", str(teacher), "--prompts", str(prompts), "-o", str(out),
            "--num-pairs", str(n), "--batch-size", "4", "--shard-size", "8", "--steps", "6"]


def _same_shards(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("shard-*.safetensors"))
    assert names and names == sorted(p.name for p in b.glob("shard-*.safetensors"))
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_pairs_content_and_manifest(sd_pairs, sd_style_ckpt):
    ps = PairSet(sd_pairs)
    x0, x1, texts = ps.pairs(torch.arange(20))
    assert len(ps) == 20 and x0.shape == (20, 4, 8, 8) and x1.shape == (20, 4, 8, 8)
    m = json.loads((sd_pairs / "manifest.json").read_text())
    assert m["complete"] and len(m["shards"]) == 3
    assert m["settings"]["teacher"]["kind"] == "diffusion" and m["settings"]["teacher"]["steps"] == 6
    assert m["settings"]["teacher"]["guidance"] == 5.0
    from train.pairs import pair_noise

    assert torch.equal(x0[13], pair_noise(0, 13, (4, 8, 8)))  # noise of pair i from (seed, i) alone
    assert set(texts) == set(PROMPTS)  # every prompt used
    assert not torch.allclose(x0, x1)


def test_pairs_identical_with_two_processes(sd_style_ckpt, prompts_file, sd_pairs, tmp_path):
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        *_pairs_cmd(sd_style_ckpt, prompts_file, out)], env=_env(tmp_path), cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    _same_shards(sd_pairs, out)


def test_pairs_kill_and_resume(sd_style_ckpt, prompts_file, sd_pairs, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *_pairs_cmd(sd_style_ckpt, prompts_file, out)], env=_env(),
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*.sha256")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(out.glob("*.sha256")))  # a shard is finished once its checksum sidecar is written
    assert 1 <= finished < 3, f"{finished} of 3 shards finished: the kill did not land mid-run"
    r = subprocess.run([sys.executable, *_pairs_cmd(sd_style_ckpt, prompts_file, out)], env=_env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    _same_shards(sd_pairs, out)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no half-written files left


def test_corrupted_shard_is_regenerated(sd_style_ckpt, prompts_file, sd_pairs, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(sd_pairs, out)
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TrainError, match="does not match its checksum"):
        PairSet(out).pairs(torch.arange(20))  # shards are read, and checked, when a batch needs them
    with one_thread():
        doc = generate(str(sd_style_ckpt), str(prompts_file), out, num_pairs=20, batch_size=4, shard_size=8, steps=6)
    assert "(8 new" in capsys.readouterr().out  # only that shard (8 pairs) was made again
    assert doc["new_pairs"] == 8 and "new_pairs" not in json.loads((out / "manifest.json").read_text())
    _same_shards(sd_pairs, out)


def test_pairs_bad_input(sd_style_ckpt, prompts_file, sd_pairs, tiny_ckpt, tmp_path):
    with pytest.raises(TrainError, match="prompt file does not exist"):
        generate(str(sd_style_ckpt), str(tmp_path / "nope.txt"), tmp_path / "o")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(TrainError, match="holds no prompts"):
        generate(str(sd_style_ckpt), str(empty), tmp_path / "o")
    no_sched = tmp_path / "nosched"
    shutil.copytree(sd_style_ckpt, no_sched)
    shutil.rmtree(no_sched / "scheduler")
    with pytest.raises(TrainError, match="without a readable scheduler"):
        generate(str(no_sched), str(prompts_file), tmp_path / "o")
    before = (sd_pairs / "manifest.json").read_bytes()
    with pytest.raises(TrainError, match="other settings .*teacher"):
        generate(str(tiny_ckpt), str(prompts_file), sd_pairs, num_pairs=20, batch_size=4, shard_size=8, steps=6)
    assert (sd_pairs / "manifest.json").read_bytes() == before  # nothing written over


def test_prompt_file_formats(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps([{"caption": "a cat"}, "a dog"]))
    (tmp_path / "p.csv").write_text("id,text\n1,a fox\n2,a cow\n")
    assert load_prompts(tmp_path / "p.json") == ["a cat", "a dog"]
    assert load_prompts(tmp_path / "p.csv") == ["a fox", "a cow"]


def _train(pairs, out, loss, steps, **kw):
    cfg = TrainConfig(pairs=str(pairs), out=str(out), max_steps=steps, batch_size=8, lr=3e-3, save_every=3,
                      **kw)
    trainer = Trainer(cfg, reflow_loss if loss == "reflow" else l2_loss, loss)
    return trainer, trainer.run()


def test_pairs_stream_from_disk_with_bounded_memory(sd_pairs, monkeypatch):
    """No pair is read when the set opens; at most cache_shards shards are held; each epoch deals the shards to
    the ranks without overlap (together: every pair once), shuffled across and within shards from (seed, epoch,
    rank); micro-batch i is a pure function of i, so a resume mid-epoch continues exactly."""
    import itertools

    import train.pairset as pairset

    reads = []
    real = pairset.st_load
    monkeypatch.setattr(pairset, "st_load", lambda data: reads.append(1) or real(data))
    ps = PairSet(sd_pairs, cache_shards=1)
    assert len(ps) == 20 and list(ps.sizes) == [8, 8, 4] and reads == []
    for world in (1, 2, 3):
        for e in (0, 1):
            parts = [PairStream(ps, 4, seed=5, rank=r, world=world).epoch(e) for r in range(world)]
            assert sorted(np.concatenate(parts).tolist()) == list(range(20))
    a, b = PairStream(ps, 4, seed=5).epoch(0), PairStream(ps, 4, seed=5).epoch(1)
    assert not np.array_equal(a, b) and not np.array_equal(a, np.sort(a))  # reshuffled each epoch, not in order
    assert np.array_equal(a, PairStream(ps, 4, seed=5).epoch(0))
    full = list(itertools.islice(PairStream(ps, 3, seed=5, rank=1, world=2).batches(), 12))
    resumed = list(itertools.islice(PairStream(ps, 3, seed=5, rank=1, world=2).batches(start=7), 5))
    assert all(np.array_equal(x, y) for x, y in zip(full[7:], resumed))
    for batch in full:
        ps.pairs(batch)
        assert len(ps._cache) == 1  # bounded by cache_shards
    with pytest.raises(TrainError, match="3 shard\\(s\\), fewer than the 4 training ranks"):
        PairStream(ps, 4, world=4)


def test_reflow_loss_decreases_and_model_loads(sd_pairs, tmp_path):
    trainer, model = _train(sd_pairs, tmp_path / "rf", "reflow", 40, text_dropout=0.1)
    first, last = sum(trainer.losses[:8]) / 8, sum(trainer.losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "RectifiedFlowPipeline" and index["_instaflow"]["stage"] == "reflow"
    assert Pipeline.from_pretrained(model)("a red circle", num_inference_steps=2, seed=0).images


def test_distill_loss_decreases(sd_pairs, tmp_path):
    trainer, _ = _train(sd_pairs, tmp_path / "st", "l2", 40, text_dropout=0.0, init=None)
    assert sum(trainer.losses[-8:]) < 0.8 * sum(trainer.losses[:8])


def test_training_resume_reproduces_uninterrupted_run(sd_pairs, tmp_path):
    first, full = _train(sd_pairs, tmp_path / "full", "reflow", 6, ema=0.9)
    _train(sd_pairs, tmp_path / "split", "reflow", 3, ema=0.9)  # "interrupted" after step 3 (state saved)
    resumed, split = _train(sd_pairs, tmp_path / "split", "reflow", 6, ema=0.9)  # resumes from step 3
    assert (first.resumed_from, resumed.resumed_from) == (0, 3)
    from safetensors.torch import load_file

    a = load_file(full / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(split / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_gives_the_same_step(sd_pairs, tmp_path):
    _, a = _train(sd_pairs, tmp_path / "a", "reflow", 2)
    _, b = _train(sd_pairs, tmp_path / "b", "reflow", 2, grad_checkpointing=True)
    from safetensors.torch import load_file

    wa = load_file(a / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_metric_hooks_skip_cleanly_without_weights(capsys):
    from train.metrics import clip_score_hook, fid_hook

    imgs = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    fid, clip = fid_hook(imgs, imgs), clip_score_hook(imgs, ["a", "b"])
    err = capsys.readouterr().err
    assert (fid is None) == ("FID skipped" in err) and (clip is None) == ("CLIP score skipped" in err)


def test_lpips_weights_missing_is_one_line(tmp_path, monkeypatch):
    from train.distill import lpips_model

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(TrainError, match=r"put vgg16-397923af.pth into .*checkpoints") as info:
        lpips_model("vgg")
    assert "\n" not in str(info.value)
    assert isinstance(lpips_model("alex", random_backbone=True), torch.nn.Module)


def test_straightness_of_straight_and_curved_fields():
    z0 = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    # a flow trained to its fixed point on (z0, target) pairs: v = X1 - X0 everywhere along the path
    assert straightness(lambda z, t: target - z0, z0, steps=10) == pytest.approx(0.0, abs=1e-12)
    # a curved field (rotation in pairs of channels): S > 0
    rot = lambda z, t: torch.cat([-z[:, 2:], z[:, :2]], dim=1) * 3.0  # noqa: E731
    assert straightness(rot, z0, steps=10) > 0.5


def test_epsilon_loss_follows_sds_schedule():
    """The diffusion teacher's loss: zero for the model that knows the true noise under SD's scaled-linear
    schedule, clearly not for one that assumes another schedule."""
    from runtime.builders import SD_SCHEDULER_CONFIG

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # SD's, written out
    x1, eps = torch.randn(32, 4, 8, 8), torch.randn(32, 4, 8, 8)

    def oracle(alphas_cumprod):
        def model(xt, t, encoder_hidden_states, return_dict):
            a = alphas_cumprod[t].reshape(-1, 1, 1, 1).float()
            return ((xt - a.sqrt() * x1) / (1 - a).sqrt(),)
        return model

    def batch(model):
        return Batch(model, eps, x1, torch.zeros(32, 4, 8), torch.Generator().manual_seed(0), None)

    loss = epsilon_loss(SD_SCHEDULER_CONFIG)
    assert float(loss(batch(oracle(torch.cumprod(1 - betas, 0))))) < 1e-8
    linear = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # DDPM's linear schedule
    assert float(loss(batch(oracle(torch.cumprod(1 - linear, 0))))) > 1e-2
    with pytest.raises(TrainError, match="epsilon"):
        epsilon_loss({**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"})


def test_diffusion_teacher_trained_saved_and_solved(sd_pairs, prompts_file, tmp_path):
    """A diffusion model trained by the loop is saved as SD is (StableDiffusionPipeline + scheduler/) and is a
    diffusion teacher for train.pairs; its DPM-Solver path, in flow coordinates, ends at the pairs' X1."""
    from runtime.builders import SD_SCHEDULER_CONFIG
    from train.teacher import load_teacher

    cfg = TrainConfig(pairs=str(sd_pairs), out=str(tmp_path / "t"), max_steps=3, batch_size=4, lr=1e-3,
                      fresh_noise=True, loss="epsilon")
    model = Trainer(cfg, epsilon_loss(SD_SCHEDULER_CONFIG), "teacher", diffusion_scheduler=SD_SCHEDULER_CONFIG).run()
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert json.loads((model / "scheduler" / "scheduler_config.json").read_text())["beta_schedule"] == "scaled_linear"
    doc = generate(str(model), str(prompts_file), tmp_path / "pairs", num_pairs=4, batch_size=4, steps=5)
    assert doc["settings"]["teacher"]["kind"] == "diffusion" and doc["settings"]["teacher"]["guidance"] == 5.0
    teacher = load_teacher(str(model), torch.device("cpu"), steps=5)
    x0, x1, texts = PairSet(tmp_path / "pairs").pairs(torch.arange(4))
    path = []
    out = teacher.solve(x0, texts, trajectory=path)
    times = [t for t, _ in path]
    assert len(path) == 6 and times == sorted(times) and 0.05 < times[0] < 0.08 and times[-1] == 1.0
    assert torch.allclose(path[-1][1], out) and torch.allclose(out, x1, atol=1e-4)
    with pytest.raises(TrainError, match="2 prompts for 4 noise samples"):
        teacher.solve(x0, texts[:2])


def test_diffusion_path_in_flow_coordinates_and_its_straightness():
    """A VP diffusion point sqrt(a) X1 + sqrt(1 - a) eps maps onto t X1 + (1 - t) eps; S of a path is the flow's S
    whatever the step sizes: 0 on the straight path, > 0 when it bends."""
    from train.teacher import diffusion_as_flow

    x1, eps = torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8)
    path = []
    for sigma in (14.6, 6.0, 2.5, 1.0, 0.3, 0.0):  # DPM-Solver-like, uneven in t
        a = 1 / (1 + sigma ** 2)
        t, z = diffusion_as_flow(a ** 0.5 * x1 + (1 - a) ** 0.5 * eps, sigma)
        assert torch.allclose(z, t * x1 + (1 - t) * eps, atol=1e-5)
        path.append((t, z))
    assert float(path_straightness(path).max()) < 1e-9
    bent = [(t, z + 0.5 * torch.sin(torch.pi * torch.tensor(t)) * eps.flip(0)) for t, z in path]
    assert float(path_straightness(bent).min()) > 1e-2


def test_metrics_on_a_checkpoint(tiny_pipe):
    m = evaluate(tiny_pipe, PROMPTS, num=4, steps=4)
    assert m["straightness"] > 0 and m["one_vs_4_step_mse"] > 0


def test_whole_chain_smoke(sd_style_ckpt, prompts_file, tmp_path):
    """pairs (SD-style teacher) -> reflow -> pairs from the 2-RF -> distill -> the runtime loads the student."""
    generate(str(sd_style_ckpt), str(prompts_file), tmp_path / "p1", num_pairs=16, batch_size=8, steps=4)
    rf = Trainer(TrainConfig(pairs=str(tmp_path / "p1"), out=str(tmp_path / "rf"), max_steps=5, batch_size=8,
                             lr=1e-3), reflow_loss, "reflow").run()
    generate(str(rf), str(prompts_file), tmp_path / "p2", num_pairs=16, batch_size=8, steps=4)
    assert json.loads((tmp_path / "p2" / "manifest.json").read_text())["settings"]["teacher"]["kind"] == "flow"
    student = Trainer(TrainConfig(pairs=str(tmp_path / "p2"), out=str(tmp_path / "st"), max_steps=5, batch_size=8,
                                  lr=1e-3, text_dropout=0.0), l2_loss, "distill").run()
    pipe = Pipeline.from_pretrained(student)
    out = pipe(["a red circle at the top left", "a blue square"], seed=0)
    assert len(out.images) == 2 and out.images[0].size == (32, 32)


def test_reflow_under_torchrun_two_processes_and_resharded_resume(sd_pairs, tmp_path, capsys):
    """Two ranks: each writes its part of the DCP state (DDP's replicated tensors are de-duplicated, so each rank's
    file holds about half); a single process resumes from it (another world size) with the very same weights."""
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                        "train.reflow", "--pairs", str(sd_pairs), "-o", str(out), "--max-steps", "4",
                        "--batch-size", "4", "--save-every", "2", "--ema", "0", "--lr", "1e-3", "--prefetch", "2"],
                       env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model" / "model_index.json").is_file()
    state = out / "state"
    assert sorted(p.name for p in state.iterdir()) == ["step-00000002", "step-00000004"]
    parts = sorted((state / "step-00000004").glob("*.distcp"))
    sizes = [p.stat().st_size for p in parts]
    assert len(parts) == 2 and min(sizes) > 0.3 * sum(sizes), sizes  # both ranks wrote, about half each
    saved = load_file(out / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    cfg = TrainConfig(pairs=str(sd_pairs), out=str(out), max_steps=4, batch_size=8, lr=1e-3, ema=0.0)
    model = Trainer(cfg, reflow_loss, "reflow").run()  # global batch 8 as before: the same run, on one rank
    assert "world size 2 -> 1" in capsys.readouterr().out
    again = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[k], again[k]) for k in saved)


def test_training_memory_is_counted_from_what_autograd_keeps():
    """benchmarks.train_memory counts the tensors autograd saves (on the meta device, nothing allocated): they
    scale with the batch, checkpointing keeps far fewer, and parameters are not counted."""
    from diffusers import UNet2DConditionModel

    from benchmarks.train_memory import saved_activation_bytes

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                    layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=8, norm_num_groups=32)
    one, two = (saved_activation_bytes(unet, b, 8, 16, 32, checkpointing=False) for b in (1, 2))
    kept = saved_activation_bytes(unet, 2, 8, 16, 32, checkpointing=True)
    params = sum(p.numel() * 4 for p in unet.parameters())
    assert 1.9 * one < two < 2.1 * one and kept < 0.5 * two and one < params
