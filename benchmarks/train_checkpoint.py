"""Writing and reading the resumable training state at SD-1.5 size on this machine: before (one ``torch.save``
file written by rank 0, ``torch.load`` of the whole file on resume) and after (``torch.distributed.checkpoint``
through ``train.checkpoint``).

    python -m benchmarks.train_checkpoint [--repeat 2] [--dir /tmp/ckpt-bench] [--out benchmarks/results/...]

The state is what a run without EMA holds: the SD-1.5 UNet's fp32 weights (860M parameters) and AdamW's two moments
and step per parameter, ~10.3 GB (EMA adds 3.4 GB). Each phase runs in a fresh process that first builds the
model and optimizer state (random values), then times only the write or the read; peak RSS is the process's. A
read is what a resume does: the old way loads the whole file into memory and then into the model and a fresh
optimizer; the new way reads each tensor into the model's and the optimizer's own tensors. One process here: with N
ranks DCP writes ~1/N of the bytes on each rank, in parallel (the replicated tensors are de-duplicated), where the old
way wrote everything from rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from runtime.cli import description

GB = 1e9


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from diffusers import UNet2DConditionModel

    from runtime.builders import SD15_SPEC

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=SD15_SPEC.sample_size, in_channels=SD15_SPEC.latent_channels,
            out_channels=SD15_SPEC.latent_channels, block_out_channels=tuple(SD15_SPEC.unet_channels),
            layers_per_block=SD15_SPEC.layers_per_block, cross_attention_dim=SD15_SPEC.text_hidden,
            attention_head_dim=SD15_SPEC.attention_head_dim)
    unet = unet.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02, generator=g)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-6, fused=True)
    return unet, opt


def fill_optimizer(unet: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """AdamW's state as after some steps (random moments), without a backward pass at this size."""
    g = torch.Generator().manual_seed(1)
    for p in unet.parameters():
        opt.state[p] = {"step": torch.tensor(1000.0), "exp_avg": torch.randn(p.shape, generator=g) * 1e-4,
                        "exp_avg_sq": torch.rand(p.shape, generator=g) * 1e-8}


def phase(name: str, folder: Path) -> dict[str, Any]:
    from runtime.files import atomic_write_with
    from train import checkpoint as ckpt
    from train.common import Dist

    unet, opt = build()
    names = [n for n, _ in unet.named_parameters()]
    if name.endswith("save"):
        fill_optimizer(unet, opt)
    t0 = time.perf_counter()
    if name == "old-save":
        state = {"step": 1000, "unet": unet.state_dict(), "optimizer": opt.state_dict()}
        atomic_write_with(folder / "step-00001000.pt", lambda f: torch.save(state, f))
    elif name == "old-load":
        state = torch.load(folder / "step-00001000.pt", map_location="cpu", weights_only=True)
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["optimizer"])
    elif name == "new-save":
        tensors = {f"model.{k}": v for k, v in unet.state_dict().items()}
        for n, p in zip(names, unet.parameters()):
            tensors.update({f"optim.{n}.{k}": v for k, v in opt.state[p].items()})
        ckpt.save(folder / "state", 1000, tensors, {"run": {}}, Dist(), keep=2)
    elif name == "new-load":
        path = ckpt.states(folder / "state")[-1]
        shapes = ckpt.saved_tensors(path)
        tensors = {f"model.{k}": v for k, v in unet.state_dict().items()}
        optim: dict[str, dict[str, torch.Tensor]] = {}
        for key, (shape, dtype) in shapes.items():
            if key.startswith("optim."):
                pname, k = key[len("optim."):].rsplit(".", 1)
                tensors[key] = optim.setdefault(pname, {})[k] = torch.empty(shape, dtype=dtype)
        ckpt.load(path, tensors, Dist())
        index = {n: i for i, n in enumerate(names)}
        groups = opt.state_dict()["param_groups"]
        opt.load_state_dict({"state": {index[n]: s for n, s in optim.items()}, "param_groups": groups})
    seconds = time.perf_counter() - t0
    assert len(opt.state) == len(names)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    return {"phase": name, "seconds": seconds, "peak_rss_gb": peak}


def drop_page_cache() -> bool:
    """Make a read come from the disk, not from the pages the write left in memory (root only)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_checkpoint", description=description(__doc__))
    p.add_argument("--dir", default="/tmp/instaflow-ckpt-bench")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "train-checkpoint.json"))
    p.add_argument("--repeat", type=int, default=2, help="runs of each phase, interleaved (the median is kept)")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    folder = Path(a.dir)
    if a.phase:
        print(json.dumps(phase(a.phase, folder)), flush=True)
        return 0
    from runtime.files import atomic_write_json

    from .subjects import machine_info, now

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    load_at_start = list(os.getloadavg())
    rows = []
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for rep in range(a.repeat):
            for name in ("old-save", "old-load", "new-save", "new-load"):
                if name.endswith("save"):  # each repeat writes afresh
                    shutil.rmtree(folder / "state", ignore_errors=True)
                    (folder / "step-00001000.pt").unlink(missing_ok=True)
                cold = drop_page_cache() if name.endswith("load") else None
                r = subprocess.run([sys.executable, "-m", "benchmarks.train_checkpoint", "--dir", str(folder),
                                    "--phase", name], capture_output=True, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "2"})
                if r.returncode:
                    print(r.stderr[-3000:], file=sys.stderr)
                    return 1
                row = json.loads(r.stdout.strip().splitlines()[-1])
                target = folder / "step-00001000.pt" if name.startswith("old") else folder / "state"
                row["bytes"] = size_of(target)
                row["page_cache_dropped"] = cold
                runs.setdefault(name, []).append(row)
                print(f"{name} ({rep + 1}/{a.repeat}): {row['seconds']:.1f} s, {row['bytes'] / GB:.2f} GB, peak RSS "
                      f"{row['peak_rss_gb']:.1f} GB", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for name, rs in runs.items():  # the median run of each phase, with every run's seconds
        rs = sorted(rs, key=lambda x: x["seconds"])
        rows.append({**rs[len(rs) // 2], "runs_seconds": [x["seconds"] for x in runs[name]]})
    doc = {"checkpoint_io": "SD-1.5 UNet + AdamW (no EMA)", "date": now(), "machine": machine_info(),
           "command": f"python -m benchmarks.train_checkpoint --repeat {a.repeat}", "rows": rows,
           "loadavg_at_start": load_at_start}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, doc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
