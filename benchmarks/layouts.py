"""Which memory layout (and whether ``torch.compile``) makes the one-step pipeline fastest, measured side by side.

    python -m benchmarks.layouts --out OUT/layouts.json          (GPU: sd15 subject, CUDA graphs)
    python -m benchmarks.layouts --subject small-sd --rounds 3    (CPU, eager)

Each variant sets the UNet's and the VAE's memory format (NCHW or channels-last), optionally compiles both, and times
the whole call (prompt -> uint8 image on the host) on the same weights, one variant after the other in one process;
the first variant is timed again at the end, which shows the spread. The table printed last is what the defaults
are chosen from.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from runtime.cli import description
from runtime import Pipeline
from runtime.files import atomic_write_json

from .subjects import PROMPT, machine_info, make_subject, now

#: name -> (UNet channels-last, VAE channels-last, torch.compile)
VARIANTS = {
    "unet_cl+vae_cl": (True, True, False),
    "unet_cl+vae_nchw": (True, False, False),
    "unet_nchw+vae_nchw": (False, False, False),
    "unet_nchw+vae_cl": (False, True, False),
    # one compiled variant only: torch.compile's code for a module assumes the parameter layout it was compiled
    # with, so a second compiled variant after an in-place format change fails (as it would for a user)
    "compiled unet_cl+vae_nchw": (True, False, True),
    "unet_cl+vae_cl (again)": (True, True, False),
}


def _fmt(cl: bool) -> torch.memory_format:
    return torch.channels_last if cl else torch.contiguous_format


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.layouts", description=description(__doc__))
    p.add_argument("--subject", default="sd15" if torch.cuda.is_available() else "small-sd",
                   choices=["tiny", "small-sd", "sd15"])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--out", default=None, help="write the medians (JSON) here, after every variant")
    args = p.parse_args(argv)
    if args.subject == "sd15" and not torch.cuda.is_available():
        print("error: the sd15 subject needs a CUDA GPU", file=sys.stderr)
        return 2
    subject = make_subject(args.subject)  # sd15: fused QKV already applied to its modules
    comps, device, dtype = subject.components, subject.pipe.device, subject.pipe.dtype
    graphs = device.type == "cuda"
    results: dict[str, dict] = {}
    pipes = []  # kept alive: a dropped pipeline's graph pool would be freed under the next one's timing
    for name, (unet_cl, vae_cl, compile_) in VARIANTS.items():
        if compile_ and args.no_compile:
            continue
        comps.unet.to(memory_format=_fmt(unet_cl))
        comps.vae.to(memory_format=_fmt(vae_cl))
        t0 = time.perf_counter()
        pipe = Pipeline(comps, device=device, dtype=dtype, cuda_graph=graphs, compile=compile_,
                        embedding_cache_size=0)
        pipe(PROMPT, seed=0)  # captures (and compiles) here
        setup = time.perf_counter() - t0
        times = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            pipe(PROMPT, seed=0)
            times.append(time.perf_counter() - t)
        results[name] = {"median_s": statistics.median(times), "min_s": min(times), "setup_s": setup}
        pipes.append(pipe)  # its graphs hold the old buffers: the next variant changes the formats in place
        print(f"{name:28s} median {results[name]['median_s'] * 1e3:7.2f} ms  (set-up {setup:.0f} s)", flush=True)
        if args.out:
            atomic_write_json(Path(args.out), {"date": now(), "machine": machine_info(), "rounds": args.rounds,
                                               "command": " ".join(["python -m benchmarks.layouts", *sys.argv[1:]]),
                                               "subject": subject.description, "variants": results})
    print(f"\n{subject.description}\n{'variant':28s} {'median ms':>10s} {'min ms':>8s}")
    for name, r in results.items():
        print(f"{name:28s} {r['median_s'] * 1e3:10.2f} {r['min_s'] * 1e3:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
