"""Where the time goes: ``torch.profiler`` tables of the top kernels, per stage and for one whole call.

    python -m benchmarks.profile --subject sd15 --out OUT/profile.txt     (GPU; phase 3 of gpu_run.sh)
    python -m benchmarks.profile --subject small-sd                       (CPU)

Each stage (text encoder, UNet, VAE decode) is profiled on its own, eagerly, with the subject's set-up (on the GPU:
fp16, channels-last, fused QKV), so that the table says which kernels to attack next. CUDA-graph replays hide their
kernels from the profiler, which is why the eager path is profiled; the graphs run the same kernels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from runtime.cli import description
from runtime.files import atomic_write_text

from .subjects import PROMPT, RawStages, make_subject


def profile_table(fn, device: torch.device, rounds: int = 5, rows: int = 15) -> str:
    """Warm up, profile ``rounds`` calls of ``fn`` and return the top-``rows`` table by device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(rounds):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"  # kernels first
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=description(__doc__))
    p.add_argument("--subject", default="sd15" if torch.cuda.is_available() else "small-sd",
                   choices=["tiny", "small-sd", "sd15"])
    p.add_argument("--rounds", type=int, default=5, help="profiled calls per table [5]")
    p.add_argument("--out", default=None, help="also write the tables to this file")
    args = p.parse_args(argv)
    if args.subject == "sd15" and not torch.cuda.is_available():
        print("error: the sd15 subject needs a CUDA GPU", file=sys.stderr)
        return 2
    subject = make_subject(args.subject)
    pipe, raw = subject.pipe, RawStages(subject.pipe)
    device = pipe.device
    eager = type(pipe)(subject.components, device=device, dtype=pipe.dtype, embedding_cache_size=0)
    sections = [f"# torch.profiler: {subject.description}; {args.rounds} calls each, sorted by "
                f"{'CUDA' if device.type == 'cuda' else 'CPU'} time"]
    for title, fn in (("text encoder", raw.encode), ("UNet", raw.unet), ("VAE decode", raw.decode),
                      ("whole call, eager pipeline (prompt -> uint8 image)", lambda: eager(PROMPT, seed=0))):
        text = profile_table(fn, device, args.rounds)
        sections.append(f"## {title}\n{text}")
        print(sections[-1], flush=True)
        if args.out:  # as it goes: a phase killed by its time limit keeps the tables already made
            atomic_write_text(Path(args.out), "\n\n".join(sections) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
