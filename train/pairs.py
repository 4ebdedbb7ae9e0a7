"""``python -m train.pairs``: reflow/distillation pairs (X0 noise, X1 = ODE[teacher](X0 | prompt)) in shards.

    python -m train.pairs --teacher sd1.5 --prompts captions.txt -o pairs/ --num-pairs 10000 [--batch-size 16]
        [--seed 0] [--steps 25] [--guidance 5.0] [--height H --width W] [--shard-size 1000] [--storage fp16]

Output: ``shard-00000.safetensors`` ... (``x0``, ``x1``, ``prompt_index``), each with a ``.sha256`` sidecar written
after it, ``prompts.json`` (the prompt texts) and ``manifest.json`` (teacher identity, settings, shards).
Pair i's noise and prompt depend on (seed, i) alone, so resuming, another batch size or another number of
processes (``torchrun --nproc_per_node N``; shards are split across ranks) give the same pairs. Killed at any
moment, the same command continues: whole shards are kept, a half-written shard never appears (temporary file,
then rename), and a shard whose checksum fails is made again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import save as st_save

from runtime.cli import description, run_cli
from runtime.pipeline import parse_dtype

from runtime.files import atomic_write_bytes, atomic_write_json

from .common import (TrainError, batches, device_for, init_distributed,
                     load_prompts, parse_args, progress, sha256_bytes)
from .teacher import load_teacher

from .pairset import MANIFEST, read_manifest


def pair_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The noise of pair ``index``: a function of (seed, index) alone."""
    g = torch.Generator().manual_seed((seed % 2**32) * 2**31 + index)
    return torch.randn(shape, generator=g, dtype=torch.float32)


def prompt_order(seed: int, n_prompts: int) -> np.ndarray:
    """Pair i uses prompt ``order[i % n_prompts]``: a seeded permutation, so every prompt is used evenly."""
    return np.random.default_rng(seed).permutation(n_prompts)


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def shard_ok(folder: Path, k: int) -> bool:
    """A shard counts as done when it exists and matches the checksum in its sidecar."""
    f, side = folder / shard_name(k), folder / (shard_name(k) + ".sha256")
    return f.is_file() and side.is_file() and sha256_bytes(f.read_bytes()) == side.read_text().strip()


def generate(teacher_ckpt: str, prompts_file: str, out: str | Path, num_pairs: int = 1000, batch_size: int = 16,
             seed: int = 0, steps: int | None = None, guidance: float | None = None, height: int | None = None,
             width: int | None = None, shard_size: int = 1000, storage: str = "fp32", device: str | None = None,
             dtype: str | None = None) -> dict[str, Any]:
    """Generate (or finish) a pairs folder; returns its manifest, with ``new_pairs``: how many pairs this call made
    on this rank (0 when the folder was complete). See the module docstring."""
    if num_pairs < 1 or batch_size < 1 or shard_size < 1:
        raise TrainError("--num-pairs, --batch-size and --shard-size must be >= 1")
    if storage not in ("fp32", "fp16"):
        raise TrainError(f"--storage must be fp32 or fp16, got {storage!r}")
    d = init_distributed()
    dev = torch.device(device) if device else device_for(d)
    prompts = load_prompts(prompts_file)
    teacher = load_teacher(teacher_ckpt, dev, parse_dtype(dtype, dev), steps, guidance)
    teacher.pipe.embedding_cache_size = max(teacher.pipe.embedding_cache_size, 4 * batch_size + 1)
    h, w = teacher.pipe.check_size(height, width)
    c = teacher.pipe.components
    shape = (c.latent_channels, h // c.vae_scale_factor, w // c.vae_scale_factor)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"output path is a file: {out}")
    settings = {"teacher": teacher.identity, "num_pairs": num_pairs, "seed": seed, "shard_size": shard_size,
                "latent_shape": list(shape), "height": h, "width": w, "storage": storage,
                "prompts_sha256": sha256_bytes(json.dumps(prompts).encode())}
    manifest = out / MANIFEST
    if manifest.is_file():
        old = read_manifest(out)["settings"]
        diff = sorted(k for k in settings if old.get(k) != settings[k])
        if diff:
            raise TrainError(f"{out} holds pairs made with other settings ({', '.join(diff)} differ: another "
                             "teacher, prompts or latent shape?); use another -o folder")
    d.barrier()
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "prompts.json", prompts)
        atomic_write_json(manifest, {"settings": settings, "complete": False, "shards": {}})
    d.barrier()
    order = prompt_order(seed, len(prompts))
    n_shards = -(-num_pairs // shard_size)
    todo = [k for k in range(d.rank, n_shards, d.world) if not shard_ok(out, k)]
    total = sum(min(shard_size, num_pairs - k * shard_size) for k in todo)
    bar = progress(total, f"pairs (rank {d.rank})", enabled=d.main, unit="pair")
    start = time.perf_counter()
    for k in todo:
        indices = list(range(k * shard_size, min((k + 1) * shard_size, num_pairs)))
        x0s, x1s = [], []
        for idx in batches(indices, batch_size):
            noise = torch.stack([pair_noise(seed, i, shape) for i in idx])
            x1 = teacher.solve(noise, [prompts[order[i % len(prompts)]] for i in idx])
            x0s.append(noise)
            x1s.append(x1.float().cpu())  # one device->host copy per batch, after the ODE loop
            bar.update(len(idx))
        keep = torch.float16 if storage == "fp16" else torch.float32
        data = st_save({"x0": torch.cat(x0s).to(keep), "x1": torch.cat(x1s).to(keep),
                        "prompt_index": torch.tensor([int(order[i % len(prompts)]) for i in indices])},
                       metadata={"first_pair": str(indices[0])})
        atomic_write_bytes(out / shard_name(k), data)
        atomic_write_bytes(out / (shard_name(k) + ".sha256"), sha256_bytes(data).encode())
    bar.close()
    rate = total / max(time.perf_counter() - start, 1e-9)
    d.barrier()
    doc = read_manifest(out)
    if d.main:
        shards = {}
        for k in range(n_shards):
            if not shard_ok(out, k):
                raise TrainError(f"shard {k} is missing or corrupted after generation; re-run the command")
            shards[shard_name(k)] = (out / (shard_name(k) + ".sha256")).read_text().strip()
        doc = {"settings": settings, "complete": True, "shards": shards}
        atomic_write_json(manifest, doc)
        print(f"{num_pairs} pairs in {out} ({total} new, {rate:.1f} pairs/s on rank 0)", flush=True)
    d.barrier()
    return {**doc, "new_pairs": total}


def write_pairs(folder: str | Path, x0: torch.Tensor, x1: torch.Tensor, prompt_index: torch.Tensor,
                prompts: list[str], settings: dict[str, Any], shard_size: int = 1000) -> None:
    """Write pairs that come from elsewhere (e.g. data latents for a 1-rectified flow) in the same format."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "prompts.json", prompts)
    shards = {}
    for k in range(-(-x0.shape[0] // shard_size)):
        sl = slice(k * shard_size, (k + 1) * shard_size)
        data = st_save({"x0": x0[sl].contiguous(), "x1": x1[sl].contiguous(),
                        "prompt_index": prompt_index[sl].contiguous()})
        atomic_write_bytes(folder / shard_name(k), data)
        atomic_write_bytes(folder / (shard_name(k) + ".sha256"), sha256_bytes(data).encode())
        shards[shard_name(k)] = sha256_bytes(data)
    atomic_write_json(folder / MANIFEST, {"settings": settings, "complete": True, "shards": shards})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.pairs", description=description(__doc__))
    p.add_argument("--recipe", default=None,
                   help="FILE:TABLE of settings (e.g. train/recipes/instaflow_sd15.toml:pairs-sd); flags override it")
    p.add_argument("--teacher", default=None, help="checkpoint: alias, hub id or folder (diffusion or flow)")
    p.add_argument("--prompts", required=True, help="text file (one per line), JSON or CSV of captions")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--num-pairs", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="ODE steps [25]")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale [5.0 diffusion, 1.5 flow]")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--storage", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="teacher compute dtype [fp16 on cuda, fp32 on cpu]")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda: _run(parse_args(build_parser(), argv)))


def _run(a: argparse.Namespace) -> None:
    if not a.teacher:
        raise TrainError("--teacher is required (a checkpoint: alias, hub id or folder), on the command line or in "
                         "the recipe")
    generate(a.teacher, a.prompts, a.output, a.num_pairs, a.batch_size, a.seed, a.steps, a.guidance, a.height,
             a.width, a.shard_size, a.storage, a.device, a.dtype)


if __name__ == "__main__":
    sys.exit(main())
