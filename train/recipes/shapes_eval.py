"""The shapes recipe's evaluation: a classifier on real shapes, rows of samples, bootstrap intervals, the claims.

The classifier's penultimate features are the FID space and its heads score prompt accuracy per attribute. Every
row is sampled on two caption sets with fixed noise: the 120 **full** captions (one right answer up to jitter) and
**partial** captions (``a red shape``, ``a circle at the center``, ``a shape``: the training captions that leave
attributes free, where one noise has several right images and mode averaging can show). On the partial set a row is
scored by its accuracy on the attributes a caption fixes, its coverage of those it leaves free (the total-variation
distance of its label histogram to the diffusion teacher's and to the data's), the share of samples that are no clean
shape (:func:`clean_shapes`: blurred, mixed, doubled or off-palette), and FID against real images whose labels
match the caption. Rows are compared pair by pair: a bootstrap replicate draws one set of sample indices (and one of
real images) per caption set and uses it for every row, which gives 95% intervals for each number and for
differences and contrasts between rows. The students may be trained with several seeds (``student_seeds``): each
seed is a row, and a claim is judged on every seed (:func:`verdict`). Each row's samples are cached in
``report/rows/`` (uint8 images: scoring is redone from them), so a killed report continues row by row.
"""

from __future__ import annotations

import io
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from runtime import flow
from runtime.files import atomic_write_bytes, atomic_write_json, atomic_write_with
from runtime.inputs import parse_device

from ..data import ATTRIBUTES, PARTIAL_KEEPS, RGB, all_labels, balanced_order, draw_shape, make_dataset, matching_label
from ..metrics import path_straightness
from ..teacher import Teacher, load_teacher

if TYPE_CHECKING:
    from .shapes import Budget

HERE = Path(__file__).resolve().parent
#: the run folder's record of each untrained stage's work, segment by segment (trained stages: their DONE)
TIMINGS = "timings.json"
#: the classifier shipped beside the recipe, used by the tests to check that the bundled model follows prompts
CLASSIFIER = HERE / "shapes_classifier.safetensors"
#: the hand-written discussion below this line in ``SHAPES.md`` survives a regenerated report
DISCUSSION = "<!-- discussion: hand-written, kept when the report is regenerated -->"


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


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


def record_time(out: Path, stage: str, wall_s: float, done: int, total: int, unit: str) -> None:
    """Add one segment of a stage's work to ``out/timings.json`` (a resumed stage has several): ``done`` of its
    ``total`` units (steps, pairs, rows) took ``wall_s`` seconds."""
    import json

    path = out / TIMINGS
    doc = json.loads(path.read_text()) if path.is_file() else {}
    entry = doc.setdefault(stage, {"segments": []})
    entry.update(total=total, unit=unit)
    entry["segments"].append({"wall_s": round(wall_s, 1), "done": done, "date": time.strftime("%Y-%m-%dT%H:%M:%S")})
    atomic_write_json(path, doc)


def stage_times(out: Path, trained: Sequence[str], others: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each stage's wall time: for ``trained`` stages the segment that finished them (their DONE: wall time and
    rate; a resumed stage's earlier segments are not timed), for the ``others`` every segment in ``timings.json``;
    ``estimate_s``: the whole stage at the timed rate. A stage with no record yet: ``{"pending": True}``."""
    import json

    log = json.loads((out / TIMINGS).read_text()) if (out / TIMINGS).is_file() else {}
    got: dict[str, dict[str, Any]] = {}
    for name in trained:
        f = out / name / "DONE"
        info = json.loads(f.read_text()) if f.is_file() else {}
        if not info.get("wall_s") or not info.get("steps_per_s"):
            got[name] = {"pending": True}
            continue
        # the wall time counts loading and saving too, the rate only the steps: a DONE without the step it resumed
        # from (written before it was recorded) is taken to have run min(steps, rate x wall time)
        start = info.get("resumed_from", max(info["steps"] - int(info["steps_per_s"] * info["wall_s"]), 0))
        got[name] = {"unit": "step", "total": info["steps"], "done": info["steps"] - start, "wall_s": info["wall_s"],
                     "resumed_from": start,
                     "rate": info["steps_per_s"], "estimate_s": info["steps"] / info["steps_per_s"]}
    for name in others:
        if name not in log:
            got[name] = {"pending": True}
            continue
        e = log[name]
        wall, done = sum(g["wall_s"] for g in e["segments"]), sum(g["done"] for g in e["segments"])
        rate = done / wall if wall > 0 else float("nan")
        # rows differ in cost (a 25-step row samples 25-50x a one-step row's work): no whole-report estimate
        whole = e["total"] / rate if rate > 0 and e["unit"] != "row" else float("nan")
        got[name] = {"unit": e["unit"], "total": e["total"], "done": done, "wall_s": wall,
                     "segments": len(e["segments"]), "rate": rate, "estimate_s": whole}
    return got


def load_classifier(path: Path = CLASSIFIER) -> Classifier:
    from safetensors.torch import load_file

    clf = Classifier()
    clf.load_state_dict(load_file(path))
    return clf.eval()


def stage_classifier(out: Path, b: Budget) -> Classifier:
    path = out / "classifier.safetensors"
    if path.is_file():
        return load_classifier(path)
    from safetensors.torch import save

    t0 = time.perf_counter()
    clf = Classifier()
    images, labels = make_dataset(max(b.images // 2, 64), seed=10)
    x = to_tensor(images)
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
    record_time(out, "classifier", time.perf_counter() - t0, b.classifier_steps, b.classifier_steps, "step")
    return clf.eval()


@dataclass(frozen=True)
class EvalSet:
    """Captions to sample a row on, one per sample, and what each fixes: ``targets[attribute][i]`` is the value
    index caption i asks for, -1 where it leaves the attribute free."""

    name: str  # "full" or "partial"
    captions: list[str]
    targets: dict[str, np.ndarray]
    noise_seed: int

    def __len__(self) -> int:
        return len(self.captions)

    def noise(self) -> torch.Tensor:
        """The same initial noise for every row."""
        return torch.randn((len(self), 4, 8, 8), generator=torch.Generator().manual_seed(self.noise_seed))


def full_set(n: int) -> EvalSet:
    """The 120 full captions, cycled: every attribute fixed."""
    labels = [all_labels()[i % 120] for i in range(n)]
    return EvalSet("full", [lb.caption for lb in labels],
                   {a: np.array([lb.index()[a] for lb in labels]) for a in ATTRIBUTES}, 123)


def partial_set(n: int, seed: int = 7) -> EvalSet:
    """Partial captions as the recipe trains on them: the 15 ways of leaving attributes out (``PARTIAL_KEEPS``, from
    ``a shape`` to one attribute free) in turn, applied to labels drawn in balanced rounds; each pattern gets n/15
    samples, so ``a shape`` (every attribute free) has as many as the 4 ``a {colour} shape`` captions together."""
    rng = np.random.default_rng(seed)
    everyone = all_labels()
    order = balanced_order(n, len(everyone), rng)
    captions, targets = [], {a: np.full(n, -1) for a in ATTRIBUTES}
    for i, j in enumerate(order):
        label, keep = everyone[j], PARTIAL_KEEPS[i % len(PARTIAL_KEEPS)]
        captions.append(label.partial_caption(keep))
        for a in ATTRIBUTES:
            if keep[a]:
                targets[a][i] = label.index()[a]
    return EvalSet("partial", captions, targets, 124)


def matching_real(s: EvalSet, seed: int) -> np.ndarray:
    """Real images (uint8 NHWC) whose labels match the captions one for one: sample i's fixed attributes, the others
    uniform (as in the training data, where a partial caption stands for every image it describes)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(len(s)):
        fixed = {a: ATTRIBUTES[a][int(t[i])] for a, t in s.targets.items() if t[i] >= 0}
        out.append(draw_shape(matching_label(fixed, rng), rng))
    return np.stack(out)


@dataclass
class Scored:
    """One row's samples as the classifier and the clean-shape test see them."""

    feats: np.ndarray  # [n, 128] float64: the FID space
    pred: dict[str, np.ndarray]  # per attribute, the classifier's label per sample
    clean: np.ndarray  # [n] bool: one clean shape (clean_shapes)

    def correct(self, targets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per attribute, whether the label matches the caption (meaningful only where the caption fixes it)."""
        return {a: self.pred[a] == targets[a] for a in ATTRIBUTES}


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [0, 1], float NCHW -> uint8 NHWC (what a PNG holds, and what the real images are)."""
    return (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def score(clf: Classifier, images: np.ndarray) -> Scored:
    """Features, labels and the clean-shape test of uint8 NHWC images."""
    feats, pred = [], {a: [] for a in ATTRIBUTES}
    with torch.no_grad():
        for i in range(0, len(images), 512):
            f, logits = clf(to_tensor(images[i:i + 512]))
            feats.append(f.numpy().astype(np.float64))
            for a in ATTRIBUTES:
                pred[a].append(logits[a].argmax(1).numpy())
    return Scored(np.concatenate(feats), {a: np.concatenate(v) for a, v in pred.items()}, clean_shapes(images))


#: the clean-shape test's thresholds on a pixel's brightest channel (a real image: background 0-29, its shape >= 170)
BRIGHT, DARK = 140, 50
#: largest share of bright pixels off the shape's palette colour, and the most "stray" pixels (neither shape nor
#: background, and not on the shape's edge), as a share of the shape's area (plus 2 pixels)
OFF_COLOUR, STRAY = 0.1, 0.15
_PALETTE = np.array([RGB[c] for c in ATTRIBUTES["color"]], dtype=np.float32)
_PALETTE /= _PALETTE.max(1, keepdims=True)


def clean_shapes(images: np.ndarray) -> np.ndarray:
    """Per uint8 NHWC image: does it hold one clean shape, as the data set draws them? Mode averaging shows as what
    this refuses: a blurred shape (a wide band of pixels between shape and background brightness), a mix of
    two (half-bright regions; two blobs), or a colour between the palette's. Clean: exactly one bright blob (>= 3
    pixels, 4-connected), its pixels of one palette colour (up to shade: the colour over its brightest channel,
    within 0.25 of the palette's), and few stray pixels (neither bright nor dark, and not an edge pixel: an edge
    pixel touches both a bright and a dark one). Real images pass all three; a decoder's soft edges are edge
    pixels."""
    from scipy import ndimage

    if len(images) == 0:
        return np.zeros(0, dtype=bool)
    x = images.astype(np.float32)
    m = x.max(-1)
    bright, dark = m > BRIGHT, m <= DARK
    around = np.ones((1, 3, 3), dtype=bool)
    edge = ndimage.binary_dilation(bright, around) & ndimage.binary_dilation(dark, around)
    stray = (~bright & ~dark & ~edge).sum((1, 2))
    four = np.zeros((3, 3, 3), dtype=bool)
    four[1] = ndimage.generate_binary_structure(2, 1)
    blobs, _ = ndimage.label(bright, structure=four)
    out = np.zeros(len(x), dtype=bool)
    for i in range(len(x)):
        sizes = np.bincount(blobs[i].ravel())[1:]
        area = int(bright[i].sum())
        if (sizes >= 3).sum() != 1 or stray[i] > STRAY * area + 2:
            continue
        colour = x[i][bright[i]] / m[i][bright[i]][:, None]
        dist = np.linalg.norm(colour[:, None, :] - _PALETTE[None], axis=-1)
        nearest = np.bincount(dist.argmin(1), minlength=len(_PALETTE)).argmax()
        out[i] = (dist[:, nearest] >= 0.25).mean() <= OFF_COLOUR
    return out


def histogram_tv(pred: np.ndarray, free: np.ndarray, ref: np.ndarray | None, k: int) -> float:
    """Total-variation distance between the label histogram of ``pred`` over the samples where ``free`` and the
    histogram of ``ref`` over the same samples (None: the uniform distribution, the data's)."""
    n = max(int(free.sum()), 1)
    h = np.bincount(pred[free], minlength=k) / n
    r = np.full(k, 1.0 / k) if ref is None else np.bincount(ref[free], minlength=k) / n
    return 0.5 * float(np.abs(h - r).sum())


def coverage_tv(row: Scored, targets: dict[str, np.ndarray], ref: Scored | None,
                idx: np.ndarray | None = None) -> dict[str, float]:
    """Per attribute a caption leaves free, the TV distance of the row's label histogram to ``ref``'s on the same
    samples (None: to the data's, uniform), and their mean over the attributes ("mean"); ``idx`` resamples."""
    out = {}
    for a, values in ATTRIBUTES.items():
        t = targets[a] if idx is None else targets[a][idx]
        free = t < 0
        if not free.any():
            continue
        p = row.pred[a] if idx is None else row.pred[a][idx]
        r = None if ref is None else (ref.pred[a] if idx is None else ref.pred[a][idx])
        out[a] = histogram_tv(p, free, r, len(values))
    out["mean"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out


def unclean_by_free(row: Scored, targets: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """The no-clean-shape share over the samples whose caption leaves 1, 2, 3 or 4 attributes free, with their
    count: mode averaging shows as a share that grows with the number of right answers."""
    free = sum((t < 0).astype(int) for t in targets.values())
    return {str(j): {"share": float(1 - row.clean[free == j].mean()), "n": int((free == j).sum())}
            for j in range(1, len(targets) + 1) if (free == j).any()}


def fixed_accuracy(row: Scored, targets: dict[str, np.ndarray], idx: np.ndarray | None = None) -> dict[str, float]:
    """Per attribute, accuracy over the samples whose caption fixes it, and over every fixed (sample, attribute)
    ("all")."""
    hits, total, out = 0, 0, {}
    for a in ATTRIBUTES:
        t = targets[a] if idx is None else targets[a][idx]
        p = row.pred[a] if idx is None else row.pred[a][idx]
        fixed = t >= 0
        if fixed.any():
            ok = p[fixed] == t[fixed]
            out[a] = float(ok.mean())
            hits, total = hits + int(ok.sum()), total + int(fixed.sum())
    out["all"] = hits / total if total else float("nan")
    return out


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b`` (rows are samples); the trace of
    sqrtm(S1 S2) is the sum of the square roots of S1 S2's eigenvalues (real and >= 0 up to rounding)."""
    return frechet_of(gaussian(a), gaussian(b))


def gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of feature set ``x`` (rows are samples)."""
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_of(g1: tuple[np.ndarray, np.ndarray], g2: tuple[np.ndarray, np.ndarray]) -> float:
    """Fréchet distance between two fitted Gaussians (:func:`gaussian`)."""
    (mu1, s1), (mu2, s2) = g1, g2
    ev = np.linalg.eigvals(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def grid(images: np.ndarray, path: Path, cols: int = 8) -> None:
    """The first 4 rows of ``cols`` uint8 NHWC images, 2x enlarged, as a PNG."""
    from PIL import Image

    imgs = images[: cols * 4]
    rows = [np.concatenate(list(imgs[r * cols:(r + 1) * cols]), axis=1) for r in range(len(imgs) // cols)]
    Image.fromarray(np.concatenate(rows, axis=0)).resize((cols * 64, len(rows) * 64), Image.NEAREST).save(path)


# ------------------------------------------------------------------------------------------------------ rows
@dataclass(frozen=True)
class Row:
    key: str
    title: str
    model: str  # key into the recipe's models
    steps: int
    guidance: float

    @property
    def nfe(self) -> int:
        return self.steps * (2 if self.guidance > 1 else 1)


def seed_keys(b: Budget, base: str) -> list[str]:
    """The row (and run folder) of each training seed of a student: ``student`` for the budget's seed, then
    ``student-s1``, ``student-s2`` ... (seeds ``seed + 1``, ``seed + 2`` ...)."""
    return [base] + [f"{base}-s{k}" for k in range(1, b.student_seeds)]


def student_runs(b: Budget) -> list[tuple[int, str, str]]:
    """Each training seed of the students with its two rows (and run folders): ``(seed, InstaFlow student,
    control)``, the budget's seed first."""
    pairs = zip(seed_keys(b, "student"), seed_keys(b, "student_teacher"))
    return [(b.seed + k, student, control) for k, (student, control) in enumerate(pairs)]


def control_steps(b: Budget) -> int:
    """The control's distillation steps: ``control_steps``, or 0 for as many as the student's."""
    return b.control_steps or b.distill_steps


def rows_for(b: Budget) -> list[Row]:
    n, w_t, w = b.ode_steps, b.teacher_guidance, b.guidance
    rows = [Row("teacher-multi", f"Diffusion teacher, DPM-Solver {n}-step", "teacher", n, w_t),
            Row("teacher-1", "Diffusion teacher, 1-step", "teacher", 1, w_t),
            Row("rf2-multi", f"2-RF, Euler {n}-step", "rf2", n, w),
            Row("rf2-1", "2-RF, 1-step", "rf2", 1, w)]
    for seed, student, control in student_runs(b):
        which = f", seed {seed}" if b.student_seeds > 1 else ""
        rows += [Row(control, f"Teacher + distill (control), 1-step{which}", control, 1, 0.0),
                 Row(student, f"2-RF + distill (InstaFlow), 1-step{which}", student, 1, 0.0)]
    return rows + [Row("before", "Bundled `tiny` before this run, 1-step", "before", 1, 0.0)]


#: straightness is measured on these sampler paths: (name, model, kind); "sampling" is the multi-step row's own path
#: (its guidance; recorded while that row samples), "conditional" the same sampler without guidance
STRAIGHTNESS = (("teacher", "teacher", "sampling"), ("teacher", "teacher", "conditional"),
                ("rf2", "rf2", "sampling"), ("rf2", "rf2", "conditional"))


def sample_row(row: Row, model: Path, s: EvalSet, folder: Path, smoke: bool,
               straightness: tuple[Path, int] | None = None) -> dict[str, Any]:
    """The row's images (uint8 NHWC) for every (caption, noise) of the set, cached in ``rows/KEY.SET.npz``; a grid;
    on the full set, the latency too.

    ``straightness`` (cache file, n): the sampler's path over the first n samples is recorded on the way and its
    straightness saved there (the row's own path: the same noise, prompts, sampler and guidance), so the multi-step
    rows give S without sampling those paths a second time."""
    cache = folder / "rows" / f"{row.key}.{s.name}.npz"
    if cache.is_file():
        d = np.load(cache)
        return {"images": d["images"], "latency_ms": float(d["latency_ms"])}
    # sampled on the GPU when there is one (fp32, like the CPU); the classifier and the statistics stay on the CPU
    teacher = load_teacher(str(model), parse_device(None), steps=row.steps, guidance=row.guidance)
    teacher.pipe.embedding_cache_size = 512
    z0, captions = s.noise(), s.captions
    images, start = [], 0
    if straightness is not None:
        s_cache, start = straightness
        x1, values = solve_with_straightness(teacher, z0[:start], captions[:start])
        images.append(to_uint8(teacher.pipe.decode(x1)))
        atomic_write_with(s_cache, lambda f: np.save(f, values))
    for i in range(start, len(captions), 256):
        images.append(to_uint8(teacher.pipe.decode(teacher.solve(z0[i:i + 256], captions[i:i + 256]))))
    imgs = np.concatenate(images)
    grid(imgs, folder / (f"grid-{row.key}.png" if s.name == "full" else f"grid-{row.key}-{s.name}.png"))
    latency = float("nan")
    if s.name == "full":
        times = []
        for _ in range(2 if smoke else 6):  # the first is a warm-up
            t = time.perf_counter()
            teacher.pipe.decode(teacher.solve(z0[:1], captions[:1])).cpu()  # the copy waits for a GPU to finish
            times.append(time.perf_counter() - t)
        latency = 1e3 * statistics.median(times[1:])
    buf = io.BytesIO()
    np.savez_compressed(buf, images=imgs, latency_ms=latency)
    atomic_write_bytes(cache, buf.getvalue())
    return {"images": imgs, "latency_ms": latency}


def vae_round_trip(model: Path, images: np.ndarray) -> np.ndarray:
    """Real images through the recipe's VAE (encode, the posterior mean, decode): the best any model decoding through
    it can do, the reference for the clean-shape test and FID."""
    from runtime.models import load_components
    from runtime.checkpoints import resolve

    vae = load_components(resolve(str(model))).vae.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 512):
            z = vae.encode(to_tensor(images[i:i + 512])).latent_dist.mean
            out.append(to_uint8((vae.decode(z).sample.float() + 1) / 2))
    return np.concatenate(out)


def path_s(model: Path, steps: int, guidance: float, captions: list[str], z0: torch.Tensor) -> np.ndarray:
    """Straightness per sample of the model's own sampler path (DPM-Solver for a diffusion model, Euler for a flow),
    measured the same way for both (:func:`train.metrics.path_straightness`)."""
    teacher = load_teacher(str(model), parse_device(None), steps=steps, guidance=guidance)
    return solve_with_straightness(teacher, z0, captions)[1]


def solve_with_straightness(teacher: Teacher, z0: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, np.ndarray]:
    """The sampler's X1 and the straightness of each sample's path on the way."""
    path: flow.Trajectory = []
    x1 = teacher.solve(z0, captions, trajectory=path)
    return x1, path_straightness(path).numpy().astype(np.float64)


# ------------------------------------------------------------------------------------------------- statistics
def interval(values: np.ndarray) -> list[float]:
    """Percentile 95% interval of bootstrap replicates (for means: accuracies, straightness)."""
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def centred_interval(point: float, values: np.ndarray) -> list[float]:
    """95% interval for FIDs and contrasts of FIDs: the replicates' 2.5-97.5 percentile spread around the estimate,
    ``point + (q2.5 - median, q97.5 - median)``. FID is biased upwards by sampling noise and a replicate (drawn with
    repeats) adds bias of its own, so the replicates sit above the estimate and a plain percentile interval can
    miss it altogether; the spread (right-skewed: a few samples far from the real ones weigh a lot) is kept."""
    lo, mid, hi = np.percentile(values, [2.5, 50, 97.5])
    return [float(point + lo - mid), float(point + hi - mid)]


def bootstrap(real: np.ndarray, rows: dict[str, Scored], s: dict[str, np.ndarray], reps: int,
              targets: dict[str, np.ndarray], seed: int = 0, partial: dict[str, Any] | None = None) -> dict[str, Any]:
    """Replicates of every row's FID, accuracies and no-clean-shape share on the full captions (one index draw
    shared by all rows, paired), of every S, and with ``partial`` (``{"real": feats, "rows": {key: Scored},
    "targets": ..., "reference": key}``) of every partial-caption statistic (its own paired draw)."""
    rng = np.random.default_rng(seed)
    n, n_real = len(next(iter(rows.values())).feats), len(real)
    n_s = len(next(iter(s.values())))
    fid = {k: np.empty(reps) for k in rows}
    acc = {k: {a: np.empty(reps) for a in ATTRIBUTES} for k in rows}
    unclean = {k: np.empty(reps) for k in rows}
    st = {k: np.empty(reps) for k in s}
    correct = {k: row.correct(targets) for k, row in rows.items()}
    if partial is not None:
        p_rows, p_t, p_real, ref = partial["rows"], partial["targets"], partial["real"], partial["reference"]
        n_p, n_pr = len(partial["targets"]["color"]), len(p_real)
        pb: dict[str, Any] = {name: {k: np.empty(reps) for k in p_rows}
                              for name in ("fid", "acc", "tv_teacher", "tv_data", "unclean")}
    for r in range(reps):
        idx, ridx, sidx = rng.integers(n, size=n), rng.integers(n_real, size=n_real), rng.integers(n_s, size=n_s)
        real_g = gaussian(real[ridx])  # once per replicate, shared by the rows
        for k, row in rows.items():
            fid[k][r] = frechet_of(real_g, gaussian(row.feats[idx]))
            unclean[k][r] = 1.0 - row.clean[idx].mean()
            for a in ATTRIBUTES:
                acc[k][a][r] = correct[k][a][idx].mean()
        for k, v in s.items():
            st[k][r] = v[sidx].mean()
        if partial is not None:
            idx, ridx = rng.integers(n_p, size=n_p), rng.integers(n_pr, size=n_pr)
            real_g = gaussian(p_real[ridx])
            for k, row in p_rows.items():
                pb["fid"][k][r] = frechet_of(real_g, gaussian(row.feats[idx]))
                pb["acc"][k][r] = fixed_accuracy(row, p_t, idx)["all"]
                pb["tv_teacher"][k][r] = coverage_tv(row, p_t, p_rows[ref], idx)["mean"]
                pb["tv_data"][k][r] = coverage_tv(row, p_t, None, idx)["mean"]
                pb["unclean"][k][r] = 1.0 - row.clean[idx].mean()
    out = {"fid": fid, "acc": acc, "unclean": unclean, "s": st}
    if partial is not None:
        out["partial"] = pb
    return out


#: a claim's verdict: its 95% interval (every seed's) clears the bar / lies wholly on the other side / otherwise
VERDICTS = ("met", "not met", "not resolvable at this scale")


def verdict(cis: Sequence[Sequence[float]], below: bool, bar: float = 0.0,
            names: Sequence[str] | None = None) -> tuple[str, str]:
    """Judge a claim "value < bar" (``below``) or "value >= bar" on the 95% interval of every training seed: met
    when every interval clears the bar, not met when every one lies wholly on the other side, and not resolvable at
    this scale otherwise (an interval holds the bar, or the seeds disagree: the training or evaluation noise is as
    large as the effect). Returns the verdict and the reason in words."""
    sides = []
    for lo, hi in cis:
        if (hi < bar) if below else (lo >= bar):
            sides.append("clears the bar")
        elif (lo > bar) if below else (hi < bar):
            sides.append("lies on the other side")
        else:
            sides.append("holds the bar")
    if len(cis) == 1:
        word = {"clears the bar": "met", "lies on the other side": "not met"}.get(sides[0], VERDICTS[2])
        return word, f"the 95% interval {sides[0]}"
    names = list(names or [f"seed {k}" for k in range(len(cis))])
    if len(set(sides)) == 1:
        word = {"clears the bar": "met", "lies on the other side": "not met"}.get(sides[0], VERDICTS[2])
        return word, f"every seed's 95% interval {sides[0]} ({len(cis)} seeds)"
    groups = {side: [n for n, s in zip(names, sides) if s == side] for side in dict.fromkeys(sides)}
    return VERDICTS[2], "; ".join(f"{', '.join(g)}: the interval {side}" for side, g in groups.items())


def combination(point: dict[str, float], reps: dict[str, np.ndarray], weights: dict[str, float],
                centred: bool = True) -> tuple[float, list[float]]:
    """sum_k w_k x_k with its 95% interval from the paired replicates (``centred`` for FID-like statistics, whose
    replicates sit above the estimate; else a percentile interval, for means)."""
    value = sum(w * point[k] for k, w in weights.items())
    r = sum(w * reps[k] for k, w in weights.items())
    return value, (centred_interval(value, r) if centred else interval(r))


def seed_rows(doc: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The rows of each training seed: (InstaFlow students, controls), seed by seed (finished or not)."""
    seeds = doc.get("seeds", {})
    return seeds.get("student", ["student"]), seeds.get("student_teacher", ["student_teacher"])


def seeded_quantities(doc: dict[str, Any], boot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every quantity a seeded claim or the seed-spread table needs, per seed: value and 95% interval, None for a
    seed whose rows are not all there yet (pending); mean, SD and interval width over the seeds that are."""
    students, controls = seed_rows(doc)
    part, pboot = doc.get("partial"), boot.get("partial")
    fid, fid_b = doc["fid"], boot["fid"]
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, label: str, need: list[list[str]], value: Any, have: dict[str, Any] = fid) -> None:
        """``need[k]``: the rows seed k's value reads (from ``have``); ``value(k)``: (value, ci)."""
        pairs = [value(k) if all(r in have for r in rows) else None for k, rows in enumerate(need)]
        out[name] = {"label": label, "values": [p and p[0] for p in pairs], "cis": [p and p[1] for p in pairs]}

    add("fid_control", "FID, full captions: control", [[c] for c in controls],
        lambda k: (fid[controls[k]], doc["fid_ci"][controls[k]]))
    add("fid_student", "FID, full captions: InstaFlow student", [[s] for s in students],
        lambda k: (fid[students[k]], doc["fid_ci"][students[k]]))
    add("diff", "FID(student) - FID(control), full captions (claim 3)", [[s, c] for s, c in zip(students, controls)],
        lambda k: combination(fid, fid_b, {students[k]: 1.0, controls[k]: -1.0}))
    add("margin", "1.5 FID(teacher) - FID(student), full captions (claim 4)",
        [["teacher-multi", s] for s in students],
        lambda k: combination(fid, fid_b, {"teacher-multi": 1.5, students[k]: -1.0}))
    add("shape_control", "shape accuracy, full captions: control", [[c] for c in controls],
        lambda k: (doc["acc"][controls[k]]["shape"], doc["acc_ci"][controls[k]]["shape"]))
    add("shape_student", "shape accuracy, full captions: InstaFlow student", [[s] for s in students],
        lambda k: (doc["acc"][students[k]]["shape"], doc["acc_ci"][students[k]]["shape"]))
    if part is not None and pboot is not None:
        pf, pfb = part["fid"], pboot["fid"]
        add("p_fid_control", "FID, partial captions: control", [[c] for c in controls],
            lambda k: (pf[controls[k]], part["fid_ci"][controls[k]]), pf)
        add("p_fid_student", "FID, partial captions: InstaFlow student", [[s] for s in students],
            lambda k: (pf[students[k]], part["fid_ci"][students[k]]), pf)
        add("p_diff", "FID(student) - FID(control), partial captions (claim 3a)",
            [[s, c] for s, c in zip(students, controls)],
            lambda k: combination(pf, pfb, {students[k]: 1.0, controls[k]: -1.0}), pf)
        add("p_contrast", "[FID(student) - FID(2-RF)] - [FID(control) - FID(teacher)], partial captions (claim 3b)",
            [[s, "rf2-multi", c, "teacher-multi"] for s, c in zip(students, controls)],
            lambda k: combination(pf, pfb, {students[k]: 1.0, "rf2-multi": -1.0, controls[k]: -1.0,
                                            "teacher-multi": 1.0}), pf)
        tv = {k: v["mean"] for k, v in part["tv_teacher"].items()}
        add("p_tv", "TV to the teacher's labels: student - control, partial captions (claim 3c)",
            [[s, c] for s, c in zip(students, controls)],
            lambda k: combination(tv, pboot["tv_teacher"], {students[k]: 1.0, controls[k]: -1.0}), tv)
        add("p_unclean", "no-clean-shape share: student - control, partial captions (claim 3d)",
            [[s, c] for s, c in zip(students, controls)],
            lambda k: combination(part["unclean"], pboot["unclean"], {students[k]: 1.0, controls[k]: -1.0},
                                  centred=False), part["unclean"])
    for q in out.values():
        v = np.array([x for x in q["values"] if x is not None], dtype=np.float64)
        q["mean"] = float(v.mean()) if len(v) else float("nan")
        q["sd"] = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
        q["ci_width"] = float(np.mean([hi - lo for lo, hi in filter(None, q["cis"])])) if len(v) else float("nan")
    return out


#: a claim that needs a row or a seed that has not finished training: judged on the seeds that have, if any
PENDING = "pending"


def claims(doc: dict[str, Any], boot: dict[str, Any], bundled: str,
           quantities: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The paper's claims, each with its measured value(s), 95% interval(s) (one per training seed of the
    students) and verdict (:func:`verdict`). Claims 3a-3d test claim 3 on the partial captions, where one noise has
    several right images: the paper's argument (a curved teacher's coupling, distilled directly, averages modes).
    A claim whose rows have not all finished training is pending: with no seed yet it says what it waits for, with
    some it is judged on those (``so_far``) and says which seeds are missing. ``quantities``: what
    :func:`seeded_quantities` returned for ``doc`` and ``boot`` (computed here when not given)."""
    fid, fid_b, s_b = doc["fid"], boot["fid"], boot["s"]
    s = {k: v["value"] for k, v in doc["straightness"].items()}
    students, _ = seed_rows(doc)
    q = seeded_quantities(doc, boot) if quantities is None else quantities
    first = doc["budget"].get("seed", 0)
    names = [f"seed {first + k}" for k in range(len(students))]

    def waiting(cid: str, text: str, rows: Sequence[str]) -> dict[str, Any]:
        return {"id": cid, "claim": text, "value": "", "cis": [], "verdict": PENDING, "met": False,
                "reason": "waits for " + ", ".join(dict.fromkeys(rows))}

    def claim(cid: str, text: str, value: str, cis: list[list[float]], below: bool, bar: float = 0.0
              ) -> dict[str, Any]:
        word, reason = verdict(cis, below, bar, names if len(cis) > 1 else None)
        return {"id": cid, "claim": text, "value": value, "cis": cis, "verdict": word, "reason": reason,
                "met": word == "met"}

    def seeded(cid: str, text: str, name: str, label: str, below: bool, fmt: str = "{:+.1f}", extra: str = "",
               rows: Sequence[str] = ()) -> dict[str, Any]:
        values, cis = q[name]["values"], q[name]["cis"]
        done = [k for k, v in enumerate(values) if v is not None]
        if not done:
            return waiting(cid, text, rows)
        value = f"{label} " + " / ".join(fmt.format(values[k]) for k in done) + extra
        word, reason = verdict([cis[k] for k in done], below, 0.0, [names[k] for k in done] if len(done) > 1 else None)
        out = {"id": cid, "claim": text, "value": value, "cis": [cis[k] for k in done], "verdict": word,
               "reason": reason, "met": word == "met", "seeds": [first + k for k in done]}
        if len(done) < len(values):
            missing = [names[k] for k in range(len(values)) if k not in done]
            out.update(verdict=PENDING, so_far=word, met=False,
                       reason=f"{len(done)} of {len(values)} seeds finished ({', '.join(missing)} pending); so far "
                              f"{word}: {reason}")
        return out

    out = []
    text1 = "S(2-RF) far below S(teacher): S ratio < 0.5"
    if {"rf2/sampling", "teacher/sampling"} <= set(s):
        ratio = s["rf2/sampling"] / s["teacher/sampling"]
        out.append(claim("1", text1, f"S ratio {ratio:.3f}",
                         [interval(s_b["rf2/sampling"] / s_b["teacher/sampling"])], True, 0.5))
    else:
        out.append(waiting("1", text1, ["rf2"]))
    text2 = ("2-RF at one step far better than the teacher at one step: FID(2-RF) < 0.5 FID(teacher), margin 0.5 "
             "FID(teacher) - FID(2-RF) > 0")
    if {"teacher-1", "rf2-1"} <= set(fid):
        c, ci = combination(fid, fid_b, {"teacher-1": 0.5, "rf2-1": -1.0})
        out.append(claim("2", text2, f"margin {c:+.1f} (FID ratio {fid['rf2-1'] / fid['teacher-1']:.3f})", [ci],
                         False))
    else:
        out.append(waiting("2", text2, ["rf2"]))
    pair = ["student", "student_teacher"]
    out.append(seeded("3", "2-RF + distill better than teacher + distill (full captions): FID difference < 0",
                      "diff", "FID difference", True, rows=pair))
    if "p_diff" in q:
        out.append(seeded("3a", "the same on partial captions (FID against caption-matched real images): FID "
                                "difference < 0", "p_diff", "FID difference", True, rows=pair))
        out.append(seeded("3b", "on partial captions, distilling the 2-RF loses less than distilling the teacher: "
                                "[FID(student) - FID(2-RF)] - [FID(control) - FID(teacher)] < 0",
                          "p_contrast", "contrast", True, rows=["rf2"] + pair))
        out.append(seeded("3c", "on partial captions, the student covers the free attributes more like the teacher "
                                "than the control does: TV(student) - TV(control) < 0",
                          "p_tv", "TV difference", True, "{:+.3f}", rows=pair))
        out.append(seeded("3d", "on partial captions, the student averages modes less: its share of samples that "
                                "are no clean shape minus the control's < 0",
                          "p_unclean", "difference", True, "{:+.1%}", rows=pair))
    ratios = " / ".join(f"{fid[k] / fid['teacher-multi']:.3f}" for k in students if k in fid)
    out.append(seeded("4", "the student within 1.5x of its teacher's multi-step FID (the diffusion teacher, "
                           f"{doc['budget'].get('ode_steps', 25)} steps): margin 1.5 FID(teacher) - FID(student) >= 0",
                      "margin", "margin", False, extra=f" (FID ratio {ratios})", rows=["student"]))
    need = {"color": 0.95, "position": 0.95, "shape": 0.85, "size": 0.85}
    text5 = "the bundled one-step model follows colour and position >= 95%, shape and size >= 85% (whole interval)"
    if bundled not in doc["acc"]:
        out.append(waiting("5", text5, [bundled]))
        return out
    lows = {a: interval(boot["acc"][bundled][a])[0] for a in need}
    ok = all(lows[a] >= need[a] for a in need)
    out.append({"id": "5", "claim": text5,
                "value": ", ".join(f"{a} {doc['acc'][bundled][a]:.1%}" for a in need),
                "cis": [], "met": ok, "verdict": "met" if ok else "not met",
                "reason": "every lower bound clears its bar" if ok else
                ", ".join(f"{a} from {lows[a]:.1%}" for a in need if lows[a] < need[a]) + " (bar: "
                + ", ".join(f"{a} {need[a]:.0%}" for a in need if lows[a] < need[a]) + ")"})
    return out


def ship_decision(doc: dict[str, Any], boot: dict[str, Any]) -> dict[str, Any]:
    """The best one-step student by FID (every finished seed of both kinds), shipped when its FID is below the
    bundled model's (paired 95% interval of the difference entirely below 0)."""
    students, controls = seed_rows(doc)
    done = [k for k in students + controls if k in doc["fid"]]
    if not done or "before" not in doc["fid"]:
        return {"key": None, "row": None, "reason": "pending: " + ("no student has finished training" if not done
                                                                 else "no bundled model in this run folder")}
    best = min(done, key=lambda k: doc["fid"][k])
    ci = centred_interval(doc["fid"][best] - doc["fid"]["before"], boot["fid"][best] - boot["fid"]["before"])
    better = ci[1] < 0
    reason = (f"{best}: FID {doc['fid'][best]:.2f} vs the bundled model's {doc['fid']['before']:.2f}, "
              f"difference 95% interval [{ci[0]:+.2f}, {ci[1]:+.2f}]")
    return {"key": best if better else None, "row": best, "reason": reason}


# ------------------------------------------------------------------------------------------------------ report
def budget_overrides(b: Budget, smoke: bool = False) -> dict[str, Any]:
    """The budget's settings that differ from the recipe's defaults (the smoke budget's with ``smoke``):
    ``--budget KEY=VALUE`` to run it again."""
    from .shapes import SMOKE, Budget as Default

    default = (SMOKE if smoke else Default()).__dict__
    return {k: v for k, v in b.__dict__.items() if default.get(k) != v}


def trained_stages(b: Budget) -> list[str]:
    """The recipe's trained stages (run folders), upstream first."""
    return ["teacher", "rf2"] + [k for _, student, control in student_runs(b) for k in (student, control)]


#: the stages whose work ``timings.json`` records (the trained ones record theirs in DONE)
UNTRAINED = ("vae", "pairs_teacher", "pairs_rf2", "classifier", "report")


def stage_report(out: Path, b: Budget, models: dict[str, Path], clf: Classifier, smoke: bool
                 ) -> tuple[Path, dict[str, Any]]:
    """The report on every row whose model is in ``models`` (the teacher at least); the others are pending, and so
    is every claim that needs one of them."""
    t0 = time.perf_counter()
    report = out / "report"
    (report / "rows").mkdir(parents=True, exist_ok=True)
    full, part = full_set(b.eval_n), partial_set(b.eval_n)
    real_imgs, real_labels = make_dataset(b.eval_n, seed=20)
    real_scored = score(clf, real_imgs)
    real = real_scored.feats
    real_correct = {a: real_scored.pred[a] == np.array([lb.index()[a] for lb in real_labels]) for a in ATTRIBUTES}
    floor = frechet(real, score(clf, make_dataset(b.eval_n, seed=21)[0]).feats)
    matched = matching_real(part, seed=30)
    p_real = score(clf, matched)
    p_refs = {"real-2": score(clf, matching_real(part, seed=31)),
              "real-vae": score(clf, vae_round_trip(models["teacher"], matched))}
    every = rows_for(b)
    specs = [r for r in every if r.model in models]
    guidance = {"teacher": b.teacher_guidance, "rf2": b.guidance}
    n = min(b.straightness_n, b.eval_n)
    z0 = full.noise()

    def s_cache(name: str, kind: str) -> Path:
        return report / "rows" / f"straightness-{name}-{kind}.npy"

    images: dict[str, dict[str, np.ndarray]] = {"full": {}, "partial": {}}
    latency = {}
    sampled = 0
    for s in (full, part):  # every row on the full captions first: the published table's numbers come first
        for row in specs:
            print(f"report: {row.title} ({s.name} captions)", flush=True)
            # the multi-step rows sample exactly the "sampling" straightness paths: recorded on the way
            own = (s.name == "full" and row.model in guidance and row.steps == b.ode_steps
                   and row.guidance == guidance[row.model] and not s_cache(row.model, "sampling").is_file())
            sampled += not (report / "rows" / f"{row.key}.{s.name}.npz").is_file()
            got = sample_row(row, models[row.model], s, report, smoke,
                             (s_cache(row.model, "sampling"), n) if own else None)
            images[s.name][row.key] = got["images"]
            if s.name == "full":
                latency[row.key] = got["latency_ms"]
    rows = {k: score(clf, v) for k, v in images["full"].items()}
    p_rows = {k: score(clf, v) for k, v in images["partial"].items()}
    st = {}
    for name, model, kind in STRAIGHTNESS:
        if model not in models:
            continue
        cache = s_cache(name, kind)
        if not cache.is_file():  # the conditional paths (and a sampling path whose row was cached without it)
            values = path_s(models[model], b.ode_steps, guidance[name] if kind == "sampling" else 1.0,
                            full.captions[:n], z0[:n])
            atomic_write_with(cache, lambda f, v=values: np.save(f, v))
        st[f"{name}/{kind}"] = np.load(cache)
    everything = {**p_rows, **p_refs}
    boot = bootstrap(real, rows, st, b.bootstrap, full.targets,
                     partial={"real": p_real.feats, "rows": everything, "targets": part.targets,
                              "reference": "teacher-multi"})
    fid = {k: frechet(real, v.feats) for k, v in rows.items()}
    p_fid = {k: frechet(p_real.feats, v.feats) for k, v in everything.items()}
    tv_teacher = {k: coverage_tv(v, part.targets, everything["teacher-multi"]) for k, v in everything.items()}
    tv_data = {k: coverage_tv(v, part.targets, None) for k, v in everything.items()}
    pb = boot["partial"]
    if sampled:  # the rows sampled in this call (2 per row: full and partial captions), scored, bootstrapped
        record_time(out, "report", time.perf_counter() - t0, sampled, 2 * len(every), "row")
    pending = [r.model for r in every if r.model not in models]
    doc: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "smoke": smoke, "budget": b.__dict__,
        "overrides": budget_overrides(b, smoke),
        "pending": list(dict.fromkeys(pending)),
        "fid_floor": floor,
        "real_accuracy": {a: float(v.mean()) for a, v in real_correct.items()},
        "rows": [{"key": r.key, "row": r.title, "nfe": r.nfe, "latency_ms": latency.get(r.key),
                  "pending": r.model not in models,
                  "grid": f"grid-{r.key}.png", "grid_partial": f"grid-{r.key}-partial.png"} for r in every],
        "seeds": {"student": seed_keys(b, "student"), "student_teacher": seed_keys(b, "student_teacher")},
        "control_steps": control_steps(b),
        "fid": fid,
        "fid_ci": {k: centred_interval(fid[k], v) for k, v in boot["fid"].items()},
        "acc": {k: {a: float(c.mean()) for a, c in v.correct(full.targets).items()} for k, v in rows.items()},
        "acc_ci": {k: {a: interval(v) for a, v in accs.items()} for k, accs in boot["acc"].items()},
        "unclean": {k: float(1 - v.clean.mean()) for k, v in rows.items()},
        "unclean_ci": {k: interval(v) for k, v in boot["unclean"].items()},
        "partial": {
            "n": len(part), "captions": len(set(part.captions)), "patterns": len(PARTIAL_KEEPS),
            "fid_floor": p_fid["real-2"],
            "fid": p_fid, "fid_ci": {k: centred_interval(p_fid[k], v) for k, v in pb["fid"].items()},
            "acc": {k: fixed_accuracy(v, part.targets) for k, v in everything.items()},
            "acc_ci": {k: interval(v) for k, v in pb["acc"].items()},
            "tv_teacher": tv_teacher,
            "tv_teacher_ci": {k: centred_interval(tv_teacher[k]["mean"], v) for k, v in pb["tv_teacher"].items()},
            "tv_data": tv_data,
            "tv_data_ci": {k: centred_interval(tv_data[k]["mean"], v) for k, v in pb["tv_data"].items()},
            "unclean": {k: float(1 - v.clean.mean()) for k, v in everything.items()},
            "unclean_ci": {k: interval(v) for k, v in pb["unclean"].items()},
            "unclean_by_free": {k: unclean_by_free(v, part.targets) for k, v in everything.items()},
        },
        "straightness": {k: {"value": float(v.mean()), "ci": interval(boot["s"][k]),
                             "guidance": guidance[k.split("/")[0]] if k.endswith("sampling") else 1.0}
                         for k, v in st.items()},
        "times": stage_times(out, trained_stages(b), UNTRAINED),
    }
    doc["ship"] = ship_decision(doc, boot)
    spread = seeded_quantities(doc, boot)
    doc["claims"] = claims(doc, boot, doc["ship"]["key"] or "before", spread)
    doc["spread"] = spread
    atomic_write_json(report / "results.json", doc)
    (report / "SHAPES.md").write_text(render_report(doc))
    return report, doc


def _pct(v: float, ci: list[float]) -> str:
    return f"{v:.1%} [{ci[0]:.1%}, {ci[1]:.1%}]"


def _fid(v: float, ci: list[float]) -> str:
    return f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _tv(v: float, ci: list[float]) -> str:
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def render_report(doc: dict[str, Any], discussion: str = "") -> str:
    b = doc["budget"]
    overrides = doc.get("overrides", {})
    steps = doc.get("control_steps", b["distill_steps"])
    same = ("the same number of distillation steps" if steps == b["distill_steps"] else
            f"{steps} distillation steps"
            + (" (the 2-RF's and the student's together: the paper's matched budget)"
               if steps == b["rf2_steps"] + b["distill_steps"] else ""))
    seeds = b.get("student_seeds", 1)
    pending = doc.get("pending", [])
    command = ("python -m train.recipes.shapes" + (" --smoke" if doc["smoke"] else "")
               + "".join(f" --budget {k}={v}" for k, v in overrides.items()))
    lines = [
        "# InstaFlow at small scale: shapes", "",
        "Regenerated by `" + command + (" --report-only" if pending else "")
        + f"` on {doc['date']}" + (" (SMOKE run: numbers meaningless)" if doc["smoke"] else "") + ". "
        "The teacher is a text-conditioned diffusion UNet in Stable Diffusion's role (epsilon prediction, SD's "
        f"scaled-linear schedule), sampled with DPM-Solver, {b['ode_steps']} steps, guidance {b['teacher_guidance']}; "
        f"the 2-RF is trained by reflow on {b['pairs']} of its pairs from its weights ({b['rf2_steps']} steps); the "
        f"InstaFlow student is distilled from {b['pairs']} 2-RF pairs (Euler {b['ode_steps']}, guidance "
        f"{b['guidance']}; {b['distill_steps']} steps); the control student is distilled from the teacher's own pairs "
        f"with {same} (latent L2 loss for both: LPIPS weights cannot be had offline)"
        + (f"; each student is trained with {seeds} seeds ({b['seed']}-{b['seed'] + seeds - 1}: batch order, "
           "time and dropout draws), the upstream stages once" if seeds > 1 else "") + ".", "",
        f"Every row: {b['eval_n']} images on the 120 full captions (cycled) and {b['eval_n']} on partial captions, "
        "the same noise for every row. FID is "
        "computed in the 128-d feature space of a small CNN trained on real shapes (its accuracy on real images: "
        + ", ".join(f"{k} {v:.1%}" for k, v in doc["real_accuracy"].items())
        + f"); two independent sets of real images are FID {doc['fid_floor']:.2f} apart (the floor). Accuracies are "
        "that classifier's agreement with the prompt. \"No clean shape\": the share of samples that are not one "
        "shape of one palette colour with sharp edges (blurred, mixed, doubled; real images: none). Brackets: 95% "
        f"bootstrap intervals ({b['bootstrap']} replicates; real images and samples resampled, the same draw for "
        "every row, so differences between rows are paired): percentile intervals for accuracies, shares and S; for "
        "FIDs, TV distances and their contrasts the replicates' 2.5-97.5 percentile spread around the estimate, since "
        "their replicates sit above it (sampling noise adds to both, and drawing with repeats adds more). "
        "Latency: sampler + decode, batch 1, median, where the report ran (see the wall-time table).", ""]
    if pending:
        lines += [f"**A partial report: {', '.join(pending)} still training.** Their rows, and the claims that need "
                  f"them, say pending; `{command}` finishes them (every stage resumes), and this report is then "
                  "regenerated whole.", ""]
    lines += ["| model | NFE | latency ms | FID | colour | shape | position | size | no clean shape | samples |",
              "| --- | ---: | ---: | --- | --- | --- | --- | --- | --- | --- |"]
    unclean, unclean_ci = doc.get("unclean", {}), doc.get("unclean_ci", {})
    for r in doc["rows"]:
        k = r["key"]
        if k not in doc["fid"]:
            lines.append(f"| {r['row']} | {r['nfe']} | pending | pending | | | | | | |")
            continue
        accs = " | ".join(_pct(doc["acc"][k][a], doc["acc_ci"][k][a]) for a in ("color", "shape", "position", "size"))
        u = _pct(unclean[k], unclean_ci[k]) if k in unclean else ""
        lines.append(f"| {r['row']} | {r['nfe']} | {r['latency_ms']:.1f} | {_fid(doc['fid'][k], doc['fid_ci'][k])} | "
                     f"{accs} | {u} | [grid]({r['grid']}) |")
    part = doc.get("partial")
    if part:
        lines += ["", "### Partial captions: prompts with more than one right answer", "",
                  f"{part['n']} samples on {part['captions']} partial captions: the {part['patterns']} ways the "
                  "recipe's training captions leave attributes out (`a shape`, `a red shape`, `a circle at the "
                  "center`, ... `a small red circle`), each for 1/15 of the samples, on labels drawn in balanced "
                  "rounds. Accuracy: on the attributes a caption fixes (all of them pooled; per attribute in "
                  "results.json). Coverage of the attributes it leaves free: the total-variation distance between the "
                  "row's label histogram and the diffusion teacher's on the same captions and noise (TV to teacher), "
                  "and to the data's (uniform: TV to data), pooled over the samples that leave the attribute free and "
                  "averaged over the four attributes (0: the same histogram; finite samples alone give the real "
                  "images' TV to data). FID against real images drawn to match each caption (its fixed attributes, "
                  f"the others uniform; a second such draw is FID {part['fid_floor']:.2f} away).", "",
                  "| model | FID (caption-matched) | accuracy, fixed attributes | TV to teacher | TV to data | "
                  "no clean shape | samples |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        titles = {r["key"]: r["row"] for r in doc["rows"]}
        titles.update({"real-2": "Real images, caption-matched (a second draw)",
                       "real-vae": "Real images through the VAE (encode, decode)"})
        grids = {r["key"]: r.get("grid_partial") for r in doc["rows"]}
        for k in titles:
            if k not in part["fid"]:
                lines.append(f"| {titles[k]} | pending | | | | | |")
                continue
            tvt = ("0 (the reference)" if k == "teacher-multi" else
                   _tv(part["tv_teacher"][k]["mean"], part["tv_teacher_ci"][k]))
            g = f"[grid]({grids[k]})" if grids.get(k) else ""
            lines.append(f"| {titles[k]} | {_fid(part['fid'][k], part['fid_ci'][k])} | "
                         f"{_pct(part['acc'][k]['all'], part['acc_ci'][k])} | {tvt} | "
                         f"{_tv(part['tv_data'][k]['mean'], part['tv_data_ci'][k])} | "
                         f"{_pct(part['unclean'][k], part['unclean_ci'][k])} | {g} |")
    by_free = (part or {}).get("unclean_by_free")
    if by_free:
        counts = next(iter(by_free.values()))
        lines += ["", "No clean shape by how many attributes the caption leaves free (samples: "
                  + ", ".join(f"{j} free {v['n']}" for j, v in counts.items()) + "; point estimates: a share's "
                  "binomial standard error is about 1.5-2 points at 500 samples, 4 at 136). Mode averaging shows as "
                  "a share that grows with the number of right answers.", "",
                  "| model | " + " | ".join(f"{j} free" for j in counts) + " |",
                  "| --- | " + " | ".join("---:" for _ in counts) + " |"]
        for k in titles:
            if k in by_free:
                lines.append(f"| {titles[k]} | " + " | ".join(f"{by_free[k][j]['share']:.1%}" for j in counts) + " |")
    lines += ["", f"Straightness S (0 = straight) of each sampler's own {b['ode_steps']}-step path, "
              f"{b['straightness_n']} samples; the diffusion teacher's DPM-Solver path is mapped to the flow's "
              "coordinates (x / (sqrt(a) + sqrt(1 - a)) at time sqrt(a) / (sqrt(a) + sqrt(1 - a))) and measured like "
              "the flow's Euler path (a sampler used at guidance 1 has one path: its two rows are the same):", "",
              "| model | path | guidance | S |", "| --- | --- | ---: | --- |"]
    names = {"teacher": "Diffusion teacher (DPM-Solver PF-ODE)", "rf2": "2-RF (Euler)"}
    for name, _, kind in STRAIGHTNESS:
        v = doc["straightness"].get(f"{name}/{kind}")
        w = (b["teacher_guidance"] if name == "teacher" else b["guidance"]) if kind == "sampling" else 1.0
        path = "as its multi-step row samples" if kind == "sampling" else "without guidance"
        lines.append(f"| {names[name]} | {path} | {w:g} | pending |" if v is None else
                     f"| {names[name]} | {path} | {v['guidance']:g} | {v['value']:.4f} [{v['ci'][0]:.4f}, "
                     f"{v['ci'][1]:.4f}] |")
    spread = doc.get("spread", {})
    if seeds > 1 and spread:
        first = b["seed"]
        lines += ["", "### Training noise: the students' seeds beside the bootstrap", "",
                  "Each seed's value with its 95% bootstrap interval (which covers the evaluation's noise: samples and "
                  "real images), the mean and standard deviation across seeds (which covers the training's), and the "
                  "mean width of the bootstrap intervals. Student seed k is paired with control seed k.", "",
                  "| quantity | " + " | ".join(f"seed {first + k}" for k in range(seeds))
                  + " | mean | SD across seeds | mean 95% interval width |",
                  "| --- | " + " | ".join("---" for _ in range(seeds)) + " | ---: | ---: | ---: |"]
        for q in spread.values():
            pct = "share" in q["label"] or "accuracy" in q["label"]
            tv = "TV" in q["label"]
            fmt = (lambda v: f"{v:.1%}") if pct else (lambda v: f"{v:.3f}") if tv else (lambda v: f"{v:.1f}")
            cells = " | ".join("pending" if v is None else f"{fmt(v)} [{fmt(ci[0])}, {fmt(ci[1])}]"
                               for v, ci in zip(q["values"], q["cis"]))
            sd, mean, width = ("n/a" if x != x else fmt(x) for x in (q["sd"], q["mean"], q["ci_width"]))
            n = sum(v is not None for v in q["values"])
            if 0 < n < seeds:
                of = f" ({n} seed{'s' if n > 1 else ''})"
                mean, sd = mean + of, sd + of
            lines.append(f"| {q['label']} | {cells} | {mean} | {sd} | {width} |")
    lines += ["", "## The paper's claims", "",
              "Verdicts: **met** when the 95% interval (of every student seed) clears the bar, **not met** when it "
              "lies wholly on the other side (every seed), **not resolvable at this scale** otherwise; **pending** "
              "while a row or seed it needs is still training (judged so far on the seeds that have finished).", "",
              "| | claim | measured | 95% interval | verdict | why |", "| --- | --- | --- | --- | --- | --- |"]
    for c in doc["claims"]:
        fmt = "{:+.3f}" if c["id"] == "3c" else "{:+.1%}" if c["id"] == "3d" else "{:.3g}"
        ci = " / ".join(f"[{fmt.format(lo)}, {fmt.format(hi)}]" for lo, hi in c.get("cis", []))
        word = c.get("verdict", c["met"])
        if "so_far" in c:
            word = f"{word} (so far: {c['so_far']})"
        lines.append(f"| {c.get('id', '')} | {c['claim']} | {c['value']} | {ci} | {word} | {c.get('reason', '')} |")
    ship = doc["ship"]
    lines += ["", "Shipped as `tiny`: " + (f"the {ship['key']} row" if ship["key"] else "nothing (the bundled model "
              "stays)") + f" ({ship['reason']}).", ""]
    times = doc.get("times")
    if times:
        lines += ["### Wall time of each stage", "",
                  "As measured where the stage ran (see the discussion for the machine and its load). A trained "
                  "stage is timed over the segment that finished it: a stage resumed from a saved state counts only "
                  "the steps after it, and \"whole stage\" is the whole step count at that segment's rate. Pairs, "
                  "the classifier and the report add every segment they ran (the report: rows sampled and scored in "
                  "that call).", "",
                  "| stage | work | timed | wall time | rate | whole stage |", "| --- | --- | --- | ---: | ---: | ---: |"]
        for name, t in times.items():
            if t.get("pending"):
                lines.append(f"| {name} | | | pending | | |")
                continue
            timed = f"{t['done']:,} {t['unit']}s" + (f" (resumed at step {t['resumed_from']:,})"
                                                    if t.get("resumed_from") else "")
            rate = (f"{t['rate']:.2f} {t['unit']}/s" if t["rate"] >= 1 or t["rate"] != t["rate"] else
                    f"{1 / t['rate']:.1f} s/{t['unit']}")
            whole = "n/a" if t["estimate_s"] != t["estimate_s"] else f"{t['estimate_s'] / 60:.1f} min"
            lines.append(f"| {name} | {t['total']:,} {t['unit']}s | {timed} | {t['wall_s'] / 60:.1f} min | {rate} | "
                         f"{whole} |")
        lines.append("")
    if discussion:
        lines += [DISCUSSION, discussion.strip(), ""]
    return "\n".join(lines)
