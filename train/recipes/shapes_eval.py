"""The shapes recipe's evaluation: a classifier on real shapes, rows of samples, bootstrap intervals, the claims.

The classifier's penultimate features are the FID space and its heads score prompt accuracy per attribute. Every
row gets the same prompts (the 120 full captions, cycled) and the same noise, so rows are compared pair by pair: a
bootstrap replicate draws one set of sample indices (and one of real images) and uses it for every row, which gives
95% intervals for each number and for differences and ratios between rows. Each row's samples are cached in
``report/rows/``, so a killed report continues row by row.
"""

from __future__ import annotations

import io
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from runtime import flow
from runtime.files import atomic_write_bytes, atomic_write_json, atomic_write_with
from runtime.inputs import parse_device

from ..data import ATTRIBUTES, Label, all_labels, make_dataset
from ..metrics import path_straightness
from ..teacher import Teacher, load_teacher

if TYPE_CHECKING:
    from .shapes import Budget

HERE = Path(__file__).resolve().parent
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
    return clf.eval()


def score(clf: Classifier, images: torch.Tensor, labels: list[Label]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Features and, per attribute, whether the classifier agrees with the prompt (per image). ``images`` in [0, 1]."""
    with torch.no_grad():
        feats, logits = clf(images * 2 - 1)
    correct = {k: (logits[k].argmax(1) == torch.tensor([lb.index()[k] for lb in labels])).numpy() for k in ATTRIBUTES}
    return feats.numpy().astype(np.float64), correct


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


def grid(images: torch.Tensor, path: Path, cols: int = 8) -> None:
    from PIL import Image

    imgs = (images[: cols * 4].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
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


def rows_for(b: Budget) -> list[Row]:
    n, w_t, w = b.ode_steps, b.teacher_guidance, b.guidance
    return [Row("teacher-multi", f"Diffusion teacher, DPM-Solver {n}-step", "teacher", n, w_t),
            Row("teacher-1", "Diffusion teacher, 1-step", "teacher", 1, w_t),
            Row("rf2-multi", f"2-RF, Euler {n}-step", "rf2", n, w),
            Row("rf2-1", "2-RF, 1-step", "rf2", 1, w),
            Row("student_teacher", "Teacher + distill (control), 1-step", "student_teacher", 1, 0.0),
            Row("student", "2-RF + distill (InstaFlow), 1-step", "student", 1, 0.0),
            Row("before", "Bundled `tiny` before this run, 1-step", "before", 1, 0.0)]


#: straightness is measured on these sampler paths: (name, model, kind); "sampling" is the multi-step row's own path
#: (its guidance; recorded while that row samples), "conditional" the same sampler without guidance
STRAIGHTNESS = (("teacher", "teacher", "sampling"), ("teacher", "teacher", "conditional"),
                ("rf2", "rf2", "sampling"), ("rf2", "rf2", "conditional"))


def sample_row(row: Row, model: Path, captions: list[str], z0: torch.Tensor, clf: Classifier, labels: list[Label],
               folder: Path, smoke: bool, straightness: tuple[Path, int] | None = None) -> dict[str, Any]:
    """The row's images for every (caption, noise) -> features and correctness (cached), a grid, latency.

    ``straightness`` (cache file, n): the sampler's path over the first n samples is recorded on the way and its
    straightness saved there (the row's own path: the same noise, prompts, sampler and guidance), so the multi-step
    rows give S without sampling those paths a second time."""
    cache = folder / "rows" / f"{row.key}.npz"
    if cache.is_file():
        d = np.load(cache)
        return {"feats": d["feats"], "correct": {k: d[k] for k in ATTRIBUTES}, "latency_ms": float(d["latency_ms"])}
    # sampled on the GPU when there is one (fp32, like the CPU); the classifier and the statistics stay on the CPU
    teacher = load_teacher(str(model), parse_device(None), steps=row.steps, guidance=row.guidance)
    teacher.pipe.embedding_cache_size = 512
    images, start = [], 0
    if straightness is not None:
        s_cache, start = straightness
        x1, values = solve_with_straightness(teacher, z0[:start], captions[:start])
        images.append(teacher.pipe.decode(x1).cpu())
        atomic_write_with(s_cache, lambda f: np.save(f, values))
    for i in range(start, len(captions), 256):
        images.append(teacher.pipe.decode(teacher.solve(z0[i:i + 256], captions[i:i + 256])).cpu())
    imgs = torch.cat(images)
    grid(imgs, folder / f"grid-{row.key}.png")
    feats, correct = score(clf, imgs, labels)
    times = []
    for _ in range(2 if smoke else 6):  # the first is a warm-up
        t = time.perf_counter()
        teacher.pipe.decode(teacher.solve(z0[:1], captions[:1])).cpu()  # the copy waits for a GPU to finish
        times.append(time.perf_counter() - t)
    latency = 1e3 * statistics.median(times[1:])
    buf = io.BytesIO()
    np.savez(buf, feats=feats, latency_ms=latency, **correct)
    atomic_write_bytes(cache, buf.getvalue())
    return {"feats": feats, "correct": correct, "latency_ms": latency}


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


def bootstrap(real: np.ndarray, rows: dict[str, dict[str, Any]], s: dict[str, np.ndarray], reps: int,
              seed: int = 0) -> dict[str, Any]:
    """Replicates of every row's FID and accuracies (one index draw shared by all rows, paired) and of every S."""
    rng = np.random.default_rng(seed)
    n, n_real = len(next(iter(rows.values()))["feats"]), len(real)
    n_s = len(next(iter(s.values())))
    fid = {k: np.empty(reps) for k in rows}
    acc = {k: {a: np.empty(reps) for a in ATTRIBUTES} for k in rows}
    st = {k: np.empty(reps) for k in s}
    for r in range(reps):
        idx, ridx, sidx = rng.integers(n, size=n), rng.integers(n_real, size=n_real), rng.integers(n_s, size=n_s)
        real_g = gaussian(real[ridx])  # once per replicate, shared by the rows
        for k, row in rows.items():
            fid[k][r] = frechet_of(real_g, gaussian(row["feats"][idx]))
            for a in ATTRIBUTES:
                acc[k][a][r] = row["correct"][a][idx].mean()
        for k, v in s.items():
            st[k][r] = v[sidx].mean()
    return {"fid": fid, "acc": acc, "s": st}


def claims(doc: dict[str, Any], boot: dict[str, Any], bundled: str) -> list[dict[str, Any]]:
    """The paper's five claims, each with its measured value, 95% interval and verdict."""
    fid, fid_b, s_b = doc["fid"], boot["fid"], boot["s"]
    s = {k: v["value"] for k, v in doc["straightness"].items()}

    def contrast(weights: dict[str, float]) -> tuple[float, list[float]]:
        """sum_k w_k FID_k with its interval (replicates paired: the same draw for every row)."""
        point = sum(w * fid[k] for k, w in weights.items())
        return point, centred_interval(point, sum(w * fid_b[k] for k, w in weights.items()))

    out = []
    ratio = s["rf2/sampling"] / s["teacher/sampling"]
    ci = interval(s_b["rf2/sampling"] / s_b["teacher/sampling"])
    out.append({"claim": "S(2-RF) far below S(teacher): S ratio < 0.5", "value": f"S ratio {ratio:.3f}", "ci": ci,
                "met": ci[1] < 0.5})
    c, ci = contrast({"teacher-1": 0.5, "rf2-1": -1.0})
    out.append({"claim": "2-RF at one step far better than the teacher at one step: FID(2-RF) < 0.5 FID(teacher), "
                         "margin 0.5 FID(teacher) - FID(2-RF) > 0",
                "value": f"margin {c:+.1f} (FID ratio {fid['rf2-1'] / fid['teacher-1']:.3f})", "ci": ci,
                "met": ci[0] > 0})
    c, ci = contrast({"student": 1.0, "student_teacher": -1.0})
    out.append({"claim": "2-RF + distill better than teacher + distill: FID difference < 0",
                "value": f"FID difference {c:+.1f}", "ci": ci, "met": ci[1] < 0})
    c, ci = contrast({"teacher-multi": 1.5, "student": -1.0})
    out.append({"claim": "the student within 1.5x of its teacher's multi-step FID (the diffusion teacher, 25 steps): "
                         "margin 1.5 FID(teacher) - FID(student) >= 0",
                "value": f"margin {c:+.1f} (FID ratio {fid['student'] / fid['teacher-multi']:.3f})", "ci": ci,
                "met": ci[0] >= 0})
    need = {"color": 0.95, "position": 0.95, "shape": 0.85, "size": 0.85}
    lows = {a: interval(boot["acc"][bundled][a])[0] for a in need}
    out.append({"claim": "the bundled one-step model follows colour and position >= 95%, shape and size >= 85% "
                         "(whole interval)",
                "value": ", ".join(f"{a} {doc['acc'][bundled][a]:.1%}" for a in need),
                "ci": [min(lows[a] - need[a] for a in need)] * 2, "met": all(lows[a] >= need[a] for a in need)})
    return out


def ship_decision(doc: dict[str, Any], boot: dict[str, Any]) -> dict[str, Any]:
    """The best one-step student by FID, shipped when its FID is below the bundled model's (paired 95% interval of
    the difference entirely below 0)."""
    best = min(("student", "student_teacher"), key=lambda k: doc["fid"][k])
    ci = centred_interval(doc["fid"][best] - doc["fid"]["before"], boot["fid"][best] - boot["fid"]["before"])
    better = ci[1] < 0
    reason = (f"{best}: FID {doc['fid'][best]:.2f} vs the bundled model's {doc['fid']['before']:.2f}, "
              f"difference 95% interval [{ci[0]:+.2f}, {ci[1]:+.2f}]")
    return {"key": best if better else None, "row": best, "reason": reason}


# ------------------------------------------------------------------------------------------------------ report
def stage_report(out: Path, b: Budget, models: dict[str, Path], clf: Classifier, smoke: bool
                 ) -> tuple[Path, dict[str, Any]]:
    report = out / "report"
    (report / "rows").mkdir(parents=True, exist_ok=True)
    labels = [all_labels()[i % 120] for i in range(b.eval_n)]
    captions = [lb.caption for lb in labels]
    real_imgs, real_labels = make_dataset(b.eval_n, seed=20)
    real, real_correct = score(clf, (to_tensor(real_imgs) + 1) / 2, real_labels)
    floor = frechet(real, score(clf, (to_tensor(make_dataset(b.eval_n, seed=21)[0]) + 1) / 2, real_labels)[0])
    z0 = torch.randn((b.eval_n, 4, 8, 8), generator=torch.Generator().manual_seed(123))
    specs = rows_for(b)
    guidance = {"teacher": b.teacher_guidance, "rf2": b.guidance}
    n = min(b.straightness_n, b.eval_n)

    def s_cache(name: str, kind: str) -> Path:
        return report / "rows" / f"straightness-{name}-{kind}.npy"

    rows = {}
    for row in specs:
        print(f"report: {row.title}", flush=True)
        # the multi-step rows sample exactly the "sampling" straightness paths: recorded on the way
        own = (row.model in guidance and row.steps == b.ode_steps and row.guidance == guidance[row.model]
               and not s_cache(row.model, "sampling").is_file())
        rows[row.key] = sample_row(row, models[row.model], captions, z0, clf, labels, report, smoke,
                                   (s_cache(row.model, "sampling"), n) if own else None)
    s = {}
    for name, model, kind in STRAIGHTNESS:
        cache = s_cache(name, kind)
        if not cache.is_file():  # the conditional paths (and a sampling path whose row was cached without it)
            values = path_s(models[model], b.ode_steps, guidance[name] if kind == "sampling" else 1.0, captions[:n],
                            z0[:n])
            atomic_write_with(cache, lambda f, v=values: np.save(f, v))
        s[f"{name}/{kind}"] = np.load(cache)
    boot = bootstrap(real, rows, s, b.bootstrap)
    fid = {k: frechet(real, v["feats"]) for k, v in rows.items()}
    doc: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "smoke": smoke, "budget": b.__dict__, "fid_floor": floor,
        "real_accuracy": {a: float(v.mean()) for a, v in real_correct.items()},
        "rows": [{"key": r.key, "row": r.title, "nfe": r.nfe, "latency_ms": rows[r.key]["latency_ms"],
                  "grid": f"grid-{r.key}.png"} for r in specs],
        "fid": fid,
        "fid_ci": {k: centred_interval(fid[k], v) for k, v in boot["fid"].items()},
        "acc": {k: {a: float(v["correct"][a].mean()) for a in ATTRIBUTES} for k, v in rows.items()},
        "acc_ci": {k: {a: interval(v) for a, v in accs.items()} for k, accs in boot["acc"].items()},
        "straightness": {k: {"value": float(v.mean()), "ci": interval(boot["s"][k]),
                             "guidance": guidance[k.split("/")[0]] if k.endswith("sampling") else 1.0}
                         for k, v in s.items()},
    }
    doc["ship"] = ship_decision(doc, boot)
    doc["claims"] = claims(doc, boot, doc["ship"]["key"] or "before")
    atomic_write_json(report / "results.json", doc)
    (report / "SHAPES.md").write_text(render_report(doc))
    return report, doc


def _pct(v: float, ci: list[float]) -> str:
    return f"{v:.1%} [{ci[0]:.1%}, {ci[1]:.1%}]"


def render_report(doc: dict[str, Any], discussion: str = "") -> str:
    b = doc["budget"]
    lines = [
        "# InstaFlow at small scale: shapes", "",
        f"Regenerated by `python -m train.recipes.shapes` on {doc['date']}"
        + (" (SMOKE run: numbers meaningless)" if doc["smoke"] else "") + ". "
        "The teacher is a text-conditioned diffusion UNet in Stable Diffusion's role (epsilon prediction, SD's "
        f"scaled-linear schedule), sampled with DPM-Solver, {b['ode_steps']} steps, guidance {b['teacher_guidance']}; "
        f"the 2-RF is trained by reflow on {b['pairs']} of its pairs from its weights; the InstaFlow student is "
        f"distilled from {b['pairs']} 2-RF pairs (Euler {b['ode_steps']}, guidance {b['guidance']}); the control "
        "student is distilled from the teacher's own pairs with the same budget (latent L2 loss for both: LPIPS "
        "weights cannot be had offline).", "",
        f"Every row: {b['eval_n']} images, the 120 full captions cycled, the same noise for every row. FID is "
        "computed in the 128-d feature space of a small CNN trained on real shapes (its accuracy on real images: "
        + ", ".join(f"{k} {v:.1%}" for k, v in doc["real_accuracy"].items())
        + f"); two independent sets of real images are FID {doc['fid_floor']:.2f} apart (the floor). Accuracies are "
        "that classifier's agreement with the prompt. Brackets: 95% bootstrap intervals "
        f"({b['bootstrap']} replicates; real images and samples resampled, the same draw for every row, so "
        "differences between rows are paired): percentile intervals for accuracies and S; for FIDs and their "
        "contrasts the replicates' 2.5-97.5 percentile spread around the estimate, since FID's replicates sit above "
        "it (sampling noise adds to FID, and drawing with repeats adds more). "
        "Latency: sampler + decode, batch 1, this CPU (2 cores), median.", "",
        "| model | NFE | latency ms | FID | colour | shape | position | size | samples |",
        "| --- | ---: | ---: | --- | --- | --- | --- | --- | --- |"]
    for r in doc["rows"]:
        k = r["key"]
        fid, ci = doc["fid"][k], doc["fid_ci"][k]
        accs = " | ".join(_pct(doc["acc"][k][a], doc["acc_ci"][k][a]) for a in ("color", "shape", "position", "size"))
        lines.append(f"| {r['row']} | {r['nfe']} | {r['latency_ms']:.1f} | {fid:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] | "
                     f"{accs} | [grid]({r['grid']}) |")
    lines += ["", f"Straightness S (0 = straight) of each sampler's own {b['ode_steps']}-step path, "
              f"{b['straightness_n']} samples; the diffusion teacher's DPM-Solver path is mapped to the flow's "
              "coordinates (x / (sqrt(a) + sqrt(1 - a)) at time sqrt(a) / (sqrt(a) + sqrt(1 - a))) and measured like "
              "the flow's Euler path:", "",
              "| model | guidance | S |", "| --- | ---: | --- |"]
    names = {"teacher": "Diffusion teacher (DPM-Solver PF-ODE)", "rf2": "2-RF (Euler)"}
    for k, v in doc["straightness"].items():
        lines.append(f"| {names[k.split('/')[0]]} | {v['guidance']:g} | {v['value']:.4f} "
                     f"[{v['ci'][0]:.4f}, {v['ci'][1]:.4f}] |")
    lines += ["", "## The paper's claims", "", "| claim | measured | 95% interval | verdict |",
              "| --- | --- | --- | --- |"]
    for c in doc["claims"]:
        ci = "" if c["claim"].startswith("the bundled") else f"[{c['ci'][0]:.3g}, {c['ci'][1]:.3g}]"
        lines.append(f"| {c['claim']} | {c['value']} | {ci} | {'met' if c['met'] else 'not met'} |")
    ship = doc["ship"]
    lines += ["", "Shipped as `tiny`: " + (f"the {ship['key']} row" if ship["key"] else "nothing (the bundled model "
              "stays)") + f" ({ship['reason']}).", ""]
    if discussion:
        lines += [DISCUSSION, discussion.strip(), ""]
    return "\n".join(lines)
