"""train: every wrong input is one line (exit 2), runs cannot be mixed up, EMA warms up, LPIPS keeps its gradient."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from train.common import TrainError
from train.loop import Batch, Trainer, TrainConfig, ema_decay, reflow_loss
from train.pairs import generate
from train.pairset import PairSet

PROMPTS = ["a red circle at the top left", "a small blue square", "a yellow circle"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


@pytest.fixture(scope="module")
def teacher_and_pairs(sd_style_ckpt, prompts_file, tmp_path_factory):
    """A private copy of the teacher (tests change it) and 8 pairs made from it through a relative path."""
    root = tmp_path_factory.mktemp("own")
    shutil.copytree(sd_style_ckpt, root / "teacher")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        generate("teacher", str(prompts_file), "pairs", num_pairs=8, batch_size=4, shard_size=4, steps=3)
    finally:
        os.chdir(cwd)
    return root / "teacher", root / "pairs"


def _cfg(pairs: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(pairs=str(pairs), out=str(out), **{"max_steps": 2, "batch_size": 4, "lr": 1e-3,
                                                          "save_every": 1, **kw})


def _weights(model: Path) -> dict[str, torch.Tensor]:
    return load_file(model / "unet" / "diffusion_pytorch_model.safetensors")


def _one_line_exit_2(capsys, main, argv, match: str) -> None:
    capsys.readouterr()  # what earlier steps printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and len(err.strip().splitlines()) == 1, err


def test_bad_settings_are_one_line_before_any_work(teacher_and_pairs, tmp_path, capsys):
    from train import distill, metrics, reflow

    _, pairs = teacher_and_pairs
    base = ["--pairs", str(pairs), "-o", str(tmp_path / "run")]
    _one_line_exit_2(capsys, reflow.main, base + ["--lr", "-1e-3"], "--lr must be a positive number, got -0.001")
    _one_line_exit_2(capsys, reflow.main, base + ["--lr", "nan"], "--lr must be a positive number")
    for ema in ("1.5", "1.0", "-0.1"):
        _one_line_exit_2(capsys, distill.main, base + ["--ema", ema], "--ema must be in [0, 1)")
    _one_line_exit_2(capsys, reflow.main, base + ["--weight-decay", "-1"], "--weight-decay and --warmup-steps")
    assert not (tmp_path / "run").exists()
    for flag in ("--num", "--steps"):
        _one_line_exit_2(capsys, metrics.main, ["--ckpt", "tiny", "--prompts", "x.txt", flag, "0"],
                         "--num and --steps must be >= 1")


def test_damaged_pairs_manifest_is_one_line(teacher_and_pairs, prompts_file, tmp_path, capsys):
    from train import pairs as pairs_cli
    from train import reflow

    teacher, pairs = teacher_and_pairs
    broken = tmp_path / "pairs"
    shutil.copytree(pairs, broken)
    (broken / "manifest.json").write_text('{"settings": {"teacher"')
    with pytest.raises(TrainError, match=r"manifest.json is damaged \(JSONDecodeError\); delete it"):
        PairSet(broken)
    _one_line_exit_2(capsys, reflow.main, ["--pairs", str(broken), "-o", str(tmp_path / "r")], "is damaged")
    _one_line_exit_2(capsys, pairs_cli.main, ["--teacher", str(teacher), "--prompts", str(prompts_file), "-o",
                                              str(broken), "--num-pairs", "8", "--shard-size", "4", "--steps", "3"],
                     "is damaged")


def test_teacher_is_found_from_anywhere_and_a_changed_one_is_refused(teacher_and_pairs, tmp_path):
    teacher, pairs = teacher_and_pairs
    stored = json.loads((pairs / "manifest.json").read_text())["settings"]["teacher"]
    assert stored["name"] == "teacher" and stored["path"] == str(teacher.resolve())  # made through a relative path
    Trainer(_cfg(pairs, tmp_path / "ok"), reflow_loss, "reflow").run()  # from another working directory
    changed = tmp_path / "changed"
    shutil.copytree(pairs.parent, changed)
    config = changed / "teacher" / "unet" / "config.json"
    config.write_text(config.read_text().replace('"norm_eps": 1e-05', '"norm_eps": 2e-05'))
    doc = json.loads((changed / "pairs" / "manifest.json").read_text())
    doc["settings"]["teacher"]["path"] = str(changed / "teacher")
    (changed / "pairs" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(TrainError, match=r"teacher .* changed after its pairs in .* were made; regenerate"):
        Trainer(_cfg(changed / "pairs", tmp_path / "bad"), reflow_loss, "reflow").run()


def test_resume_must_be_the_same_run(teacher_and_pairs, tmp_path, capsys):
    """A distillation pointed at a finished reflow run's folder is refused (it printed "resumed" and wrote a model
    after zero distillation steps); so are other settings; --force starts over."""
    from train import distill

    _, pairs = teacher_and_pairs
    out = tmp_path / "run"
    Trainer(_cfg(pairs, out), reflow_loss, "reflow").run()
    _one_line_exit_2(capsys, distill.main, ["--pairs", str(pairs), "-o", str(out), "--max-steps", "2"],
                     "holds a run with other settings (")
    with pytest.raises(TrainError, match=r"lr 0.001 -> 0.002"):
        Trainer(_cfg(pairs, out, lr=2e-3, max_steps=3), reflow_loss, "reflow").run()
    Trainer(_cfg(pairs, out, max_steps=3), reflow_loss, "reflow").run()  # same run, more steps: resumes
    assert "resumed reflow from step-00000002\n" in capsys.readouterr().out
    assert distill.main(["--pairs", str(pairs), "-o", str(out), "--max-steps", "2", "--force"]) == 0
    out_text = capsys.readouterr().out
    assert "resumed" not in out_text
    info = json.loads((out / "model" / "model_index.json").read_text())["_instaflow"]
    assert info["stage"] == "distill-l2" and info["steps"] == 2


def test_ema_warms_up_so_short_runs_ship_trained_weights(teacher_and_pairs, tmp_path):
    assert ema_decay(0.9999, 0) == pytest.approx(0.1) and ema_decay(0.9999, 90) == pytest.approx(0.91)
    assert ema_decay(0.9999, 10**6) == 0.9999 and ema_decay(0.5, 20) == 0.5
    teacher, pairs = teacher_and_pairs
    init = load_file(teacher / "unet" / "diffusion_pytorch_model.safetensors")
    raw = _weights(Trainer(_cfg(pairs, tmp_path / "raw", max_steps=6, ema=0.0), reflow_loss, "reflow").run())
    ema = _weights(Trainer(_cfg(pairs, tmp_path / "ema", max_steps=6, ema=0.9999), reflow_loss, "reflow").run())

    def moved(w):
        return sum(float((w[k] - init[k]).norm()) for k in init)

    assert moved(ema) > 0.3 * moved(raw)  # without warm-up: 0.9999 ships ~0.06% of the way (the initial weights)


def test_lpips_keeps_the_gradient_where_pixels_leave_the_range():
    """The student's decoded image is not clamped before LPIPS: a decoder whose every pixel is out of [-1, 1]
    still passes a gradient to the velocity (a clamp made it exactly zero)."""
    from train.distill import lpips_model, make_lpips_loss

    class Velocity(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.v = torch.nn.Parameter(torch.zeros(1, 4, 8, 8))

        def forward(self, x, t, encoder_hidden_states=None, return_dict=False):
            return (self.v.expand_as(x),)

    class BrightDecoder:
        def decode(self, z, return_dict=False):
            img = torch.nn.functional.interpolate(z[:, :3], size=(64, 64))
            return (3.0 + 0.1 * img,)  # every pixel above 1

    model = Velocity()
    comps = SimpleNamespace(vae=BrightDecoder(), scaling_factor=1.0, shift_factor=0.0)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    loss = make_lpips_loss(lpips_model("alex", random_backbone=True))
    loss(Batch(model, x0, x1, torch.zeros(2, 1, 8), g, comps)).backward()
    assert model.v.grad is not None and model.v.grad.abs().sum() > 0


def test_damaged_lpips_backbone_is_one_line(tmp_path, monkeypatch):
    from train.distill import LPIPS_BACKBONES, lpips_model

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / LPIPS_BACKBONES["alex"]).write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(TrainError, match=r"LPIPS cannot load its alex backbone .*delete it") as info:
        lpips_model("alex")
    assert "\n" not in str(info.value)
