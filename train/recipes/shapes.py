"""``python -m train.recipes.shapes -o runs/shapes``: the whole InstaFlow chain at small scale, on shapes.

Stages (each skipped when its output is complete, so a killed run continues stage by stage):
data -> VAE (32x32 -> 4x8x8) -> 1-rectified flow from data (independent coupling, text dropout) -> pairs from the
1-RF (Euler 25, CFG) -> 2-RF -> pairs from the 2-RF -> one-step students (from the 2-RF and, as the paper's
control, from the 1-RF) -> a small classifier on real shapes -> report (``SHAPES.md`` + sample grids).
The text encoder is a frozen, randomly initialised tiny CLIP with one token per grammar word.

``--smoke`` runs every stage with tiny step counts (CI); ``--ship`` copies the 2-RF student into
``runtime/assets/tiny`` (the ``tiny`` alias); ``--publish`` copies the report to ``train/recipes/``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from runtime import Pipeline
from runtime.checkpoints import BUNDLED, resolve
from runtime.cli import run_cli
from runtime.models import load_components, save_checkpoint
from runtime.testing import TinySpec, build_tiny_components

from runtime.files import atomic_write_bytes, atomic_write_json

from ..common import progress
from ..data import ATTRIBUTES, Label, all_labels, longest_caption_tokens, make_dataset
from ..loop import Trainer, TrainConfig, l2_loss, reflow_loss
from ..metrics import evaluate
from ..pairs import generate, write_pairs

HERE = Path(__file__).resolve().parent
#: the classifier shipped beside the recipe, used by the tests to check that the bundled model follows prompts
CLASSIFIER = HERE / "shapes_classifier.safetensors"
SPEC = TinySpec(sample_size=8, latent_channels=4, unet_channels=(64, 128), layers_per_block=1, attention_head_dim=8,
                text_hidden=64, text_layers=2, text_heads=2, max_length=16, vae_channels=(32, 64, 64), vae_groups=8)


@dataclass
class Budget:
    images: int = 12000
    vae_steps: int = 1500  # 700 left small shapes blurred: 70% shape accuracy on reconstructions
    vae_batch: int = 32
    rf1_steps: int = 2000
    pairs: int = 2000
    rf2_steps: int = 800
    distill_steps: int = 600
    classifier_steps: int = 600
    eval_n: int = 240
    batch: int = 64
    lr: float = 1e-3
    guidance: float = 1.5
    ode_steps: int = 25  # teacher ODE steps for pairs and the multi-step rows


SMOKE = Budget(images=128, vae_steps=3, vae_batch=8, rf1_steps=3, pairs=16, rf2_steps=2, distill_steps=2,
               classifier_steps=3, eval_n=12, batch=8, ode_steps=3)


def _done(folder: Path) -> bool:
    return (folder / "DONE").is_file()


def _mark(folder: Path, info: dict[str, Any] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "DONE", info or {})


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


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
    torch.manual_seed(0)
    comps = build_tiny_components(SPEC, seed=0, tokenizer_dir=str(out / ".tokenizer"))
    if (n := longest_caption_tokens(comps.tokenizer)) > SPEC.max_length:
        raise RuntimeError(f"the recipe's captions need {n} tokens, the text window has {SPEC.max_length}")
    vae = comps.vae.train().requires_grad_(True)
    x = _to_tensor(images)
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
        bar.set_postfix(loss=f"{float(loss):.4f}")
    bar.close()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i:i + 512]).latent_dist.mean for i in range(0, min(len(x), 4096), 512)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    save_checkpoint(comps, folder)
    _mark(folder, {"vae_recon_mse": float(loss), "scaling_factor": float(1.0 / z.std())})
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
        x = _to_tensor(images)
        z = torch.cat([comps.vae.encode(x[i:i + 512]).latent_dist.mean for i in range(0, len(x), 512)])
    x1 = z * comps.scaling_factor
    prompts, index = caption_variants(labels, seed=1)
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(2))
    write_pairs(folder, x0, x1, torch.tensor(index), prompts,
                {"teacher": {"name": str(init), "kind": "data", "fingerprint": "data"},
                 "latent_shape": list(x1.shape[1:]), "num_pairs": len(x1)})
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return folder


def train_stage(out: Path, name: str, pairs: Path, init: Path, steps: int, b: Budget, loss: str,
                fresh_noise: bool = False, dropout: float = 0.1, lr: float | None = None) -> Path:
    run = out / name
    if _done(run):
        return run / "model"
    cfg = TrainConfig(pairs=str(pairs), out=str(run), init=str(init), max_steps=steps, batch_size=b.batch,
                      lr=lr or b.lr, text_dropout=dropout, save_every=max(steps // 5, 1), fresh_noise=fresh_noise,
                      warmup_steps=min(100, steps), ema=0.999 if steps >= 1000 else 0.0,
                      extra={"default_steps": 1 if loss == "l2" else 25})
    trainer = Trainer(cfg, reflow_loss if loss == "reflow" else l2_loss, f"{name}")
    model = trainer.run()
    _mark(run, {"final_loss": statistics.mean(trainer.losses[-20:]) if trainer.losses else None,
                "steps_per_s": trainer.steps_per_s})
    return model


def stage_pairs(out: Path, name: str, teacher: Path, b: Budget) -> Path:
    folder = out / name
    generate(str(teacher), str(out / "prompts.txt"), folder, num_pairs=b.pairs, batch_size=b.batch, seed=3,
             steps=b.ode_steps, guidance=b.guidance, shard_size=1000)
    return folder


class Classifier(torch.nn.Module):
    """Small CNN on real shapes: one head per attribute; its penultimate features define the FID space."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
            torch.nn.Linear(64 * 8 * 8, 128), torch.nn.ReLU())
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(128, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        f = self.features(x)
        return f, {k: h(f) for k, h in self.heads.items()}


def load_classifier(path: Path = CLASSIFIER) -> Classifier:
    from safetensors.torch import load_file

    clf = Classifier()
    clf.load_state_dict(load_file(path))
    return clf.eval()


def stage_classifier(out: Path, b: Budget) -> Classifier:
    path = out / "classifier.safetensors"
    clf = Classifier()
    from safetensors.torch import load_file, save

    if path.is_file():
        clf.load_state_dict(load_file(path))
        return clf.eval()
    images, labels = make_dataset(max(b.images // 2, 64), seed=10)
    x = _to_tensor(images)
    y = {k: torch.tensor([lb.index()[k] for lb in labels]) for k in ATTRIBUTES}
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(b.classifier_steps):
        idx = torch.randint(len(x), (b.batch,), generator=g)
        _, logits = clf(x[idx])
        loss = sum(F.cross_entropy(logits[k], y[k][idx]) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    atomic_write_bytes(path, save(clf.state_dict()))
    return clf.eval()


# -------------------------------------------------------------------------------------------------- report
def frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def score(clf: Classifier, images: torch.Tensor, labels: list[Label]) -> tuple[np.ndarray, dict[str, float]]:
    with torch.no_grad():
        feats, logits = clf(images * 2 - 1)
    acc = {k: float((logits[k].argmax(1) == torch.tensor([lb.index()[k] for lb in labels])).float().mean())
           for k in ATTRIBUTES}
    return feats.numpy(), acc


def grid(images: torch.Tensor, path: Path, cols: int = 8) -> None:
    from PIL import Image

    imgs = (images[: cols * 4].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    rows = [np.concatenate(list(imgs[r * cols:(r + 1) * cols]), axis=1) for r in range(len(imgs) // cols)]
    Image.fromarray(np.concatenate(rows, axis=0)).resize((cols * 64, len(rows) * 64), Image.NEAREST).save(path)


def stage_report(out: Path, b: Budget, models: dict[str, Path], clf: Classifier, smoke: bool) -> Path:
    report = out / "report"
    report.mkdir(exist_ok=True)
    labels = [all_labels()[i % 120] for i in range(b.eval_n)]
    captions = [lb.caption for lb in labels]
    real, _ = make_dataset(b.eval_n, seed=20)
    real_feats, real_acc = score(clf, (_to_tensor(real) + 1) / 2, make_dataset(b.eval_n, seed=20)[1])
    n = b.ode_steps
    rows_spec = [("1-RF", "rf1", n, b.guidance), ("1-RF", "rf1", 1, b.guidance), ("2-RF", "rf2", n, b.guidance),
                 ("2-RF", "rf2", 1, b.guidance), ("1-RF+distill", "student1", 1, 0.0),
                 ("2-RF+distill", "student2", 1, 0.0)]
    rows, straight = [], {}
    for title, key, steps, w in rows_spec:
        pipe = Pipeline.from_pretrained(models[key], device="cpu")
        noise_shape = (4, 8, 8)
        z0 = pipe.prepare_latents(len(captions), noise_shape, seed=123)
        imgs = torch.cat([pipe(captions[i:i + 64], latents=z0[i:i + 64], num_inference_steps=steps, guidance_scale=w,
                               output_type="pt").images for i in range(0, len(captions), 64)])
        feats, acc = score(clf, imgs, labels)
        times = []
        for _ in range(3 if smoke else 15):
            t = time.perf_counter()
            pipe(captions[0], seed=0, num_inference_steps=steps, guidance_scale=w)
            times.append(time.perf_counter() - t)
        slug = f"{key}-{steps}step"
        grid(imgs, report / f"grid-{slug}.png")
        if key in ("rf1", "rf2") and key not in straight:
            straight[key] = evaluate(pipe, captions, num=min(64, b.eval_n), steps=n)["straightness"]
        rows.append({"row": f"{title} {steps}-step", "nfe": steps * (2 if w > 1 else 1),
                     "latency_ms": 1e3 * statistics.median(times), "fid": frechet(real_feats, feats), **acc,
                     "grid": f"grid-{slug}.png"})
    doc = {"rows": rows, "straightness": straight, "real_accuracy": real_acc, "budget": asdict(b),
           "date": time.strftime("%Y-%m-%d"), "smoke": smoke}
    atomic_write_json(report / "results.json", doc)
    (report / "SHAPES.md").write_text(render_report(doc))
    return report


def render_report(doc: dict[str, Any]) -> str:
    s = doc["straightness"]
    lines = ["# InstaFlow at small scale: shapes", "",
             f"Regenerated by `python -m train.recipes.shapes` on {doc['date']}"
             + (" (SMOKE run: numbers meaningless)" if doc["smoke"] else "") + ". "
             "FID is computed in the feature space of a small CNN trained on real shapes; accuracies are that "
             "classifier's agreement with the prompt's attributes on "
             f"{doc['budget']['eval_n']} images (prompts cycle through all 120 captions, same noise for every row). "
             f"The classifier scores {', '.join(f'{k} {v:.0%}' for k, v in doc['real_accuracy'].items())} on real "
             "images. Latency: full pipeline, batch 1, this CPU (2 cores), median.", "",
             "| model | NFE | latency ms | FID | colour | shape | position | size | samples |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in doc["rows"]:
        lines.append(f"| {r['row']} | {r['nfe']} | {r['latency_ms']:.1f} | {r['fid']:.2f} | {r['color']:.0%} | "
                     f"{r['shape']:.0%} | {r['position']:.0%} | {r['size']:.0%} | [grid]({r['grid']}) |")
    n = doc["budget"]["ode_steps"]
    lines += ["", f"Straightness S ({n}-step Euler, lower is straighter): 1-RF {s.get('rf1', float('nan')):.4f}, "
              f"2-RF {s.get('rf2', float('nan')):.4f}.", ""]
    return "\n".join(lines)


def run(out: str | Path, smoke: bool = False, ship: bool = False, publish: bool = False) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    b = SMOKE if smoke else Budget()
    t0 = time.perf_counter()
    images, labels = stage_data(out, b)
    init = stage_vae_and_init(out, b, images)
    data_pairs = stage_data_pairs(out, init, images, labels)
    rf1 = train_stage(out, "rf1", data_pairs, init, b.rf1_steps, b, "reflow", fresh_noise=True)
    pairs1 = stage_pairs(out, "pairs_rf1", rf1, b)
    rf2 = train_stage(out, "rf2", pairs1, rf1, b.rf2_steps, b, "reflow", lr=b.lr / 3)
    pairs2 = stage_pairs(out, "pairs_rf2", rf2, b)
    student2 = train_stage(out, "student2", pairs2, rf2, b.distill_steps, b, "l2", dropout=0.0, lr=b.lr / 3)
    student1 = train_stage(out, "student1", pairs1, rf1, b.distill_steps, b, "l2", dropout=0.0, lr=b.lr / 3)
    clf = stage_classifier(out, b)
    report = stage_report(out, b, {"rf1": rf1, "rf2": rf2, "student1": student1, "student2": student2}, clf, smoke)
    if publish:
        dest = HERE / "shapes_report"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(report, dest)
        text = (dest / "SHAPES.md").read_text().replace("(grid-", "(shapes_report/grid-")
        (HERE / "SHAPES.md").write_text(text)
        (dest / "SHAPES.md").unlink()
    if ship:
        shutil.copyfile(out / "classifier.safetensors", CLASSIFIER)
        comps = load_components(resolve(student2)).to(dtype=torch.float16)  # stored fp16: half the size
        save_checkpoint(comps, BUNDLED["tiny"], extra={"_instaflow": {"stage": "distill", "recipe": "shapes",
                                                                      "default_steps": 1}})
    print(f"recipe done in {time.perf_counter() - t0:.0f} s: {report / 'SHAPES.md'}", flush=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.recipes.shapes", description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", default="runs/shapes")
    p.add_argument("--smoke", action="store_true", help="tiny step counts (CI)")
    p.add_argument("--ship", action="store_true", help="copy the 2-RF student into runtime/assets/tiny")
    p.add_argument("--publish", action="store_true", help="copy the report into train/recipes/")
    a = p.parse_args(argv)
    return run_cli(lambda: run(a.output, a.smoke, a.ship, a.publish))


if __name__ == "__main__":
    sys.exit(main())
