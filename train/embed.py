"""``python -m train.embed``: cache the text embeddings of a pairs folder's prompts, for training.

    python -m train.embed --pairs pairs/sd [--ckpt CKPT] [--storage fp32|fp16] [--device cuda]
    torchrun --nproc_per_node 8 -m train.embed --pairs pairs/sd      # shards split across ranks

The text encoder is frozen in every stage (only the UNet trains), so a prompt's embedding never changes during a
run: computing it once per pair, here, takes the text encoder off the training step and lets the loader read the
embeddings with the pairs. Output: ``PAIRS/embeddings/<key>/shard-NNNNN.safetensors`` (``emb``: ``[pairs, tokens,
dim]``, aligned with the pair shard of the same name) and ``manifest.json`` (the text encoder's identity, the
shards' checksums). ``<key>`` identifies the text encoder by its weights and tokenizer, so the cache serves every
checkpoint with the same text encoder (teacher, 2-RF and students share it) and is ignored by any other.

Each prompt is encoded in a call of its own in fp32 (as the trainer encodes when there is no cache), so training with
the cache gives the same result as without, on the same device. ``--storage fp16`` halves the size (at SD size an
embedding is 77 x 768: 118 KB in fp16, ~190 GB for 1.6M pairs) and rounds the embeddings. Killed, the same command
continues; finished side files are kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import save as st_save

from runtime import Pipeline
from runtime.checkpoints import resolve
from runtime.cli import description, run_cli
from runtime.files import atomic_write_bytes, atomic_write_json
from runtime.models import Components, load_components

from .common import TrainError, device_for, init_distributed, parse_args, progress, sha256_bytes
from .pairset import MANIFEST, PairSet


def text_encoder_identity(comps: Components) -> dict[str, Any]:
    """The text encoder's identity: its weights (every byte), its tokenizer and token window."""
    h = hashlib.sha256()
    for name, t in sorted(comps.text_encoder.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    tok = comps.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)).encode())
    h.update(f"max_length:{comps.max_length}".encode())
    digest = h.hexdigest()
    return {"key": digest[:16], "sha256": digest, "class": type(comps.text_encoder).__name__}


def embed(pairs_dir: str | Path, ckpt: str | None = None, storage: str = "fp32", device: str | None = None,
          batch_size: int = 64) -> Path:
    """Make (or finish) the cache; returns its folder."""
    if storage not in ("fp32", "fp16"):
        raise TrainError(f"--storage must be fp32 or fp16, got {storage!r}")
    if batch_size < 1:
        raise TrainError("--batch-size must be >= 1")
    d = init_distributed()
    dev = torch.device(device) if device else device_for(d)
    pairs = PairSet(pairs_dir)
    teacher = pairs.settings["teacher"]
    checkpoint = resolve(ckpt or teacher.get("path") or teacher["name"])
    comps = load_components(checkpoint, device=dev, dtype=torch.float32)
    identity = text_encoder_identity(comps)
    pipe = Pipeline(comps, device=dev, dtype=torch.float32, embedding_cache_size=max(4 * batch_size, 256))
    folder = pairs.embedding_folder(identity)
    manifest = folder / MANIFEST
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        if old.get("pairs") != pairs.digest or old.get("storage") != storage:
            raise TrainError(f"{folder} holds embeddings of other pairs or another --storage "
                             f"({old.get('storage')}); delete it to make them again")
    d.barrier()
    if d.main:
        folder.mkdir(parents=True, exist_ok=True)
    d.barrier()
    keep = torch.float16 if storage == "fp16" else torch.float32
    todo = [k for k in range(d.rank, len(pairs.shards), d.world) if not _side_ok(folder, pairs.shards[k][0])]
    bar = progress(int(sum(pairs.sizes[k] for k in todo)), f"embeddings (rank {d.rank})", d.main, unit="pair")
    for k in todo:
        name = pairs.shards[k][0]
        lo, hi = int(pairs.offsets[k]), int(pairs.offsets[k + 1])
        _, _, texts = pairs.pairs(np.arange(lo, hi))
        rows = []
        for i in range(0, len(texts), batch_size):
            with torch.no_grad():
                rows.append(pipe.encode(texts[i:i + batch_size], separately=True).to("cpu", keep))
            bar.update(len(texts[i:i + batch_size]))
        data = st_save({"emb": torch.cat(rows).contiguous()})
        atomic_write_bytes(folder / name, data)
        atomic_write_bytes(folder / (name + ".sha256"), sha256_bytes(data).encode())
    bar.close()
    d.barrier()
    if d.main:
        shards = {}
        for name, _ in pairs.shards:
            if not _side_ok(folder, name):
                raise TrainError(f"{folder / name} is missing or damaged after embedding; re-run the command")
            shards[name] = (folder / (name + ".sha256")).read_text().strip()
        atomic_write_json(manifest, {"encoder": identity, "pairs": pairs.digest, "storage": storage,
                                     "checkpoint": str(checkpoint.path), "complete": True, "shards": shards})
        print(f"text embeddings of {len(pairs)} pairs in {folder}", flush=True)
    d.barrier()
    return folder


def _side_ok(folder: Path, name: str) -> bool:
    f, side = folder / name, folder / (name + ".sha256")
    return f.is_file() and side.is_file() and sha256_bytes(f.read_bytes()) == side.read_text().strip()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.embed", description=description(__doc__))
    p.add_argument("--pairs", required=True, help="pairs folder from `python -m train.pairs`")
    p.add_argument("--ckpt", default=None, help="checkpoint whose text encoder to use [the pairs' teacher]")
    p.add_argument("--storage", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    return run_cli(lambda: _run(parse_args(p, argv)))


def _run(a: argparse.Namespace) -> None:
    embed(a.pairs, a.ckpt, a.storage, a.device, a.batch_size)


if __name__ == "__main__":
    sys.exit(main())
