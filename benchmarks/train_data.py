"""How fast the training data path delivers SD-1.5-shaped pairs on this machine, with and without the background
prefetch and the text-embedding cache.

    python -m benchmarks.train_data [--pairs 2048] [--batch 16] [--step-ms 25 250] [--out benchmarks/results/...]

A pairs folder of SD-1.5 shapes is written once (latents 4x64x64 in fp16, shards of 64 pairs, so that the loader
meets several groups of 8 shards, and a side file of cached text embeddings, 77x768 in fp16, per shard), then read
through ``train.pairset.Loader`` as a rank would read it, micro-batch after micro-batch, from a cold page cache each
time (as the first epoch reads from disk), each configuration ``--repeat`` times, interleaved (median):

* ``read``: the loader alone (shard reads, checksums, gathering the batch), no training work;
* ``read + step``: each micro-batch is followed by ``--step-ms`` of waiting, the stand-in for a GPU's training step
  (which leaves the CPU free); with prefetch the reads overlap it;
* ``encode``: the text encoder's cost that the cache removes: SD-1.5's CLIP text encoder (123M parameters, random
  weights) encoding one prompt per call, as the trainer does without a cache, on this CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from runtime.cli import description


def make_pairs(folder: Path, n: int, shard: int) -> None:
    from safetensors.torch import save as st_save

    from runtime.files import atomic_write_bytes, atomic_write_json
    from train.common import sha256_bytes
    from train.pairs import write_pairs
    from train.pairset import EMBEDDINGS, MANIFEST, PairSet

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 4, 64, 64, generator=g).half()
    x1 = torch.randn(n, 4, 64, 64, generator=g).half()
    prompts = [f"prompt number {i}" for i in range(n)]
    settings = {"teacher": {"name": "bench", "kind": "flow", "fingerprint": "bench"}, "latent_shape": [4, 64, 64],
                "num_pairs": n, "storage": "fp16"}
    write_pairs(folder, x0, x1, torch.arange(n), prompts, settings, shard_size=shard)
    ps = PairSet(folder)
    identity = {"key": "bench", "sha256": "bench", "class": "CLIPTextModel"}
    emb_dir = folder / EMBEDDINGS / "bench"
    emb_dir.mkdir(parents=True)
    shards = {}
    for k, (name, _) in enumerate(ps.shards):
        data = st_save({"emb": torch.randn(int(ps.sizes[k]), 77, 768, generator=g).half()})
        atomic_write_bytes(emb_dir / name, data)
        shards[name] = sha256_bytes(data)
    atomic_write_json(emb_dir / MANIFEST, {"encoder": identity, "pairs": ps.digest, "storage": "fp16",
                                           "complete": True, "shards": shards})


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def run_loader(folder: Path, batch: int, batches: int, prefetch: int, cached: bool, step_s: float) -> float:
    """Pairs per second over ``batches`` micro-batches."""
    from train.pairset import Loader, PairSet, PairStream

    ps = PairSet(folder)
    if cached:
        assert ps.use_embeddings({"key": "bench", "sha256": "bench", "class": "CLIPTextModel"}) == "bench"
    t0 = time.perf_counter()
    loader = Loader(ps, PairStream(ps, batch, seed=0), prefetch=prefetch)
    try:
        for _ in range(batches):
            _, _, _, emb = next(loader)
            assert (emb is not None) == cached
            if step_s:
                time.sleep(step_s)
    finally:
        loader.close()
    return batches * batch / (time.perf_counter() - t0)


def encode_rate(prompts: int) -> float:
    """Prompts per second of SD-1.5's text encoder (random weights), one prompt per call, fp32, this CPU."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from runtime.builders import SD15_SPEC

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=SD15_SPEC.text_vocab, hidden_size=SD15_SPEC.text_hidden,
                         intermediate_size=SD15_SPEC.text_intermediate, num_hidden_layers=SD15_SPEC.text_layers,
                         num_attention_heads=SD15_SPEC.text_heads, max_position_embeddings=SD15_SPEC.max_length)
    model = CLIPTextModel(cfg).eval()
    ids = torch.randint(0, SD15_SPEC.text_vocab, (prompts, SD15_SPEC.max_length))
    with torch.no_grad():
        model(ids[:1])  # warm-up
        t0 = time.perf_counter()
        for i in range(prompts):
            model(ids[i:i + 1])
        return prompts / (time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_data", description=description(__doc__))
    p.add_argument("--pairs", type=int, default=2048)
    p.add_argument("--shard", type=int, default=64, help="pairs per shard (the loader reads groups of 8 shards)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--step-ms", type=float, nargs="+", default=[25.0, 250.0])
    p.add_argument("--prefetch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default="/tmp/instaflow-data-bench")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "train-data.json"))
    a = p.parse_args(argv)
    from runtime.files import atomic_write_json

    from .subjects import machine_info, now

    folder = Path(a.dir)
    shutil.rmtree(folder, ignore_errors=True)
    load_at_start = list(os.getloadavg())
    make_pairs(folder, a.pairs, a.shard)
    batches = a.pairs // a.batch
    rows: list[dict[str, Any]] = []
    try:
        run_loader(folder, a.batch, 4, 0, True, 0.0)  # warm-up: imports, first allocations
        for step_ms in (0.0, *a.step_ms):
            for cached in (False, True):
                rates: dict[int, list[float]] = {0: [], a.prefetch: []}
                for _ in range(a.repeat):  # interleaved: both see the same moments of the shared machine
                    for prefetch in rates:
                        cold = drop_page_cache()
                        rates[prefetch].append(run_loader(folder, a.batch, batches, prefetch, cached,
                                                          step_ms / 1000))
                for prefetch, rs in rates.items():
                    rows.append({"step_ms": step_ms, "cached_embeddings": cached, "prefetch": prefetch,
                                 "pairs_per_s": float(np.median(rs)), "runs": rs, "cold_cache": cold})
                    print(f"step {step_ms:.0f} ms, cached embeddings {cached}, prefetch {prefetch}: "
                          f"{np.median(rs):.1f} pairs/s (median of {len(rs)})", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    enc = encode_rate(32)
    print(f"text encoder (SD-1.5 CLIP, one prompt per call, CPU): {enc:.1f} prompts/s", flush=True)
    doc = {"data_path": "SD-1.5-shaped pairs", "date": now(), "machine": machine_info(),
           "command": f"python -m benchmarks.train_data --pairs {a.pairs} --shard {a.shard} --batch {a.batch} "
                      f"--step-ms {' '.join(f'{x:g}' for x in a.step_ms)} --repeat {a.repeat}",
           "pairs": a.pairs, "shard": a.shard, "batch": a.batch, "rows": rows, "encode_prompts_per_s": enc,
           "loadavg_at_start": load_at_start, "bytes_per_pair": {"latents": 2 * 4 * 64 * 64 * 2,
                                                                  "embedding": 77 * 768 * 2}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, doc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
