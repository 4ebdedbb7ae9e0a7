"""``python -m train.recipes.shapes -o runs/shapes``: InstaFlow's chain at small scale, on shapes, as in the paper.

Stages (each skipped when its output is complete, so a killed run continues stage by stage):
data -> VAE (32x32 -> 4x8x8) -> the teacher, a text-conditioned **diffusion** UNet in Stable Diffusion's role
(epsilon prediction, SD's scaled-linear schedule, text dropout) -> its pairs (DPM-Solver 25 steps, guidance 5.0,
through ``train.pairs`` as for SD 1.5) -> 2-RF by reflow, initialised from the teacher's weights -> the 2-RF's pairs
(Euler 25, guidance 1.5) -> the one-step student from the 2-RF, and the control: a one-step student distilled
directly from the teacher's pairs (the same steps, or ``control_steps``: the paper's matched budget is the 2-RF's
and the student's together), each student with ``student_seeds`` training seeds -> a small classifier on real
shapes -> report (``SHAPES.md``: on full and on partial captions, FID, prompt accuracy, coverage and clean shapes
with bootstrap intervals, the seeds' spread, straightness, the paper's claims judged on every seed; sample grids).
The text encoder is a frozen, randomly initialised tiny CLIP with one token per grammar word.

``--smoke`` runs every stage with tiny step counts (CI); ``--ship`` copies the best one-step student into
``runtime/assets/tiny`` (the ``tiny`` alias) when it beats the bundled model; ``--publish`` copies the report to
``train/recipes/``; ``--report-only`` trains nothing and reports the stages that have finished (the others, and the
claims that need them, say pending), e.g. while a long run is still training in the same folder.

Wall time: a trained stage's ``DONE`` records the time and rate of the segment that finished it (a resumed stage's
last segment); the other stages add each segment of work to ``timings.json``; the report tabulates both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from runtime.checkpoints import BUNDLED, resolve
from runtime.cli import description, run_cli
from runtime.models import load_components, save_checkpoint
from runtime.builders import SD_SCHEDULER_CONFIG, TinySpec, build_tiny_components

from runtime.files import atomic_write_bytes, atomic_write_json

from ..common import TrainError, progress
from ..data import ATTRIBUTES, Label, all_labels, longest_caption_tokens, make_dataset
from ..loop import Trainer, TrainConfig, epsilon_loss, l2_loss, reflow_loss
from ..pairs import generate, write_pairs
from ..pairset import read_manifest
from .shapes_eval import (CLASSIFIER, DISCUSSION, control_steps, load_classifier, record_time,
                          stage_classifier, stage_report, student_runs, to_tensor)

__all__ = ["CLASSIFIER", "SPEC", "Budget", "load_classifier", "run"]

HERE = Path(__file__).resolve().parent
SPEC = TinySpec(sample_size=8, latent_channels=4, unet_channels=(64, 128), layers_per_block=1, attention_head_dim=8,
                text_hidden=64, text_layers=2, text_heads=2, max_length=16, vae_channels=(32, 64, 64), vae_groups=8)


@dataclass
class Budget:
    images: int = 12000
    vae_steps: int = 1500  # 700 left small shapes blurred: 70% shape accuracy on reconstructions
    vae_batch: int = 32
    teacher_steps: int = 2200  # cut from 3000 to fit 90 min on 2 cores: 84 measured alone on them (SHAPES.md)
    pairs: int = 3000
    rf2_steps: int = 1200
    distill_steps: int = 800
    classifier_steps: int = 600
    eval_n: int = 2040  # 17 x the 120 full captions
    straightness_n: int = 256
    bootstrap: int = 500
    batch: int = 64
    lr: float = 1e-3  # every stage: no per-stage tuning
    teacher_guidance: float = 5.0  # the paper's SD setting for reflow pairs
    guidance: float = 1.5  # the paper's 2-RF setting for distillation pairs
    ode_steps: int = 25  # DPM-Solver steps (teacher) and Euler steps (2-RF) for pairs and multi-step rows
    seed: int = 0  # training seed of every trained stage (batch order, t, text dropout): the students' training noise
    student_seeds: int = 1  # each student trained with seeds seed, seed + 1, ...: rows "student", "student-s1", ...
    control_steps: int = 0  # the control's distillation steps; 0: distill_steps (rf2_steps + distill_steps: matched)


SMOKE = Budget(images=128, vae_steps=3, vae_batch=8, teacher_steps=3, pairs=16, rf2_steps=2, distill_steps=2,
               classifier_steps=3, eval_n=12, straightness_n=6, bootstrap=20, batch=8, ode_steps=3)


def _done(folder: Path, expect: dict[str, Any] | None = None) -> bool:
    """Whether the stage in ``folder`` is finished; ``expect``: settings it must have been run with (one line if
    not: a folder of another budget, or a stage copied from another run)."""
    if not (folder / "DONE").is_file():
        return False
    if expect:
        info = json.loads((folder / "DONE").read_text())
        differ = {k: (info.get(k), v) for k, v in expect.items() if k in info and info[k] != v}
        if differ:
            raise TrainError(f"{folder} was trained with other settings ("
                             + ", ".join(f"{k} {a!r}, this budget {b!r}" for k, (a, b) in differ.items())
                             + "); use another -o folder")
    return True


def _mark(folder: Path, info: dict[str, Any] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "DONE", info or {})


# -------------------------------------------------------------------------------------------------- stages
def stage_data(out: Path, b: Budget) -> tuple[np.ndarray, list[Label]]:
    f = out / "data.npz"
    if not f.is_file():
        images, labels = make_dataset(b.images, seed=0)
        import io

        buf = io.BytesIO()
        np.savez(buf, images=images, captions=np.array([lb.caption for lb in labels]))
        atomic_write_bytes(f, buf.getvalue())
    d = np.load(f)
    lookup = {lb.caption: lb for lb in all_labels()}
    return d["images"], [lookup[c] for c in d["captions"]]


def stage_vae_and_init(out: Path, b: Budget, images: np.ndarray) -> Path:
    """Train the VAE on shapes, set its scaling factor to 1/std of the latents, save the initial flow folder."""
    folder = out / "init"
    if _done(folder):
        return folder
    t0 = time.perf_counter()
    torch.manual_seed(0)
    comps = build_tiny_components(SPEC, seed=0, tokenizer_dir=str(out / ".tokenizer"))
    if (n := longest_caption_tokens(comps.tokenizer)) > SPEC.max_length:
        raise RuntimeError(f"the recipe's captions need {n} tokens, the text window has {SPEC.max_length}")
    vae = comps.vae.train().requires_grad_(True)
    x = to_tensor(images)
    opt = torch.optim.AdamW(vae.parameters(), lr=b.lr)
    g = torch.Generator().manual_seed(0)
    bar = progress(b.vae_steps, "vae", True, "step")
    for _ in range(b.vae_steps):
        batch = x[torch.randint(len(x), (b.vae_batch,), generator=g)]
        post = vae.encode(batch).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, batch) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    bar.close()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i:i + 512]).latent_dist.mean for i in range(0, min(len(x), 4096), 512)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    save_checkpoint(comps, folder)
    record_time(out, "vae", time.perf_counter() - t0, b.vae_steps, b.vae_steps, "step")
    _mark(folder, {"vae_recon_mse": float(loss.detach()), "scaling_factor": float(1.0 / z.std())})
    return folder


def caption_variants(labels: list[Label], seed: int) -> tuple[list[str], list[int]]:
    """Training captions: the full caption 70% of the time, else one with attributes left out."""
    rng = np.random.default_rng(seed)
    prompts: dict[str, int] = {}
    index = []
    for lb in labels:
        if rng.random() < 0.7:
            cap = lb.caption
        else:
            cap = lb.partial_caption({k: bool(rng.random() < 0.5) for k in ATTRIBUTES})
        index.append(prompts.setdefault(cap, len(prompts)))
    return list(prompts), index


def stage_data_pairs(out: Path, init: Path, images: np.ndarray, labels: list[Label]) -> Path:
    folder = out / "data_pairs"
    if (folder / "manifest.json").is_file():
        return folder
    comps = load_components(resolve(init))
    with torch.no_grad():
        x = to_tensor(images)
        z = torch.cat([comps.vae.encode(x[i:i + 512]).latent_dist.mean for i in range(0, len(x), 512)])
    x1 = z * comps.scaling_factor
    prompts, index = caption_variants(labels, seed=1)
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(2))
    write_pairs(folder, x0, x1, torch.tensor(index), prompts,
                {"teacher": {"name": str(init), "kind": "data", "fingerprint": "data"},
                 "latent_shape": list(x1.shape[1:]), "num_pairs": len(x1)})
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return folder


def pairs_identity(pairs: Path) -> dict[str, Any]:
    """What a stage's pairs were made with (their count and their teacher's kind, steps and guidance): a finished
    stage copied into a run of another budget is refused, not silently reused."""
    settings = read_manifest(pairs)["settings"]
    teacher = settings.get("teacher", {})
    return {"num_pairs": settings.get("num_pairs"), **{k: teacher.get(k) for k in ("kind", "steps", "guidance")}}


def train_stage(out: Path, name: str, pairs: Path, init: Path, steps: int, b: Budget, loss: str,
                fresh_noise: bool = False, dropout: float = 0.1, seed: int | None = None) -> Path:
    """One training stage: ``loss`` is "epsilon" (the diffusion teacher), "reflow" (2-RF) or "l2" (distillation)."""
    run = out / name
    seed = seed if seed is not None else b.seed
    if _done(run, {"steps": steps, "seed": seed, "pairs": pairs_identity(pairs)}):
        return run / "model"
    # every setting that changes the numbers is written here, not taken from TrainConfig's defaults (they follow
    # the paper at SD scale and may change: issue 30 moved EMA to 0.9999 and lr to 1e-6)
    cfg = TrainConfig(pairs=str(pairs), out=str(run), init=str(init), max_steps=steps, batch_size=b.batch,
                      grad_accum=1, global_batch=None, lr=b.lr, weight_decay=1e-2,
                      lr_schedule="constant-with-warmup", warmup_steps=min(100, steps), max_grad_norm=1.0,
                      text_dropout=dropout, save_every=max(steps // 5, 1), fresh_noise=fresh_noise, loss=loss,
                      ema=0.999,  # every stage: a last iterate at lr 1e-3 is noisy
                      mixed_precision="no",  # fp32 on any device: a GPU run computes what the CPU does
                      text_embeddings="encode",  # each prompt in its own text-encoder call (a cache gives the same)
                      seed=seed,
                      extra={"default_steps": 1 if loss == "l2" else b.ode_steps, "recipe": "shapes"})
    t0 = time.perf_counter()
    if loss == "epsilon":
        trainer = Trainer(cfg, epsilon_loss(SD_SCHEDULER_CONFIG), name, diffusion_scheduler=SD_SCHEDULER_CONFIG)
    else:
        trainer = Trainer(cfg, reflow_loss if loss == "reflow" else l2_loss, name)
    model = trainer.run()
    _mark(run, {"final_loss": statistics.mean(trainer.losses[-20:]) if trainer.losses else None,
                "steps_per_s": trainer.steps_per_s, "steps": steps, "seed": seed, "pairs": pairs_identity(pairs),
                "wall_s": time.perf_counter() - t0, "resumed_from": trainer.resumed_from})
    return model


def stage_pairs(out: Path, name: str, teacher: Path, guidance: float, b: Budget) -> Path:
    """Pairs through ``train.pairs``, the path that serves SD 1.5 (DPM-Solver for a diffusion teacher, Euler for a
    flow)."""
    folder = out / name
    t0 = time.perf_counter()
    made = generate(str(teacher), str(out / "prompts.txt"), folder, num_pairs=b.pairs, batch_size=b.batch, seed=3,
                    steps=b.ode_steps, guidance=guidance, shard_size=1000, dtype="fp32")["new_pairs"]
    if made:
        record_time(out, name, time.perf_counter() - t0, made, b.pairs, "pair")
    return folder


def stage_baseline(out: Path) -> Path:
    """A copy of the bundled model as it was when the run started: the row a newly trained student must beat."""
    folder = out / "bundled_before"
    if not (folder / "model_index.json").is_file():
        tmp = out / ".bundled_before.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(BUNDLED["tiny"], tmp)
        tmp.rename(folder)
    return folder


def finished_models(out: Path, b: Budget) -> dict[str, Path]:
    """The models of ``out`` whose stages have finished with this budget's settings (what ``--report-only``
    reports); a finished stage of another budget, or pairs made with another guidance or count, is one line."""
    def pairs_of(name: str, guidance: float | None) -> Path | None:
        pairs = out / name
        if not (pairs / "manifest.json").is_file():
            return None
        got = pairs_identity(pairs)
        want = {"num_pairs": b.pairs, "guidance": guidance} if guidance is not None else {}
        if any(got.get(k) != v for k, v in want.items()):
            raise TrainError(f"{pairs} holds pairs of other settings ({got['num_pairs']} pairs, guidance "
                             f"{got['guidance']}; this budget: {b.pairs}, {guidance}); use the -o folder of that "
                             "budget")
        return pairs

    def done(name: str, pairs: Path | None, steps: int, seed: int) -> bool:
        return pairs is not None and _done(out / name, {"steps": steps, "seed": seed, "pairs": pairs_identity(pairs)})

    models: dict[str, Path] = {}
    if (out / "bundled_before" / "model_index.json").is_file():
        models["before"] = out / "bundled_before"
    data, teacher_pairs = pairs_of("data_pairs", None), pairs_of("pairs_teacher", b.teacher_guidance)
    rf2_pairs = pairs_of("pairs_rf2", b.guidance)
    for name, pairs, steps in (("teacher", data, b.teacher_steps), ("rf2", teacher_pairs, b.rf2_steps)):
        if done(name, pairs, steps, b.seed):
            models[name] = out / name / "model"
    for seed, name, control in student_runs(b):
        if done(name, rf2_pairs, b.distill_steps, seed):
            models[name] = out / name / "model"
        if done(control, teacher_pairs, control_steps(b), seed):
            models[control] = out / control / "model"
    return models


def budget(smoke: bool = False, overrides: Sequence[str] = ()) -> Budget:
    """The default (or smoke) budget with ``KEY=VALUE`` overrides, e.g. ``pairs=6000`` (one line for a bad one)."""
    b = SMOKE if smoke else Budget()
    fields = {k: type(v) for k, v in asdict(b).items()}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in fields:
            raise TrainError(f"--budget {item!r}: no such setting; one of {', '.join(fields)}")
        try:
            changes[key] = fields[key](value)
        except ValueError:
            raise TrainError(f"--budget {item!r}: {key} takes a {fields[key].__name__}") from None
    b = replace(b, **changes)
    if b.student_seeds < 1 or b.control_steps < 0:
        raise TrainError("--budget student_seeds must be >= 1 and control_steps >= 0 (0: distill_steps)")
    return b


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """fp32 that is fp32 on a GPU too: cuDNN's convolutions (and matmuls, where enabled) would otherwise round
    through TF32, and a GPU run of the recipe would no longer compute what the CPU run does."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def publish_report(report: Path, into: Path = HERE) -> Path:
    """Copy a report folder's SHAPES.md, results.json and grids into ``into`` (``SHAPES.md`` beside
    ``shapes_report/``), keeping the hand-written discussion of the SHAPES.md already there."""
    dest = into / "shapes_report"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(report, dest, ignore=shutil.ignore_patterns("rows"))
    text = (dest / "SHAPES.md").read_text().replace("(grid-", "(shapes_report/grid-")
    published = into / "SHAPES.md"
    old = published.read_text() if published.is_file() else ""
    if DISCUSSION in old:  # the hand-written discussion stays
        text = text.rstrip() + "\n\n" + old[old.index(DISCUSSION):]
    published.write_text(text)
    (dest / "SHAPES.md").unlink()
    return published


def run(out: str | Path, smoke: bool = False, ship: bool = False, publish: bool = False,
        b: Budget | None = None, report_only: bool = False) -> Path:
    """The whole recipe into ``out`` (each stage resumes); returns the report folder. On a GPU the trained stages
    and the report's sampling run there, in strict fp32. ``report_only``: train nothing, report what has
    finished."""
    with strict_fp32():
        return _run(out, smoke, ship, publish, b, report_only)


def _run(out: str | Path, smoke: bool, ship: bool, publish: bool, b: Budget | None, report_only: bool = False
         ) -> Path:
    out = Path(out)
    b = b or budget(smoke)
    t0 = time.perf_counter()
    if report_only:
        if ship:
            raise TrainError("--ship needs every stage: run without --report-only")
        models = finished_models(out, b) if out.is_dir() else {}
        if "teacher" not in models:
            raise TrainError(f"nothing to report in {out}: its diffusion teacher has not finished training")
        return _report(out, b, models, smoke, ship, publish, t0)
    out.mkdir(parents=True, exist_ok=True)
    baseline = stage_baseline(out)
    images, labels = stage_data(out, b)
    init = stage_vae_and_init(out, b, images)
    data = stage_data_pairs(out, init, images, labels)
    teacher = train_stage(out, "teacher", data, init, b.teacher_steps, b, "epsilon", fresh_noise=True)
    pairs_teacher = stage_pairs(out, "pairs_teacher", teacher, b.teacher_guidance, b)
    rf2 = train_stage(out, "rf2", pairs_teacher, teacher, b.rf2_steps, b, "reflow")
    pairs_rf2 = stage_pairs(out, "pairs_rf2", rf2, b.guidance, b)
    models = {"teacher": teacher, "rf2": rf2, "before": baseline}
    for seed, name, control in student_runs(b):
        models[name] = train_stage(out, name, pairs_rf2, rf2, b.distill_steps, b, "l2", dropout=0.0, seed=seed)
        models[control] = train_stage(out, control, pairs_teacher, teacher, control_steps(b), b, "l2", dropout=0.0,
                                      seed=seed)
    return _report(out, b, models, smoke, ship, publish, t0)


def _report(out: Path, b: Budget, models: dict[str, Path], smoke: bool, ship: bool, publish: bool, t0: float
            ) -> Path:
    clf = stage_classifier(out, b)
    report, doc = stage_report(out, b, models, clf, smoke)
    if publish:
        publish_report(report)
    ship_key = doc["ship"]["key"]
    if ship and ship_key:
        shutil.copyfile(out / "classifier.safetensors", CLASSIFIER)
        comps = load_components(resolve(models[ship_key])).to(dtype=torch.float16)  # stored fp16: half the size
        save_checkpoint(comps, BUNDLED["tiny"], extra={"_instaflow": {"stage": "distill", "recipe": "shapes",
                                                                      "default_steps": 1}})
        print(f"shipped {models[ship_key]} as tiny", flush=True)
    elif ship:
        print("kept the bundled tiny model: " + doc["ship"]["reason"], flush=True)
    print(f"recipe done in {time.perf_counter() - t0:.0f} s: {report / 'SHAPES.md'}", flush=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.recipes.shapes", description=description(__doc__))
    p.add_argument("-o", "--output", default="runs/shapes")
    p.add_argument("--smoke", action="store_true", help="tiny step counts (CI)")
    p.add_argument("--ship", action="store_true",
                   help="copy the best one-step student into runtime/assets/tiny if it beats the bundled model")
    p.add_argument("--publish", action="store_true", help="copy the report into train/recipes/")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: report the stages that have finished (the others say pending)")
    p.add_argument("--budget", action="append", default=[], metavar="KEY=VALUE",
                   help="change one setting of the budget, e.g. pairs=6000 (repeatable; use a new -o folder)")
    a = p.parse_args(argv)
    return run_cli(lambda: run(a.output, a.smoke, a.ship, a.publish, budget(a.smoke, a.budget), a.report_only))


if __name__ == "__main__":
    sys.exit(main())
