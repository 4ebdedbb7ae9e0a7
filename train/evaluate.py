"""``python -m train.evaluate``: FID and CLIP score of a checkpoint over a caption set with reference images.

    python -m train.evaluate --ckpt runs/lpips/model --captions coco/annotations/captions_val2017.json \\
        --images coco/val2017 -o eval/lpips [--steps 1] [--guidance 0] [--batch-size 16] [--num 5000]
    torchrun --nproc_per_node 8 -m train.evaluate ...          # batches split across ranks

The paper's set is COCO-2017 val, 5,000 images with one caption each (FID-5k 23.4 and CLIP 0.304 for InstaFlow-0.9B
at one step; 21.5 / 0.315 for the 2-RF at 25 steps). Layout: the images as they come (``val2017/*.jpg``) and
COCO's ``captions_val2017.json``; the first caption of each image is used, images in id order. A JSON list of
``{"image": FILE, "caption": TEXT}`` or a CSV with ``image`` and ``caption`` columns (files relative to ``--images``)
works too.

* Images: ``--num`` captions, image i from noise seed ``--seed + i`` (the runtime's rule), at the checkpoint's size
  (``--steps``/``--guidance`` default to its own defaults), saved to ``OUT/images/NNNNN.png``. Reference images are
  centre-cropped to a square and resized to the same size.
* FID: torchmetrics' Inception-v3 feature extractor (the FID variant, 2048-d pool features; torch-fidelity's
  weights ``weights-inception-2015-12-05-6726825d.pth``, read from ``--inception``, by default from the torch hub
  cache: offline they cannot be downloaded, so a missing file is one line saying where to put it), Fréchet distance
  of Gaussians fitted in float64 (torchmetrics' formula).
* CLIP score: mean cosine similarity between a generated image and its caption in a CLIP model's embedding space
  (``--clip``: a transformers CLIP folder, by default ``openai/clip-vit-large-patch14`` from the Hugging Face cache);
  torchmetrics' CLIPScore is 100x this. The JSON records which CLIP model was used: compare numbers made with the same.
* Resumable: each batch's features are written (atomically) to ``OUT/features/`` when the batch is done, so a killed
  run continues with the next batch; ``OUT/settings.json`` refuses a resume with other settings (``--force`` starts
  over). Numbers go to ``OUT/metrics.json``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save

from runtime.cli import description, run_cli
from runtime.files import atomic_write_bytes, atomic_write_json

from .common import TrainError, init_distributed, parse_args, progress

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


@dataclass
class Extractors:
    """What the metrics see: ``fid`` maps uint8 images ``[n, 3, H, W]`` to features ``[n, d]``; ``clip_image`` and
    ``clip_text`` map images and captions into one embedding space. ``name`` identifies them in the settings."""

    fid: Callable[[torch.Tensor], torch.Tensor]
    clip_image: Callable[[torch.Tensor], torch.Tensor]
    clip_text: Callable[[list[str]], torch.Tensor]
    name: dict[str, str]


def default_inception_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def inception_extractor(path: str | Path | None, device: torch.device) -> tuple[Callable, str]:
    """torchmetrics' FID Inception (2048-d) with weights from ``path``; one line when they are missing."""
    weights = Path(path) if path else default_inception_path()
    if not weights.is_file():
        raise TrainError(f"FID needs the Inception weights: put {INCEPTION_FILE} into {weights.parent} "
                         f"({INCEPTION_URL}), "
                         "or pass --inception FILE")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError:
        raise TrainError("FID needs torchmetrics and torch-fidelity: pip install 'instaflow-rt[train]'") from None
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=str(weights)).to(device)
    except Exception as e:  # noqa: BLE001 - a damaged file surfaces as pickle/zip/runtime errors from torch.load
        raise TrainError(f"cannot load the Inception weights {weights} ({type(e).__name__}); delete the file and put a "
                         f"good copy there ({INCEPTION_URL})") from None

    def features(images: torch.Tensor) -> torch.Tensor:
        return net(images.to(device)).reshape(len(images), -1).double().cpu()

    return features, f"inception-v3-compat:{weights.name}:{weights.stat().st_size}"


def clip_extractor(name: str | None, device: torch.device) -> tuple[Callable, Callable, str]:
    """A transformers CLIP model from a local folder or the Hugging Face cache (never downloaded)."""
    from transformers import CLIPModel, CLIPProcessor

    source = name or DEFAULT_CLIP
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=True).to(device).eval()
        processor = CLIPProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        raise TrainError(f"CLIP score needs a CLIP model: {source} is not a local folder or in the Hugging Face cache; "
                         f"pass --clip FOLDER (e.g. `huggingface-cli download {DEFAULT_CLIP}` on a machine online, "
                         "then copy the cache)") from None

    @torch.no_grad()
    def image(images: torch.Tensor) -> torch.Tensor:
        pixels = processor(images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt")["pixel_values"]
        out = model.get_image_features(pixel_values=pixels.to(device))
        return _embeds(out).float().cpu()

    @torch.no_grad()
    def text(captions: list[str]) -> torch.Tensor:
        tok = processor(text=captions, return_tensors="pt", padding=True, truncation=True)
        out = model.get_text_features(input_ids=tok["input_ids"].to(device),
                                      attention_mask=tok["attention_mask"].to(device))
        return _embeds(out).float().cpu()

    return image, text, f"clip:{source}"


def _embeds(out: Any) -> torch.Tensor:
    """transformers 5 returns a model output (its ``pooler_output`` projected) from ``get_*_features``; 4.x a
    tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


def load_captions(path: str | Path, images: str | Path, num: int | None) -> list[tuple[Path, str]]:
    """(reference image, caption) pairs from COCO's captions JSON, a JSON list or a CSV (see the module doc)."""
    p, root = Path(path), Path(images)
    if not p.is_file():
        raise TrainError(f"caption file does not exist: {p}")
    if not root.is_dir():
        raise TrainError(f"reference image folder does not exist: {root}")
    try:
        if p.suffix.lower() == ".csv":
            rows = [(r["image"], r["caption"]) for r in csv.DictReader(p.read_text(encoding="utf-8").splitlines())]
        else:
            doc = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(doc, dict) and "annotations" in doc and "images" in doc:  # COCO captions_*.json
                files = {im["id"]: im["file_name"] for im in doc["images"]}
                first: dict[int, str] = {}
                for a in doc["annotations"]:
                    first.setdefault(a["image_id"], a["caption"])
                rows = [(files[i], first[i].strip()) for i in sorted(first)]
            else:
                rows = [(r["image"], r["caption"]) for r in doc]
    except (ValueError, KeyError, TypeError) as e:
        raise TrainError(f"unreadable caption file {p} ({type(e).__name__}: {e}); see `python -m train.evaluate -h` "
                         "for the formats") from None
    if not rows:
        raise TrainError(f"caption file {p} holds no captions")
    if num is not None:
        if num < 1:
            raise TrainError(f"--num must be >= 1, got {num}")
        if num > len(rows):
            raise TrainError(f"--num {num} but {p} has {len(rows)} captions")
        rows = rows[:num]
    missing = [f for f, _ in rows if not (root / f).is_file()]
    if missing:
        raise TrainError(f"{len(missing)} reference image(s) missing from {root}, e.g. {missing[0]}")
    return [(root / f, c) for f, c in rows]


def reference_images(paths: Sequence[Path], size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[n, 3, H, W]``: each image centre-cropped to a square and resized (bicubic) to ``size``."""
    from PIL import Image

    out = []
    for path in paths:
        with Image.open(path) as im:
            im = im.convert("RGB")
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((size[1], size[0]), Image.BICUBIC)
            out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return torch.stack(out)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between feature sets (rows are samples), float64: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), the
    trace of the square root as the sum of the square roots of S1 S2's eigenvalues (torchmetrics' formula)."""
    a, b = a.double(), b.double()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = torch.cov(a.T), torch.cov(b.T)
    c = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * c)


def evaluate(ckpt: str, captions: str | Path, images: str | Path, out: str | Path, *, num: int | None = None,
             steps: int | None = None, guidance: float | None = None, batch_size: int = 16, seed: int = 0,
             extractors: Extractors | None = None, inception: str | None = None, clip: str | None = None,
             device: str | None = None, save_images: bool = True, force: bool = False) -> dict[str, Any]:
    """Generate, extract features batch by batch (resumable), and write ``OUT/metrics.json``; returns it."""
    from runtime import Pipeline

    if batch_size < 1:
        raise TrainError(f"--batch-size must be >= 1, got {batch_size}")
    if steps is not None and steps < 1:
        raise TrainError(f"--steps must be >= 1, got {steps}")
    from runtime.checkpoints import resolve

    rows = load_captions(captions, images, num)
    d = init_distributed()
    checkpoint = resolve(ckpt)
    pipe = Pipeline.from_pretrained(ckpt, device=device)
    if extractors is None:
        fid, fid_name = inception_extractor(inception, pipe.device)
        clip_image, clip_text, clip_name = clip_extractor(clip, pipe.device)
        extractors = Extractors(fid, clip_image, clip_text, {"fid": fid_name, "clip": clip_name})
    try:  # the defaults training wrote into the checkpoint (1 step for students, a few for a 2-RF)
        info = json.loads((Path(checkpoint.path) / "model_index.json").read_text()).get("_instaflow", {})
    except (OSError, ValueError):
        info = {}
    call: dict[str, Any] = {"num_inference_steps": steps or int(info.get("default_steps", 1)), "output_type": "pt"}
    if guidance is not None or "default_guidance" in info:
        call["guidance_scale"] = float(guidance if guidance is not None else info["default_guidance"])
    h, w = pipe.components.default_size
    out = Path(out)
    settings = {"checkpoint": checkpoint.fingerprint(),
                "captions": hashlib.sha256(json.dumps([[str(p.name), c] for p, c in rows]).encode()).hexdigest(),
                "num": len(rows), "seed": seed, "batch_size": batch_size, "size": [h, w], **{
                    k: v for k, v in call.items() if k != "output_type"}, "extractors": extractors.name}
    if force and d.main:
        shutil.rmtree(out, ignore_errors=True)
    d.barrier()
    saved = out / "settings.json"
    if saved.is_file():
        old = json.loads(saved.read_text())
        differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if differ:
            raise TrainError(f"{out} holds an evaluation with other settings ({', '.join(differ)} differ); use another "
                             "-o folder, or --force to start over")
    d.barrier()
    if d.main:
        (out / "features").mkdir(parents=True, exist_ok=True)
        (out / "images").mkdir(exist_ok=True)
        atomic_write_json(saved, settings)
    d.barrier()
    starts = list(range(0, len(rows), batch_size))
    todo = [k for k in range(d.rank, len(starts), d.world) if not (out / "features" / f"batch-{k:05d}.safetensors")
            .is_file()]
    bar = progress(sum(min(batch_size, len(rows) - starts[k]) for k in todo), "evaluate", d.main, unit="image")
    for k in todo:
        start = starts[k]
        part = rows[start:start + batch_size]
        texts = [c for _, c in part]
        with torch.no_grad():
            fake = pipe(texts, seed=seed + start, **call).images.float().cpu()
        fake_u8 = (fake.clamp(0, 1) * 255).round().to(torch.uint8)
        real_u8 = reference_images([p for p, _ in part], (h, w))
        if save_images:
            from .monitor import _png

            for i, img in enumerate(fake):
                atomic_write_bytes(out / "images" / f"{start + i:05d}.png", _png(img))
        img_emb = torch.nn.functional.normalize(extractors.clip_image(fake_u8).float(), dim=-1)
        txt_emb = torch.nn.functional.normalize(extractors.clip_text(texts).float(), dim=-1)
        tensors = {"fake": extractors.fid(fake_u8).double().contiguous(),
                   "real": extractors.fid(real_u8).double().contiguous(),
                   "clip": (img_emb * txt_emb).sum(-1).double().contiguous()}
        atomic_write_bytes(out / "features" / f"batch-{k:05d}.safetensors", save(tensors))
        bar.update(len(part))
    bar.close()
    d.barrier()
    result: dict[str, Any] = {}
    if d.main:
        parts = [load_file(out / "features" / f"batch-{k:05d}.safetensors") for k in range(len(starts))]
        fake_f = torch.cat([p["fake"] for p in parts])
        real_f = torch.cat([p["real"] for p in parts])
        clip_s = torch.cat([p["clip"] for p in parts])
        result = {"fid": frechet_distance(fake_f, real_f), "clip_score": float(clip_s.mean()),
                  "clip_score_x100": float(100 * clip_s.clamp(min=0).mean()), "num": len(rows),
                  "checkpoint": str(ckpt), "captions": str(captions), **{k: v for k, v in settings.items()
                                                                          if k not in ("checkpoint", "captions")}}
        atomic_write_json(out / "metrics.json", result)
        print(json.dumps({k: result[k] for k in ("fid", "clip_score", "num")}), flush=True)
    d.barrier()
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=description(__doc__))
    p.add_argument("--ckpt", required=True, help="checkpoint: alias, hub id or folder")
    p.add_argument("--captions", required=True, help="COCO captions_*.json, a JSON list or a CSV (image, caption)")
    p.add_argument("--images", required=True, help="folder of the reference images")
    p.add_argument("-o", "--output", required=True, help="work folder: images/, features/, metrics.json")
    p.add_argument("--num", type=int, default=None, help="first N captions [all]")
    p.add_argument("--steps", type=int, default=None, help="[the checkpoint's default: 1 for InstaFlow]")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inception", default=None, help=f"FID Inception weights [torch hub cache/{INCEPTION_FILE}]")
    p.add_argument("--clip", default=None, help=f"CLIP model folder or cached hub id [{DEFAULT_CLIP}]")
    p.add_argument("--device", default=None)
    p.add_argument("--no-images", action="store_true", help="do not keep the generated PNGs")
    p.add_argument("--force", action="store_true", help="start over, discarding the work in -o")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda: _run(parse_args(build_parser(), argv)))


def _run(a: argparse.Namespace) -> None:
    evaluate(a.ckpt, a.captions, a.images, a.output, num=a.num, steps=a.steps, guidance=a.guidance,
             batch_size=a.batch_size, seed=a.seed, inception=a.inception, clip=a.clip, device=a.device,
             save_images=not a.no_images, force=a.force)


if __name__ == "__main__":
    sys.exit(main())
